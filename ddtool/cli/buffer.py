"""`ddtool buffer` (train expert trajectories) and `ddtool buffer-merge` (merge shards)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from ddtool import distributed
from ddtool.cli.main import SEED_RANGE, cli, say
from ddtool.data import prepare
from ddtool.device import resolve_device
from ddtool.errors import ConfigError
from ddtool.experts.config import LR_DECAYS, OPTIMIZERS, ExpertConfig
from ddtool.experts.execution import UNCOMPILED_NOTE, plan_execution, training_images
from ddtool.durations import format_duration
from ddtool.experts.plan import estimate_training_time, for_data, inspect_store, store_path_for
from ddtool.experts.merge import merge_shards
from ddtool.experts.runner import Shard, run_buffer
from ddtool.experts.store import ExpertStore, experts_folder, read_manifest
from ddtool.training import PRECISIONS

_DEFAULTS = {f.name: f.default for f in fields(ExpertConfig)}


def _default(name: str) -> Any:
    return _DEFAULTS[name]


def config_from_options(options: dict[str, Any]) -> ExpertConfig:
    """The ExpertConfig of `ddtool buffer`'s parsed options (those that are not settings are ignored)."""
    settings = {k: v for k, v in options.items() if k in _DEFAULTS and k != "arch_options"}
    arch_options = {k: options.get(k) for k in ("width", "depth") if options.get(k) is not None}
    return ExpertConfig(**settings, arch_options=arch_options)


def _indices(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:10])) + (f" ... ({len(indices)} in all)" if len(indices) > 10 else "")


# The store written: an index file and, beside it, the folder of the experts' files.
_STORE_FILES = ("the index file NAME.h5 and, beside it, the folder NAME.experts/ that holds the experts' files "
                "(the index links to them: move or copy the two together)")


@cli.command(context_settings={"show_default": True})
@click.option("--dataset", default=_default("dataset"), help="Dataset name (see `ddtool datasets`).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), show_default="none",
              help="Folder to look for the dataset in first (then $DDTOOL_DATA, the user cache, Debian's folders).")
@click.option("--arch", default=_default("arch"), help="Network of the experts (convnet, mlp, resnet18, vgg11, ...).")
@click.option("--width", type=int, show_default="the network's; 128 for ConvNet and MLP",
              help="Network width (ConvNet: feature maps per layer).")
@click.option("--depth", type=int, show_default="from the image size",
              help="Network depth (ConvNet: conv blocks).")
@click.option("--experts", type=int, default=_default("experts"), help="Number of experts K.")
@click.option("--epochs", type=int, default=_default("epochs"), help="Epochs per expert E.")
@click.option("--batch-size", type=int, default=_default("batch_size"), help="Real images per training step.")
@click.option("--lr", type=float, default=_default("lr"), help="Learning rate of the experts' SGD.")
@click.option("--momentum", type=float, default=_default("momentum"), help="SGD momentum, in [0, 1).")
@click.option("--weight-decay", type=float, default=_default("weight_decay"), help="SGD weight decay (L2).")
@click.option("--lr-decay", type=click.Choice(LR_DECAYS), default=_default("lr_decay"),
              help="step: x0.1 at half the epochs; cosine: per-epoch cosine to 0.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=_default("optimizer"),
              help="sam/gsam: sharpness-aware experts (FTD uses gsam); twice the cost of sgd.")
@click.option("--rho", type=float, default=_default("rho"), help="SAM/GSAM radius.")
@click.option("--gsam-alpha", type=float, default=_default("gsam_alpha"),
              help="GSAM: weight of the surrogate-gap term (the published FTD code uses 1).")
@click.option("--adaptive/--no-adaptive", default=_default("adaptive"),
              help="Adaptive (weight-scaled) SAM perturbation, as the published FTD code uses.")
@click.option("--zca/--no-zca", default=_default("zca"), help="ZCA-whiten the images.")
@click.option("--augment/--no-augment", default=_default("augment"), help="DSA augmentation.")
@click.option("--ast-loss-scaling", is_flag=True, default=_default("ast_loss_scaling"),
              help="AST: scale the loss 0.50, 0.55 ... 0.95 over the first 10 epochs.")
@click.option("--ast-input-grad-penalty", type=float, default=_default("ast_input_grad_penalty"),
              help="AST: weight of (||d sum(logits)/dx|| - 1)^2; 0 = off (AST uses 2).")
@click.option("--seed", type=SEED_RANGE, default=_default("seed"), help="Expert i is fixed by (seed, i).")
@click.option("--eval-every", type=int, default=_default("eval_every"),
              help="Also measure test accuracy every N epochs (0: only at the end).")
@click.option("--train-subset", type=int, show_default="all training images",
              help="Train on a seeded subset of this many images (quick runs).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_default("precision"),
              help="bf16: autocast the forward passes to bfloat16 (float32 weights and snapshots), for a GPU's "
                   "speed; a store of its own (distill: --set expert_precision=bf16).")
@click.option("--shard", metavar="i/n", show_default="all experts",
              help="Train only the experts with index = i mod n, into a shard store of their own beside the "
                   "store: -o NAME.h5 --shard 0/2 writes NAME.shard-0-of-2.h5 (and NAME.shard-0-of-2.experts/); "
                   "merge the shards with `ddtool buffer-merge`.")
@click.option("--output", "-o", "--out", "out", type=click.Path(dir_okay=False), metavar="NAME.h5",
              show_default="in the cache, where `ddtool distill` finds it: experts/<settings>-<images>.h5 in "
                           "$DDTOOL_CACHE or ~/.cache/ddtool",
              help=f"The expert store to write or extend: {_STORE_FILES}.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=1), show_default="a CPU's cores, for long enough experts",
              help="Experts trained at once on a CPU, each in its own process with its share of the cores.")
@click.option("--compile/--no-compile", "compile_", default=None, show_default="on a CPU, for long enough experts",
              help="Train through torch.compile (the same maths, other rounding; about a minute to compile).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the time estimate, train nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def buffer(dataset, data_root, arch, width, depth, shard, out, device, workers, compile_, dry_run, quiet,
           **settings) -> None:
    """Train expert trajectories (for mtt, tesla, datm, ftd) into an HDF5 store.

    Experts already in the store are skipped and an interrupted expert resumes from its last
    epoch, so re-running the same command after a kill continues where it stopped. Without
    -o the store goes to the cache, where `ddtool distill` finds it by configuration:
    pre-train with the settings of the distill preset you will run (buffer has no --preset;
    `ddtool distill ... --dry-run` prints the experts a run needs and whether they are cached).

    \b
    Examples (the experts of distill's Fashion-MNIST presets; --optimizer gsam: FTD's):
      ddtool buffer --width 32 --experts 3 --epochs 20   # distill's default: fashion-cpu, --ipc 10 or 50
      ddtool buffer --width 32 --experts 3 --epochs 6    # fashion-cpu, --ipc 1 (tesla: also --ipc 10)
      ddtool buffer --experts 20 --epochs 30             # --preset fashion-gpu, any --ipc
      ddtool buffer --width 32 --experts 3 --epochs 20 --optimizer gsam  # distill --method ftd
      ddtool buffer --shard 0/2 & ddtool buffer --shard 1/2   # two processes, then buffer-merge
      torchrun --nproc-per-node 2 -m ddtool buffer --experts 20 --epochs 30  # two processes, one store
    """
    config = config_from_options(dict(dataset=dataset, arch=arch, width=width, depth=depth, **settings))
    world = distributed.world_size()
    if shard and world > 1:
        raise ConfigError(f"--shard splits the experts over separate `ddtool buffer` commands; under torchrun the "
                          f"{world} processes split them already (expert i on rank i mod {world}). Drop --shard.")
    target = distributed.device_for_rank(resolve_device(device))
    parts = Shard.parse(shard) if shard else None  # None: all experts (over the ranks under torchrun)
    say(f"Loading {config.dataset}{' with ZCA whitening' if config.zca else ''} ...", err=True)
    data = prepare(config.dataset, data_root, zca=config.zca, device=target)
    config = for_data(config, data)  # a cached store's name includes the images'
    store = Path(out) if out else store_path_for(config)
    path = parts.store_path(store) if parts else store

    stored = inspect_store(config, path)  # before any training: a clashing store fails now
    have = stored.present
    mine = [i for i in range(config.experts) if parts is None or parts.owns(i)]
    missing = [i for i in mine if i not in have]
    busiest = max(sum(1 for i in missing if i % world == r) for r in range(world))  # experts per rank, at most

    say(f"Plan: {config.experts} experts x {config.epochs} epochs: {config.describe()}.")
    say(f"  store: {path}")
    if parts is not None and parts.count > 1:
        say(f"  shard {parts.index}/{parts.count}: experts with index = {parts.index} mod {parts.count}")
    if world > 1:
        say(f"  torchrun: {world} processes; expert i on rank i mod {world}, each rank into its shard store "
            f"beside the store (*.shard-<rank>-of-{world}.h5), merged into the store by rank 0")
    execution = plan_execution(config, target, training_images(config, data), compile=compile_, workers=workers)
    say(f"  already stored: {len(mine) - len(missing)}; to train: {len(missing)} on {target}"
        + (f" (at most {busiest} per rank)" if world > 1 else "") + f", {execution.describe()}")
    unreadable = sorted(i for i in stored.unreadable if i in mine)
    if unreadable:
        say(f"  missing: the index {path} lists experts {_indices(unreadable)} whose files are missing or "
            f"unreadable (e.g. {stored.unreadable[unreadable[0]]}), so they count as to train. If the store was "
            f"moved or copied without its folder {experts_folder(path).name}/, move that folder to "
            f"{experts_folder(path)} to keep them.")
    if missing and distributed.is_main():
        estimate = estimate_training_time(config, data, target, busiest, execution=execution)
        say(f"  {estimate.train_images:,} training images (validation split excluded); "
            f"measured {estimate.images_per_second:,.0f} images/s an expert{UNCOMPILED_NOTE if execution.compile else ''}")
        say(f"  estimated time: {format_duration(estimate.total_seconds)} "
            f"({format_duration(estimate.seconds_per_expert)} per expert)")
    if dry_run:
        return

    result = run_buffer(config, store, data, target, shard=parts, progress=not quiet, execution=execution)
    if not distributed.is_main():
        return
    with ExpertStore.open(result.path) as done:
        accuracies = [r.test_accuracy for r in done.manifest.experts]
        click.echo(f"Done: {result.path} holds {done.num_experts} experts "
                   f"(trained now: {len(result.trained)}; mean final test accuracy "
                   f"{sum(accuracies) / max(1, len(accuracies)):.4f}).")
    if parts is not None and parts.count > 1:
        shards = " ".join(str(Shard(i, parts.count).store_path(store)) for i in range(parts.count))
        click.echo(f"When every shard is done: ddtool buffer-merge {shards} -o {store}")


@cli.command("buffer-merge")
@click.argument("shards", nargs=-1, required=True, metavar="SHARD.h5...",
                type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", "--out", "out", required=True, type=click.Path(dir_okay=False), metavar="NAME.h5",
              help=f"The merged store, created or extended (experts it holds already are kept): {_STORE_FILES}.")
def buffer_merge(shards, out) -> None:
    """Merge expert stores of one configuration (shards of `ddtool buffer --shard i/n`) into one.

    Each store named is its index file SHARD.h5 together with the folder SHARD.experts/ beside
    it. The merged store's expert files are hard links to the shards' when they share a file
    system (no copy), copies otherwise; the shard stores (both parts) can be deleted afterwards.
    Every shard's expert files are checked before anything is written, and a merge that fails
    leaves no new file behind and an existing -o store as it was.
    """
    path = merge_shards([Path(s) for s in shards], Path(out))
    manifest = read_manifest(path)
    indices = [r.index for r in manifest.experts]
    gaps = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
    click.echo(f"Merged {len(shards)} stores into {path}: {manifest.describe()}.")
    if gaps:
        click.echo(f"Missing experts: {gaps} (run the shards that train them, then merge again).")
