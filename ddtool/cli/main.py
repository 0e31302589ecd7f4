"""`ddtool`: the command-line interface.

Each command lives in its own module of this package and is added to the group below; the
group turns DDToolError into a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from ddtool import __version__
from ddtool.errors import DDToolError
from ddtool.memory import keep_freed_memory

# The commands' one-line summaries, which `ddtool --help` lists: kept here, so that the list needs
# none of the command modules, which import torch (seconds) and the registries. Each command
# takes its summary from this table as it is added to the group (a test holds the two equal).
SUMMARIES = {
    "buffer": "Train expert trajectories (for mtt, tesla, datm, ftd) into an HDF5 store.",
    "buffer-merge": "Merge expert stores of one configuration (shards of `ddtool buffer --shard i/n`) into one.",
    "compare": "Compare sets by the evaluations their files record, grouped by protocol, network and dataset.",
    "datasets": "Which datasets ddtool knows, which are found on this machine, and where.",
    "distill": "Distill a dataset into IPC synthetic images per class, save it, and evaluate it.",
    "evaluate": "Train fresh networks on a synthetic set; report its accuracy beside the baselines and record it.",
    "export": "Write a set as an ImageFolder of PNGs, an npz archive or a torch file.",
    "import": "Bring a set made elsewhere into ddtool's format, to evaluate it under the same protocol.",
    "info": "Describe a synthetic set: what it is, how it was made, how it scored.",
    "methods": "List the distillation methods and their presets; with NAME, every setting of that method.",
    "show": "Save the images as a PNG grid, one row per class, un-whitened and de-normalised.",
}
# ddtool.distributed.BACKENDS, spelt out for the same reason (the test holds them equal too).
DIST_BACKENDS = ("auto", "gloo", "nccl")


# Every --seed option's range. Seeds are stored as int64 (HDF5 attributes, torch generators): a
# larger one would pass every check and fail when the result is saved, after the hours the run took.
SEED_RANGE = click.IntRange(0, 2**63 - 1)


class _Group(click.Group):
    """The command group: commands are imported when one is run or its help is asked for."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.short_help = SUMMARIES.get(name or cmd.name, cmd.short_help)
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(SUMMARIES) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in SUMMARIES:
            _load_command_module(name)
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if set(SUMMARIES) <= set(self.commands):
            return super().format_commands(ctx, formatter)
        with formatter.section("Commands"):  # as click lists commands that carry a short_help
            formatter.write_dl(sorted(SUMMARIES.items()))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DDToolError as exc:
            from ddtool import distributed

            # Under torchrun every rank prints its own failure: say which one it is.
            click.echo(click.wrap_text(f"Error{distributed.where()}: {exc}", width=100, preserve_paragraphs=True),
                       err=True)
            sys.exit(2)
        except KeyboardInterrupt as exc:
            what = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
            click.echo(f"{what}. Files being written were discarded; checkpoints on disk are intact: the same "
                       "command with --resume continues a distillation or an evaluation from them.", err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, a batch scheduler, torchrun stopping its workers), raised where the
    process is, so that it unwinds as Ctrl-C does: temporary files and lock files are removed
    on the way out instead of being left beside the user's files."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ddtool")
@click.option("--dist-backend", type=click.Choice(DIST_BACKENDS), default="auto", show_default=True,
              envvar="DDTOOL_DIST_BACKEND",
              help="Under torchrun: the torch.distributed backend (auto: gloo on CPU; NCCL for CUDA tensors "
                   "with gloo beside it when GPUs are present).")
@click.pass_context
def cli(ctx: click.Context, dist_backend: str) -> None:
    """Dataset distillation: turn a labelled image dataset into a few synthetic images per class.

    \b
    Typical use:
      ddtool datasets                      # what is known and found here
      ddtool distill --ipc 10              # Fashion-MNIST, default method, evaluated at the end
      ddtool evaluate distilled/X.h5       # fresh networks, mean ± std beside baselines
      ddtool show distilled/X.h5 -o grid.png
      torchrun --nproc-per-node 2 -m ddtool distill ...   # several processes (docs/distributed.md)
    """
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return  # one process: nothing to join, and `ddtool CMD --help` need not import torch
    from ddtool import distributed

    if distributed.launched_by_torchrun():
        distributed.init_from_env(dist_backend)
        ctx.call_on_close(distributed.shutdown)


def say(message: str = "", **kwargs) -> None:
    """click.echo on rank 0 only: under torchrun the ranks share one terminal and would repeat it."""
    from ddtool import distributed

    if distributed.is_main():
        click.echo(message, **kwargs)


# The commands of ddtool/cli/buffer.py; the others are declared in ddtool/cli/commands.py, which
# imports no torch (their work is in actions.py), so that their --help is quick too.
_BUFFER_COMMANDS = ("buffer", "buffer-merge")


def _load_command_module(name: str) -> None:
    """Import the module that declares command `name` (it adds its commands to `cli` as it loads)."""
    if name in _BUFFER_COMMANDS:
        from ddtool.cli import buffer  # noqa: F401
    else:
        from ddtool.cli import commands  # noqa: F401


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    keep_freed_memory()  # a command computes for long and exits: see ddtool.memory
    cli(prog_name="ddtool")
