"""Seconds per outer iteration and peak memory of each matching backend.

ConvNet-3 on Fashion-MNIST-shaped data (28x28x1, 10 classes), IPC 10 (100 images, the whole
set at every inner step), DSA on, N = 10, 20, 40, 80 student steps. On the CPU each (backend, N)
runs in a fresh subprocess. Peak memory is the peak of live tensor bytes above what existed once
model and data were set up: on CUDA torch.cuda.max_memory_allocated, on CPU the running
"Total Allocated" of the PyTorch profiler's memory events over one extra, untimed iteration
(allocator-independent: glibc keeps freed pages, so peak RSS overstates and jitters). The
growth of peak RSS is reported beside it on CPU for comparison.

    python scripts/bench_matching.py                 # CPU, width 128
    python scripts/bench_matching.py --device cuda --iterations 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def measure(backend: str, steps: int, device: str, width: int, ipc: int, iterations: int) -> dict:
    from ddtool.augment import DSA, DSAConfig
    from ddtool.matching import InnerStep, MatchTarget, SyntheticBatch, Unroll, get_backend
    from ddtool.networks import ParamLayout, create_network

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = create_network("convnet", channels=1, num_classes=10, image_size=28, width=width).to(dev)
    layout = ParamLayout.from_module(net)
    start = layout.flatten(net).to(dev)
    target = start + 0.01 * torch.randn(start.shape, generator=g).to(dev)
    images = torch.randn(10 * ipc, 1, 28, 28, generator=g).to(dev).requires_grad_(True)
    labels = torch.arange(10, device=dev).repeat_interleave(ipc)
    lr = torch.tensor(0.01, device=dev, requires_grad=True)
    dsa = DSA(DSAConfig())

    def one_iteration(n_steps: int) -> None:
        steps_ = [InnerStep(batch=torch.randperm(images.shape[0], generator=g),
                            augmentation=dsa.sample(images.shape[0], 28, 28, g)) for _ in range(n_steps)]
        unroll = Unroll(forward=lambda p, x: layout.functional_forward(net, p, x), start=start, steps=steps_,
                        targets=[MatchTarget(n_steps, target, (start - target).pow(2).sum())], augmenter=dsa)
        get_backend(backend)(unroll, SyntheticBatch(images=images, lr=lr, fixed_targets=labels))

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    one_iteration(1)  # warm-up (allocator, kernels): one step is enough; it never outgrows the timed run
    if dev.type == "cuda":
        torch.cuda.synchronize()  # kernels are queued asynchronously: time only what has finished
    began = time.perf_counter()
    for _ in range(iterations):
        one_iteration(steps)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / iterations
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rss = float("nan")
    else:
        rss = _peak_rss_mib() - base
        peak = _profiled_peak_mib(lambda: one_iteration(steps))
    return {"backend": backend, "steps": steps, "seconds": seconds, "peak_mib": peak, "rss_mib": rss}


def _profiled_peak_mib(fn) -> float:
    """Peak of live CPU tensor bytes allocated while fn runs (relative to its start)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(totals, default=0) / 2**20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
    parser.add_argument("--backends", nargs="+", default=["bptt", "tesla", "exact"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = parser.parse_args()
    if args.one:
        backend, steps = args.one.split(":")
        print(json.dumps(measure(backend, int(steps), args.device, args.width, args.ipc, args.iterations)))
        return
    rows = []
    for steps in args.steps:
        for backend in args.backends:
            if args.device.startswith("cuda"):
                # CUDA's peak counter resets per cell, so one process serves every cell (and pays
                # the CUDA start-up once); the CPU's profiler-based peak needs a fresh process
                torch.cuda.empty_cache()
                rows.append(measure(backend, steps, args.device, args.width, args.ipc, args.iterations))
            else:
                out = subprocess.run([sys.executable, __file__, "--one", f"{backend}:{steps}", "--device", args.device,
                                      "--width", str(args.width), "--ipc", str(args.ipc),
                                      "--iterations", str(args.iterations)], capture_output=True, text=True, check=True)
                # the profiler logs to stdout on some builds: the JSON is the last line
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  measured {backend} N={steps}: {rows[-1]['seconds']:.2f} s, {rows[-1]['peak_mib']:.0f} MiB",
                  file=sys.stderr)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nConvNet-3 width {args.width}, IPC {args.ipc} Fashion-MNIST shape, DSA on, {device_name}, torch {torch.__version__}\n")
    print("| N | " + " | ".join(f"{b} s/it | {b} peak MiB" for b in args.backends) + " | exact/bptt time |")
    print("|---|" + "---|---|" * len(args.backends) + "---|")
    for steps in args.steps:
        by = {r["backend"]: r for r in rows if r["steps"] == steps}
        cells = " | ".join(f"{by[b]['seconds']:.2f} | {by[b]['peak_mib']:.0f}" for b in args.backends)
        ratio = by["exact"]["seconds"] / by["bptt"]["seconds"] if {"exact", "bptt"} <= by.keys() else float("nan")
        print(f"| {steps} | {cells} | {ratio:.2f}x |")
    if {"exact"} <= set(args.backends) and len(args.steps) > 1:
        peaks = [r["peak_mib"] for r in rows if r["backend"] == "exact"]
        print(f"\nexact peak memory, N={args.steps[-1]} vs N={args.steps[0]}: {peaks[-1] / peaks[0]:.2f}x")
    if args.device == "cpu":
        print("\npeak RSS growth (MiB), for comparison: " + ", ".join(
            f"{r['backend']} N={r['steps']}: {r['rss_mib']:.0f}" for r in rows))


if __name__ == "__main__":
    main()
