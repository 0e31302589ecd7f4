"""Speed-up from 1 to 2 processes under torchrun (gloo on CPU, or NCCL on GPUs), for the two
phases that scale out: expert training (`ddtool buffer`) and the distillation loop.

For each process count P the script starts `torchrun --nproc-per-node P` on itself (worker
mode), with one thread per process and a fresh cache in a temporary folder (the user's cache
is not touched). Each worker, on a class-balanced subset of Fashion-MNIST:

  buffer   trains the experts of the `fashion-cpu` MTT preset's network (ConvNet-3 width 32,
           DSA), expert i on rank i mod P; images/s = experts x epochs x training images over
           the wall time from the first rank's start to the merged store;
  distill  runs that preset's outer loop (IPC 10, N = 10 student steps on 100 images, exact
           backend) with `segments_per_iteration` segments per iteration, split over the ranks;
           seconds per iteration = the median of rank 0's logged iteration times, the first
           iteration left out as warm-up.

Prints a markdown table. A couple of minutes on a 2-core CPU:

    python scripts/bench_distributed.py
    python scripts/bench_distributed.py --processes 1 2 4 --segments 4   # on a bigger machine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def launch(processes: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Run the worker under torchrun with `processes` processes; return rank 0's measurements."""
    result = workdir / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DDTOOL_CACHE": str(workdir / "cache"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "--worker",
               "--result", str(result), "--per-class", str(args.per_class), "--experts", str(args.experts),
               "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--segments", str(args.segments),
               "--device", args.device]
    if args.data_root:
        command += ["--data-root", args.data_root]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(result.read_text())


def worker(args: argparse.Namespace) -> None:
    """One rank: train the experts, then distill; rank 0 writes the measurements."""
    from ddtool import distributed
    from ddtool.data import prepare, sample_per_class
    from ddtool.device import resolve_device
    from ddtool.experts import run_buffer, store_path_for
    from ddtool.methods.experts import expert_config_for
    from ddtool.methods.trajectory_config import FASHION_CPU
    from ddtool.run import prepare_distill
    from ddtool.seeding import generator

    if distributed.launched_by_torchrun():
        distributed.init_from_env()
    device = distributed.device_for_rank(resolve_device(args.device))
    full = prepare("fashion-mnist", args.data_root, device=device)
    # A class-balanced subset keeps expert training short; an outer iteration's cost depends on the
    # synthetic set and the network only, not on the size of the training split.
    keep = sample_per_class(full.train_y, full.spec.num_classes, args.per_class, generator(0, "bench-subset"))
    data = dataclasses.replace(full, train_x=full.train_x[keep], train_y=full.train_y[keep],
                               train_indices=full.train_indices[keep.cpu()], test_x=full.test_x[:1000],
                               test_y=full.test_y[:1000])
    # the fashion-cpu preset at IPC 10 with short experts (E = --epochs, every start epoch that fits)
    settings = {"experts": args.experts, "expert_train_epochs": args.epochs,
                "max_start_epoch": args.epochs - FASHION_CPU.match_span_epochs,
                "segments_per_iteration": args.segments, "iterations": args.iterations,
                "checkpoint_every": args.iterations, "eval_every": 0}
    work_dir = Path(os.environ["DDTOOL_CACHE"]) / "run"
    run = prepare_distill("mtt", 10, preset="fashion-cpu", settings=settings, device=device, progress=False,
                          log=lambda message: None, data=data, work_dir=work_dir)
    experts = expert_config_for(run.config, run.ctx)

    distributed.barrier()
    started = time.perf_counter()
    run_buffer(experts, store_path_for(experts), data, device, progress=False)  # ends with a barrier
    buffer_seconds = time.perf_counter() - started
    run.distill()
    if distributed.is_main():
        log = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
        Path(args.result).write_text(json.dumps({
            "buffer_images_per_second": experts.experts * experts.epochs * data.train_x.shape[0] / buffer_seconds,
            "seconds_per_iteration": statistics.median(r["seconds"] for r in log[1:]),
            "device": str(device),
        }))
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--segments", type=int, default=2, help="segments_per_iteration (a multiple of each count)")
    parser.add_argument("--iterations", type=int, default=4, help="outer iterations (the first is warm-up)")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per expert")
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.iterations < 2:
        sys.exit("--iterations must be at least 2 (the first is warm-up).")
    for count in args.processes:
        if args.segments % count:
            sys.exit(f"--segments {args.segments} must be a multiple of every process count ({count}).")

    load_before = os.getloadavg()[0]
    rows = []
    for count in args.processes:
        with tempfile.TemporaryDirectory(prefix="ddtool-bench-distributed-") as folder:
            rows.append((count, launch(count, args, Path(folder))))
    print(f"Host: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{'gloo' if args.device == 'cpu' else 'NCCL'}, {args.threads} thread(s) per process; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after. Buffer: {args.experts} experts x {args.epochs} "
          f"epochs on {args.per_class * 10} images; distill: fashion-cpu preset, {args.segments} segments per "
          f"iteration, median of {args.iterations - 1} iterations.\n")
    print("| processes | buffer images/s | buffer speed-up | distill s/iteration | distill speed-up |")
    print("|---:|---:|---:|---:|---:|")
    base = rows[0][1]
    for count, r in rows:
        print(f"| {count} | {r['buffer_images_per_second']:,.0f} | "
              f"{r['buffer_images_per_second'] / base['buffer_images_per_second']:.2f}x | "
              f"{r['seconds_per_iteration']:.2f} | {base['seconds_per_iteration'] / r['seconds_per_iteration']:.2f}x |")


if __name__ == "__main__":
    main()
