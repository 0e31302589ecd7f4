"""Filling a store: train the experts it lacks (resumable, shardable; shards merge through experts/merge.py).

Resuming is skipping: an expert is a pure function of (configuration, index), so experts
already in the store are skipped and an interrupted expert continues from its per-epoch
checkpoint; the store then equals an uninterrupted run's, bit for bit on CPU. Sharding is a
partition of the indices (i mod n), each shard into its own store, merged afterwards.

Under torchrun the ranks are the shards: rank r trains the experts with index = r mod world
into `NAME.shard-r-of-world.h5` (store `NAME.h5`), and rank 0 merges them into the store and removes the
shard stores once every rank is done. A rerun of the same command (same number of
processes) resumes each rank's shard; experts already merged into the store are skipped.

Processes filling one store at once share the work: a process trains an expert only while it
holds the expert's lock (flock on `NAME.experts/expert-00007.lock`, tried without waiting), so
each takes the next expert no other process is training. Once none is left to take, it waits
for the others' experts to appear in the store, saying which and whose; the OS releases a
dead process's lock, and the waiting process then takes its expert over from its checkpoint.
A store is returned complete either way. Worker processes train the experts whose locks the
parent holds.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ddtool import distributed
from ddtool.data import PreparedData
from ddtool.errors import ConfigError, DDToolError, FormatError
from ddtool.experts.config import ExpertConfig
from ddtool.experts.execution import ExpertExecution, plan_execution, torch_threads
from ddtool.experts.checkpoint import load_progress
from ddtool.experts.manifest import ExpertRecord, build_manifest
from ddtool.experts.plan import stored_experts
from ddtool.experts.merge import merge_shards, remove_store
from ddtool.experts.progress import ShardProgress, WorkersProgress
from ddtool.experts.store import StoreWriter, expert_file_name, experts_folder, read_expert_record
from ddtool.experts.train import Trajectory, expert_layout, train_expert, training_split
from ddtool.memory import keep_freed_memory, keeping_freed_memory
from ddtool.files import exclusive_lock
from ddtool.training import EpochStats


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` trains the experts whose index is congruent to it mod count."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"Shard {self.index}/{self.count}: need 0 <= i < n (e.g. --shard 0/4 ... 3/4).")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """'i/n' -> Shard(i, n)."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard takes i/n (for example 0/4), got {text!r}.") from None
        return cls(index, count)

    def owns(self, expert: int) -> bool:
        return expert % self.count == self.index

    def store_path(self, store: Path) -> Path:
        """Where this shard writes: the store itself, or `NAME.shard-i-of-n.h5` beside the store `NAME.h5`."""
        if self.count == 1:
            return store
        return store.with_name(f"{store.stem}.shard-{self.index}-of-{self.count}{store.suffix or '.h5'}")


@dataclass(frozen=True)
class BufferResult:
    path: Path  # the store written (the shard's own store when sharded by hand)
    trained: tuple[int, ...]  # experts trained by this call (by all ranks under torchrun)
    # experts of this shard (all ranks' shards under torchrun) already stored, or stored meanwhile
    # by other processes filling the same store
    skipped: tuple[int, ...]


def run_buffer(
    config: ExpertConfig,
    store_path: str | os.PathLike,
    data: PreparedData,
    device: torch.device | str = "cpu",
    shard: Shard | tuple[int, int] | None = None,
    progress: bool = True,
    execution: ExpertExecution | None = None,
) -> BufferResult:
    """Train this shard's experts 0..config.experts-1 that the store lacks, adding each to it
    as soon as it is complete.

    `shard=None` means all experts: in one process, or, under torchrun, split over the ranks
    and merged into `store_path` by rank 0 (every rank returns once the merged store is
    complete). An explicit `shard` trains only that shard, in this process. `execution`: how
    many experts at once, threads, compiled (None: `plan_execution`'s choice for the machine)."""
    device = torch.device(device)
    if shard is None and distributed.world_size() > 1:
        return _run_over_ranks(config, Path(store_path), data, device, progress, execution)
    shard = Shard() if shard is None else shard if isinstance(shard, Shard) else Shard(*shard)
    return _train_shard(config, shard.store_path(Path(store_path)), data, device, shard, progress,
                        execution=execution)


def _train_shard(config: ExpertConfig, path: Path, data: PreparedData, device: torch.device, shard: Shard,
                 progress: bool, merged: frozenset[int] = frozenset(),
                 execution: ExpertExecution | None = None, merged_into: Path | None = None) -> BufferResult:
    """Train the experts of `shard` missing from its store at `path` (and from `merged`, the
    experts already in the store `merged_into` the shards are merged into); `execution` None:
    plan_execution's. Experts another process is training into the same store are waited for,
    not trained."""
    split = training_split(config, data, device)
    manifest = build_manifest(config, data, expert_layout(config, data), train_images=split[0].shape[0])
    writer = StoreWriter.open(path, manifest)
    mine = [i for i in range(config.experts) if shard.owns(i)]
    done = writer.completed() | merged
    skipped = tuple(i for i in mine if i in done)
    todo = [i for i in mine if i not in done]

    execution = plan_execution(config, device, split[0].shape[0]) if execution is None else execution
    with _Claims(writer, todo, config.epochs, merged_into) as claims:
        if execution.workers > 1 and len(todo) > 1:
            trained = _train_in_workers(config, data, device, split, writer, claims, len(mine), len(skipped),
                                        execution, progress)
        else:
            trained = _train_one_at_a_time(config, data, device, split, writer, claims, len(mine), len(skipped),
                                           execution, progress)
    return BufferResult(path, tuple(sorted(trained)), tuple(sorted(skipped + tuple(claims.adopted))))


def _train_one_at_a_time(config: ExpertConfig, data: PreparedData, device: torch.device,
                         split: tuple[torch.Tensor, torch.Tensor], writer: StoreWriter, claims: "_Claims",
                         total: int, done: int, execution: ExpertExecution, progress: bool) -> list[int]:
    """Train the experts `claims` gets, in this process; the experts trained."""
    trained = []
    with ExitStack() as bars, torch_threads(execution.threads):
        report = ShardProgress(bars, total, done, config.epochs) if progress else None
        claims.on_adopt = report.finish_expert if report else None
        while claims.pending:
            index = claims.claim()
            if index is None:  # the rest are being trained by other processes
                claims.wait()
                continue
            on_epoch = report.start_expert(index) if report else None
            try:
                trajectory = train_expert(config, index, data, device, checkpoint=writer.checkpoint_path(index),
                                          on_epoch=on_epoch, split=split, compile=execution.compile,
                                          side_by_side=_processes_on_this_machine())
                writer.add(trajectory)
            except DDToolError:
                raise  # names the expert already (the CLI adds the rank)
            except Exception:
                _say_kept(index, writer)
                raise
            finally:
                claims.release(index)
            trained.append(index)
            if report:
                report.finish_expert(trajectory.test_accuracy)
    return trained


def _processes_on_this_machine() -> int:
    """The experts training at once here when each process trains one: torchrun's processes on
    this node (LOCAL_WORLD_SIZE), else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if distributed.world_size() > 1 else 1


def _say_kept(index: int, writer: StoreWriter) -> None:
    # A crash keeps its own message and traceback; under torchrun the ranks' output is
    # interleaved, so say which expert on which rank it was, and that nothing is lost.
    print(f"ddtool: expert {index}{distributed.where()} failed. The experts finished so far and this "
          f"one's last finished epoch are kept in {writer.folder}; run the same command again to "
          "resume.", file=sys.stderr, flush=True)


# Worker processes' end of the progress channel (set by _start_worker in each worker).
_events = None


def _start_worker(events, threads: int, keep_memory: bool) -> None:
    global _events
    _events = events
    torch.set_num_threads(threads)
    if keep_memory:  # as the parent process (a command) does: see ddtool.memory
        keep_freed_memory()


def _worker_train(config: ExpertConfig, index: int, data: PreparedData, device: torch.device, checkpoint: Path,
                  split: tuple[torch.Tensor, torch.Tensor], compile: bool, side_by_side: int) -> Trajectory:
    def on_epoch(done: int, stats: EpochStats, seconds: float) -> None:
        _events.put((index, done, stats, seconds))

    return train_expert(config, index, data, device, checkpoint=checkpoint, on_epoch=on_epoch, split=split,
                        compile=compile, side_by_side=side_by_side)


def _train_in_workers(config: ExpertConfig, data: PreparedData, device: torch.device,
                      split: tuple[torch.Tensor, torch.Tensor], writer: StoreWriter, claims: "_Claims", total: int,
                      done: int, execution: ExpertExecution, progress: bool) -> list[int]:
    """Train the experts `claims` gets in `execution.workers` processes, adding each to the
    store as it completes (in any order: an expert is a pure function of its index); the
    experts trained. This process holds the lock of each expert a worker trains, from before
    it is handed out until it is in the store. Tensors reach the workers through shared
    memory; a failure stops the others, keeping their last epochs."""
    context = torch.multiprocessing.get_context("spawn")
    events = context.Queue()
    pool = ProcessPoolExecutor(execution.workers, mp_context=context, initializer=_start_worker,
                               initargs=(events, execution.threads, keeping_freed_memory()))
    side_by_side = min(execution.workers, len(claims.pending))
    running: dict = {}
    trained = []
    try:
        with ExitStack() as bars:
            report = WorkersProgress(bars, total, done, config.epochs, len(claims.pending), execution.workers) \
                if progress else None
            claims.on_adopt = report.adopted if report else None
            while claims.pending or running:
                while len(running) < execution.workers and (index := claims.claim()) is not None:
                    running[pool.submit(_worker_train, config, index, data, device, writer.checkpoint_path(index),
                                        split, execution.compile, side_by_side)] = index
                if not running:  # the rest are being trained by other processes
                    claims.wait()
                    continue
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                _drain(events, report)
                for future in finished:
                    index = running.pop(future)
                    try:
                        trajectory = future.result()
                    except DDToolError:
                        raise
                    except Exception:
                        _say_kept(index, writer)
                        raise
                    writer.add(trajectory)
                    claims.release(index)
                    trained.append(index)
                    if report:
                        report.finish_expert(trajectory.test_accuracy)
    finally:
        # the workers stop before the caller lets go of their experts' locks
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list((pool._processes or {}).values()):  # no public way to stop a running task
            process.terminate()
        for process in list((pool._processes or {}).values()):
            process.join()
        events.close()
    return trained


# How often a process with nothing left to train looks whether the experts others train are done.
_POLL_SECONDS = 1.0


class _Claims:
    """The experts a process still needs from a store, and the locks of those it trains.

    Each expert has a lock file in the store's folder; a process trains an expert only while it
    holds its flock, taken without waiting, so processes filling one store take turns expert by
    expert. An expert another process holds is left to it and waited for; the OS releases the
    lock of a process that dies, and its expert is then taken over (from its checkpoint, as any
    interrupted expert). The lock file names its holder, for the messages."""

    def __init__(self, writer: StoreWriter, todo: Sequence[int], epochs: int, merged_into: Path | None = None) -> None:
        self.writer = writer
        self.epochs = epochs
        # under torchrun, the store the shards are merged into: another job may have merged an expert there
        self.merged_into = merged_into
        self.pending = sorted(todo)  # neither in the store nor held by this process
        self.adopted: list[int] = []  # trained by other processes meanwhile
        self.on_adopt: Callable[[float], None] | None = None  # with the expert's final test accuracy
        self._held: dict[int, ExitStack] = {}
        self._told: dict[int, str] = {}  # experts said to be waited for -> their holder

    def __enter__(self) -> "_Claims":
        return self

    def __exit__(self, *exc) -> None:
        for index in list(self._held):
            self.release(index)

    def claim(self) -> int | None:
        """The first pending expert no other process holds, its lock now held by this one; None
        if every pending expert is held by another. Experts found finished on the way (their
        files in the store: their process let go of them) leave the pending list."""
        for index in list(self.pending):
            lock = ExitStack()
            path = self.writer.lock_path(index)
            if not lock.enter_context(exclusive_lock(path, wait=False, remove=True)):
                lock.close()
                continue
            try:
                record = self.writer.finished_elsewhere(index) or self._merged(index)
            except BaseException:
                lock.close()
                raise
            self.pending.remove(index)
            if record is not None:
                lock.close()
                self._finished(index, record.test_accuracy)
                continue
            self._held[index] = lock
            _name_holder(path)
            if index in self._told:
                self._say(f"expert {index}: {_describe_holder(self._told.pop(index))} stopped before finishing "
                          f"it; this process takes it over{self._resumed_from(index)}.")
            return index
        return None

    def release(self, index: int) -> None:
        self._held.pop(index).close()

    def wait(self) -> None:
        """Say which experts other processes hold (once each, and again if another takes one
        over), then sleep a polling interval."""
        for index in self.pending:
            holder = _holder(self.writer.lock_path(index))
            # "": the holder has not named itself yet (it does just after it took the lock)
            if holder and self._told.get(index) != holder:
                self._told[index] = holder
                self._say(f"expert {index} is being trained by {_describe_holder(holder)}; waiting for it to "
                          f"appear in {self.writer.path}.")
        time.sleep(_POLL_SECONDS)

    def _finished(self, index: int, test_accuracy: float) -> None:
        self.adopted.append(index)
        if index in self._told:
            self._say(f"expert {index} is in the store, trained by {_describe_holder(self._told.pop(index))}.")
        if self.on_adopt is not None:
            self.on_adopt(test_accuracy)

    def _merged(self, index: int) -> ExpertRecord | None:
        if self.merged_into is None:
            return None
        file = experts_folder(self.merged_into) / expert_file_name(index)
        try:
            return read_expert_record(file, self.writer.manifest.fingerprint, self.epochs) if file.exists() else None
        except FormatError:
            return None

    def _resumed_from(self, index: int) -> str:
        progress = load_progress(self.writer.checkpoint_path(index), fingerprint=self.writer.manifest.fingerprint,
                                 index=index)
        if progress is None:
            return " from its start (it left no checkpoint)"
        return f" from its checkpoint after epoch {progress.epochs_done} of {self.epochs}"

    @staticmethod
    def _say(message: str) -> None:
        tqdm.write(f"ddtool: {message}", file=sys.stderr)


def _name_holder(lock: Path) -> None:
    """Write this process into the lock file it holds, for the messages of processes waiting on it."""
    try:
        lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")
    except OSError:
        pass  # the name only serves messages


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip()
    except OSError:
        return ""


def _describe_holder(holder: str) -> str:
    """'another process (pid 123)', naming the machine when it is another one."""
    pid, _, host = holder.partition(" ")
    if not pid.isdigit():
        return "another process"
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"another process (pid {pid}{where})"


def _drain(events, report: "WorkersProgress | None") -> None:
    while True:
        try:
            index, done, stats, seconds = events.get_nowait()
        except queue.Empty:
            return
        if report:
            report.epoch(index, done, stats, seconds)


def _run_over_ranks(config: ExpertConfig, store: Path, data: PreparedData, device: torch.device,
                    progress: bool, execution: ExpertExecution | None) -> BufferResult:
    """The whole buffer under torchrun: rank r is shard r/world, then rank 0 merges."""
    shards = [Shard(r, distributed.world_size()) for r in range(distributed.world_size())]
    # Read by every rank before any rank can change it: rank 0 writes the store only after the
    # gather below, which waits for all ranks.
    merged = frozenset(stored_experts(config, store))
    mine = shards[distributed.rank()]
    # One set of progress bars (rank 0's shard): the ranks share one terminal.
    result = _train_shard(config, mine.store_path(store), data, device, mine, progress and distributed.is_main(),
                          merged, execution, merged_into=store)
    reports = distributed.gather_objects(result)  # returns when every rank's shard is complete
    if distributed.is_main():
        paths = [s.store_path(store) for s in shards]
        unseen = [str(p) for p in paths if not p.exists()]
        if unseen and set(range(config.experts)) <= stored_experts(config, store):
            # another torchrun job filling the same store merged (and removed) those shards already
            paths, unseen = [p for p in paths if p.exists()], []
        if unseen:
            raise DDToolError(
                f"Rank 0 cannot see the shard stores {', '.join(unseen)} that the other ranks wrote, so it cannot "
                "merge them. Under torchrun on several machines the expert store (--out, or the cache "
                "$DDTOOL_CACHE) must be on a file system that every machine shares."
            )
        if paths:
            merge_shards(paths, store)
        for path in paths:  # the merged store hard-links (or copies) their expert files
            remove_store(path)
    distributed.barrier()  # no rank reads the store before it is merged
    return BufferResult(store, tuple(sorted(i for r in reports for i in r.trained)),
                        tuple(sorted(i for r in reports for i in r.skipped)))
