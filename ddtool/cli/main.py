"""`ddtool`: the command-line interface.

Each command lives in its own module of this package and is added to the group below; the
group turns DDToolError into a one-paragraph message and exit status 2.
"""

from __future__ import annotations

import signal
import sys

import click

from ddtool import __version__, distributed
from ddtool.errors import DDToolError
from ddtool.memory import keep_freed_memory


# Every --seed option's range. Seeds are stored as int64 (HDF5 attributes, torch generators): a
# larger one would pass every check and fail when the result is saved, after the hours the run took.
SEED_RANGE = click.IntRange(0, 2**63 - 1)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DDToolError as exc:
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
@click.option("--dist-backend", type=click.Choice(distributed.BACKENDS), default="auto", show_default=True,
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
    if distributed.launched_by_torchrun():
        distributed.init_from_env(dist_backend)
        ctx.call_on_close(distributed.shutdown)


def say(message: str = "", **kwargs) -> None:
    """click.echo on rank 0 only: under torchrun the ranks share one terminal and would repeat it."""
    if distributed.is_main():
        click.echo(message, **kwargs)


def _register_commands() -> None:
    from ddtool.cli import commands  # noqa: F401  (each module adds its commands to `cli`)


def main() -> None:
    _register_commands()
    signal.signal(signal.SIGTERM, _terminate)
    keep_freed_memory()  # a command computes for long and exits: see ddtool.memory
    cli(prog_name="ddtool")
