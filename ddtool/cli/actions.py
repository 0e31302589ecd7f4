"""What the `ddtool` commands of ddtool/cli/commands.py do, once their options are parsed.

Commands are thin: they parse options (commands.py), call the library, print (here). All checks
of input live in the library (typed configs validated once), so the CLI and the Python API
behave alike.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click
import torch

from ddtool import distributed
from ddtool.cli.main import say
from ddtool.cli.printing import describe_timings, print_comparison, print_comparison_csv, print_json, print_settings
from ddtool.data import DEFAULT_DATASET, get_spec, list_specs, load_raw, locate, prepare, search_paths
from ddtool.data.prepare import check_ipc_fits, class_indices
from ddtool.device import resolve_device
from ddtool.errors import ConfigError, DDToolError
from ddtool.evaluation import get_protocol, time_epoch
from ddtool.evaluation.compare import protocol_label
from ddtool.durations import format_duration
from ddtool.methods.base import (
    get_method_class,
    list_methods,
    parse_overrides,
)
from ddtool.run import default_method, default_protocol, evaluate_file, prepare_distill, recorded_run
from ddtool.storage import (
    export_set,
    import_set,
    load_synthetic_set,
    save_grid_png,
    save_synthetic_set,
)
from ddtool.files import check_writable
from ddtool.storage.export import left_out_of_export
from ddtool.storage.picture import auto_grid_scale

# ---- datasets -------------------------------------------------------------------------------
def datasets(names: tuple[str, ...], data_root: str | None, download_name: str | None) -> None:
    """`ddtool datasets` (its options and help: commands.py)."""
    if names:
        for name in names:
            _describe_dataset(name, data_root)
        return
    if download_name is not None:
        name = get_spec(download_name).name  # a clear error for an unknown name
        raw = load_raw(name, data_root, download=True)
        click.echo(f"{name}: {raw.train_images.shape[0]:,} training and {raw.test_images.shape[0]:,} test images "
                   f"in {raw.source}")
        return
    specs = list_specs()
    width = max(len(spec.name) for spec in specs) + len(" (default)") + 1
    click.echo(f"{'dataset':<{width}} {'images':<10} {'classes':>7}  found at")
    for spec in specs:
        where = locate(spec.name, data_root)
        size = f"{spec.image_size}x{spec.image_size}x{spec.channels}"
        found = str(where) if where else "not found (looked in: " + ", ".join(
            str(p) for p in search_paths(spec.name, data_root)[:3]) + ", ...)"
        default = " (default)" if spec.name == DEFAULT_DATASET else ""
        click.echo(f"{spec.name + default:<{width}} {size:<10} {spec.num_classes or '?':>7}  {found}")
    click.echo("\nAny ImageFolder (root/train/<class>/*.png, root/test/<class>/*.png) works as "
               "--dataset folder:/path/to/root.")


def _describe_dataset(name: str, data_root: str | None) -> None:
    from ddtool.data.registry import folder_root
    from ddtool.data.sources import FOLDER_OPTIONS_FILE
    from ddtool.networks.convnet import describe_depth

    raw = load_raw(name, data_root)
    spec = raw.spec
    click.echo(f"{spec.name}: {raw.source}")
    for split, labels in (("train", raw.train_labels), ("test", raw.test_labels)):
        counts = torch.bincount(labels, minlength=spec.num_classes).tolist()
        click.echo(f"  {split}: {len(labels):,} images, {min(counts):,}-{max(counts):,} a class")
    classes = ", ".join(spec.classes) if len(spec.classes) <= 12 else ", ".join(spec.classes[:12]) + ", ..."
    click.echo(f"  {spec.num_classes} classes: {classes}")
    click.echo(f"  images: {spec.image_size}x{spec.image_size}, {spec.channels} channel{'s' if spec.channels > 1 else ''}")
    options_file = Path(raw.source) / FOLDER_OPTIONS_FILE
    if folder_root(spec.name) is None:
        how = "the dataset's own"
    elif options_file.exists():
        how = f"set in {options_file}"
    else:
        how = f'the default for image folders; {{"flip": false}} in {FOLDER_OPTIONS_FILE} at its root turns them off'
    click.echo(f"  augmentation (DSA): {'with' if spec.flip else 'without'} left-right flips ({how})")
    click.echo(f"  network: ConvNet {describe_depth(spec.image_size)}")


# ---- distill --------------------------------------------------------------------------------
# Where distill saves without -o: a folder of the user's own, apart from the sets shipped in the
# repository's synthetic_sets/ (which a command run from its root must not touch).
DEFAULT_OUTPUT_FOLDER = Path("distilled")


def _default_output(dataset: str, method: str, ipc: int, seed: int) -> Path:
    return DEFAULT_OUTPUT_FOLDER / f"{_file_safe_name(dataset)}_{method}_ipc{ipc}_seed{seed}.h5"


def _file_safe_name(dataset: str) -> str:
    """A dataset's name fit for a file name: an ImageFolder's "folder:/abs/path/pets" is
    "pets" (the whole name would make folders under one named "folder:")."""
    if dataset.startswith("folder:"):
        dataset = Path(dataset[len("folder:"):]).name or "folder"
    return re.sub(r"[^\w.+-]", "_", dataset).lstrip(".") or "dataset"


def distill(method, ipc, dataset, data_root, preset, settings, iterations, budget, backend, output, resume, no_eval,
            overwrite, protocol, eval_runs, eval_epochs, compile_eval, eval_precision, from_set, list_presets, dry_run,
            seed, device, quiet) -> None:
    """`ddtool distill` (its options and help: commands.py)."""
    if no_eval:
        _refuse_evaluation_options(protocol=protocol, eval_runs=eval_runs, eval_epochs=eval_epochs,
                                   compile_eval=compile_eval, eval_precision=eval_precision)
    recorded: dict = {}
    if from_set is not None:
        recorded = _recorded_run(from_set, click.get_current_context())
        method, ipc, dataset = recorded["method"], recorded["ipc"], recorded["dataset"]
        seed = recorded["seed"]
    named_method = method
    method = method or default_method(dataset, device)
    method_cls = get_method_class(method)
    if list_presets:
        default = method_cls.default_preset
        for name, cfg in method_cls.presets.items():
            click.echo(f"{name}{' (default)' if name == default else ''}: {_changed_settings(cfg)}")
        click.echo(f"(settings not listed keep the defaults of {method_cls.config_class.__name__}; "
                   "`--set KEY=VALUE` changes any of them)")
        return
    changes = parse_overrides(method_cls.config_class, settings)
    overrides = {**recorded.get("settings", {}), **changes}
    if iterations is not None:
        overrides["iterations"] = iterations
    if backend is not None:
        overrides["backend"] = backend
    if not no_eval and protocol is not None:
        _refuse_kd_without_teacher(method, method_cls, protocol)
    if distributed.world_size() > 1 and not method_cls.splits_over_processes:
        raise ConfigError(f"Method {method!r} does not split its work over torchrun processes; only the trajectory "
                          "methods (mtt, tesla, datm, ftd) do. Run it as one process (`ddtool distill ...` without "
                          "torchrun); `torchrun ... -m ddtool evaluate SET.h5` spreads its evaluation.")
    run = prepare_distill(named_method, ipc, dataset=dataset, data_root=data_root, preset=preset, settings=overrides,
                          budget=budget, seed=seed, device=device, resume=resume, progress=not quiet,
                          log=lambda m: click.echo(m, err=True))
    if from_set is not None:
        run.recorded_from, run.recorded_changes = from_set, changes
    data, runner = run.data, run.method
    if runner.draws_real_images or not no_eval:  # the evaluation's random baseline draws them too
        check_ipc_fits(class_indices(data.train_y.cpu(), data.spec.num_classes), ipc)
    out = Path(output) if output else _default_output(data.spec.name, method, ipc, seed)
    if distributed.is_main():
        check_writable(out)  # now, not after the hours the distillation takes
        _refuse_to_replace(out, overwrite=overwrite, resume=resume)
    if distributed.is_main():  # the plan measures expert-training speed: once is enough
        click.echo("Plan:")
        lines = run.plan()
        evaluation = protocol or method_cls.default_protocol
        lines.insert(-1, f"save to {out}{_replacing(out)}"
                     + ("" if no_eval else f", then evaluate ({evaluation} protocol"
                        f"{_evaluation_estimate(runner, data, ipc, evaluation, eval_runs, eval_epochs, eval_precision)})"))
        resume_note = _resume_note(runner, run.work_dir, resume)
        if resume_note:
            lines.append(resume_note)
        if distributed.world_size() > 1:
            lines.append(f"{distributed.world_size()} processes (torchrun): rank 0 writes every file")
        for line in lines:
            click.echo(f"  - {line}")
    if dry_run:
        click.echo("Dry run: nothing distilled or written.")
        return
    started = time.perf_counter()
    sset = run.distill()
    if distributed.is_main():
        save_synthetic_set(out, sset)
    # The wall-clock of this command beside the set's recorded cost (what a budget counts): they differ
    # by the plan's timings (not counted) and, with cached experts, by the experts' recorded training.
    cost = f"; its recorded cost {describe_timings(sset.timings)}" if sset.timings.get("total_s") else ""
    say(f"Saved {sset.num_images} images ({ipc}/class) to {out} in {time.perf_counter() - started:.0f} s{cost}.")
    if not no_eval:
        _evaluate_and_record(out, protocol or method_cls.default_protocol, None, eval_runs, seed,
                             data_root, run.ctx.device, quiet, baselines=True, reference=None, epochs=eval_epochs,
                             compile=compile_eval, resume=resume, precision=eval_precision)


def _recorded_run(path: str, context: click.Context) -> dict:
    """recorded_run(path), with an explicit --seed in place of the recorded one; the options the
    record fixes are refused when given."""
    from click.core import ParameterSource

    recorded = recorded_run(path)
    given = [name for name in ("method", "ipc", "dataset", "preset", "budget")
             if context.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
    if given:
        raise ConfigError(f"--from {path} repeats the recorded {', '.join(sorted(given))}; drop "
                          f"{' and '.join('--' + name for name in given)} (change settings with --set KEY=VALUE).")
    if context.get_parameter_source("seed") not in (ParameterSource.DEFAULT, None):
        recorded["seed"] = context.params["seed"]
    return recorded


def _refuse_kd_without_teacher(method: str, method_cls, protocol: str) -> None:
    """A KD protocol trains on a teacher's labels of each view: refuse it now for a method whose
    sets have no teacher, rather than after the hours of distillation."""
    if get_protocol(protocol).kd is None or method_cls.makes_teacher:
        return
    makers = [name for name in list_methods() if get_method_class(name).makes_teacher]
    raise ConfigError(f"The {protocol} protocol trains on a teacher's soft labels, and {method} sets have no teacher "
                      f"(only {' and '.join(makers)} make one). Choose another --protocol (the method's own is "
                      f"{method_cls.default_protocol}), or --no-eval.")


def _evaluation_estimate(runner, data, ipc: int, protocol_name: str, runs: int | None, epochs: int | None,
                         precision: str | None) -> str:
    """", about ... for its N runs" for a plan, timed here; "" for a set whose teacher runs live
    at evaluation (its cost is the teacher's, which does not exist yet)."""
    protocol = get_protocol(protocol_name).with_overrides(runs=runs, epochs=epochs, precision=precision)
    if protocol.kd is not None and runner.teacher_labels_live:
        return ""
    arch = runner.student_arch() or "convnet"
    seconds = time_epoch(ipc * data.spec.num_classes, data, protocol=protocol, arch=arch) * protocol.epochs
    return (f": about {format_duration(seconds * protocol.runs)} for its {protocol.runs} runs on {arch}, "
            "and as much again for the random-subset baseline unless it is cached")


def _changed_settings(config) -> str:
    """The settings of a preset that differ from its config class's defaults, as key=value."""
    import dataclasses

    default = type(config)()
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(default, f.name)]
    return ", ".join(changed) or "the defaults"


def _resume_note(runner, work_dir: Path, resume: bool) -> str | None:
    """What the plan says of an interrupted run of the same settings: a fresh run replaces its
    checkpoint, and --resume without one starts from the beginning."""
    checkpoint = work_dir / runner.checkpoint_name if runner.checkpoint_name else None
    found = checkpoint is not None and checkpoint.exists()
    if found and not resume:
        return ("an interrupted run of these settings left a checkpoint there: this run starts afresh and "
                "replaces it (--resume continues it instead)")
    if resume and not found:
        return "--resume: no checkpoint of these settings there, so the run starts from the beginning"
    return None


def _refuse_evaluation_options(**given) -> None:
    """--no-eval beside an option of the evaluation it skips: the user expects an evaluation
    the command would silently not run."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value not in (None, False)]
    if named:
        raise ConfigError(f"{', '.join(named)} set{'s' if len(named) == 1 else ''} how the set is evaluated, "
                          "but --no-eval skips the evaluation. Drop --no-eval to evaluate, or drop "
                          f"{'it' if len(named) == 1 else 'them'}; `ddtool evaluate SET.h5` evaluates a saved set later.")


def _refuse_to_replace(path: Path, *, overwrite: bool, resume: bool = False, command: str = "distill") -> None:
    """A file already at the output path is not replaced unless asked (--overwrite), or the run
    that saves there is being continued (--resume)."""
    there = None if overwrite or resume else _what_is_there(path)
    if there:
        raise ConfigError(f"{path} holds {there}, and {command} does not replace a file unless asked. Save "
                          f"elsewhere (-o NEW{path.suffix}), or give --overwrite to replace it.")


def _replacing(path: Path) -> str:
    """What saving to `path` replaces, said in the plan (a shipped set's records go with it)."""
    there = _what_is_there(path)
    return f" (replacing {there}: --overwrite or --resume)" if there else ""


def _what_is_there(path: Path) -> str | None:
    if not path.is_file():
        return None
    if path.suffix not in (".h5", ".hdf5"):
        return "a file"
    try:
        old = load_synthetic_set(path)
    except DDToolError:
        return "the file there"
    records = len(old.evaluations)
    return (f"the {old.method} set there, made {old.created[:10] or 'earlier'}, and its {records} "
            f"evaluation record{'s' if records != 1 else ''}")


# ---- evaluate -------------------------------------------------------------------------------
def _evaluate_and_record(path: Path, protocol_name: str | None, archs: list[str] | None, runs: int | None, seed: int,
                         data_root: str | None, device: torch.device, quiet: bool, *, baselines: bool,
                         reference: bool | None, epochs: int | None = None, record: bool = True,
                         compile: bool = False, resume: bool = False, precision: str | None = None,
                         hard_labels: bool = False, as_json: bool = False) -> None:
    # with --json, stdout holds the JSON report alone: what is said on the way goes to stderr
    log = (lambda message: say(message, err=True)) if as_json else say
    rows = evaluate_file(path, protocol=protocol_name, archs=archs, runs=runs, epochs=epochs, seed=seed,
                         data_root=data_root, device=device, baselines=baselines, reference=reference, record=record,
                         compile=compile, resume=resume, precision=precision, hard_labels=hard_labels,
                         progress=not quiet, log=log)
    if not distributed.is_main():
        return
    if as_json:
        print_json({"set": str(path), "recorded": record and bool(rows),
                     "evaluations": [{**r.to_record(), "protocol_label": protocol_label(r.protocol.to_dict()),
                                      "beats_random_subset": r.beats_random_subset} for r in rows]})
        return
    if not rows:
        return
    click.echo(f"\n{'architecture':<24} {'synthetic set':>16} {'random subset':>16} {'whole dataset':>16}")
    for r in rows:
        cells = [str(r.synthetic), str(r.random_subset) if r.random_subset else "-",
                 str(r.whole_dataset) if r.whole_dataset else "not cached"]
        click.echo(f"{r.arch:<24} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")
    for r in rows:
        if r.synthetic.resumed:
            click.echo(f"({r.arch}: run{'s' if len(r.synthetic.resumed) > 1 else ''} "
                       f"{', '.join(map(str, r.synthetic.resumed))} of the set taken from the interrupted evaluation, "
                       "as --resume asks)")
    count = len(rows[0].synthetic.runs)
    click.echo(f"(test accuracy %, final epoch, mean ± std over {count} run{'s' if count != 1 else ''}; "
               f"lr {rows[0].lr:.4g}, {rows[0].labels} labels; {rows[0].synthetic.seconds:.0f} s for the set on {device})")
    for r in rows:
        if r.beats_random_subset is False:
            click.echo(click.wrap_text(
                f"WARNING: on {r.arch} this set scores no better than random real images of the same size "
                f"({r.synthetic} against {r.random_subset}): on this data the distillation did not pay for "
                "itself. A coreset (--method herding) keeps real images; a longer run (more experts, more "
                "iterations, --budget) or a smaller network (--arch convnet:depth=2 on small images) may help.",
                width=100), err=True)
    if any(r.whole_dataset is None for r in rows) and reference is None:
        click.echo("The whole-dataset reference is computed once with `ddtool evaluate SET.h5 --reference` "
                   "and cached (hours on a CPU).")
    if record:
        click.echo(f"Recorded in {path}.")


def evaluate(set_path, protocol, archs, runs, epochs, no_baselines, reference, no_record, compile_networks,
             precision, resume, hard_labels, as_json, data_root, seed, device, quiet) -> None:
    """`ddtool evaluate` (its options and help: commands.py)."""
    _evaluate_and_record(Path(set_path), protocol, list(archs) or None, runs, seed, data_root,
                         distributed.device_for_rank(resolve_device(device)), quiet,
                         baselines=not no_baselines, reference=reference, epochs=epochs,
                         record=not no_record, compile=compile_networks, resume=resume, precision=precision,
                         hard_labels=hard_labels, as_json=as_json)


# ---- info / show / export / import ----------------------------------------------------------
def info(set_path, as_json) -> None:
    """`ddtool info` (its options and help: commands.py)."""
    sset = load_synthetic_set(set_path)
    if as_json:
        print_json(_set_summary(set_path, sset))
        return
    c, h, w = sset.image_shape
    click.echo(f"{set_path}")
    click.echo(f"  dataset      {sset.dataset} ({sset.num_classes} classes)")
    click.echo(f"  method       {sset.method}, IPC {sset.ipc}, seed {sset.seed}")
    click.echo(f"  images       {sset.num_images} x {c}x{h}x{w}")
    labels = sset.label_kind + (f" (temperature {sset.label_temperature:g})" if sset.is_soft else "")
    stored = sset.extras.get("kd_logits")
    if stored is not None:  # what the kd protocol trains on: the teacher's labels of each view
        labels += f"; the teacher's soft labels of {stored.shape[0]} epochs of augmented views are stored beside them"
    elif sset.teacher is not None:
        labels += "; its teacher is stored, to label views as the kd protocol trains"
    click.echo(f"  labels       {labels}")
    click.echo(f"  learned lr   {sset.learned_lr:.6g}" if sset.learned_lr is not None else "  learned lr   -")
    click.echo(f"  input space  {sset.preprocessing.describe()}")
    click.echo(f"  made         {sset.created} with ddtool {sset.ddtool_version}")
    if sset.timings:
        click.echo(f"  cost         {describe_timings(sset.timings)}")
    if sset.teacher:
        click.echo(f"  teacher      {sset.teacher['arch']} (saved in the file)")
    if sset.extras:
        click.echo("  extras       " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in sset.extras.items()))
    click.echo("  config       " + json.dumps(sset.config, sort_keys=True))
    if not sset.evaluations:
        click.echo("  evaluations  none yet (ddtool evaluate)")
    for e in sset.evaluations:
        base = e.get("baselines", {})
        extra = "".join(f", {name.replace('_', ' ')} {100 * b['mean']:.2f} ± {100 * b['std']:.2f}"
                        for name, b in base.items())
        runs = len(e["runs"])
        random = base.get("random_subset")
        verdict = " (NO BETTER THAN RANDOM REAL IMAGES)" if random and e["mean"] <= random["mean"] else ""
        click.echo(f"  evaluation   {protocol_label(e['protocol'])} on {e['arch']}: {100 * e['mean']:.2f} ± "
                   f"{100 * e['std']:.2f} over {runs} run{'s' if runs != 1 else ''}{extra}{verdict} "
                   f"({e.get('timestamp', '')})")


def _set_summary(set_path, sset) -> dict:
    """What `info --json` prints: the set's record in the file (its configuration and every
    evaluation included), without the arrays."""
    return {
        "path": str(set_path), "dataset": sset.dataset, "classes": sset.classes, "num_classes": sset.num_classes,
        "method": sset.method, "ipc": sset.ipc, "seed": sset.seed, "num_images": sset.num_images,
        "image_shape": list(sset.image_shape), "label_kind": sset.label_kind,
        "label_temperature": sset.label_temperature, "learned_lr": sset.learned_lr,
        "input_space": sset.preprocessing.describe(), "zca": sset.preprocessing.zca is not None,
        "bytes": int(sset.images.nbytes + sset.labels.nbytes),  # what the set stores: images and labels
        "created": sset.created, "ddtool_version": sset.ddtool_version, "timings": sset.timings,
        "teacher": None if sset.teacher is None else {"arch": sset.teacher["arch"], "options": sset.teacher["options"]},
        "extras": {name: list(value.shape) for name, value in sset.extras.items()},
        "config": sset.config,
        "evaluations": [{**record, "protocol_label": protocol_label(record["protocol"])}
                        for record in sset.evaluations],
    }


def show(set_path, output, per_class, scale, class_names) -> None:
    """`ddtool show` (its options and help: commands.py)."""
    if Path(output).suffix.lower() != ".png":
        raise ConfigError(f"`ddtool show` writes a PNG picture; name the output file .png (got {output}).")
    sset = load_synthetic_set(set_path)
    scale = scale or auto_grid_scale(max(sset.image_shape[1:]))
    path = save_grid_png(sset, output, max_per_class=per_class, scale=scale, class_names=class_names)
    click.echo(f"Wrote {path} ({sset.num_classes} rows, each pixel {scale}x{scale})")


def export_command(set_path, fmt, output, overwrite, bit_depth) -> None:
    """`ddtool export` (its options and help: commands.py)."""
    _refuse_to_replace(Path(output), overwrite=overwrite, command="export")
    sset = load_synthetic_set(set_path)
    path = export_set(sset, output, fmt, bit_depth=int(bit_depth))
    click.echo(f"Wrote {path}")
    left = left_out_of_export(sset)
    if left:
        click.echo(f"Not exported: {' and '.join(left)}, which the {default_protocol(sset)} protocol trains "
                   f"with; evaluate {set_path} itself under it.", err=True)


def import_command(sources, fmt, dataset, zca, learned_lr, ipc, experiment, checkpoint, soft_labels,
                   label_temperature, output, overwrite, data_root) -> None:
    """`ddtool import` (its options and help: commands.py)."""
    from ddtool.storage.importers import check_learned_lr

    misplaced = [option for option, applies in (("--checkpoint", checkpoint == "final" or fmt == "mtt"),
                                                ("--experiment", experiment == 0 or fmt == "dc")) if not applies]
    if misplaced:  # an option of another format would be silently ignored
        raise ConfigError(f"{' and '.join(misplaced)} {'applies' if len(misplaced) == 1 else 'apply'} to another "
                          f"format (--checkpoint: mtt folders; --experiment: dc files), not --format {fmt}.")
    if learned_lr is not None:
        learned_lr = check_learned_lr(learned_lr)  # before any work
    _refuse_to_replace(Path(output), overwrite=overwrite, command="import")
    spec = get_spec(dataset)

    def space(whitened: bool):
        if whitened:
            # ddtool's own runs fit the ZCA without their validation images; the published code
            # fits it on the whole training split, and that is the space the imported images are in
            return prepare(spec.name, data_root, zca=True, val_per_class=0).preprocessing
        from ddtool.data import Preprocessing

        return Preprocessing(spec.mean, spec.std)

    classes = list(spec.classes) if spec.classes else None
    sset = import_set([Path(s) for s in sources] if len(sources) > 1 else Path(sources[0]), fmt,
                      dataset=spec.name, preprocessing=space(zca) if zca is not None else None,
                      default_preprocessing=lambda: space(False), zca_preprocessing=lambda: space(True),
                      classes=classes, ipc=ipc, experiment=experiment, iteration=checkpoint,
                      label_kind=soft_labels, label_temperature=label_temperature, learned_lr=learned_lr)
    replaced = _what_is_there(Path(output))  # said, as distill says it in its plan
    save_synthetic_set(output, sset)
    click.echo(f"Imported {sset.num_images} images ({sset.label_kind} labels"
               f"{', learned lr %.4g' % sset.learned_lr if sset.learned_lr is not None else ''}) into {output}"
               + (f", replacing {replaced}" if replaced else ""))
    for note in sset.config.get("import_notes", []):
        click.echo(f"  {note}")


def methods_command(name, preset, ipc, as_json) -> None:
    """`ddtool methods` (its options and help: commands.py)."""
    if name is None:
        if preset is not None or ipc is not None:
            raise ConfigError("--preset and --ipc show one method's settings: name the method, e.g. "
                              f"`ddtool methods datm{' --preset ' + preset if preset else ''}"
                              f"{' --ipc %d' % ipc if ipc else ''}`.")
        listing = []
        for method in list_methods():
            cls = get_method_class(method)
            listing.append({"name": method, "default_protocol": cls.default_protocol, "presets": list(cls.presets),
                            "default_preset": cls.default_preset})
        if as_json:
            print_json(listing)
            return
        for entry in listing:
            presets = ", ".join(p + (" (default)" if p == entry["default_preset"] else "")
                                for p in entry["presets"]) or "-"
            click.echo(f"{entry['name']:<10} protocol {entry['default_protocol']:<8} presets: {presets}")
        click.echo("(`ddtool methods NAME` lists a method's settings with their meaning)")
        return
    from ddtool.methods.settings import describe_settings

    described = describe_settings(name, preset, ipc)
    if as_json:
        print_json(described.to_dict())
        return
    print_settings(described)


# ---- compare --------------------------------------------------------------------------------
def compare(set_paths, protocol, as_json, as_csv) -> None:
    """`ddtool compare` (its options and help: commands.py)."""
    from ddtool.evaluation.compare import compare_sets

    if as_json and as_csv:
        raise ConfigError("--json and --csv each print the comparison on stdout: choose one.")
    comparison = compare_sets(list(set_paths), protocol=protocol)
    if as_json:
        print_json(comparison.to_dict())
    elif as_csv:
        print_comparison_csv(comparison)
    else:
        print_comparison(comparison)


