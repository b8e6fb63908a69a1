"""Detection quality per unit of budget: the exported detector of a search against a plain
nearest-neighbour baseline on frozen features, measured in the same run.

For each product:
  (a) the baseline, which trains nothing: EfficientNet-Lite0 (packaged ImageNet weights)
      stride-8 and stride-16 features (blocks.2, blocks.4), 3x3 average pooled, the
      coarser map upsampled to the finer grid, a random 20,000-patch bank drawn from all
      of train/good, each test patch scored by its distance to the nearest bank patch,
      image score = max over patches. It runs at the input shape the exported detector
      uses (its manifest's height x width: the search's geometry, ``--geometry``);
  (b) the full main job ``cli.py search --category C --budget B`` (ensemble, export), and
      the exported bundle's test metrics from its manifest (computed after the search,
      never used by it); then what the search itself stored under
      ``<out>/results/<C>-<B>-<searcher>/<experiment>/``: its trials table, its ledger
      (budget.json) and its record (search.json, whose plan holds the expected trials).
Printed per product (test image AUROC unless AUPRO is named): the baseline's, the exported
detector's and their difference; the best single trial's (over the search's own stored
trials) and the *selection regret*, best single trial minus exported (negative when the
export, an ensemble say, beats every trial); both AUPROs; budget used from the ledger, and
as % of the budget; trials run (stored trials that reported an epoch or a val objective)
vs the plan's expected count; Spearman(val objective, test image AUROC) over the trials,
by the leaderboard's own rule (results.leaderboard.spearman_val_test); the search's wall
seconds and the *after-leaderboard* seconds: from the moment the CLI printed the
leaderboard (its stdout is read line by line and time-stamped; the log still goes to
``<out>/<tag>.log``) to the end of the process: ensemble, export, report and shutdown.
Then the summary: mean dAUROC, products at or above the baseline, the max selection
regret, and per run whether it used <= 105 % of its budget and ran within 25 % of the
expected trials. Every row goes to ``<out>/quality.json``.

``--reuse`` runs no search whose exported manifest already exists under ``--out``: the
table is recomputed from the stored results (the baseline still runs). The timings then
come from ``<out>/<tag>.timing.json``, written when this benchmark ran the search; for a
search it did not run, the after-leaderboard time is estimated from file times (the last
write of the ledger or a trial row to the log's last write) and printed with ``~`` (copy
such a folder with ``cp -a``, which keeps the times).

With ``--random-search`` (c) one product is searched again with random sampling and no
early stopping at twice the budget, and the two exported detectors are printed side by
side (with their best single trials and regrets; the random run is in the checks too).

    python benchmarks/quality.py --budget 10m
    python benchmarks/quality.py --budget 10m --categories screw --random-search screw
    python benchmarks/quality.py --baseline-only --image-size 256
    python benchmarks/quality.py --budget 15m --data /data/mvtec --categories screw,kolektor --reuse

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
def nearest_neighbour_baseline(data_root: Path, category: str, image_size: int, seed: int,
                               shape: tuple[int, int] | None = None) -> dict:
    """Test metrics of the plain baseline (module docstring, (a)) at ``shape`` (height,
    width; default the square ``image_size``)."""
    from automl_ad.methods.backbones import create_backbone
    from automl_ad.data.dataset import load_category
    from automl_ad.evaluation.metrics import evaluate

    began = time.perf_counter()
    data = load_category(data_root, category, image_size, shape=shape, seed=seed)
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
    maps = F.interpolate(nearest, size=tuple(data.test.masks.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    scores = nearest.flatten(1).amax(dim=1)
    metrics = evaluate(scores, maps, data.test.labels, data.test.masks[:, 0], data.test.has_mask)
    metrics["wall_s"] = time.perf_counter() - began
    return metrics


# --- one search: run it (or reuse it) and read back what it stored ----------------------

BUDGET_TOLERANCE = 1.05  # a run holds its budget when it used at most 105 % of it
TRIALS_TOLERANCE = 0.25  # ... and its plan when the trials run are within 25 % of the expected count


def search_paths(out: Path, category: str, budget: str, searcher: str) -> dict:
    """Where the benchmark keeps one search's results, bundle, log and timings."""
    tag = f"{category}-{budget}-{searcher}"
    return {"tag": tag, "storage": out / "results" / tag, "models": out / "models" / tag,
            "manifest": out / "models" / tag / category / "manifest.json", "log": out / f"{tag}.log",
            "timing": out / f"{tag}.timing.json"}


def run_logged(command: list[str], log: Path, mark: bytes) -> dict:
    """Run ``command``, copying its stdout and stderr to ``log`` line by line; the seconds to
    the first line holding ``mark`` (the leaderboard's title) and from there to the end."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach us when printed, not at exit
    began = time.monotonic()
    marked = None
    with log.open("wb") as handle, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     env=env) as process:
        for line in process.stdout:
            if marked is None and mark in line:
                marked = time.monotonic()
            handle.write(line)
            handle.flush()
        returncode = process.wait()
    ended = time.monotonic()
    return {"returncode": returncode, "wall_s": round(ended - began, 1),
            "leaderboard_at_s": None if marked is None else round(marked - began, 1),
            "after_leaderboard_s": None if marked is None else round(ended - marked, 1),
            "after_leaderboard_source": "measured" if marked is not None else None}


def stored_timing(paths: dict) -> dict:
    """The timings of a search run earlier (``--reuse``): the ones this benchmark measured
    then, else the after-leaderboard time estimated from file times: from the search's last
    write of its ledger or a trial row (the leaderboard follows at once) to the log's last
    write (the process's end)."""
    if paths["timing"].is_file():
        return json.loads(paths["timing"].read_text())
    timing = {"wall_s": None, "leaderboard_at_s": None, "after_leaderboard_s": None,
              "after_leaderboard_source": None}
    from automl_ad.experiment import LEDGER_FILE, TRIALS

    written = [p.stat().st_mtime for pattern in (f"*/{LEDGER_FILE}", f"*/{TRIALS}/*.parquet")
               for p in paths["storage"].glob(pattern)]
    if written and paths["log"].is_file():
        timing.update(after_leaderboard_s=round(paths["log"].stat().st_mtime - max(written), 1),
                      after_leaderboard_source="file times")
    return timing


def experiment_stats(storage: Path, category: str) -> dict:
    """What the search itself stored (the newest experiment of ``category`` under ``storage``):
    budget used (its ledger), trials planned (search.json's plan) and run (its trials table),
    the best single trial on test and Spearman(val objective, test image AUROC) by the
    leaderboard's own rule."""
    from automl_ad.experiment import read_record
    from automl_ad.results import leaderboard, store
    from automl_ad.tuning.budget import Ledger, parse_budget

    experiments = store.list_experiments(storage, category)
    if not experiments:
        return {"stats_error": f"no experiment of {category} with stored trials under {storage}"}
    folder = storage / experiments[0]
    record = read_record(folder)
    budget = parse_budget(record["budget"])
    ledger = Ledger(folder, budget)  # reads budget.json; written only by the search
    rows = store.read_table(folder).to_pylist()
    return {"experiment": str(folder), "budget_text": budget.text, "budget_kind": budget.kind,
            "budget_amount": budget.amount, "budget_used": ledger.used(),
            "budget_used_text": budget.describe(ledger.used()),
            **trial_stats(rows, (record.get("plan") or {}).get("expected_trials"))}


# --- pure: the numbers and the table from rows --------------------------------------------

def ran(row: dict) -> bool:
    """Whether a stored trial ran at all: it reported an epoch or a val objective (a trial the
    budget stopped before its first report is stored but ran none)."""
    from automl_ad.results.leaderboard import number

    return bool(number(row.get("epochs"))) or number(row.get("objective")) is not None


def trial_stats(rows: list[dict], expected_trials: float | None) -> dict:
    """From a search's stored trial rows: trials stored, run (:func:`ran`) and planned, the
    best single trial on test image AUROC (failed trials left out, as the leaderboard's
    Spearman leaves them out) and Spearman(val objective, test image AUROC)."""
    from automl_ad.results.leaderboard import number, spearman_val_test

    tested = [r for r in rows if r.get("status") != "error" and number(r.get("test_image_auroc")) is not None]
    best = max(tested, key=lambda r: number(r["test_image_auroc"]), default=None)
    rho, pairs = spearman_val_test(rows)
    return {"trials_stored": len(rows), "trials_run": sum(ran(r) for r in rows),
            "trials_expected": number(expected_trials),
            "best_trial_auroc": None if best is None else number(best["test_image_auroc"]),
            "best_trial": None if best is None else f"{best.get('trial_id')} {best.get('method')}",
            "spearman": rho, "spearman_trials": pairs}


def derived(row: dict) -> dict:
    """Regret, budget share and the two adherence checks of one run's row (None: unknown).

    regret = best single trial's test image AUROC - the exported detector's (negative when
    the export, an ensemble say, beats every trial)."""
    best, exported = row.get("best_trial_auroc"), row.get("test_image_auroc")
    used, amount = row.get("budget_used"), row.get("budget_amount")
    run, expected = row.get("trials_run"), row.get("trials_expected")
    share = used / amount if used is not None and amount else None
    trials_off = (run - expected) / expected if run is not None and expected else None
    return {"regret": None if best is None or exported is None else best - exported,
            "budget_share": share,
            "budget_held": None if share is None else share <= BUDGET_TOLERANCE,
            "trials_off": trials_off,
            "trials_held": None if trials_off is None else abs(trials_off) <= TRIALS_TOLERANCE}


def _fmt(value) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def _signed(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _held(value) -> str:
    return "?" if value is None else ("ok" if value else "NO")


def _members(row: dict) -> str:
    return f"{row.get('kind') or '-'} {' + '.join(row.get('members') or [])}".strip()


TABLE_HEADER = (f"{'category':9} {'size':>7} {'base':>6} {'export':>6} {'dAUROC':>6} {'best tr':>7} {'regret':>6} "
                f"{'bAUPRO':>6} {'eAUPRO':>6} {'budget used':>17} {'trials run/plan':>16} {'Spearman(n)':>12} "
                f"{'search s':>8} {'after-lb s':>10}")


def _shape(row: dict) -> str:
    """The input: the size for a square, height x width otherwise."""
    height, width = row.get("shape") or [row.get("image_size") or 0] * 2
    return f"{height}" if height == width else f"{height}x{width}"


def table_lines(rows: list[dict]) -> list[str]:
    """The per-product table (test image AUROC unless named AUPRO) and what each exported."""
    lines = [TABLE_HEADER]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['category']:9} error: {row['error']}")
            continue
        base = row.get("baseline") or {}
        extra = derived(row)
        delta = (row["test_image_auroc"] - base["image_auroc"]
                 if row.get("test_image_auroc") is not None and base.get("image_auroc") is not None else None)
        share = extra["budget_share"]
        budget = "-" if row.get("budget_used_text") is None else \
            f"{row['budget_used_text']} {'' if share is None else f'{share:.0%}'}".strip()
        run, expected = row.get("trials_run"), row.get("trials_expected")
        trials = "-" if run is None else f"{run}/{'-' if expected is None else f'{expected:.1f}'}" + \
            ("" if extra["trials_off"] is None else f" {extra['trials_off']:+.0%}")
        rho = "-" if row.get("spearman") is None else f"{row['spearman']:+.2f}"
        spearman = f"{rho}({row.get('spearman_trials', 0)})"
        after = row.get("after_leaderboard_s")
        after_text = "-" if after is None else (f"{after:.0f}" if row.get("after_leaderboard_source") == "measured"
                                                else f"~{after:.0f}")
        lines.append(
            f"{row['category']:9} {_shape(row):>7} {_fmt(base.get('image_auroc'))} "
            f"{_fmt(row.get('test_image_auroc'))} {_signed(delta):>6} {_fmt(row.get('best_trial_auroc')):>7} "
            f"{_signed(extra['regret']):>6} {_fmt(base.get('aupro'))} {_fmt(row.get('test_aupro'))} {budget:>17} "
            f"{trials:>16} {spearman:>12} {'-' if row.get('wall_s') is None else format(row['wall_s'], '.0f'):>8} "
            f"{after_text:>10}")
    lines += [f"  {row['category']}: exported {_members(row)}; best trial {row.get('best_trial') or '-'}"
              for row in rows if "error" not in row and "kind" in row]
    return lines


def summary_lines(rows: list[dict], runs: list[dict]) -> list[str]:
    """mean dAUROC and products at or above the baseline (``rows``); max regret; whether
    each run (``runs``: these and any random-search one) held its budget and its plan."""
    lines = []
    deltas = [r["test_image_auroc"] - r["baseline"]["image_auroc"] for r in rows
              if "error" not in r and r.get("test_image_auroc") is not None
              and (r.get("baseline") or {}).get("image_auroc") is not None]
    if deltas:
        lines.append(f"mean dAUROC {sum(deltas) / len(deltas):+.3f}; products at or above the baseline: "
                     f"{sum(d >= 0 for d in deltas)}/{len(deltas)}")
    regrets = [(derived(r)["regret"], r["category"]) for r in rows if "error" not in r]
    regrets = [pair for pair in regrets if pair[0] is not None]
    if regrets:
        worst = max(regrets)
        lines.append(f"max selection regret {worst[0]:+.3f} ({worst[1]}; best single trial minus exported, "
                     f"test image AUROC)")
    done = [r for r in runs if "error" not in r]
    if done:
        held = [derived(r) for r in done]
        lines.append(f"budget used <= {BUDGET_TOLERANCE:.0%}: {sum(h['budget_held'] is True for h in held)}/"
                     f"{len(done)} runs; trials run within {TRIALS_TOLERANCE:.0%} of expected: "
                     f"{sum(h['trials_held'] is True for h in held)}/{len(done)} runs")
        for row, h in zip(done, held):
            share = "-" if h["budget_share"] is None else f"{h['budget_share']:.0%}"
            expected = "-" if row.get("trials_expected") is None else f"{row['trials_expected']:.1f}"
            off = "" if h["trials_off"] is None else f" ({h['trials_off']:+.0%})"
            lines.append(f"  {row.get('tag', row['category'])}: budget {share} of {row.get('budget_text') or '-'} "
                         f"{_held(h['budget_held'])}; trials {row.get('trials_run', '-')} run vs {expected} "
                         f"expected{off} {_held(h['trials_held'])}")
    return lines


# --- the benchmark ------------------------------------------------------------------------

def run_search(category: str, budget: str, args: argparse.Namespace, *, searcher: str = "tpe") -> dict:
    """``cli.py search`` as a user runs it (or, with ``--reuse``, the one already exported
    under ``--out``); the exported bundle's manifest and what the search stored."""
    from automl_ad.results.leaderboard import TITLE

    paths = search_paths(args.out, category, budget, searcher)
    row = {"category": category, "budget": budget, "searcher": searcher, "tag": paths["tag"],
           "log": str(paths["log"])}
    if args.reuse and paths["manifest"].is_file():
        row.update(reused=True, **stored_timing(paths))
    else:
        for folder in (paths["storage"], paths["models"]):
            shutil.rmtree(folder, ignore_errors=True)
        paths["timing"].unlink(missing_ok=True)
        command = [sys.executable, str(ROOT / "cli.py"), "search", "--category", category, "--budget", budget,
                   "--seed", str(args.seed), "--storage", str(paths["storage"]), "--models", str(paths["models"])]
        if args.data is not None:
            command += ["--data", str(args.data)]
        if searcher != "tpe":
            command += ["--searcher", searcher]
        if args.geometry != "auto":
            command += ["--geometry", args.geometry]
        timing = run_logged(command, paths["log"], TITLE.encode())
        returncode = timing.pop("returncode")
        row.update(timing)
        if returncode != 0 or not paths["manifest"].is_file():
            row["error"] = f"exit {returncode}; see {paths['log']}"
            return row
        paths["timing"].write_text(json.dumps(timing, indent=1))
    manifest = json.loads(paths["manifest"].read_text())
    members = manifest.get("members", [])
    pre = manifest["preprocessing"]
    row.update(
        image_size=int(pre["image_size"]),
        shape=[int(pre.get("height", pre["image_size"])), int(pre.get("width", pre["image_size"]))],
        kind=manifest.get("kind"),
        members=[f"{m['method']}({m['params'].get(m['method'] + '.backbone', m['params'].get('backbone', '-'))})"
                 for m in members],
        val_objective=manifest.get("val_objective"),
        test_image_auroc=manifest.get("test", {}).get("image_auroc"),
        test_aupro=manifest.get("test", {}).get("aupro"),
    )
    try:
        row.update(experiment_stats(paths["storage"], category))
    except Exception as error:  # the exported numbers still stand; say why the rest is missing
        row["stats_error"] = f"{type(error).__name__}: {error}"
    row.update(derived(row))
    return row


def search_table(args: argparse.Namespace) -> None:
    from automl_ad.data.builtin import ensure_builtin_root
    from automl_ad.data.geometry import resolve as resolve_geometry
    from automl_ad.data.layout import discover_category

    data_root = args.data or ensure_builtin_root()
    rows = []
    for category in args.categories.split(","):
        if args.baseline_only:
            layout = discover_category(data_root, category)
            geometry = resolve_geometry(args.geometry, layout.train)
            found = {"category": category, "image_size": args.image_size,
                     "shape": list(geometry.shape(args.image_size))}
        else:
            found = run_search(category, args.budget, args)
            if "error" in found:
                print(f"{category}: search failed: {found['error']}", flush=True)
                rows.append(found)
                continue
        size = args.image_size or found.get("image_size") or 128
        # The same geometry as the exported detector (its manifest's input shape).
        shape = tuple(found["shape"]) if found.get("shape") else None
        found["baseline"] = nearest_neighbour_baseline(data_root, category, size, args.seed, shape=shape)
        found["image_size"] = size
        rows.append(found)
        print(json.dumps(found, default=str), flush=True)

    print(f"\nbudget {args.budget}, seed {args.seed}; test image AUROC unless AUPRO (test metrics are never "
          f"used by the search): base = baseline, export = exported detector, best tr = best single trial, "
          f"regret = best tr - export; Spearman(val objective, test image AUROC) over the trials; "
          f"~ = estimated from file times")
    print("\n".join(table_lines(rows)))

    runs = [r for r in rows if not args.baseline_only]
    random_rows = []
    if args.random_search:
        category = args.random_search
        doubled = _double(args.budget)
        tpe = next((r for r in rows if r["category"] == category and "error" not in r), None)
        if tpe is None:
            tpe = run_search(category, args.budget, args)
            runs.append(tpe)
        rand = run_search(category, doubled, args, searcher="random")
        random_rows = [rand]
        runs.append(rand)
        print(f"\n{category}: TPE + ASHA at {args.budget} vs random search (no early stopping) at {doubled}")
        for name, row in ((f"tpe+asha {args.budget}", tpe), (f"random {doubled}", rand)):
            if "error" in row:
                print(f"  {name:16} error: {row['error']}")
                continue
            print(f"  {name:16} test AUROC {_fmt(row.get('test_image_auroc'))} AUPRO {_fmt(row.get('test_aupro'))} "
                  f"val {_fmt(row.get('val_objective'))} best trial {_fmt(row.get('best_trial_auroc'))} "
                  f"regret {_signed(row.get('regret'))}  {_members(row)}")

    print()
    print("\n".join(summary_lines(rows, runs)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"budget": args.budget, "seed": args.seed, "rows": rows,
                                                       "random_search": random_rows}, indent=1, default=str))
    print(f"rows: {args.out / 'quality.json'}")


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
    parser.add_argument("--geometry", choices=("auto", "square", "keep_aspect", "tiled"), default="auto",
                        help="cli.py search --geometry; the baseline runs at the exported detector's input shape")
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
    parser.add_argument("--reuse", action="store_true",
                        help="do not re-run a search whose exported manifest exists under --out: recompute the "
                             "table from what it stored")
    args = parser.parse_args()
    if args.baseline_only and not args.image_size:
        parser.error("--baseline-only needs --image-size")
    if args.per_method:
        per_method_table(args)
    else:
        search_table(args)


if __name__ == "__main__":
    main()
