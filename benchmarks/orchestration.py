"""Orchestration overhead and budget adherence of the search.

1. Runs ``--trials`` trials through the search (Ray Tune + Ray Train TorchTrainer, the
   production path; ``--tune-only`` adds the Tune-function path), then the *same*
   configurations for the same number of epochs bare (``training.fit`` in this process,
   with ``--bare-threads`` torch threads: a trial's worker gets 1 CPU, so Ray gives it
   one thread). Prints both wall times, their ratio, and orchestration seconds per trial.
2. Runs the search under each ``--budgets`` entry (default ``5cpu-m,15m``) and prints
   budget used vs given, and wall time.

Every line ends with the 1-minute load average: other work on the machine shows there.

    .venv/bin/python benchmarks/orchestration.py                    # full (about 25 min)
    .venv/bin/python benchmarks/orchestration.py --budgets 2cpu-m,3m  # quicker
    # ~60 s trials (SSAE, default parameters, 64 px, 1 thread; about 8 min):
    .venv/bin/python benchmarks/orchestration.py --methods ssae --pin-defaults --trials 3 --epochs 2 \
        --steps 40 --budgets ""
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from automl_ad.results import store  # noqa: E402
from automl_ad.tuning.space import packaged_space_files  # noqa: E402


def space_dir(folder: Path, epochs: int, steps: int, pin_defaults: bool = False) -> Path:
    """The shipped search spaces with a short fidelity; with ``pin_defaults`` every method
    parameter is fixed at its default, so trials cost the same and ``--steps`` sets it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in packaged_space_files().items():
        spec = yaml.safe_load(path.read_text())
        if name == "common":
            spec["fidelity"] = {"max_epochs": epochs, "grace_period": epochs, "reduction_factor": 2,
                                "steps_per_epoch": steps, "batch_size": 8}
        elif pin_defaults:
            spec["params"] = {name: {"type": "categorical", "choices": [p["default"]], "default": p["default"]}
                              for name, p in spec.get("params", {}).items()}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def load() -> str:
    return f"(load {os.getloadavg()[0]:.2f})"


def bare(rows: list[dict], data_root: Path, category: str, image_size: int, steps: int, seed: int,
         threads: int) -> float:
    """Train the stored configurations with ``training.fit`` directly; wall seconds."""
    import torch

    torch.set_num_threads(threads)
    from automl_ad.data.dataset import load_category
    from automl_ad.methods.base import get_method_class
    from automl_ad.training.loop import TrainConfig, fit, synthesis_family
    from automl_ad.param_keys import split_config
    from automl_ad.evaluation.validation import build_val_anomalies, val_set_for

    began = time.perf_counter()
    data = load_category(data_root, category, image_size, seed=seed)
    anomalies = build_val_anomalies(data, seed=seed)
    for row in rows:
        split = split_config(json.loads(row["params"]), image_size)
        cfg = TrainConfig(method=split.method, method_params=split.method_params, synthesis=split.synthesis,
                          synthesis_params=split.synthesis_params, image_size=split.image_size,
                          epochs=int(row["epochs"]), steps_per_epoch=steps, batch_size=8, seed=seed)
        val_set = val_set_for(data.val_good, anomalies, synthesis_family(cfg, get_method_class(cfg.method)))
        trial_began = time.perf_counter()
        fit(cfg, data, val_set)
        print(f"  bare {split.method}: {time.perf_counter() - trial_began:.1f} s; "
              f"in the search: {row['wall_s']:.1f} s {load()}", flush=True)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="screw")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--budgets", default="5cpu-m,15m", help="comma separated; empty to skip")
    parser.add_argument("--tune-only", action="store_true", help="also time the Tune-function path")
    parser.add_argument("--methods", default=None, help="comma separated; default: every shipped method")
    parser.add_argument("--bare-threads", type=int, default=1, help="torch threads of the bare run")
    parser.add_argument("--pin-defaults", action="store_true",
                        help="every method parameter at its default (trials of one method cost the same)")
    args = parser.parse_args()

    from automl_ad.data.dataset import resolve_data_root
    from automl_ad.tuning.search import SearchOptions, run_search

    data_root = resolve_data_root(args.data, args.category)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spaces = space_dir(work / "spaces", args.epochs, args.steps, args.pin_defaults)
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
        common = dict(category=args.category, data=args.data, storage=work / "results", image_size=args.image_size,
                      live=False, space_dir=spaces, methods=methods)
        paths = [("tune-train", True)] + ([("tune-only", False)] if args.tune_only else [])
        if args.trials < 1:
            paths = []  # --trials 0: budget adherence only
        for label, use_train in paths:
            began = time.perf_counter()
            summary = run_search(SearchOptions(budget=f"{args.trials}trials", experiment=f"overhead-{label}",
                                               use_train=use_train, **common))
            searched = time.perf_counter() - began
            rows = store.read_table(summary.experiment_dir).to_pylist()
            plain = bare(rows, data_root, args.category, args.image_size, args.steps, 0, args.bare_threads)
            epochs = sum(int(r["epochs"]) for r in rows)
            print(f"[{label}] {len(rows)} trials, {epochs} epochs at {args.image_size}px, {args.steps} steps/epoch: "
                  f"search {searched:.1f} s, bare training.fit {plain:.1f} s, overhead ratio {searched / plain:.3f}x, "
                  f"orchestration {(searched - plain) / max(len(rows), 1):.1f} s per trial "
                  f"(search start-up and finish included) {load()}", flush=True)
        for text in [b for b in args.budgets.split(",") if b.strip()]:
            began = time.perf_counter()
            summary = run_search(SearchOptions(budget=text, experiment=f"budget-{text}", **common))
            wall = time.perf_counter() - began
            budget = summary.budget
            rows = store.read_table(summary.experiment_dir).to_pylist()
            statuses = {s: sum(1 for r in rows if r["status"] == s) for s in sorted({r["status"] for r in rows})}
            print(f"[budget {text}] used {budget.describe(summary.budget_used)} "
                  f"({100 * summary.budget_used / budget.amount:.1f} %), {summary.trials} trials {statuses}, "
                  f"wall {wall:.1f} s {load()}", flush=True)


if __name__ == "__main__":
    main()
