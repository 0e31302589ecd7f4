"""Reproduce ddtool's Fashion-MNIST results: distil every set with its shipped preset, evaluate
it on fresh networks, and write the tables (into docs/results.md), the plots and synthetic_sets/.

    python scripts/run_results.py plan                          # what would run, what is done
    python scripts/run_results.py run --table main --ipc 10     # distil + evaluate what is missing
    python scripts/run_results.py run --table ablation --only ftd datm
    python scripts/run_results.py run --table cross-arch
    python scripts/run_results.py run --table gpu               # on a machine with CUDA only
    python scripts/run_results.py tables                        # docs/results.md tables + plots from the files
    python scripts/run_results.py merge OUT/cross-arch/*.h5     # records of copies evaluated elsewhere

Every cell is one HDF5 set with its evaluations inside: `run` skips a set that exists and an
evaluation the set already records (same protocol, epochs, runs, architecture), and resumes an
interrupted distillation from its checkpoint and an interrupted evaluation from the runs it
finished (`plan` lists them), so rerunning continues where it stopped. A set
made before its preset changed is not taken as done: `plan` marks it STALE and `run` skips it
with the settings that moved, for the user to move it away and re-make it. `tables`
reads only the files, so each number in the results page comes from a set anyone can re-evaluate
(`ddtool evaluate SET.h5 --protocol P --runs 5`). Several `run` processes may work on disjoint
rows at once (--only); on a shared CPU give each OMP_NUM_THREADS=1.

Tables (each between `<!-- results:NAME -->` markers in docs/results.md, or the page `--page` names):
- main: every method at IPC 1, 10, 50 under its own protocol, with the matched random-subset
  baseline and the whole-dataset reference of the same protocol and network (`run --reference`
  trains it, into synthetic_sets/whole_dataset.json).
- ablation: the trajectory-matching family at IPC 10, cumulative, all under the mtt protocol.
- cross-arch: the IPC-10 sets trained on ConvNet, AlexNet, VGG11 and ResNet-18.
- gpu: the main table's distilling methods with their `fashion-gpu` presets (sized for a GPU:
  longer experts, wider networks, thousands of iterations), each set and its evaluation made on
  the GPU `run` finds; `run --table gpu` refuses a machine without CUDA. The coreset rows have
  no GPU preset (their sets are the same on any hardware), so they are not repeated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETS = ROOT / "synthetic_sets"
PLOTS = ROOT / "docs" / "results"
RESULTS_PAGE = ROOT / "docs" / "results.md"  # the page whose markers `tables` rewrites
REFERENCES = SETS / "whole_dataset.json"  # the whole-dataset references, per protocol and network
# Finished runs of evaluations cut off by a session's end, carried to the next machine (see carry_kept_runs)
KEPT_RUNS = SETS / "kept_runs"
DATASET = "fashion-mnist"
RUNS = 5
# Settings that change how a run is watched or resumed, not the set it makes.
RUN_ONLY_SETTINGS = {"checkpoint_every", "eval_every", "eval_epochs", "seconds", "device"}
KD_EPOCHS = 100  # the curriculum CPU presets store views for 100 epochs (docs/results.md, "Curriculum synthesis")
CROSS_ARCHS = ("convnet:width=32", "alexnet", "vgg11", "resnet18")
EMA = ("ema_decay=0.98", "ema_bias_correction=true")  # FTD's fashion-cpu average
AST = ("ast_balanced_loss=0.5", "ast_intermediate_weight=1.0", "ast_weight_perturbation=0.01")
# The ablation's budget, pinned: the base fashion-cpu presets' 6-epoch experts and start epochs,
# not the IPC-10 variants (20-epoch experts) that the main table's sets use.
ABLATION_BUDGET = {"mtt": ("expert_train_epochs=6", "max_start_epoch=4"),
                   "datm": ("expert_train_epochs=6", "max_start_epoch=2", "max_start_epoch_final=4")}


@dataclass(frozen=True)
class Cell:
    """One synthetic set of a table: how to make it and how to evaluate it."""

    key: str  # unique within its table
    label: str  # the row's name in the table
    method: str
    ipc: int
    path: Path
    settings: tuple[str, ...] = ()
    protocol: str | None = None  # None: the method's own
    epochs: int | None = None  # None: the protocol's
    archs: tuple[str, ...] = ()  # () : the network the set was distilled for
    baselines: bool = True  # also train the matched random-subset baseline
    preset: str | None = None  # None: the method's default (its fashion-cpu presets)
    budget: str | None = None  # a wall-clock budget ("30m"): the default recipe sized to it, no preset named
    notes: dict = field(default_factory=dict, compare=False)

    def recipe(self) -> list[str]:
        """The `ddtool distill` arguments that choose the set: method, IPC, preset, settings."""
        arguments = ["--method", self.method, "--ipc", str(self.ipc)]
        if self.budget:  # the default recipe: the method's preset for the IPC, sized to the budget on this machine
            return arguments + ["--budget", self.budget]
        # named even when it is the method's default: without a preset, distill would size a
        # trajectory run to its default time budget instead of running the preset as it is
        preset = self.preset or self.method_class().default_preset
        if preset:
            arguments += ["--preset", preset]
        for setting in self.settings:
            arguments += ["--set", setting]
        return arguments

    def distill_command(self) -> list[str]:
        return ["ddtool", "distill", *self.recipe(), "--dataset", DATASET, "--output", str(self.path), "--resume",
                "--no-eval", "--seed", "0", "--quiet"]

    def method_class(self):
        from ddtool.methods.base import get_method_class

        return get_method_class(self.method)

    def config(self):
        """The configuration the cell's set is distilled with (its preset, its settings)."""
        from ddtool.methods.base import build_config, get_method_class, parse_overrides

        method_cls = get_method_class(self.method)
        return build_config(method_cls, self.preset, parse_overrides(method_cls.config_class, self.settings),
                            ipc=self.ipc)

    def evaluate_command(self, arch: str | None, compile: bool = False, processes: int = 1) -> list[str]:
        # --resume: an interrupted evaluation keeps its finished runs (a cross-arch cell is hours on a CPU)
        launcher = ["ddtool"] if processes == 1 else ["torchrun", "--standalone", "--nproc-per-node", str(processes),
                                                      "-m", "ddtool"]
        command = launcher + ["evaluate", str(self.path), "--runs", str(RUNS), "--quiet", "--no-reference", "--resume"]
        if compile:
            command.append("--compile")
        if not self.baselines:
            command.append("--no-baselines")
        if self.protocol:
            command += ["--protocol", self.protocol]
        if self.epochs:
            command += ["--epochs", str(self.epochs)]
        if arch:
            command += ["--arch", arch]
        return command


def _default_path(method: str, ipc: int) -> Path:
    if method in ("sre2l", "cda"):  # made by scripts/run_curriculum_table.py with the same preset
        return SETS / "curriculum" / f"{DATASET}-{method}-ipc{ipc}.h5"
    return SETS / f"{DATASET}_{method}_ipc{ipc}_seed0.h5"


def main_table(ipcs=(1, 10, 50)) -> list[Cell]:
    cells = []
    for method in ("random", "herding", "kcenter", "mtt", "tesla", "ftd", "datm", "sre2l", "cda"):
        for ipc in ipcs:
            curriculum = method in ("sre2l", "cda")
            # the curriculum presets' student; the IPC-10 sets predate its being recorded in the file
            cells.append(Cell(key=f"{method}-ipc{ipc}", label=method, method=method, ipc=ipc,
                              path=_default_path(method, ipc), epochs=KD_EPOCHS if curriculum else None,
                              archs=("convnet:width=32",) if curriculum else ()))
    return cells


def ablation_table() -> list[Cell]:
    """The trajectory-matching family at IPC 10, same budget (the base fashion-cpu presets: 3
    experts x 6 epochs, N = 10, 100 iterations), same protocol. From MTT each row adds one
    ingredient to the row above, on MTT's SGD experts; flat (GSAM) experts cost twice as much to
    train, so they are measured as one swap on MTT and once under the full stack (the last row)."""
    folder = SETS / "ablation"
    rows = [
        ("mtt", "MTT", "mtt", ()),
        ("flat", "MTT + flat experts (GSAM)", "mtt", ("expert_optimizer=gsam",)),
        ("ema", "MTT + EMA of the images", "mtt", EMA),
        ("window", "+ DATM window and loss gate", "datm", EMA + ("labels=hard", "correct_only_init=false")),
        ("soft", "+ correct-only init, learned soft labels (= DATM + EMA)", "datm", EMA),
        ("ast", "+ AST: balanced loss, intermediate matching, weight perturbation", "datm", EMA + AST),
        ("ast-flat", "the row above on flat experts (GSAM)", "datm", EMA + AST + ("expert_optimizer=gsam",)),
        ("ast-kmeans", "the AST row + representative init (k-means on expert logits)", "datm",
         EMA + AST + ("init=kmeans",)),
        ("ast-momentum", "the AST row + momentum inner loop (0.5; 0 / 0.5 on validation: 79.96 / 80.68)", "datm",
         EMA + AST + ("ast_inner_momentum=0.5",)),
    ]
    return [Cell(key=key, label=label, method=method, ipc=10, path=folder / f"{DATASET}_{key}_ipc10_seed0.h5",
                 settings=ABLATION_BUDGET[method] + settings, protocol="mtt")
            for key, label, method, settings in rows]


def cross_arch_table() -> list[Cell]:
    # A random subset's matched baseline is another random subset: the random row trains none.
    return [Cell(key=f"{c.method}-xarch", label=c.method, method=c.method, ipc=10, path=c.path,
                 protocol=c.protocol, epochs=c.epochs, archs=CROSS_ARCHS, baselines=c.method != "random")
            for c in main_table(ipcs=(10,)) if c.method in ("random", "mtt", "ftd", "datm", "cda")]


GPU_METHODS = ("mtt", "tesla", "ftd", "datm", "sre2l", "cda")  # the methods with a fashion-gpu preset


def gpu_table(ipcs=(1, 10, 50)) -> list[Cell]:
    # Evaluated under each method's own protocol for as many epochs as that protocol trains
    # (the curriculum GPU presets store views for the KD protocol's own epochs, not the CPU's 100).
    return [Cell(key=f"{method}-gpu-ipc{ipc}", label=method, method=method, ipc=ipc, preset="fashion-gpu",
                 path=SETS / "gpu" / f"{DATASET}_{method}_ipc{ipc}_gpu_seed0.h5")
            for method in GPU_METHODS for ipc in ipcs]


# The default recipe of `ddtool distill` on a CPU (DATM sized to a wall-clock budget,
# docs/budget.md) at the budgets the accuracy-against-time plot shows, per IPC.
BUDGETS = ((1, "60m"), (10, "10m"), (10, "30m"), (10, "60m"), (50, "60m"))


def budget_table() -> list[Cell]:
    return [Cell(key=f"datm-ipc{ipc}-{budget}", label=f"IPC {ipc}, {budget}", method="datm", ipc=ipc, budget=budget,
                 path=SETS / "budget" / f"{DATASET}_datm_ipc{ipc}_budget{budget}_seed0.h5") for ipc, budget in BUDGETS]


TABLES = {"main": main_table, "ablation": ablation_table, "cross-arch": cross_arch_table, "gpu": gpu_table,
          "budget": budget_table}
# What a plain `run` makes: a CPU's tables. The budget table's runs time themselves against the
# clock, so they are made only when named, on a machine with nothing else running.
DEFAULT_TABLES = ("main", "ablation", "cross-arch")


# ---- reading what is done ------------------------------------------------------------------------
def _protocol_name(cell: Cell, sset) -> str:
    if cell.protocol:
        return cell.protocol
    from ddtool.methods.base import get_method_class

    return get_method_class(cell.method).default_protocol


def find_evaluation(cell: Cell, sset, arch: str | None):
    """The newest record of this cell's evaluation in the set's file, or None."""
    from ddtool.evaluation import get_protocol

    name = _protocol_name(cell, sset)
    named = get_protocol(name)
    epochs = cell.epochs or named.epochs
    arch = arch or _distilled_for(sset)
    for record in reversed(sset.evaluations):
        protocol = record.get("protocol", {})
        # the tables are of float32 training on the set's own labels; a user's bf16 or
        # --hard-labels evaluation of a shipped set is not a cell
        if (protocol.get("name") == name and protocol.get("epochs") == epochs and len(record.get("runs", [])) == RUNS
                and protocol.get("precision", "fp32") == "fp32"
                and protocol.get("soft_labels", named.soft_labels) == named.soft_labels
                and _same_arch(record.get("arch"), arch)):
            return record
    return None


def kept_runs(sset) -> list[tuple[dict, list[int]]]:
    from ddtool.evaluation import kept_runs_of_set

    return kept_runs_of_set(sset) if sset is not None else []


def describe_kept_baseline(key: dict, runs: list[int]) -> str:
    """One interrupted baseline computation of `plan`'s listing."""
    what = f"random subset IPC {key.get('ipc')}" if key.get("kind") == "random_subset" else "whole dataset"
    # Baselines are keyed by their training recipe (no protocol name), older entries by the protocol.
    recipe = key.get("recipe") or key.get("protocol") or {}
    how = recipe.get("name") or f"{recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}"
    return (f"{what} on {key.get('arch')} ({how}){' compiled' if key.get('compiled') else ''}: "
            f"run(s) {', '.join(map(str, runs))}")


def _distilled_for(sset) -> str:
    return sset.config.get("student_arch") or sset.config.get("student") or "convnet"


def own_record(cell: Cell, sset):
    """The cell's evaluation on the network its table reads (the first it lists, else the one
    the set was distilled for), or None."""
    return find_evaluation(cell, sset, cell.archs[0] if cell.archs else None) if sset is not None else None


def _same_arch(a: str | None, b: str | None) -> bool:
    from ddtool.networks import same_network

    return a is not None and b is not None and same_network(a, b)


def preset_drift(cell: Cell, sset) -> dict[str, tuple]:
    """{setting: (the set's value, the preset's now)} where the shipped preset (with the cell's
    settings) has changed since the set was made: such a set no longer shows the preset, and
    `run` would otherwise skip it as done. Settings an older set does not record are ignored."""
    from ddtool.methods.base import current_names
    from ddtool.storage.synthetic_set import to_plain

    config = cell.config()
    if not is_dataclass(config) or cell.budget:  # a budget sizes the run on the machine, not from the preset alone
        return {}
    stored = current_names(type(config), sset.config or {})  # a set made before a rename records the old name
    # the values as the file stores them (JSON: tuples as lists, floats exact), so equal means equal
    now = to_plain(asdict(config), "preset")
    return {name: (stored[name], value) for name, value in now.items()
            if name in stored and name not in RUN_ONLY_SETTINGS and stored[name] != value}


def describe_drift(drift: dict[str, tuple]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in drift.items())


def load(cell: Cell):
    from ddtool.storage import load_synthetic_set

    return load_synthetic_set(cell.path) if cell.path.exists() else None


# ---- running -------------------------------------------------------------------------------------
def run_cell(cell: Cell, log, compile: bool = False, archs: list[str] | None = None, processes: int = 1) -> None:
    """Distil the cell's set if it is missing, then evaluate it on each of its networks (only
    those in `archs`, when given) that it has no record for, as `processes` torchrun processes
    when more than one."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    timings = cell.path.with_suffix(".times.json")
    times = json.loads(timings.read_text()) if timings.exists() else {}
    if not cell.path.exists():
        cell.path.parent.mkdir(parents=True, exist_ok=True)
        log(f"[{cell.key}] distilling: {' '.join(cell.distill_command())}")
        began = time.perf_counter()
        subprocess.run(cell.distill_command(), check=True, env=env)
        times["distill_wall_seconds"] = round(time.perf_counter() - began, 1)  # includes experts trained here
        timings.write_text(json.dumps(times, indent=1))
        _copy_matching_log(cell)
    sset = load(cell)
    drift = preset_drift(cell, sset)
    if drift:
        log(f"[{cell.key}] SKIPPED: {cell.path.relative_to(ROOT)} was made before its preset changed "
            f"({describe_drift(drift)}); move it (and its .log.jsonl, .times.json) away to re-make it")
        return
    for arch in cell.archs or (None,):
        if archs is not None and arch is not None and arch not in archs:
            continue
        if find_evaluation(cell, sset, arch) is not None:
            log(f"[{cell.key}] {arch or 'own network'}: evaluation already recorded")
            continue
        command = cell.evaluate_command(arch, compile, processes)
        log(f"[{cell.key}] evaluating: {' '.join(command)}")
        subprocess.run(command, check=True, env=env)
        sset = load(cell)


def adopt_recorded_baselines(cells: list[Cell], log) -> int:
    """Give the baseline cache back the random baselines the cells' sets record (a new machine
    starts with an empty cache): a cell evaluated on another network, or another set at the same
    IPC and recipe, then reads its baseline instead of retraining it (about an hour a baseline
    for AlexNet or VGG11 on a CPU). The number of baselines cached."""
    from ddtool.data import prepare
    from ddtool.evaluation import adopt_recorded_baselines as adopt, recorded_random_baselines

    prepared, recorded = {}, []
    for cell in cells:
        sset = load(cell)
        if sset is None or not any(random_baseline(r) for r in sset.evaluations):
            continue
        zca = sset.preprocessing.zca  # describe() names a ZCA's eps, not its fit
        data_for = (sset.dataset, sset.preprocessing.describe(),
                    None if zca is None else hashlib.sha256(zca.matrix.cpu().numpy().tobytes()).hexdigest())
        if data_for not in prepared:
            prepared[data_for] = prepare(sset.dataset, None, preprocessing=sset.preprocessing)
        recorded += recorded_random_baselines(sset, prepared[data_for])
    adopted = adopt(recorded)
    if adopted:
        log(f"{len(adopted)} random baseline(s) recorded in the sets' files put back in the cache")
    return len(adopted)


def carry_kept_runs(folder: Path = KEPT_RUNS) -> int:
    """Mirror the cache's kept runs (the finished runs of interrupted evaluations, sets' and
    baselines') into `folder`, beside the sets: a session that ends mid-cell, on a machine
    whose cache the next session will not have, commits them there, and the next `run` puts
    them back (restore_kept_runs) and resumes. Each file is self-describing (its evaluation's
    key, the run's index, accuracy, seconds and hardware). The number of runs carried."""
    from ddtool.paths import cache_root
    from ddtool.files import atomic_directory, exclusive_lock

    # two `run`s at once (one cell each, one per core) each mirror at their end: one at a time
    with exclusive_lock(folder.with_name(f".{folder.name}.lock"), remove=True):
        kept = sorted((cache_root() / "evaluations").glob("*/run-*.json"))
        shutil.rmtree(folder, ignore_errors=True)  # the cache holds every run it held
        if kept:
            with atomic_directory(folder) as tmp:
                for path in kept:
                    (tmp / path.parent.name).mkdir(exist_ok=True)
                    shutil.copy2(path, tmp / path.parent.name / path.name)
    return len(kept)


def restore_kept_runs(log, folder: Path = KEPT_RUNS) -> int:
    """Put the runs carry_kept_runs carried back into the cache where it lacks them; the number put back."""
    from ddtool.paths import cache_root

    restored = 0
    for path in sorted(folder.glob("*/run-*.json")):
        target = cache_root() / "evaluations" / path.parent.name / path.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            restored += 1
    if restored:
        log(f"{restored} kept run(s) of interrupted evaluations put back in the cache from "
            f"{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}")
    return restored


def _read_on(cell: Cell, sset) -> str:
    """The network a cell's table reads it on: the first it lists, else the one it was distilled for."""
    return cell.archs[0] if cell.archs else _distilled_for(sset)


def reference_key(cell: Cell, sset) -> str:
    """Which whole-dataset reference a cell is read beside: its protocol on its own network."""
    return f"{_protocol_name(cell, sset)} on {_read_on(cell, sset)}"


def read_references(path: Path = REFERENCES) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_reference(cell: Cell, log, path: Path = REFERENCES, compile: bool = False) -> None:
    """Train the whole-dataset reference of the cell's protocol and network, once per pair: the
    result goes into `path` (shipped beside the sets, so `tables` needs no cache) and into the
    baseline cache that `ddtool evaluate` reads."""
    from ddtool.data import prepare
    from ddtool.evaluation import get_protocol, kd
    from ddtool.evaluation import whole_dataset_reference
    from ddtool.files import atomic_path
    from ddtool.storage.synthetic_set import teacher_digest

    sset = load(cell)
    if sset is None or (key := reference_key(cell, sset)) in read_references(path):
        return
    protocol = get_protocol(_protocol_name(cell, sset))
    arch = _read_on(cell, sset)
    data = prepare(sset.dataset, None, preprocessing=sset.preprocessing)
    teacher = teacher_key = None
    if protocol.kd is not None:  # the reference learns from the set's teacher on the whole split
        teacher, teacher_key = kd.set_teacher(sset, data.test_x.device), teacher_digest(sset.teacher)
    log(f"[{cell.key}] whole-dataset reference: {key}, {protocol.reference_epochs} epochs on "
        f"{data.train_x.shape[0]} images")
    result = whole_dataset_reference(data, protocol=protocol, arch=arch, progress=False, teacher=teacher,
                                     teacher_key=teacher_key, compile=compile)
    references = read_references(path)  # another process may have added one meanwhile
    references[key] = {"protocol": protocol.name, "arch": arch, "epochs": protocol.reference_epochs,
                       "batch_size": protocol.reference_batch_size, "teacher": teacher_key,
                       "runs": result.runs, "mean": result.mean, "std": result.std, "seconds": result.seconds,
                       "compiled": result.compiled, "hardware": result.hardware}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(references, indent=1, sort_keys=True))


def merge_evaluations(copy: Path, into: Path) -> int:
    """Append to the set `into` the evaluation records that `copy` (the same set, evaluated
    elsewhere: scripts/gpu_check.py evaluates copies on a GPU) has and `into` lacks; refuses a
    copy whose images differ. Returns how many records were added."""
    import torch

    from ddtool.storage import append_evaluation, load_synthetic_set

    theirs, ours = load_synthetic_set(copy), load_synthetic_set(into)
    if not (theirs.images.shape == ours.images.shape and torch.equal(theirs.images, ours.images)):
        raise SystemExit(f"{copy} is not a copy of {into}: their images differ")
    known = {json.dumps(r, sort_keys=True, default=str) for r in ours.evaluations}
    added = 0
    for record in theirs.evaluations:
        if json.dumps(record, sort_keys=True, default=str) not in known:
            append_evaluation(into, record)
            added += 1
    return added


def _copy_matching_log(cell: Cell) -> None:
    """Keep the matching loss per iteration beside the set (for the loss plot)."""
    from ddtool.methods.base import run_fingerprint
    from ddtool.methods.trajectory_config import TrajectoryConfig
    from ddtool.paths import cache_root

    config = cell.config()
    if not isinstance(config, TrajectoryConfig):
        return
    # a lookup, so cache_root, not cache_dir (which would create the run's folder)
    log = cache_root() / "runs" / run_fingerprint(cell.method, config, DATASET, cell.ipc, 0) / "log.jsonl"
    if log.exists():
        cell.path.with_suffix(".log.jsonl").write_text(log.read_text())


# ---- tables --------------------------------------------------------------------------------------
def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def pct_of(figures: dict | None) -> str:
    """An accuracy record's mean ± std, or "-" where there is none."""
    return pct(figures["mean"], figures["std"]) if figures else "-"


def random_baseline(record: dict) -> dict | None:
    """The matched random-subset baseline an evaluation record carries, or None."""
    return record.get("baselines", {}).get("random_subset")


def minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.0f}"


def evaluation_minutes(record: dict) -> str:
    """An evaluation's minutes; "c" marks torch.compile'd networks (`--compile`: faster, same protocol)."""
    return minutes(record.get("seconds")) + ("c" if record.get("compiled") else "")


def render_main(cells: list[Cell], references_path: Path = REFERENCES) -> str:
    ipcs = sorted({c.ipc for c in cells})
    lines = ["| method | protocol | " + " | ".join(f"IPC {i}" for i in ipcs)
             + " | random subset (same protocol; hard labels, under kd the teacher's) | "
             "whole dataset (same protocol and network) | minutes (distil + evaluate), per IPC |",
             "|---|---|" + "---|" * len(ipcs) + "---|---|---|"]
    references = read_references(references_path)
    for method in dict.fromkeys(c.method for c in cells):
        row = [c for c in cells if c.method == method]
        accs, randoms, times, protocol, whole = [], [], [], "-", "not run"
        for c in row:
            sset = load(c)
            if sset is not None and (ref := references.get(reference_key(c, sset))):
                spread = f" ± {100 * ref['std']:.2f}" if len(ref["runs"]) > 1 else ""  # no std of one run
                whole = f"{100 * ref['mean']:.2f}{spread} ({len(ref['runs'])} run, {ref['epochs']} ep)"
            record = own_record(c, sset)
            if record is None:
                accs.append("not run")
                randoms.append("")
                times.append("")
                continue
            protocol = f"{record['protocol']['name']} ({record['protocol']['epochs']} ep)"
            accs.append(pct(record["mean"], record["std"]))
            base = random_baseline(record)
            randoms.append(f"{c.ipc}: {pct(base['mean'], base['std'])}" if base else "")
            times.append(f"{c.ipc}: {minutes(sset.config.get('seconds'))} + {evaluation_minutes(record)}")
        lines.append(f"| {method} | {protocol} | " + " | ".join(accs) + f" | {'; '.join(r for r in randoms if r)} | "
                     f"{whole} | {'; '.join(t for t in times if t)} |")
    return "\n".join(lines)


def render_ablation(cells: list[Cell]) -> str:
    lines = ["| IPC 10, mtt protocol | test accuracy (%) | distil minutes | evaluation minutes | experts |",
             "|---|---|---|---|---|"]
    for c in cells:
        sset = load(c)
        record = find_evaluation(c, sset, None) if sset else None
        if record is None:
            lines.append(f"| {c.label} | not run | | | |")
            continue
        experts = sset.config.get("expert_optimizer", "sgd")
        lines.append(f"| {c.label} | {pct(record['mean'], record['std'])} | {minutes(sset.config.get('seconds'))} | "
                     f"{evaluation_minutes(record)} | {experts} |")
    base = next((random_baseline(r) for c in cells if (s := load(c))
                 for r in [find_evaluation(c, s, None)] if r and random_baseline(r)), None)
    if base:
        lines.append(f"| random real images (matched baseline) | {pct(base['mean'], base['std'])} | | | |")
    return "\n".join(lines)


def render_cross_arch(cells: list[Cell]) -> str:
    lines = ["| IPC 10 set | " + " | ".join(CROSS_ARCHS) + " |", "|---|" + "---|" * len(CROSS_ARCHS)]
    for c in cells:
        sset = load(c)
        cells_ = []
        for arch in CROSS_ARCHS:
            record = find_evaluation(c, sset, arch) if sset else None
            if record is None:
                cells_.append("not run")
                continue
            where = "" if str(record.get("device", "cpu")).startswith("cpu") else " (GPU)"
            base = random_baseline(record) if c.baselines else None
            cells_.append(pct(record["mean"], record["std"]) + where + (f" [{100 * base['mean']:.2f}]" if base else ""))
        lines.append(f"| {c.label} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def render_files() -> str:
    """One line per shipped set: what it is, the command that made it, its recorded evaluations."""
    lines = ["| file | method, IPC | made by | evaluations recorded inside |", "|---|---|---|---|"]
    seen = set()
    for c in main_table() + ablation_table() + gpu_table():
        if c.path in seen or (sset := load(c)) is None:
            continue
        seen.add(c.path)
        if c.method in ("sre2l", "cda") and c.preset is None:
            made = f"`python scripts/run_curriculum_table.py --ipc {c.ipc} --runs 5 --epochs {KD_EPOCHS}`"
        else:
            made = "`ddtool distill " + " ".join(c.recipe()) + "`"
        evaluations = "; ".join(f"{r['protocol']['name']} {r['protocol']['epochs']} ep on {r['arch']}: "
                                f"{pct(r['mean'], r['std'])} ({len(r['runs'])} runs)" for r in sset.evaluations)
        lines.append(f"| `{c.path.relative_to(SETS)}` | {sset.method}, {sset.ipc} | {made} | {evaluations or '-'} |")
    return "\n".join(lines)


# Published Fashion-MNIST results (ConvNet-3; ../shared/docs/reference-results.md), (mean, std or None)
# per IPC 1, 10, 50. No trajectory-matching or curriculum paper reports Fashion-MNIST.
PUBLISHED = {
    "random real subset": ("random", ((51.4, 3.8), (73.8, 0.7), (82.5, 0.7))),
    "herding": ("herding", ((67.0, 1.9), (71.1, 0.7), (71.9, 0.8))),
    "DC": (None, ((70.5, None), (82.3, None), (83.6, None))),
    "DSA": (None, ((70.6, None), (84.6, None), (88.7, None))),
    "DM": (None, ((70.7, None), (83.5, None), (88.1, None))),
    "IDC": (None, ((81.0, None), (86.0, None), (86.2, None))),
}


def render_published(cells: list[Cell]) -> str:
    """ddtool's numbers (from the sets) beside the published Fashion-MNIST numbers."""
    ipcs = (1, 10, 50)

    def ours(method: str, ipc: int) -> str:
        cell = next((c for c in cells if c.method == method and c.ipc == ipc), None)
        record = own_record(cell, load(cell)) if cell is not None else None
        return f"{pct(record['mean'], record['std'])} ({record['protocol']['name']})" if record else "-"

    def published(value: tuple[float, float | None]) -> str:
        mean, std = value
        return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")

    lines = ["| method | " + " | ".join(f"IPC {i}: ddtool | IPC {i}: published" for i in ipcs) + " |",
             "|---|" + "---|---|" * len(ipcs)]
    for label, (method, values) in PUBLISHED.items():
        row = [f"{ours(method, i) if method else 'not in ddtool'} | {published(v)}" for i, v in zip(ipcs, values)]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    for method in dict.fromkeys(c.method for c in cells):
        if method not in (m for m, _ in PUBLISHED.values()):
            lines.append(f"| {method} | " + " | ".join(f"{ours(method, i)} | -" for i in ipcs) + " |")
    return "\n".join(lines)


def render_gpu(cells: list[Cell]) -> str:
    if not any(c.path.exists() for c in cells):
        return ("No set of this table has been made yet: `python scripts/run_results.py run --table gpu` makes "
                "them on a machine with CUDA.")
    return render_main(cells)


def budget_points(cells: list[Cell]) -> list[tuple[Cell, object, dict]]:
    """(cell, set, its own evaluation record) for each budget cell that is made and evaluated."""
    return [(c, sset, record) for c in cells if (sset := load(c)) is not None
            and (record := own_record(c, sset)) is not None]


def bars_at(ipc: int) -> dict[str, dict | None]:
    """The bars a budgeted set is read against at `ipc`, from the main table's sets: herding
    (its own protocol), and random real images with a teacher's soft labels (the random subset
    the curriculum rows are evaluated beside, under the kd protocol)."""
    main = {c.key: c for c in main_table(ipcs=(ipc,))}
    herding = main[f"herding-ipc{ipc}"]
    record = own_record(herding, load(herding))
    kd = next((base for key in (f"sre2l-ipc{ipc}", f"cda-ipc{ipc}") if (sset := load(main[key])) is not None
               and (r := own_record(main[key], sset)) is not None
               and (base := random_baseline(r))), None)
    return {"herding": record, "random + KD": kd}


def render_budget(cells: list[Cell]) -> str:
    lines = ["| IPC | budget | cost: experts + distillation (`timings`) | test accuracy, datm protocol | matched random "
             "subset | herding (classic) | random + teacher's soft labels (kd) |", "|---|---|---|---|---|---|---|"]
    made = {c.key: (sset, record) for c, sset, record in budget_points(cells)}
    bars = {ipc: bars_at(ipc) for ipc in {c.ipc for c in cells}}  # read once per IPC, not per row
    for c in cells:
        herding, kd = pct_of(bars[c.ipc]["herding"]), pct_of(bars[c.ipc]["random + KD"])
        if c.key not in made:
            lines.append(f"| {c.ipc} | {c.budget} | not run | | | {herding} | {kd} |")
            continue
        sset, record = made[c.key]
        t = sset.timings or {}
        cost = (f"{t['total_s'] / 60:.1f} min ({t['experts_s'] / 60:.1f} + {t['distill_s'] / 60:.1f})"
                if t.get("total_s") is not None and t.get("experts_s") is not None else "-")
        lines.append(f"| {c.ipc} | {c.budget} | {cost} | {pct_of(record)} | {pct_of(random_baseline(record))} | "
                     f"{herding} | {kd} |")
    return "\n".join(lines)


RENDER = {"main": render_main, "ablation": render_ablation, "cross-arch": render_cross_arch, "gpu": render_gpu,
          "budget": render_budget}


def table_records(name: str, cells: list[Cell]):
    """The evaluation records a table reads."""
    for c in cells:
        sset = load(c)
        if sset is None:
            continue
        for arch in (CROSS_ARCHS if name == "cross-arch" else [None]):
            record = find_evaluation(c, sset, arch) if arch else own_record(c, sset)
            if record is not None:
                yield record


def hardware_note(records) -> str:
    """What trained the runs behind a table, as far as its records say: records name the
    hardware of each run (theirs and their baselines') since 2026-12-01, older ones do not."""
    named, unnamed = {}, 0
    for record in records:
        for acc in (record, random_baseline(record)):
            if not acc:
                continue
            hardware = acc.get("hardware") or {}
            for description, runs in hardware.items():
                named[description] = named.get(description, 0) + len(runs)
            unnamed += len(acc.get("runs", [])) - sum(len(runs) for runs in hardware.values())
    parts = [f"{description}: {count} run{'s' if count != 1 else ''}" for description, count in sorted(named.items())]
    if unnamed:
        parts.append(f"{unnamed} runs on 2-core CPU machines (AMD EPYC), recorded before records named the "
                     "hardware")
    return "; ".join(parts) or "no runs recorded"


def write_tables(tables: dict[str, str], page: Path = RESULTS_PAGE) -> list[str]:
    """Replace the text between each table's markers in the Markdown file `page`
    (`<!-- results:NAME -->` ... `<!-- /results:NAME -->`), leaving the rest of it as it is;
    returns the tables it found markers for."""
    text = page.read_text()
    written = []
    for name, body in tables.items():
        pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /results:{re.escape(name)} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
            written.append(name)
    page.write_text(text)
    return written


def plots(main: list[Cell], ablation: list[Cell], budget: list[Cell], folder: Path = PLOTS) -> list[Path]:
    """Accuracy against IPC per method, the matching loss over iterations, accuracy against a
    budget's wall-clock, an image grid per set."""
    from ddtool.storage import save_grid_png

    from ddtool.storage.picture import auto_grid_scale

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for c in main:
        if c.ipc == 10 and (sset := load(c)) is not None:
            made.append(save_grid_png(sset, folder / f"grid_{c.method}_ipc10.png", class_names=True,
                                      scale=auto_grid_scale(max(sset.image_shape[1:]))))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[results]'): line plots skipped", file=sys.stderr)
        return made
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    methods = list(dict.fromkeys(c.method for c in main))
    colours = plt.get_cmap("tab10").colors
    references, drawn = read_references(), set()
    for index, method in enumerate(methods):  # one colour a method, in the table's order, whatever is plotted
        cells = [(c, sset, r) for c in main if c.method == method and (sset := load(c)) is not None
                 and (r := own_record(c, sset)) is not None]
        if not cells:
            continue
        protocols = sorted({_protocol_name(c, sset) for c, sset, _ in cells})
        coreset = method in ("random", "herding", "kcenter")  # real images: dashed
        ax.errorbar([c.ipc for c, _, _ in cells], [r["mean"] * 100 for _, _, r in cells],
                    [r["std"] * 100 for _, _, r in cells], marker="o", capsize=3, color=colours[index % 10],
                    ls="--" if coreset else "-", label=f"{method} ({', '.join(protocols)})")
        drawn.update(key for c, sset, _ in cells if (key := reference_key(c, sset)) in references)
    # each protocol's whole-dataset reference, named under its line (levels close together share a name)
    levels: list[tuple[float, list[str]]] = []
    for key in sorted(drawn, key=lambda k: references[k]["mean"]):
        level = references[key]["mean"] * 100
        ax.axhline(level, color="grey", lw=0.8, ls=":")
        if levels and level - levels[-1][0] < 2.5:
            levels[-1][1].append(f"{key} {level:.1f}")
        else:
            levels.append((level, [f"{key} {level:.1f}"]))
    for level, names in levels:
        ax.annotate("whole dataset: " + "; ".join(names), (0.01, level), xycoords=("axes fraction", "data"),
                    fontsize=6, color="dimgrey", va="top")
    ipcs = sorted({c.ipc for c in main})
    ax.set(xscale="log", xlabel="images per class", ylabel="test accuracy (%)",
           title="Fashion-MNIST, ConvNet (evaluation protocol in brackets)")
    ax.set_xticks(ipcs, [str(i) for i in ipcs])
    ax.minorticks_off()
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_ipc.png", dpi=120)
    made.append(folder / "accuracy_vs_ipc.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in main + ablation:
        log = c.path.with_suffix(".log.jsonl")
        if c.ipc == 10 and log.exists():
            records = [json.loads(line) for line in log.read_text().splitlines()]
            # the end-point match where the log has it (AST's objective adds its intermediate targets)
            ax.plot([r["iteration"] for r in records], [r.get("target_loss", r["loss"]) for r in records],
                    label=c.key, lw=1)
    ax.set(xlabel="outer iteration", ylabel="normalised matching loss (end point)", title="IPC 10")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "matching_loss.png", dpi=120)
    made.append(folder / "matching_loss.png")
    if (path := plot_budget(plt, budget, folder)) is not None:
        made.append(path)
    plt.close("all")
    return made


def plot_budget(plt, cells: list[Cell], folder: Path) -> Path | None:
    """Test accuracy against the wall-clock a set cost (experts + distillation), one panel per
    IPC with budgeted sets, beside the bars whose cost is near zero: the matched random subset,
    herding, random real images with a teacher's soft labels."""
    points = budget_points(cells)
    ipcs = sorted({c.ipc for c, _, _ in points})
    if not ipcs:
        return None
    fig, axes = plt.subplots(1, len(ipcs), figsize=(4.5 * len(ipcs) + 1.5, 4), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs):
        mine = sorted(((sset.timings["total_s"] / 60, record) for c, sset, record in points
                       if c.ipc == ipc and (sset.timings or {}).get("total_s") is not None), key=lambda p: p[0])
        ax.errorbar([m for m, _ in mine], [100 * r["mean"] for _, r in mine], [100 * r["std"] for _, r in mine],
                    marker="o", capsize=3, color="tab:blue", label="default recipe (DATM, budgeted)")
        bars = {"matched random subset": next((base for _, r in mine
                                               if (base := random_baseline(r))), None),
                **bars_at(ipc)}
        for (name, figures), style in zip(bars.items(), ("--", "-.", ":")):
            if figures:
                ax.axhline(100 * figures["mean"], color="grey", ls=style, lw=1,
                           label=f"{name} {100 * figures['mean']:.1f}")
        ax.set(xlabel="minutes: experts + distillation (2-core CPU)", ylabel="test accuracy (%)",
               title=f"Fashion-MNIST, IPC {ipc}", xlim=(0, max(65, max(m for m, _ in mine) + 5)))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_budget.png", dpi=120)
    return folder / "accuracy_vs_budget.png"


def render_tables() -> dict[str, str]:
    """Every table's Markdown, from the sets' files, by marker name (what `tables` writes)."""
    tables = {}
    for name in TABLES:
        cells = TABLES[name]()
        records = list(table_records(name, cells))
        tables[name] = RENDER[name](cells) + (
            f"\n\n(Generated by `python scripts/run_results.py tables` from the sets' own evaluation records; "
            f"hardware of the runs (the sets' and their random baselines'): {hardware_note(records)}; evaluation "
            f"minutes marked c: networks run through torch.compile, `--compile`.)" if records else "")
    tables["published"] = render_published(main_table()) + "\n\n(Generated by `python scripts/run_results.py " \
        "tables`; published numbers from each paper's own protocol, ddtool's under the protocol named.)"
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("plan", "run", "tables", "merge", "carry"),
                        help="carry: copy the finished runs of interrupted evaluations from the cache into "
                             f"{KEPT_RUNS.relative_to(ROOT)}, to commit before a machine goes away; `run` puts "
                             "them back and resumes (and mirrors the cache there again at its end)")
    parser.add_argument("copies", nargs="*", type=Path,
                        help="merge: evaluated copies of shipped sets (same file name), e.g. from gpu_check.py")
    parser.add_argument("--table", choices=sorted(TABLES), nargs="+", default=list(DEFAULT_TABLES),
                        help=f"default: {' '.join(DEFAULT_TABLES)} (gpu only when named)")
    parser.add_argument("--ipc", type=int, nargs="+", default=None, help="only these IPCs")
    parser.add_argument("--only", nargs="+", default=None, help="only these cell keys or methods")
    parser.add_argument("--arch", nargs="+", default=None, choices=CROSS_ARCHS,
                        help="cross-arch: evaluate on these networks only (e.g. the ConvNet column on a CPU)")
    parser.add_argument("--reference", action="store_true",
                        help=f"also train the whole-dataset reference of each main- or gpu-table cell's protocol and "
                             f"network, once per pair, into {REFERENCES.relative_to(ROOT)} (30 epochs on "
                             f"55000 images: about half an hour per pair for the width-32 ConvNet on one core)")
    parser.add_argument("--no-plots", dest="make_plots", action="store_false")
    parser.add_argument("--page", type=Path, default=RESULTS_PAGE,
                        help=f"the Markdown page whose `<!-- results:NAME -->` markers the tables are written between "
                             f"[default: {RESULTS_PAGE.relative_to(ROOT)}]")
    parser.add_argument("--processes", type=int, default=1,
                        help="run each evaluation as this many torchrun processes, its runs (and its baseline's) "
                             "spread over them: e.g. 2 on a 2-core CPU with nothing else running (5 runs then take "
                             "3 rounds instead of 5)")
    parser.add_argument("--compile", action="store_true",
                        help="evaluate with `ddtool evaluate --compile` (torch.compile: 1.4-2.2x faster on a CPU)")
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.action == "run" and "gpu" in args.table:
        import torch

        if not torch.cuda.is_available():
            parser.error("the gpu table's sets are distilled with the fashion-gpu presets, sized for a GPU (days "
                         "on a CPU), and their rows say a GPU made them: run `--table gpu` on a machine with CUDA")

    def selected(cells: list[Cell]) -> list[Cell]:
        return [c for c in cells if (args.ipc is None or c.ipc in args.ipc)
                and (args.only is None or c.key in args.only or c.method in args.only)]

    if args.action == "merge":
        for copy in args.copies:
            shipped = next((c.path for name in TABLES for c in TABLES[name]() if c.path.name == copy.name), None)
            if shipped is None or not shipped.exists():
                raise SystemExit(f"{copy.name} is not one of the shipped sets")
            print(f"{shipped.relative_to(ROOT)}: {merge_evaluations(copy, shipped)} evaluation(s) added")
        return
    if args.action == "plan":
        for name in args.table:
            print(f"== {name}")
            for c in selected(TABLES[name]()):
                sset = load(c)
                done = [a or "own" for a in c.archs or (None,) if sset and find_evaluation(c, sset, a)]
                state = "missing" if sset is None else f"distilled; evaluated on {done or 'nothing yet'}"
                kept = [f"{key['protocol']['name']} on {key['arch']}{' compiled' if key['compiled'] else ''}: "
                        f"run(s) {', '.join(map(str, runs))}" for key, runs in kept_runs(sset)]
                if kept:
                    state += f"; interrupted, kept for `run` to resume: {'; '.join(kept)}"
                drift = preset_drift(c, sset) if sset is not None else {}
                if drift:
                    state += f"; STALE, the preset changed since: {describe_drift(drift)}"
                print(f"  {c.key:<16} {c.path.relative_to(ROOT)}: {state}")
        from ddtool.evaluation import kept_runs_of_baselines

        for key, runs in kept_runs_of_baselines():
            print(f"baseline interrupted, kept for `run` to resume: {describe_kept_baseline(key, runs)}")
    elif args.action == "carry":
        print(f"{carry_kept_runs()} kept run(s) carried into {KEPT_RUNS.relative_to(ROOT)}")
        return
    elif args.action == "run":
        say = lambda m: print(m, flush=True)  # noqa: E731
        restore_kept_runs(say)
        adopt_recorded_baselines([c for name in TABLES for c in TABLES[name]()], say)
        for name in args.table:
            for c in selected(TABLES[name]()):
                run_cell(c, say, args.compile, args.arch, args.processes)
                if args.reference and name in ("main", "gpu"):
                    run_reference(c, say, compile=args.compile)
        carry_kept_runs()  # what finished is no longer kept: the carried copies go too
    if args.action == "plan":
        return
    for name in TABLES:
        for c in TABLES[name]():
            sset = load(c)
            if sset is not None and (drift := preset_drift(c, sset)):
                print(f"warning: {c.path.relative_to(ROOT)} ({name} table) predates its preset: "
                      f"{describe_drift(drift)}", file=sys.stderr)
    page = args.page.resolve()
    written = write_tables(render_tables(), page)
    shown = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
    print(f"{shown}: tables updated: {', '.join(written) or 'none (no markers)'}")
    if write_tables({"files": render_files()}, SETS / "README.md"):
        print("synthetic_sets/README.md file list updated")
    if args.make_plots:
        for path in plots(main_table(), ablation_table(), budget_table()):
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
