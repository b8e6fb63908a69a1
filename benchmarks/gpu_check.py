"""The driver of benchmarks/gpu_check.sh: every GPU check in one run, one JSON of results.

    bash benchmarks/gpu_check.sh                 # on a GPU machine: the full check, at most 8 minutes
    bash benchmarks/gpu_check.sh --smoke         # anywhere: every stage on the CPU at tiny sizes (~2-3 min)
    .venv/bin/python benchmarks/gpu_check.py --smoke --out gpu_check.json

Stages, each a subprocess with its own timeout (a hang or a crash costs only its stage):

1. data         the built-in ``screw`` product written out (``data synth``)
2. synthesis    batched synthesis vs the per-image references (benchmarks/synthesis.py)
3. train_step   one training step per method in fp32 and bf16 mixed precision: steps/s,
                peak memory (benchmarks/train_step.py --precisions fp32,bf16)
4. inference    an exported bundle (DRAEM): eager vs TorchScript on the device vs ONNX
                Runtime's CUDA provider (skipped, and said so, when it is not installed)
5. calibration  ``search --plan --calibrate`` of a 20gpu-m search with every method: the
                search's own calibration of every method on this device, cached in the
                work folder; its rows go to the JSON's ``calibration``, which
                ``AUTOML_AD_GPU_PRIOR`` (automl_ad/tuning/gpu_prior.py) takes as the GPU
                prior instead of the estimate
6. search       ``search --budget 20gpu-m`` with every method allowed, given what is left
                of the deadline: on one GPU a 20gpu-m budget runs about 20 minutes, so
                at the stage's cap the search is stopped with SIGINT, its own clean stop
                (trials end, the store is saved, exit 130); it passes when trials were
                stored, none failed, and (full mode) they ran on the GPU

The results JSON (``format`` automl_ad.gpu_check/1) holds the environment, every stage's
status, seconds, numbers and log tail, and ``ok``; the exit status is 0 only when every
stage passed. Logs of every stage are kept beside the JSON (``<out>.logs/``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMAT = "automl_ad.gpu_check/1"  # automl_ad.tuning.gpu_prior reads this format
METHODS = "draem,nsa,ssae,cfa,ast,patchcore"
EXPERIMENT = "gpu-check"
STOP_S = 35.0  # how long a search may take to stop after SIGINT


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full check and the smoke run."""

    device: str
    deadline_s: float  # the whole run, the search's cap included
    data: tuple[str, ...]  # data synth options
    synthesis: tuple[str, ...]
    train_step: tuple[str, ...]
    inference: tuple[str, ...]
    budget: str
    search: tuple[str, ...]  # options shared by the calibration and the search
    timeouts: dict[str, float] = field(default_factory=dict)
    search_min_s: float = 60.0
    search_max_s: float = float("inf")
    threads: int | None = None  # torch threads of the stages (None: torch's default)


FULL = Sizes(
    device="cuda", deadline_s=465.0, data=(),
    synthesis=("--batch", "32", "--size", "256", "--repeats", "3"),
    train_step=("--image-size", "256", "--batch-size", "8", "--steps", "5", "--warmup", "2"),
    inference=("--methods", "draem", "--image-size", "256", "--batch-size", "8", "--repeats", "5"),
    budget=os.environ.get("GPU_CHECK_BUDGET", "20gpu-m"), search=(),
    timeouts={"data": 90, "synthesis": 60, "train_step": 120, "inference": 90, "calibration": 150},
    search_min_s=90.0)
SMOKE = Sizes(
    device="cpu", deadline_s=600.0, data=("--n-train", "12", "--n-test", "8", "--image-size", "64"),
    synthesis=("--batch", "4", "--size", "128", "--repeats", "1"),  # NSA's reference fails at 64 px
    train_step=("--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--setup-images", "2"),
    inference=("--methods", "draem", "--image-size", "32", "--batch-size", "2", "--repeats", "1"),
    budget="2cpu-m", search=("--image-size", "32"),
    timeouts={"data": 60, "synthesis": 60, "train_step": 150, "inference": 90, "calibration": 150},
    search_min_s=45.0, search_max_s=75.0, threads=1)


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Run:
    """One check: the work folder, the clock, the stages' records."""

    def __init__(self, sizes: Sizes, mode: str, out: Path, work: Path, python: str) -> None:
        self.sizes, self.mode, self.out, self.work, self.python = sizes, mode, out, work, python
        self.logs = out.with_name(out.name + ".logs")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.began = time.monotonic()
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    # the search's caches stay in the work folder: a check never reads or
                    # changes this machine's calibration or learned costs
                    "AUTOML_AD_CALIBRATION": str(work / "calibration.json"),
                    "AUTOML_AD_LEARNED_COSTS": str(work / "learned_costs.json")}
        if sizes.threads:  # a shared CPU: more threads than cores thrash
            self.env["OMP_NUM_THREADS"] = str(sizes.threads)
        self.stages: dict[str, dict[str, Any]] = {}

    def left_s(self) -> float:
        return self.sizes.deadline_s - (time.monotonic() - self.began)

    def command(self, name: str, argv: list[str], timeout: float, *, interrupt_at: float | None = None) -> dict[str, Any]:
        """Run ``argv`` as stage ``name``; past ``interrupt_at`` seconds it gets SIGINT (a
        search's clean stop), past ``timeout`` it is killed. Returns the stage record."""
        log = self.logs / f"{name}.log"
        began = time.monotonic()
        record: dict[str, Any] = {"command": " ".join(argv), "timeout_s": round(timeout, 1)}
        with open(log, "w") as handle:
            process = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            interrupted = False
            try:
                while process.poll() is None:
                    elapsed = time.monotonic() - began
                    if interrupt_at is not None and not interrupted and elapsed > interrupt_at:
                        process.send_signal(signal.SIGINT)
                        interrupted = True
                        record["interrupted_at_s"] = round(elapsed, 1)
                    if elapsed > timeout:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                        record["timed_out"] = True
                        break
                    time.sleep(0.5)
            finally:  # the driver itself interrupted: no stage outlives it
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        record.update(returncode=process.returncode, seconds=round(time.monotonic() - began, 1), log=str(log),
                      log_tail=_tail(log))
        return record

    def stage(self, name: str, body: Callable[[], dict[str, Any]]) -> None:
        """Run one stage; any exception or a record without ``ok`` is its failure."""
        print(f"[{time.monotonic() - self.began:6.1f}s] {name} ...", flush=True)
        try:
            record = body()
        except Exception as error:  # a broken stage is recorded, the others still run
            record = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        self.stages[name] = record
        status = "ok" if record.get("ok") else f"FAILED: {record.get('error') or record.get('log_tail', '')[-300:]}"
        print(f"[{time.monotonic() - self.began:6.1f}s] {name}: {status}", flush=True)

    def python_stage(self, name: str, argv: list[str], *, json_out: Path | None = None) -> dict[str, Any]:
        # never past the run's deadline: a slow stage costs the stages after it, not the 8 minutes
        record = self.command(name, [self.python, *argv], min(self.sizes.timeouts[name], max(5.0, self.left_s() - 5.0)))
        record["ok"] = record["returncode"] == 0 and not record.get("timed_out")
        if not record["ok"]:
            record["error"] = "timed out" if record.get("timed_out") else f"exit {record['returncode']}"
        if json_out is not None and json_out.is_file():
            record["results"] = json.loads(json_out.read_text())
        return record


# --- the stages -----------------------------------------------------------------------------

def data_stage(run: Run) -> dict[str, Any]:
    return run.python_stage("data", ["cli.py", "data", "synth", "--out", str(run.work / "data"),
                                     "--categories", "screw", *run.sizes.data])


def synthesis_stage(run: Run) -> dict[str, Any]:
    out = run.work / "synthesis.json"
    record = run.python_stage("synthesis", ["benchmarks/synthesis.py", "--device", run.sizes.device,
                                            *run.sizes.synthesis, "--json", str(out)], json_out=out)
    rows = (record.get("results") or {}).get("families") or []
    missing = [r["family"] for r in rows if not r.get("batched_img_s")]
    if record["ok"] and (not rows or missing):
        record.update(ok=False, error=f"no throughput for {', '.join(missing) or 'any family'}")
    return record


def train_step_stage(run: Run) -> dict[str, Any]:
    out = run.work / "train_step.json"
    record = run.python_stage("train_step", ["benchmarks/train_step.py", "--device", run.sizes.device,
                                             "--methods", METHODS, "--precisions", "fp32,bf16", "--no-reference",
                                             *run.sizes.train_step, "--json", str(out)], json_out=out)
    rows = (record.get("results") or {}).get("rows") or []
    failed = [f"{r['method']} {r['precision']}: {r['error']}" for r in rows if r.get("error")]
    timed = {(r["method"], r["precision"]) for r in rows if r.get("steps_per_s")}
    absent = [f"{m} {p}" for m in METHODS.split(",") if m != "patchcore" for p in ("fp32", "bf16")
              if (m, p) not in timed]  # patchcore trains nothing: no step to time
    if record["ok"] and (failed or absent):
        record.update(ok=False, error="; ".join(failed + [f"{a}: not timed" for a in absent]))
    return record


def inference_stage(run: Run) -> dict[str, Any]:
    out = run.work / "inference.json"
    record = run.python_stage("inference", ["benchmarks/inference.py", "--device", run.sizes.device,
                                            *run.sizes.inference, "--json", str(out)], json_out=out)
    problems = []
    for row in record.get("results") or []:
        problems += [f"{row['model']}: {key} {row[key]}" for key in ("torchscript_error", "onnxruntime_error")
                     if row.get(key)]
        skipped = row.get("onnxruntime_skipped", "")
        if skipped and not skipped.startswith("onnxruntime CUDA provider not installed"):
            problems.append(f"{row['model']}: onnxruntime skipped for another reason: {skipped}")
    if record["ok"] and (problems or not record.get("results")):
        record.update(ok=False, error="; ".join(problems) or "no rows")
    return record


def _search_args(run: Run) -> list[str]:
    return ["cli.py", "search", "--category", "screw", "--data", str(run.work / "data"), "--budget", run.sizes.budget,
            "--methods", METHODS, "--storage", str(run.work / "results"), "--models", str(run.work / "models"),
            *run.sizes.search]


def calibration_rows(cache: Path) -> tuple[str, list[dict[str, Any]]]:
    """(device name, rows) of a calibration cache file (tuning/calibration.py's format:
    keys host|device|threads|method|size|batch|backbone)."""
    content = json.loads(cache.read_text()) if cache.is_file() else {}
    rows, devices = [], set()
    for key, entry in sorted((content.get("entries") or {}).items()):
        _host, device, threads, method, size, batch, backbone = key.split("|")
        devices.add(device)
        rows.append({"method": method, "size": int(size.removesuffix("px")), "batch": int(batch.removeprefix("b")),
                     "backbone": None if backbone == "-" else backbone, "threads": int(threads.removesuffix("t")),
                     **{k: entry[k] for k in ("build_s", "setup_c", "setup_p", "step_s", "infer_s", "metrics_s")},
                     "measured_at": entry.get("measured_at")})
    return (devices.pop() if len(devices) == 1 else ", ".join(sorted(devices))), rows


def calibration_stage(run: Run) -> dict[str, Any]:
    record = run.python_stage("calibration", [*_search_args(run), "--plan", "--calibrate"])
    device, rows = calibration_rows(run.work / "calibration.json")
    from automl_ad.training.precision import SpeedPath
    from automl_ad.methods import get_method_class
    import torch

    for row in rows:  # what the training step ran on (auto: the method's switch on CUDA)
        row["precision"] = SpeedPath.resolve("auto", get_method_class(row["method"]), torch.device(run.sizes.device)).dtype
    record["device"], record["rows"] = device, rows
    absent = sorted(set(METHODS.split(",")) - {r["method"] for r in rows})
    if record["ok"] and absent:
        record.update(ok=False, error=f"not calibrated: {', '.join(absent)}")
    if record["ok"] and run.mode == "full" and device == "cpu":
        record.update(ok=False, error="calibrated on the CPU, not the GPU")
    return record


def search_stage(run: Run) -> dict[str, Any]:
    # SIGINT at the cap; the search then has STOP_S to end its trials and save (it takes a
    # few seconds) before it is killed, and the store is read and the JSON written in time
    cap = min(run.sizes.search_max_s, run.left_s() - STOP_S - 10.0)
    if cap < run.sizes.search_min_s:
        return {"ok": False, "error": f"only {cap:.0f} s left of the deadline (at least {run.sizes.search_min_s:.0f} s)"}
    args = [*_search_args(run), "--experiment", EXPERIMENT]
    record = run.command("search", [run.python, *args], timeout=cap + STOP_S, interrupt_at=cap)
    record["budget"], record["cap_s"] = run.sizes.budget, round(cap, 1)
    trials = _stored_trials(run.work / "results" / EXPERIMENT)
    record["trials"] = trials
    finished = [t for t in trials if t["status"] in ("finished", "stopped") and t["objective"] is not None]
    errors = [t for t in trials if t["status"] == "error"]
    expected = {0} | ({130} if record.get("interrupted_at_s") is not None else set())
    problems = []
    if record.get("timed_out"):
        problems.append(f"did not stop within {STOP_S:.0f} s of SIGINT")
    elif record["returncode"] not in expected:
        problems.append(f"exit {record['returncode']}")
    if not finished:
        problems.append("no trial reported a validation")
    if errors:
        problems.append(f"{len(errors)} trial(s) failed: {errors[0].get('error')}")
    if run.mode == "full" and any(t["device_kind"] != "gpu" for t in trials):
        problems.append("trials ran on " + ", ".join(sorted({str(t["device_kind"]) for t in trials})))
    record["ok"] = not problems
    if problems:
        record["error"] = "; ".join(problems)
    return record


def _stored_trials(folder: Path) -> list[dict[str, Any]]:
    """Every stored trial's method, status, device kind, objective and wall time."""
    if not folder.is_dir():
        return []
    from automl_ad.results import store

    try:
        table = store.read_table(folder, store.TRIALS).to_pylist()
    except Exception as error:  # an empty or missing trials table
        return [{"status": "unreadable", "error": str(error), "device_kind": None, "objective": None}]
    keys = ("trial_id", "method", "image_size", "status", "device_kind", "objective", "wall_s", "error")
    return [{k: row.get(k) for k in keys} for row in table]


# --- the run --------------------------------------------------------------------------------

def environment(python: str, device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "interpreter": python, "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
                            "host": platform.node()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # no git, or a copy without .git
        info["commit"] = None
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every stage on the CPU at tiny sizes")
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    parser.add_argument("--out", type=Path, default=default_out, help=f"results JSON (default {default_out})")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    args = parser.parse_args()
    mode, sizes = ("smoke", SMOKE) if args.smoke else ("full", FULL)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check."))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = Run(sizes, mode, out, work, args.python)
    started = dt.datetime.now(dt.timezone.utc)
    env = environment(args.python, sizes.device)
    print(f"gpu_check {mode}: device {env.get('gpu', 'cpu')}, torch {env['torch']}, work {work}, "
          f"results {out}, deadline {sizes.deadline_s:.0f} s", flush=True)
    if mode == "full" and not env["cuda_available"]:
        run.stages["environment"] = {"ok": False, "error": "torch sees no CUDA device (use --smoke on a CPU machine)"}
    else:
        run.stages["environment"] = {"ok": True}
        try:
            run.stage("data", lambda: data_stage(run))
            for name, body in (("synthesis", synthesis_stage), ("train_step", train_step_stage),
                               ("inference", inference_stage)):
                run.stage(name, lambda body=body: body(run))
            if run.stages["data"].get("ok"):
                run.stage("calibration", lambda: calibration_stage(run))
                run.stage("search", lambda: search_stage(run))
            else:
                run.stages["calibration"] = run.stages["search"] = {"ok": False, "error": "no data (stage data failed)"}
        except KeyboardInterrupt:  # gpu_check.sh's backstop timeout: still write what was measured
            run.stages["interrupted"] = {"ok": False, "error": f"SIGINT after {time.monotonic() - run.began:.0f} s"}
    document = results_document(mode, run.stages, env, started=started, seconds=time.monotonic() - run.began,
                                deadline_s=sizes.deadline_s, work=work)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str))
    os.replace(tmp, out)
    print(f"gpu_check {mode}: {'PASSED' if document['ok'] else 'FAILED'} in {document['seconds']:.0f} s; "
          f"results in {out}" + "".join(f"\n  failed: {f}" for f in document["failures"]), flush=True)
    return 0 if document["ok"] else 1


def results_document(mode: str, stages: dict[str, dict[str, Any]], env: dict[str, Any], *, started: dt.datetime,
                     seconds: float, deadline_s: float, work: Path) -> dict[str, Any]:
    """The results JSON: ``ok`` when every stage passed; the calibration stage's rows at
    the top level, where ``automl_ad.tuning.gpu_prior`` reads them."""
    failures = [f"{name}: {record.get('error', 'failed')}" for name, record in stages.items() if not record.get("ok")]
    calibration = stages.get("calibration") or {}
    return {
        "format": FORMAT, "mode": mode, "ok": not failures, "failures": failures,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1), "deadline_s": deadline_s, "environment": env, "work": str(work),
        "calibration": {"device": calibration.get("device"), "rows": calibration.get("rows", [])},
        "stages": stages,
    }


if __name__ == "__main__":
    sys.exit(main())
