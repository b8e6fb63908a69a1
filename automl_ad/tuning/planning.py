"""From a search's options to its schedule: what the planner is told of each method,
the plan itself (calibrated, learnt and sampled costs), ``search --plan``, what trials
cost against the plan kept for the next one, and the warm-start points."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from automl_ad import experiment as layout
from automl_ad.data.dataset import resolve_data_root
from automl_ad.data.geometry import Geometry, median_shape, offered, shape_text
from automl_ad.data.geometry import check_memory
from automl_ad.data.geometry import resolve as resolve_geometry
from automl_ad.data.layout import discover_category
from automl_ad.errors import UserError
from automl_ad.plugins import load_plugins
from automl_ad.methods.base import get_method_class
from automl_ad.results import store
from automl_ad.results.remote_storage import parse_storage
from automl_ad.tuning import learned_costs
from automl_ad.tuning.budget import Budget, parse_budget
from automl_ad.tuning.calibration import SpeedBook
from automl_ad.tuning.devices import DevicePlan, local_resources, plan_devices, trial_context
from automl_ad.tuning.finalize import default_backbone
from automl_ad.tuning.options import SearchOptions, pick_experiment
from automl_ad.tuning.planner import make_plan, plan_with_calibration
from automl_ad.tuning.sampled_costs import config_cost_factor, sampled_cost_factors
from automl_ad.tuning.schedule import (
    DataCounts,
    MethodInput,
    Plan,
    data_counts,
    recipe_for,
    val_images,
)
from automl_ad.param_keys import method_key, size_key, split_config
from automl_ad.tuning.space import SearchSpace, load_space
from automl_ad.tuning.trainable import allocated_devices


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def method_inputs(space: SearchSpace, val_good: int) -> list[Any]:
    """What the planner needs to know of each method of ``space``."""
    out = []
    for name, method_space in sorted(space.methods.items()):
        cls = get_method_class(name)
        searched = method_space.params.get("backbone")
        default = default_backbone(name)
        if searched is not None and searched.type == "categorical":
            choices = [str(b) for b in searched.choices]
            # the Config's default first: the one a calibration times
            backbones: tuple[str | None, ...] = tuple(sorted(choices, key=lambda b: b != default))
        else:
            backbones = (default,)
        family = method_space.synthesis[0] if method_space.synthesis else None
        out.append(MethodInput(name=name, trainable=bool(tuple(cls.phases)), recipe=recipe_for(name),
                               sizes=tuple(space.method_sizes(name)), backbones=backbones,
                               val_images=val_images(family, val_good)))
    return out


def plan_schedule(opts: SearchOptions, budget: Budget, space: SearchSpace, data_root: Path, devices: DevicePlan,
                  *, calibrate: bool = True, log: Callable[[str], None] | None = None,
                  geometry: Geometry | None = None) -> Plan:
    """The search's schedule (``planner.make_plan``) for ``devices``: speeds measured on
    this machine's device when it has it (``calibrate``: measure what is missing first),
    else the project's prior for the device kind."""
    kind = "gpu" if devices.use_gpu else "cpu"
    if kind == "gpu":
        import torch

        device, threads = ("cuda:0" if torch.cuda.is_available() else None), 1
    else:
        device, threads = "cpu", max(1, int(opts.cpus_per_trial))
    counts = data_counts(data_root, opts.category)
    tiles = geometry.tiles(max(space.all_image_sizes())) if geometry is not None else 1
    if tiles > 1:  # every image is that many model inputs: fit, scored and tested tile by tile
        counts = DataCounts(fit=counts.fit * tiles, val_good=counts.val_good * tiles, test=counts.test * tiles)
    methods = _with_learned_costs(method_inputs(space, counts.val_good), device, threads, tiles)
    bounds = space.fidelity
    speeds = SpeedBook(kind, device, threads, trainable={m.name: m.trainable for m in methods})
    # Speeds decide nothing when the steps are fixed and every method has one size.
    needed = not bounds.steps_per_epoch or any(len(m.sizes) > 1 for m in methods)
    probe = trial_context(opts, devices, space)  # what one trial holds, before there is a schedule
    options = dict(category=opts.category, devices_per_trial=allocated_devices(probe, kind),
                   concurrency=devices.max_concurrent, workers=probe.num_workers, use_train=opts.use_train,
                   keep_all=bool(opts.methods))  # methods the user named stay, however short their schedule
    plan = plan_with_calibration(budget, methods, bounds, speeds, counts, calibrate=calibrate and needed, log=log,
                                 **options)
    # What a drawn configuration costs changes the count of trials, not what joins the
    # plan: it is worked out for the methods that joined (costing one takes ~0.4 s).
    planned = {e.method for e in plan.entries}
    data = dataclasses.asdict(counts)
    ratios = _draw_ratios(device, threads, tiles, planned) if opts.searcher == "tpe" else {}
    methods = [dataclasses.replace(m, sampled_cost=sampled_cost_factors(space, m.name, data),
                                   draw_ratio=ratios.get(m.name, 1.0))
               if m.name in planned else m for m in methods]
    plan = make_plan(budget, methods, bounds, speeds, counts, **options)
    if geometry is not None and tiles > 1:
        shapes = ", ".join(f"{size} -> {geometry.describe(size)}" for size in plan.all_sizes())
        plan.notes.append(f"geometry tiled: every image is {tiles} model inputs, so each costs {tiles} images' "
                          f"setup and inference (image counts above are tiles): {shapes}")
    elif geometry is not None and not geometry.square:
        # Same pixels per image at each size, so the same costs; only the shape differs.
        shapes = ", ".join(f"{size} -> {shape_text(geometry.shape(size))}" for size in plan.all_sizes())
        plan.notes.append(f"geometry {geometry.mode}: the images' aspect ({geometry.aspect:.2f} width/height) "
                          f"at each size's pixel count: {shapes}")
    if geometry is not None:
        note = _geometries_note(geometry, discover_category(data_root, opts.category).train, max(plan.all_sizes()))
        if note:
            plan.notes.append(note)
    return plan


def _geometries_note(chosen: Geometry, paths: list[Path], size: int) -> str | None:
    """What each geometry that can help this product costs against this search's, or None
    for a product of small square images (nothing but square can help it)."""
    choices = offered(chosen.aspect, median_shape(paths), size)
    if len(choices) == 1:
        return None
    described = ", ".join(f"{g.label(size)} ({g.tiles(size) / chosen.tiles(size):.3g}x)" for g in choices)
    return (f"geometries that can help these images at {size} px (--geometry; setup and inference a trial against "
            f"this search's {chosen.mode}): {described}")


def _with_learned_costs(methods: list[Any], device: str | None, threads: int, tiles: int = 1) -> list[Any]:
    """``methods`` with what earlier searches' trials cost on this machine against their
    plans (learned_costs), at this geometry's tiles per image; a tiled plan with nothing
    learnt tiled yet starts from the untiled ratio, nearer its own than 1 (KolektorSDD:
    2.15 tiled, 1.77 untiled)."""
    learned = learned_costs.factors(learned_costs.machine_key(device, threads)) if device else {}
    out = []
    for m in methods:
        found = learned.get(learned_costs.cost_key(m.name, tiles)) or learned.get(m.name)
        out.append(m if found is None else dataclasses.replace(
            m, learned=found.factor, learned_trials=found.trials, learned_start_up=found.start_up,
            learned_start_up_planned=found.planned_start_up))
    return out


def _draw_ratios(device: str | None, threads: int, tiles: int, names: set[str]) -> dict[str, float]:
    """``{method: realized / planned cost factor of earlier TPE searches' drawn trials}``
    of ``names`` (at this geometry's tiles, else untiled), as learned_costs keeps them."""
    found = learned_costs.draw_ratios(learned_costs.machine_key(device, threads)) if device else {}
    hits = {name: found.get(learned_costs.cost_key(name, tiles)) or found.get(name) for name in names}
    return {name: hit[0] for name, hit in hits.items() if hit}


def learn_costs(folder: Path, opts: SearchOptions, devices_gpu: bool,
                warm_starts: Sequence[Mapping[str, Any]] = ()) -> None:
    """Keep what this search's finished trials cost against their plan (learned_costs),
    and, for a TPE search, what its drawn trials (all but its ``warm_starts``
    configurations) cost against the factor the plan counted for a draw, for the next
    plan on this machine; a plan without a measured device learns nothing."""
    plan_dict = (layout.read_record(folder) if layout.has_record(folder) else {}).get("plan")
    if not plan_dict or plan_dict.get("budget_kind") == "trials":
        return
    if devices_gpu:
        import torch

        device, threads = ("cuda:0" if torch.cuda.is_available() else None), 1
    else:
        device, threads = "cpu", max(1, int(opts.cpus_per_trial))
    if device is None:
        return
    plan = Plan.from_dict(plan_dict)
    default_size = plan.all_sizes()[0] if plan.entries else 128
    geometry = Geometry.from_dict(layout.read_record(folder).get("geometry"))
    tiles = geometry.tiles(max(plan.all_sizes())) if plan.entries else 1
    rows = sorted((r for r in store.read_table(folder).to_pylist() if r.get("params")),
                  key=lambda r: (r.get("started") is None, r.get("started") or 0, str(r.get("trial_id"))))
    seen, drawn = [], []
    for row in rows:
        params = json.loads(row["params"])
        split = split_config(params, default_size)
        entry = plan.entry(split.method, split.image_size)
        if entry is None:
            continue
        key, name = learned_costs.cost_key(split.method, tiles), f"{row.get('experiment')}/{row.get('trial_id')}"
        factor = config_cost_factor(split.method, split.method_params, split.image_size, plan.data)
        if opts.searcher == "tpe" and not _is_warm_start(params, warm_starts) and entry.sampled_factor > 0:
            drawn.append((key, factor, entry.sampled_factor / max(entry.draw_ratio, 1e-9), name))
        if row.get("status") != "finished" or not row.get("wall_s"):
            continue
        backbone = split.method_params.get("backbone")
        seconds = plan.seconds_at(split.method, split.image_size, str(backbone) if backbone else None,
                                  int(row.get("epochs") or plan.rounds), factor)
        if seconds:
            overhead = entry.overhead_s or 0.0
            start_up = entry.start_up_s if entry.start_up_s is not None else overhead / max(entry.learned_factor, 1e-9)
            # the calibrated seconds: the plan's start-up + its work before any learnt factor
            planned = start_up + (seconds - overhead) / max(entry.learned_factor, 1e-9)
            seen.append((key, planned, float(row["wall_s"]), name, start_up))
    try:
        learned_costs.record(learned_costs.machine_key(device, threads), seen, draws=drawn)
    except OSError as error:  # a read-only home: the next plan keeps the calibrated costs
        print(f"notice: trial costs not kept for later plans ({error})", file=sys.stderr)


def _is_warm_start(params: Mapping[str, Any], warm_starts: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a trial ran one of the warm-start configurations (by value: a warm start
    the searcher refused leaves no trial, and a resume may run one again)."""
    return any(all(params.get(key) == value for key, value in point.items()) for point in warm_starts)


def preview_plan(opts: SearchOptions) -> Plan:
    """``search --plan``: the schedule a search with ``opts`` would run, without Ray and
    without training (unless ``opts.calibrate``). The devices are this machine's; a GPU
    budget on a machine without one is planned for ``--max-gpus`` GPUs (default 1) with
    the GPU prior."""
    budget = parse_budget(opts.budget)
    if opts.resume:  # the schedule the search runs is the one it stored
        spec = parse_storage(opts.storage)
        if spec.is_remote:
            raise UserError("--plan --resume reads the stored plan from a local --storage folder only")
        folder = store.experiment_dir(spec.local, pick_experiment(opts, spec))
        saved = layout.read_record(folder) if layout.has_record(folder) else {}
        if not saved.get("plan"):
            raise UserError(f"--resume: no stored plan in {layout.record_path(folder)}")
        return Plan.from_dict(saved["plan"])
    load_plugins(opts.plugins)
    space = load_space(opts.methods, opts.space_file, **({"space_dir": opts.space_dir} if opts.space_dir else {}),
                       image_size=opts.image_size)
    data_root = resolve_data_root(opts.data, opts.category)
    resources = local_resources()
    max_gpus = opts.max_gpus
    if max_gpus is None and budget.device == "gpu" and resources["GPU"] == 0:
        max_gpus = max(1.0, opts.gpus_per_trial)
    devices = plan_devices(budget, resources, max_gpus=max_gpus, gpus_per_trial=opts.gpus_per_trial,
                           cpus_per_trial=opts.cpus_per_trial, use_train=opts.use_train,
                           max_concurrent=opts.max_concurrent)
    found = discover_category(data_root, opts.category)
    geometry = resolve_geometry(opts.geometry, found.train, max(space.all_image_sizes()))
    check_memory(geometry, max(space.all_image_sizes()), len(found.train), len(found.test))
    return plan_schedule(opts, budget, space, data_root, devices, calibrate=opts.calibrate, log=_log,
                         geometry=geometry)


def warm_start_points(space: SearchSpace, schedule: Plan) -> list[dict[str, Any]]:
    """The first configurations a TPE search runs: every planned method at its defaults
    (the papers' settings). A method that trains runs at its planned size nearest the
    paper's (the size its schedule was measured at); a method that trains nothing runs at
    its largest planned size, once per searchable backbone: a memory bank's only knobs that
    matter much are its features and their resolution (a finer patch grid resolves smaller
    defects), and the plan only keeps sizes the budget affords (docs/search.md, "Warm
    start", has the measurement). Methods that train nothing come first
    (cheap, strong), then the others, cheapest full trial first. No data is looked at:
    these are priors. A method whose cheapest full trial would take more than the share
    of the budget one trial may block (``Plan.heavy_limit_s``: budget / min_trials) gets no
    warm start: a prior that costs a quarter of a 15-minute budget (CFA on a CPU, which
    then tested 0.55 on KolektorSDD) is not where a small budget pays; TPE may still
    sample it."""
    def full_cost(method: str) -> float:
        return min(e.full_s for e in schedule.entries if e.method == method)

    def trains(method: str) -> bool:
        return recipe_for(method).epochs > 0

    limit = schedule.heavy_limit_s
    methods = sorted((m for m in space.methods if limit is None or not trains(m) or full_cost(m) <= limit),
                     key=lambda m: (trains(m), full_cost(m), m))
    points = []
    for method in methods:
        point = space.defaults(method)
        if space.sizes_searched(method):
            sizes, paper = space.method_sizes(method), recipe_for(method).image_size
            point[size_key(method)] = (min(sizes, key=lambda size: (abs(size - paper), size)) if trains(method)
                                             else max(sizes))
        backbone = space.methods[method].params.get("backbone")
        if not trains(method) and backbone is not None and backbone.type == "categorical":
            ordered = [backbone.default] + [b for b in backbone.choices if b != backbone.default]
            points.extend({**point, method_key(method, "backbone"): b} for b in ordered)
        else:
            points.append(point)
    return points
