"""Running under torchrun: the one module that knows about torch.distributed.

`torchrun --nproc-per-node P -m ddtool ...` starts P copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. The CLI calls
`init_from_env()` once when WORLD_SIZE > 1; all other code calls the helpers below
unconditionally: without a process group they are trivial (rank 0 of 1, collectives return
their input), so the single-process path is the same code.

How the work is split (item i always runs on rank i % world):
- `buffer`: expert i; each rank fills its own shard store, rank 0 merges them into one.
- `distill` (trajectory methods): segment s of every outer iteration; the gradients are
  summed with all_reduce, so every rank applies the same update; rank 0 alone writes files.
- evaluation: fresh-network run r; the accuracies are gathered to every rank in run order.
"""

from __future__ import annotations

import contextlib
import os
import re
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ddtool.errors import ConfigError, DDToolError

BACKENDS = ("auto", "gloo", "nccl")
# Ranks legitimately wait for each other for a long time: a rank with one expert more than
# the others, rank 0 scoring the set on the validation split while the others wait at the
# next all_reduce. PyTorch's default timeout would turn such a wait into a crash; a rank
# that really dies is noticed by torchrun, which stops the others at once.
COLLECTIVE_TIMEOUT = timedelta(hours=12)

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str = "auto") -> None:
    """Join the process group torchrun describes in the environment (idempotent).

    auto: gloo without CUDA; with CUDA, NCCL for CUDA tensors and gloo for CPU tensors and
    pickled objects ("cpu:gloo,cuda:nccl"), so `--device cpu` works on a GPU machine too.
    """
    if is_initialised():
        return
    if backend not in BACKENDS:
        raise ConfigError(f"Unknown distributed backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("--dist-backend nccl needs CUDA GPUs, and PyTorch sees none here. Use gloo "
                              "(the default without GPUs) to run several CPU processes.")
        _check_gpu_for_local_rank()
    if torch.cuda.is_available() and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())  # NCCL's object collectives and barriers use the current device
    try:
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise DDToolError(
            f"Could not join the process group described by the environment (WORLD_SIZE="
            f"{os.environ.get('WORLD_SIZE')}, RANK={os.environ.get('RANK')}, MASTER_ADDR="
            f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}. Start ddtool "
            "with torchrun (see docs/distributed.md), or unset WORLD_SIZE to run one process."
        ) from exc


def shutdown() -> None:
    if is_initialised():
        dist.destroy_process_group()


def is_initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialised() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialised() else 1


def is_main() -> bool:
    """Rank 0: the process that prints, writes files and merges."""
    return rank() == 0


def local_rank() -> int:
    """The process's index on its own machine (torchrun's LOCAL_RANK): which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def where() -> str:
    """' (rank r of w)' under torchrun, '' otherwise: for messages that must say which process."""
    return f" (rank {rank()} of {world_size()})" if is_initialised() else ""


def indices_of_this_rank(count: int) -> list[int]:
    """The items i < count this rank handles: i % world == rank."""
    return [i for i in range(count) if i % world_size() == rank()]


def device_for_rank(device: torch.device) -> torch.device:
    """One GPU per process: under torchrun, a CUDA device without an index becomes
    cuda:LOCAL_RANK. CPU devices and explicit indices are kept as given."""
    if device.type == "cuda" and device.index is None and is_initialised():
        _check_gpu_for_local_rank()
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if not is_initialised():
        return
    with _peers_expected():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its sum over all ranks."""
    if not is_initialised():
        return
    with _peers_expected():
        for tensor in tensors:
            if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
                # Pure NCCL reduces CUDA tensors only (a run with --device cpu on GPU machines).
                staged = tensor.to(torch.device("cuda", local_rank()))
                dist.all_reduce(staged)
                tensor.copy_(staged)
            else:
                dist.all_reduce(tensor)


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not is_initialised():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    with _peers_expected():
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` (picklable) on every rank; the other ranks' argument is ignored."""
    if not is_initialised():
        return obj
    box = [obj]
    with _peers_expected():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_rank_zero(decide: Callable[[], T]) -> T:
    """`decide()` on every rank, and rank 0's outcome on all: its result, or the ConfigError it
    raised, raised on every rank. For decisions that measure this machine (a budget's timings):
    each process would measure its own, and ranks that decided apart would wait on each other
    for ever."""
    try:
        outcome: T | ConfigError = decide()
    except ConfigError as error:
        outcome = error
    outcome = broadcast_object(outcome)
    if isinstance(outcome, ConfigError):
        raise outcome
    return outcome


@contextlib.contextmanager
def _peers_expected() -> Iterator[None]:
    """A collective whose peer died fails with a backend error (gloo: "Connection closed by
    peer"). That is not this rank's fault: say so in one paragraph instead of a traceback that
    buries the failing rank's own message."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistBackendError and the backends' connection errors
        # gloo: "[.../pair.cc:561] Connection closed by peer [addr]:port. This is typically ...": keep the gist
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0][:300]
        raise DDToolError(
            f"Lost contact with another process of this torchrun job ({reason}). Usually another process failed: "
            "its own message above says why, and torchrun's summary names its rank. Finished work is kept "
            "(finished experts, checkpoints): run the same command again to continue (`ddtool distill` with "
            "--resume)."
        ) from exc


def _check_gpu_for_local_rank() -> None:
    count = torch.cuda.device_count()
    if local_rank() >= count:
        raise ConfigError(
            f"This process has LOCAL_RANK {local_rank()} but the machine has {count} GPU(s): start at most one "
            f"process per GPU (torchrun --nproc-per-node {count}), or use --device cpu."
        )
