"""The commands of `ddtool` as the command line sees them: their options, arguments and help.

Each command's work is in ddtool.cli.actions, imported when the command runs, so that asking
for a command's --help imports neither torch nor the registries (a second or more): the choices
offered here are the registries' names, spelt out in ddtool.cli.names.
"""

from __future__ import annotations

import click

from ddtool.cli.main import SEED_RANGE, cli
from ddtool.cli.names import (
    DATASET_NAMES, DEFAULT_DATASET, EXPORT_FORMATS, IMPORT_FORMATS, METHOD_NAMES, NETWORK_NAMES, PRECISIONS,
    PROTOCOL_NAMES, completes,
)

_data_root = click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
                          help="Folder holding datasets (also $DDTOOL_DATA, the user cache, Debian's folders).")
_device = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
_seed = click.option("--seed", type=SEED_RANGE, default=0, show_default=True,
                     help="Every random choice derives from it: a CPU run repeats bit for bit.")
_quiet = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
_json = click.option("--json", "as_json", is_flag=True,
                     help="Print the result as JSON on stdout, and nothing else there (messages go to stderr).")


def _run(name: str, options: dict):
    """Do command `name` (its function in ddtool.cli.actions, imported now) with its options."""
    from ddtool.cli import actions

    return getattr(actions, name)(**options)


@cli.command()
@click.argument("names", nargs=-1, metavar="[DATASET]...")
@_data_root
@click.option("--download", "download_name", metavar="DATASET", default=None,
              help="Fetch a dataset that is not found through torchvision into the user cache (needs network); "
                   "one already found is left as it is.")
def datasets(names: tuple[str, ...], data_root: str | None, download_name: str | None) -> None:
    """Which datasets ddtool knows, which are found on this machine, and where.

    With DATASET names (e.g. folder:/path/to/root), what ddtool reads in each: classes and their
    images, image size, the augmentation and the network depth a run will use.
    """
    return _run("datasets", locals())


@cli.command()
@click.option("--method", "-m", default=None, shell_complete=completes(METHOD_NAMES),
              help="Distillation method: " + ", ".join(["mtt", "datm", "tesla", "ftd", "random", "herding", "...",
                                                         "(ddtool methods)"])
              + " [default: datm for Fashion-MNIST on a CPU, else mtt].")
@click.option("--ipc", type=click.IntRange(min=1), default=10, show_default=True, help="Images per class.")
@click.option("--dataset", "-d", default=DEFAULT_DATASET, show_default=True, shell_complete=completes(DATASET_NAMES))
@_data_root
@click.option("--preset", default=None, help="A named configuration of the method (see --list-presets).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override one setting of the method's configuration (repeatable).")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Shortcut for --set iterations=N.")
@click.option("--budget", metavar="DURATION", default=None,
              help="Wall-clock budget for experts and distillation (e.g. 30m, 1h30m; evaluation not included): "
                   "the plan times this machine and sizes the experts, the unroll and the iterations to fit, and "
                   "the run stops in time with its set saved (trajectory methods). [default: 30m for "
                   "Fashion-MNIST on a CPU when no --preset and none of experts, expert_train_epochs, syn_steps "
                   "or iterations are given, else none]")
@click.option("--backend", type=click.Choice(["auto", "exact", "bptt", "tesla"]), default=None,
              help="Gradient backend of trajectory matching: bptt (fastest; memory grows with N), exact (the "
                   "same gradient in constant memory), tesla (TESLA's first-order rule). Default auto: bptt when "
                   "its memory fits in a quarter of the device's, else exact; the plan says which.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Where to save the set [default: distilled/<dataset>_<method>_ipc<N>_seed<S>.h5].")
@click.option("--resume", is_flag=True,
              help="Continue the interrupted run with the same settings (its distillation, then its evaluation).")
@click.option("--no-eval", is_flag=True, help="Save the set without evaluating it.")
@click.option("--overwrite", is_flag=True, help="Replace the file at the output path (a set there, with its "
              "evaluation records, is otherwise left alone and the command refuses to start).")
@click.option("--protocol", type=click.Choice(PROTOCOL_NAMES), default=None,
              help="Evaluation protocol [default: the method's own].")
@click.option("--eval-runs", type=click.IntRange(min=1), default=None, help="Fresh networks to evaluate with.")
@click.option("--eval-epochs", type=click.IntRange(min=1), default=None, help="Override the protocol's epochs.")
@click.option("--compile-eval", is_flag=True, help="Evaluate with torch.compile'd networks (as `ddtool evaluate "
              "--compile`: 1.4-2.2x faster on a CPU after a one-off compile).")
@click.option("--eval-precision", type=click.Choice(PRECISIONS), default=None,
              help="Precision of the evaluation's training, as `ddtool evaluate --precision` [default: fp32].")
@click.option("--from", "--config", "from_set", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="SET.h5",
              help="Make a set again from its own record: its method, dataset, IPC, seed and every setting "
                   "(--set changes settings, --seed the seed; a CPU run repeats it bit for bit unless a budget "
                   "stopped it).")
@click.option("--list-presets", is_flag=True, help="List the method's presets and exit.")
@click.option("--dry-run", is_flag=True, help="Print the plan (with its time estimates, timed on this machine) and exit; "
              "nothing is trained or written.")
@_seed
@_device
@_quiet
def distill(method, ipc, dataset, data_root, preset, settings, iterations, budget, backend, output, resume, no_eval,
            overwrite, protocol, eval_runs, eval_epochs, compile_eval, eval_precision, from_set, list_presets, dry_run,
            seed, device, quiet) -> None:
    """Distill a dataset into IPC synthetic images per class, save it, and evaluate it.

    Finds or trains the expert trajectories it needs (cached by configuration), prints its
    plan, checkpoints regularly (--resume continues an interrupted run to the same result),
    saves one HDF5 file and, unless --no-eval, evaluates it beside the random-subset baseline
    and the whole-dataset reference.
    """
    return _run("distill", locals())


@cli.command()
@click.argument("set_path", metavar="SET.h5", type=click.Path(dir_okay=False))
@click.option("--protocol", type=click.Choice(PROTOCOL_NAMES), default=None,
              help="Evaluation protocol [default: the method's own, imported MTT/TESLA/FTD/DATM sets "
                   "included (mtt; datm for soft labels); for other sets mtt with a learned lr, else classic].")
@click.option("--arch", "archs", multiple=True, shell_complete=completes(NETWORK_NAMES),
              help="Architecture(s) to train, e.g. convnet, resnet18, convnet:width=64 (repeat for "
                   "cross-architecture transfer) [default: the network the set was distilled for].")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Fresh networks per architecture [default: the protocol's, 5].")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs each network trains [default: the protocol's, e.g. mtt 1000, classic 300].")
@click.option("--no-baselines", is_flag=True, help="Skip the matched random-subset baseline.")
@click.option("--reference/--no-reference", default=None,
              help="Compute the whole-dataset reference if it is not cached yet (hours on a CPU) / skip it. "
                   "[default: show it when cached]")
@click.option("--no-record", is_flag=True, help="Do not write the results into the file.")
@click.option("--compile", "compile_networks", is_flag=True,
              help="Run each network through torch.compile: 1.4-2.2x faster training on a CPU (measured; wider "
                   "networks gain less) after a one-off "
                   "compile (seconds to a minute); the same protocol, numbers differ from eager by rounding only. "
                   "Recorded with the results.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Precision of the networks' training: fp32, or bf16 (autocast: bfloat16 forward passes, "
                   "float32 weights; for GPUs, whose tensor cores run it several times faster). Part of the "
                   "protocol: recorded, and its baselines are its own. [default: fp32]")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted evaluation with the same settings: the runs it finished (kept in the "
                   "cache as each ends) are taken, the others trained.")
@click.option("--hard-labels", is_flag=True,
              help="Train on the class of each image (the argmax of a soft-labelled set's labels) instead of its "
                   "soft labels, e.g. to judge a DATM set's images apart from its labels. Part of the protocol: "
                   "recorded. Not with a KD protocol, whose labels are a teacher's.")
@_json
@_data_root
@_seed
@_device
@_quiet
def evaluate(set_path, protocol, archs, runs, epochs, no_baselines, reference, no_record, compile_networks,
             precision, resume, hard_labels, as_json, data_root, seed, device, quiet) -> None:
    """Train fresh networks on a synthetic set; report final-epoch test accuracy, mean ± std,
    beside the matched random-subset baseline and the whole-dataset reference (both computed
    once under the same protocol and cached), and record everything in the file.

    Under torchrun the runs are spread over the processes (run r on rank r mod P); rank 0
    prints and records."""
    return _run("evaluate", locals())


@cli.command()
@click.argument("set_path", metavar="SET.h5", type=click.Path(dir_okay=False))
@_json
def info(set_path, as_json) -> None:
    """Describe a synthetic set: what it is, how it was made, how it scored."""
    return _run("info", locals())


@cli.command()
@click.argument("set_path", metavar="SET.h5", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="PNG file to write.")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images shown per class (one row per class).")
@click.option("--scale", type=click.IntRange(min=1), default=None,
              help="Each pixel drawn as scale x scale pixels [default: enough for 64-px images or larger, "
                   "e.g. 3 for 28 px, 8 for 8 px].")
@click.option("--class-names/--no-class-names", default=True, show_default=True,
              help="Each row's class name at its left.")
def show(set_path, output, per_class, scale, class_names) -> None:
    """Save the images as a PNG grid, one row per class, un-whitened and de-normalised."""
    return _run("show", locals())


@cli.command("export")
@click.argument("set_path", metavar="SET.h5", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True)
@click.option("--output", "-o", type=click.Path(), required=True,
              help="Folder (imagefolder) or file (npz, torch) to write.")
@click.option("--overwrite", is_flag=True, help="Replace an npz or torch file at the output path (an existing "
              "image folder is never written into).")
@click.option("--bit-depth", type=click.Choice(["8", "16"]), default="8", show_default=True,
              help="imagefolder: 8-bit PNGs of the [0, 1] pixels (values outside clipped), or 16-bit PNGs of the "
                   "set's whole value range, which labels.json records (nothing clipped).")
def export_command(set_path, fmt, output, overwrite, bit_depth) -> None:
    """Write a set as an ImageFolder of PNGs, an npz archive or a torch file.

    The exports hold the images, labels, learned lr and class names, and npz and torch also the
    preprocessing (an ImageFolder holds de-normalised PNGs); the evaluation records, seed and
    configuration stay in SET.h5.
    """
    return _run("export_command", locals())


@cli.command("import")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(IMPORT_FORMATS), required=True,
              help="mtt: images/labels/lr tensors (MTT, DATM, FTD); dc: a DC-style dict; npz; torch.")
@click.option("--dataset", "-d", default=DEFAULT_DATASET, show_default=True, shell_complete=completes(DATASET_NAMES),
              help="The dataset the set was distilled from.")
@click.option("--zca/--no-zca", default=None,
              help="The images are (--zca) or are not (--no-zca) in ZCA-whitened space [default: the file's "
                   "record of its space; for mtt, ZCA when an images_zca_<it>.pt (the un-whitened copy MTT, DATM "
                   "and FTD write only for ZCA runs) lies beside the images, else --no-zca, and refused as "
                   "unknowable for 50 or more images per class, for which they write no copy].")
@click.option("--lr", "learned_lr", type=float, default=None, metavar="FLOAT",
              help="The learned step size to record (MTT saves none, so its sets are otherwise evaluated at the "
                   "protocol's fixed lr); replaces the one the files record, if any.")
@click.option("--ipc", type=click.IntRange(min=1), default=None, help="Images per class [default: inferred].")
@click.option("--experiment", type=int, default=0, show_default=True, help="dc: which experiment of the file.")
@click.option("--checkpoint", default="final", show_default=True, metavar="final|best|ITERATION",
              help="mtt, given a folder: which saved iteration to import. final: the highest-numbered "
                   "images_<it>.pt, the last the run saved. best: images_best.pt, which MTT/DATM save whenever "
                   "the TEST accuracy improves, so it is selected on the test split and its score is optimistic; "
                   "import it only to compare with numbers published that way. (Files given one by one are "
                   "imported as named.)")
@click.option("--soft-labels", type=click.Choice(["logits", "probs"]), default=None,
              help="What (N, K) labels hold [default: the file's record, else probs when every row is "
                   "non-negative and sums to 1 (one-hot included), else logits, as DATM saves them].")
@click.option("--label-temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Temperature of soft logits: targets are softmax(logits / T) [default: the file's, else 1].")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, help="The .h5 file to write.")
@click.option("--overwrite", is_flag=True, help="Replace the file at the output path, evaluation records included.")
@_data_root
def import_command(sources, fmt, dataset, zca, learned_lr, ipc, experiment, checkpoint, soft_labels,
                   label_temperature, output, overwrite, data_root) -> None:
    """Bring a set made elsewhere into ddtool's format, to evaluate it under the same protocol.

    The input space is the file's own record where it has one (ddtool's npz and torch
    exports; --zca/--no-zca, when given, must agree with it), for MTT/DATM/FTD files what their
    images_zca_<it>.pt copies show, else rebuilt from the dataset, so the dataset's files must
    be found: mean/std normalisation or, with ZCA, in its place the ZCA (eps 0.1) fitted on every
    training image's [0, 1] pixels, as MTT and DATM fit it. The output says which space and
    learned lr were recorded, and why.
    """
    return _run("import_command", locals())


@cli.command("methods")
@click.argument("name", required=False, metavar="[NAME]")
@click.option("--preset", default=None,
              help="With NAME: show the values of this preset [default: the method's default preset].")
@click.option("--ipc", type=click.IntRange(min=1), default=None,
              help="With NAME: show the preset's variant for this IPC, as `ddtool distill --ipc N` takes it.")
@_json
def methods_command(name, preset, ipc, as_json) -> None:
    """List the distillation methods, their presets and default evaluation protocols; with NAME,
    every setting of that method: its type, default, the preset's value and meaning."""
    return _run("methods_command", locals())


@cli.command("compare")
@click.argument("set_paths", metavar="SET.h5 [SET.h5 ...]", nargs=-1, required=True,
                type=click.Path(dir_okay=False))
@click.option("--protocol", type=click.Choice(PROTOCOL_NAMES), default=None,
              help="Compare the sets' evaluations under this protocol only [default: every recorded one, each "
                   "protocol and network in a group of its own].")
@_json
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV row per evaluation on stdout instead of the table.")
def compare(set_paths, protocol, as_json, as_csv) -> None:
    """Compare sets by the evaluations their files record: one table of method, IPC, accuracy
    beside the matched random baseline, size and cost, grouped by protocol, network and
    dataset (accuracies compare only within a group; nothing is trained)."""
    return _run("compare", locals())
