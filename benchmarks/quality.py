"""Detection quality per unit of budget: the exported detector of a search against a plain
nearest-neighbour baseline on frozen features, measured in the same run.

For each product:
  (a) the baseline, which trains nothing: EfficientNet-Lite0 (packaged ImageNet weights)
      stride-8 and stride-16 features (blocks.2, blocks.4), 3x3 average pooled, the
      coarser map upsampled to the finer grid, a random 20,000-patch bank drawn from all
      of train/good, each test patch scored by its distance to the nearest bank patch,
      image score = max over patches. It runs at the image size the exported detector
      uses;
  (b) the full main job ``cli.py search --category C --budget B`` (ensemble, export), and
      the exported bundle's test metrics from its manifest (computed after the search,
      never used by it).
Printed: test image AUROC and AUPRO of both and the difference. With ``--random-search``
(c) one product is searched again with random sampling and no early stopping at twice
the budget, and the two exported detectors are printed side by side.

    python benchmarks/quality.py --budget 10m
    python benchmarks/quality.py --budget 10m --categories screw --random-search screw
    python benchmarks/quality.py --baseline-only --image-size 256

``--per-method`` keeps the older per-method table (``cli.py train`` of every method at
its defaults under a wall-clock limit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE_BANK = 20_000
BASELINE_BACKBONE = "efficientnet_lite0"
BASELINE_LAYERS = ("blocks.2", "blocks.4")


@torch.no_grad()
def baseline_patch_features(extractor: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """N x C x h x w: 3x3-averaged layer features, the coarser upsampled to the finer grid."""
    from automl_ad.data.types import to_float

    chunks = []
    for start in range(0, len(images), 16):
        maps = extractor(to_float(images[start : start + 16]))
        size = maps[0].shape[-2:]
        pooled = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in maps]
        chunks.append(torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear",
                                                                                align_corners=False)
                                 for p in pooled], dim=1))
    return torch.cat(chunks)


@torch.no_grad()
def nearest_neighbour_baseline(data_root: Path, category: str, image_size: int, seed: int) -> dict:
    """Test metrics of the plain baseline (module docstring, (a))."""
    from automl_ad.methods.backbones import create_backbone
    from automl_ad.data.dataset import load_category
    from automl_ad.evaluation.metrics import evaluate

    began = time.perf_counter()
    data = load_category(data_root, category, image_size, seed=seed)
    extractor = create_backbone(BASELINE_BACKBONE, layers=list(BASELINE_LAYERS))
    train_good = torch.cat([data.fit, data.val_good])
    features = baseline_patch_features(extractor, train_good)
    patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    generator = torch.Generator().manual_seed(seed)
    bank = patches[torch.randperm(len(patches), generator=generator)[:BASELINE_BANK]]
    bank_sq = (bank * bank).sum(dim=1)
    test_features = baseline_patch_features(extractor, data.test.images)
    n, c, h, w = test_features.shape
    queries = test_features.permute(0, 2, 3, 1).reshape(-1, c)
    nearest = torch.cat([((q * q).sum(1, keepdim=True) - 2 * q @ bank.T + bank_sq).clamp_min(0).min(dim=1).values
                         for q in queries.split(4096)]).sqrt().reshape(n, 1, h, w)
    maps = F.interpolate(nearest, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
    scores = nearest.flatten(1).amax(dim=1)
    metrics = evaluate(scores, maps, data.test.labels, data.test.masks[:, 0], data.test.has_mask)
    metrics["wall_s"] = time.perf_counter() - began
    return metrics


def run_search(category: str, budget: str, args: argparse.Namespace, *, searcher: str = "tpe") -> dict:
    """``cli.py search`` as a user runs it; the exported bundle's manifest."""
    tag = f"{category}-{budget}-{searcher}"
    storage, models = args.out / "results" / tag, args.out / "models" / tag
    for folder in (storage, models):
        shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, str(ROOT / "cli.py"), "search", "--category", category, "--budget", budget,
               "--seed", str(args.seed), "--storage", str(storage), "--models", str(models)]
    if args.data is not None:
        command += ["--data", str(args.data)]
    if searcher != "tpe":
        command += ["--searcher", searcher]
    began = time.perf_counter()
    log = args.out / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True)
    row = {"category": category, "budget": budget, "searcher": searcher,
           "wall_s": round(time.perf_counter() - began, 1), "log": str(log)}
    manifest_path = models / category / "manifest.json"
    if done.returncode != 0 or not manifest_path.is_file():
        row["error"] = f"exit {done.returncode}; see {log}"
        return row
    manifest = json.loads(manifest_path.read_text())
    members = manifest.get("members", [])
    row.update(
        image_size=int(manifest["preprocessing"]["image_size"]),
        kind=manifest.get("kind"),
        members=[f"{m['method']}({m['params'].get(m['method'] + '.backbone', m['params'].get('backbone', '-'))})"
                 for m in members],
        val_objective=manifest.get("val_objective"),
        test_image_auroc=manifest.get("test", {}).get("image_auroc"),
        test_aupro=manifest.get("test", {}).get("aupro"),
    )
    return row


def _fmt(value) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def search_table(args: argparse.Namespace) -> None:
    from automl_ad.data.builtin import ensure_builtin_root

    data_root = args.data or ensure_builtin_root()
    rows = []
    for category in args.categories.split(","):
        if args.baseline_only:
            found = {"category": category, "image_size": args.image_size}
        else:
            found = run_search(category, args.budget, args)
            if "error" in found:
                print(f"{category}: search failed: {found['error']}", flush=True)
                rows.append(found)
                continue
        size = args.image_size or found.get("image_size") or 128
        found["baseline"] = nearest_neighbour_baseline(data_root, category, size, args.seed)
        found["image_size"] = size
        rows.append(found)
        print(json.dumps(found, default=str), flush=True)

    print(f"\nbudget {args.budget}, seed {args.seed}; test metrics (never used by the search)")
    print(f"{'category':9} {'size':>4} {'base AUROC':>10} {'base AUPRO':>10} {'srch AUROC':>10} {'srch AUPRO':>10} "
          f"{'dAUROC':>7} {'search s':>8}  exported")
    deltas = []
    for row in rows:
        if "error" in row:
            print(f"{row['category']:9} error: {row['error']}")
            continue
        base = row["baseline"]
        delta = (row["test_image_auroc"] - base["image_auroc"]) if row.get("test_image_auroc") is not None else None
        if delta is not None:
            deltas.append(delta)
        print(f"{row['category']:9} {row['image_size']:4d} {_fmt(base['image_auroc']):>10} {_fmt(base['aupro']):>10} "
              f"{_fmt(row.get('test_image_auroc')):>10} {_fmt(row.get('test_aupro')):>10} "
              f"{'   -  ' if delta is None else f'{delta:+.3f}':>7} {row.get('wall_s', 0):8.0f}  "
              f"{row.get('kind', '-')} {' + '.join(row.get('members', []))}")
    if deltas:
        print(f"mean dAUROC {sum(deltas) / len(deltas):+.3f}; products at or above the baseline: "
              f"{sum(d >= 0 for d in deltas)}/{len(deltas)}")

    if args.random_search:
        category = args.random_search
        doubled = _double(args.budget)
        tpe = next((r for r in rows if r["category"] == category and "error" not in r), None) \
            or run_search(category, args.budget, args)
        rand = run_search(category, doubled, args, searcher="random")
        print(f"\n{category}: TPE + ASHA at {args.budget} vs random search (no early stopping) at {doubled}")
        for name, row in ((f"tpe+asha {args.budget}", tpe), (f"random {doubled}", rand)):
            if "error" in row:
                print(f"  {name:16} error: {row['error']}")
                continue
            print(f"  {name:16} test AUROC {_fmt(row.get('test_image_auroc'))} AUPRO {_fmt(row.get('test_aupro'))} "
                  f"val {_fmt(row.get('val_objective'))}  {row.get('kind')} {' + '.join(row.get('members', []))}")


def _double(budget: str) -> str:
    import re

    match = re.fullmatch(r"([0-9.]+)(.*)", budget.strip())
    if not match:
        raise SystemExit(f"error: cannot double --budget {budget!r}")
    return f"{float(match.group(1)) * 2:g}{match.group(2)}"


# --- the older per-method table -----------------------------------------------------------

def train_one(method: str, category: str, args: argparse.Namespace) -> dict:
    out = args.out / f"{category}-{method}"
    command = [
        sys.executable, str(ROOT / "cli.py"), "train", "--method", method, "--category", category,
        "--image-size", str(args.image_size or 128), "--epochs", str(args.epochs),
        "--time-limit", str(args.minutes), "--device", args.device, "--seed", str(args.seed), "--out", str(out),
    ] + (["--data", str(args.data)] if args.data else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    row = {"method": method, "category": category, "wall_s": round(time.perf_counter() - began, 1)}
    if done.returncode != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
        return row
    metrics = json.loads((out / "metrics.json").read_text())
    row.update(
        epochs=len(metrics["epochs"]),
        val_objective=metrics["objective"],
        **{f"test_{k}": metrics["test"].get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
    )
    return row


def per_method_table(args: argparse.Namespace) -> None:
    pairs = [(m, c) for c in args.categories.split(",") for m in args.methods.split(",")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda pair: train_one(*pair, args), pairs))
    print(f"{'category':9} {'method':9} {'epochs':>6} {'val obj':>7} {'img AUROC':>9} {'px AUROC':>8} {'AUPRO':>6} {'wall s':>7}")
    for row in rows:
        if "error" in row:
            print(f"{row['category']:9} {row['method']:9} error: {row['error']}")
            continue
        print(f"{row['category']:9} {row['method']:9} {row['epochs']:6d} {_fmt(row['val_objective']):>7} "
              f"{_fmt(row['test_image_auroc']):>9} {_fmt(row['test_pixel_auroc']):>8} {_fmt(row['test_aupro']):>6} "
              f"{row['wall_s']:7.0f}")
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="10m", help="search budget per product (cli.py search --budget)")
    parser.add_argument("--categories", default="fabric,marble,screw,washer")
    parser.add_argument("--data", type=Path, help="dataset root (default: the built-in products)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="baseline image size (default: the exported detector's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-search", metavar="CATEGORY",
                        help="also compare TPE + ASHA at --budget with random search at twice --budget")
    parser.add_argument("--baseline-only", action="store_true", help="only the baseline (needs --image-size)")
    parser.add_argument("--per-method", action="store_true", help="the per-method table instead")
    parser.add_argument("--methods", default="draem,nsa,ssae,cfa,ast,patchcore", help="with --per-method")
    parser.add_argument("--minutes", type=float, default=10.0, help="with --per-method: wall limit per run")
    parser.add_argument("--epochs", type=int, default=1000, help="with --per-method: upper bound")
    parser.add_argument("--jobs", type=int, default=2, help="with --per-method: runs in parallel")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = parser.parse_args()
    if args.baseline_only and not args.image_size:
        parser.error("--baseline-only needs --image-size")
    if args.per_method:
        per_method_table(args)
    else:
        search_table(args)


if __name__ == "__main__":
    main()
