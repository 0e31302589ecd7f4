"""A distillation run: the one place where a method, its configuration, the data, the run's
work folder, a time budget and the set's timings come together. `ddtool distill`, the Python
API and the scripts all go through `prepare_distill` and `DistillRun.distill`.

    run = prepare_distill("datm", ipc=10, budget="30m")  # method None: the dataset's default
    print("\\n".join(run.plan()))      # what will run, timed on this machine
    sset = run.distill()               # a SyntheticSet with .timings
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ddtool import distributed
from ddtool.data import PreparedData, prepare
from ddtool.data.prepare import check_ipc_fits, class_indices
from ddtool.data.registry import get_spec
from ddtool.device import describe_hardware, resolve_device
from ddtool.durations import parse_duration
from ddtool.errors import ConfigError
from ddtool.evaluation import EvaluationReport, evaluate_set, get_protocol
from ddtool.methods.base import (
    DEFAULT_CPU_RECIPES, DEFAULT_METHOD, DistillContext, Method, build_config, current_names, get_method_class,
    resolve_preset, run_fingerprint,
)
from ddtool.methods.budget import SIZED_BY_BUDGET
from ddtool.networks import create_network, same_network
from ddtool.paths import cache_root
from ddtool.storage import UNKNOWN_SEED, SyntheticSet, append_evaluation, load_synthetic_set
from ddtool.files import write_atomically

BUDGET_PLAN = "budget_plan.json"  # in the work folder: the sized configuration --resume continues



@dataclass
class DistillRun:
    """A prepared run: configuration resolved (and sized to the budget), data loaded."""

    method: Method
    preset: str | None  # the preset the configuration started from, as resolved for the IPC
    overrides: dict[str, Any]
    ctx: DistillContext
    budget: Any | None = None  # ddtool.methods.budget.BudgetPlan
    budget_reused: bool = False  # the plan of the interrupted run this one resumes
    budget_by_default: bool = False  # the dataset's default budget on a CPU, not one asked for
    recorded_from: str | None = None  # the set whose recorded settings this run repeats (recorded_run)
    recorded_changes: dict = dataclasses.field(default_factory=dict)  # what the user changed of them
    method_by_default: bool = False  # the dataset's default method on a CPU, not one named
    budget_recipe: dict = dataclasses.field(default_factory=dict)  # the method's budgeted settings it took

    @property
    def data(self) -> PreparedData:
        return self.ctx.data

    @property
    def config(self) -> Any:
        return self.method.config

    @property
    def work_dir(self) -> Path:
        return self.ctx.work_dir

    def plan(self) -> list[str]:
        """What the run will do, one line per part, with its time measured on this machine."""
        data = self.data
        lines = [f"data: {data.spec.name} from {data.source or 'memory'}: {len(data.train_y):,} training images "
                 f"({len(data.val_y):,} more held out for validation), {len(data.test_y):,} test images"]
        if self.method_by_default:
            lines.append(f"method {self.method.name}: the default for {data.spec.name} on a CPU (it scored best on "
                         f"the validation split; --method names another)")
        if self.recorded_from is not None:
            changed = ", ".join(f"{k}={v}" for k, v in self.recorded_changes.items())
            lines.append(f"settings: every one recorded in {self.recorded_from}" + (f", with {changed}" if changed else ""))
        elif self.preset is not None:
            changed = ", ".join(f"{k}={v}" for k, v in self.overrides.items())
            lines.append(f"preset {self.preset}" + (f", with {changed}" if changed else ""))
        if self.budget is not None:
            lines += self.budget.describe()
            if self.budget_by_default:
                lines.append(f"the budget is the default for {data.spec.name} on a CPU: --budget changes it, "
                             f"--preset {self.method.default_preset} runs the preset as it is")
            if self.budget_recipe:
                taken = ", ".join(f"{k}={v}" for k, v in self.budget_recipe.items())
                lines.append(f"a budgeted {self.method.name} run at IPC {self.ctx.ipc} also takes {taken} (chosen "
                             f"on the validation split; --set changes it)")
            if self.budget_reused:
                lines.append("the budget's sizing is the interrupted run's (--resume), not measured again")
        lines += self.method.plan(self.ctx)
        lines.append(f"checkpoints and log in {self.work_dir}")
        return lines

    def distill(self) -> SyntheticSet:
        """Run the method; the set comes back with its timings (see SyntheticSet.timings)."""
        if distributed.is_main():
            self.work_dir.mkdir(parents=True, exist_ok=True)
            if self.budget is not None:
                write_atomically(self.work_dir / BUDGET_PLAN, json.dumps(
                    {"config": dataclasses.asdict(self.config), "iteration_s": self.method.budget_iteration_s,
                     "workers": self.method.budget_workers},
                    indent=1).encode())
        ctx = self.ctx
        started = time.perf_counter()
        sset = self.method.distill(ctx)
        wall = time.perf_counter() - started + ctx.resumed_s
        distill_s = wall - ctx.experts_trained_s
        sset.config["seconds"] = round(wall, 1)
        sset.config["device"] = str(ctx.device)
        if distributed.world_size() > 1:
            sset.config["processes"] = distributed.world_size()
        experts_s = ctx.experts_s
        sset.timings = {"experts_s": None if experts_s is None else round(experts_s, 3),
                        "distill_s": round(distill_s, 3),
                        "total_s": None if experts_s is None else round(experts_s + distill_s, 3),
                        "hardware": describe_hardware(ctx.device)}
        return sset


def default_method(dataset: str, device: str | torch.device = "auto") -> str:
    """The method `ddtool distill` runs when none is named: the dataset's default recipe's on a
    CPU, else DEFAULT_METHOD."""
    recipe = _cpu_recipe(dataset, device)
    return recipe["method"] if recipe else DEFAULT_METHOD


def _cpu_recipe(dataset: str, device: str | torch.device) -> dict | None:
    device = resolve_device(device) if isinstance(device, str) else device
    return DEFAULT_CPU_RECIPES.get(get_spec(dataset).name) if device.type == "cpu" else None


def prepare_distill(method: str | None = None, ipc: int = 10, *, dataset: str = "fashion-mnist",
                    data_root: str | None = None, preset: str | None = None,
                    settings: dict[str, Any] | None = None, budget: str | float | None = None, seed: int = 0,
                    device: str | torch.device = "auto", resume: bool = False, progress: bool = True,
                    log: Callable[[str], None] = print, data: PreparedData | None = None,
                    work_dir: str | Path | None = None) -> DistillRun:
    """Resolve a run: the method's preset (its variant for `ipc`) with `settings` applied, the
    data, the work folder; with `budget` (seconds, or a text such as "30m"), the configuration
    sized to it on this machine (trajectory methods). `method` None: `default_method`. Without
    a budget, a CPU run on a dataset of DEFAULT_CPU_RECIPES that names no preset and sizes
    nothing itself gets that dataset's budget. Nothing is trained or written.

    For scripts that run many cells: `data`, the dataset already prepared (`dataset` and
    `data_root` are then not read; it must be whitened exactly when the method whitens), and
    `work_dir`, a folder of their own for checkpoints and the log in place of the cache's
    folder named by the run's fingerprint (where --resume finds it)."""
    method_by_default = method is None
    method = default_method(dataset, device) if method is None else method
    method_cls = get_method_class(method)
    overrides = dict(settings or {})
    config = build_config(method_cls, preset, overrides, ipc=ipc)
    torch_device = distributed.device_for_rank(resolve_device(device) if isinstance(device, str) else device)
    spec = get_spec(dataset) if data is None else data.spec
    budget_s = None if budget is None else parse_duration(budget)
    recipe = _cpu_recipe(spec.name, torch_device)
    budgeted: dict[str, Any] = {}  # the method's budget recipe, where the user did not set it
    # settings the budget would size: given, they run the preset instead of the default budget
    sized_by_budget = (SIZED_BY_BUDGET | method_cls.budget_sized_settings) & set(overrides)
    by_default = budget_s is None and preset is None and not sized_by_budget and \
        method_cls.fits_budget and recipe is not None
    if by_default:
        budget_s = recipe["budget_s"]
    if budget_s is not None:
        if not method_cls.fits_budget:
            able = _methods_that_fit_budgets()
            raise ConfigError(f"--budget sizes the runs of {', '.join(able)}; {method} has no settings to size "
                              "(drop --budget, or choose one of those methods).")
        if sized_by_budget:
            placed = (" (budget_start_share places the start epochs along whatever trajectory the budget gives)"
                      if sized_by_budget & method_cls.budget_sized_settings else "")
            raise ConfigError(f"--budget sizes {', '.join(sorted(sized_by_budget))} itself; drop "
                              f"{' and '.join(sorted(sized_by_budget))} from the settings, or drop --budget{placed}.")
        budgeted = {name: value for name, value in method_cls.budget_recipes.get(ipc, {}).items()
                    if name not in overrides}
        config = dataclasses.replace(config, budget_s=float(budget_s), **budgeted)
    method_obj = method_cls(config)
    if data is None:
        data = prepare(spec.name, data_root, zca=method_obj.whitens, device=torch_device)
    elif (data.preprocessing.zca is not None) != method_obj.whitens:
        raise ConfigError(f"{method} {'works on ZCA-whitened' if method_obj.whitens else 'does not whiten'} images "
                          f"and the data given {'are' if data.preprocessing.zca is not None else 'are not'} "
                          f"whitened: prepare them with zca={method_obj.whitens}.")
    if work_dir is None:
        work_dir = cache_root() / "runs" / run_fingerprint(method, config, data.spec.name, ipc, seed)
    ctx = DistillContext(data=data, ipc=ipc, seed=seed, device=torch_device, work_dir=Path(work_dir), data_root=data_root,
                         resume=resume, progress=progress, log=log)
    run = DistillRun(method_obj, resolve_preset(method_cls, preset, ipc), overrides, ctx,
                     budget_by_default=by_default, method_by_default=method_by_default,
                     budget_recipe=budgeted)
    if budget_s is not None:
        _size_to_budget(run, budget_s)
    return run


def recorded_run(path: str | Path) -> dict[str, Any]:
    """The arguments of `prepare_distill` (and `ddtool.distill`) that make the set at `path` again:
    its method, dataset, IPC, seed, and every setting of its recorded configuration (in full, so
    no preset is named; what the run added to the record, such as the iteration it selected, is
    left out). A CPU run repeats bit for bit, except where a budget stopped it: a budgeted run
    stops at the same budget, measured on this machine."""
    sset = load_synthetic_set(path)
    method_cls = get_method_class(sset.method)
    fields = {f.name for f in dataclasses.fields(method_cls.config_class)}
    settings = {name: value for name, value in current_names(method_cls.config_class, sset.config).items()
                if name in fields}
    if sset.seed == UNKNOWN_SEED or (fields and not settings):
        raise ConfigError(f"{path} does not record how it was made (an imported set, or one written by another "
                          "tool): there is no run to repeat.")
    return {"method": sset.method, "ipc": sset.ipc, "dataset": sset.dataset, "seed": sset.seed,
            "settings": settings}


def _size_to_budget(run: DistillRun, seconds: float) -> None:
    from ddtool.methods.budget import fit_budget

    method_cls = type(run.method)
    saved = run.work_dir / BUDGET_PLAN
    # each process times this machine for itself; under torchrun all take rank 0's sizing
    plan = distributed.decided_by_rank_zero(lambda: fit_budget(run.method, run.ctx, seconds))
    if run.ctx.resume and saved.exists():
        # the interrupted run's sizing, so that it continues on the same experts and schedule
        saved_plan = json.loads(saved.read_text())
        if "config" not in saved_plan:  # written before the timed iteration was kept beside it
            saved_plan = {"config": saved_plan, "iteration_s": None}
        config = method_cls.config_class(**current_names(method_cls.config_class, saved_plan["config"]))
        # the interrupted run's timing, so that its iterations are counted as they were (none: not at all)
        iteration_s, workers = saved_plan["iteration_s"], saved_plan.get("workers", plan.workers)
        plan = dataclasses.replace(plan, config=config, iteration_s=iteration_s or plan.iteration_s)
        run.budget_reused = True
    else:
        iteration_s, workers = plan.iteration_s, plan.workers
    run.method = method_cls(plan.config)
    run.method.budget_iteration_s, run.method.budget_workers = iteration_s, workers
    if not run.budget_reused:  # the plan states the figures the sizing timed, not a second timing
        run.method.timed_iteration_s = plan.iteration_s
        if not plan.experts_cached:
            run.method.timed_experts_s = plan.experts_s
    run.budget = plan


def _methods_that_fit_budgets() -> list[str]:
    from ddtool.methods.base import list_methods

    return [name for name in list_methods() if get_method_class(name).fits_budget]


# ---- evaluating a saved set ---------------------------------------------------------------
def evaluate_file(path: str | Path, *, protocol: str | None = None, archs: list[str] | None = None,
                  runs: int | None = None, epochs: int | None = None, seed: int = 0, data_root: str | None = None,
                  device: str | torch.device = "auto", baselines: bool = True, reference: bool | None = None,
                  record: bool = True, compile: bool = False, resume: bool = False, precision: str | None = None,
                  hard_labels: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> list[EvaluationReport]:
    """Train fresh networks on the set saved at `path`, one report per network in `archs` (the
    network it was distilled for by default), each beside its matched baselines, and record
    each in the file unless `record` is False. `protocol` None: the set's own (`default_protocol`).
    With `resume`, an evaluation the file already records (same protocol, network and seed) is
    not run again, and an interrupted one takes the runs it finished."""
    path = Path(path)
    device = distributed.device_for_rank(resolve_device(device) if isinstance(device, str) else device)
    sset = _load_set_on_every_rank(path)
    # what was evaluated, to refuse recording into the file if another set replaces it meanwhile
    evaluated_content = sset.content_digest()
    archs = list(archs or [sset.config.get("student_arch") or "convnet"])
    chosen = get_protocol(protocol or default_protocol(sset)).with_overrides(
        epochs=epochs, runs=runs, precision=precision, soft_labels=False if hard_labels else None)
    if hard_labels and chosen.kd is not None:
        raise ConfigError(f"--hard-labels: the {chosen.name} protocol trains on a teacher's soft labels of each "
                          "view, not on the set's labels; choose a protocol without a teacher (mtt, datm, classic, "
                          "classic-dsa).")
    data = prepare(sset.dataset, data_root, preprocessing=sset.preprocessing, device=device)
    if baselines:  # the random baseline draws IPC real images a class: refuse now, not after the set's runs
        check_ipc_fits(class_indices(data.train_y.cpu(), data.spec.num_classes), sset.ipc)
    for arch in archs:  # a misspelt network fails now, not after the first network's hours
        create_network(arch, channels=data.spec.channels, num_classes=data.spec.num_classes,
                       image_size=data.spec.image_size)
    log(f"Evaluating {path} ({sset.method}, IPC {sset.ipc}, {sset.label_kind} labels) under the "
        f"{chosen.name!r} protocol: {chosen.runs} fresh network{'s' if chosen.runs != 1 else ''} x "
        f"{chosen.epochs} epochs.")
    reports = []
    for arch in archs:
        recorded = (recorded_evaluation(sset, chosen, arch, seed, baselines=baselines, reference=reference is True)
                    if resume and record else None)
        if recorded is not None:
            log(f"{arch}: {path} already records this evaluation (record {recorded}: the same protocol, network "
                "and seed), so there is nothing to resume. Without --resume, `ddtool evaluate` runs it again "
                "(recorded as a new record only if its accuracies differ: on a CPU they repeat bit for bit).")
            continue
        report = evaluate_set(sset, data, protocol=chosen, arch=arch, seed=seed, baselines=baselines,
                              reference=reference, progress=progress, compile=compile, resume=resume,
                              keep_runs=True)
        if record and distributed.is_main():
            append_evaluation(path, report.to_record(), expected_content=evaluated_content)
        # each rank kept the set's runs for a resume until now (rank 0 has recorded them)
        distributed.barrier()
        report.release_kept_runs()
        reports.append(report)
    return reports


def default_protocol(sset: SyntheticSet) -> str:
    """The protocol a set is judged under unless told otherwise: the one its method's own sets
    are (the published evaluation), also for a set made elsewhere whose method is known."""
    method = sset.method
    if method.startswith("imported:"):
        fmt = method.partition(":")[2]
        original = sset.config.get("original")  # an npz/torch export of a ddtool set names its method
        if isinstance(original, dict) and isinstance(original.get("method"), str):
            method = original["method"]
        elif fmt == "mtt":
            # MTT, TESLA and FTD save hard labels in this format; DATM alone saves soft logits.
            method = "datm" if sset.is_soft else "mtt"
        else:
            method = fmt
    try:
        return get_method_class(method).default_protocol
    except ConfigError:  # a method ddtool does not know (DC, DSA, another tool's)
        # only the MTT family learns an lr, and its sets are judged under the mtt protocol
        return "mtt" if sset.learned_lr is not None else "classic"


def recorded_evaluation(sset: SyntheticSet, protocol, arch: str, seed: int, *, baselines: bool,
                        reference: bool) -> int | None:
    """The index of a record of `sset` made by this very evaluation, if it finished before: the
    same protocol, seed and network, with the baselines this one asks for."""
    wanted = json.loads(json.dumps(protocol.to_dict()))  # as a record reads back (lists, not tuples)
    for index, record in enumerate(sset.evaluations):
        if record.get("protocol") != wanted or record.get("seed") != seed:
            continue
        held = record.get("baselines") or {}
        if (baselines and "random_subset" not in held) or (reference and "whole_dataset" not in held):
            continue
        try:
            if same_network(str(record.get("arch")), arch):
                return index
        except ConfigError:  # a record of a network this version no longer knows
            continue
    return None


def _load_set_on_every_rank(path: Path) -> SyntheticSet:
    """The set at `path` as rank 0 reads it, on every rank (under torchrun the other ranks
    need not see rank 0's file system, and cannot read a file rank 0 is still writing)."""
    return distributed.broadcast_object(load_synthetic_set(path) if distributed.is_main() else None)
