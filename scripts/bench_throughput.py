"""This checkout's throughput beside an older commit's, measured side by side in one run.

Two measurements, each in fresh subprocesses that import ddtool from one tree or the other
(the older commit is checked out as a temporary git worktree, removed afterwards), taking turns
so that a change of load hits both alike:

  distillation  seconds per outer iteration of trajectory matching: ConvNet-3 on Fashion-MNIST
                shapes, IPC 10 (all 100 images at every inner step), DSA on, N student steps, the
                tree's default backend (this tree: what `backend=auto` picks on this machine) and
                the process set-up `ddtool` gives its commands; exact and bptt beside it.
  experts       images per second of expert training on this machine, as `ddtool buffer` and
                `ddtool distill` run it for full-length experts (this tree: its plan_execution's
                workers, threads and compilation; the older one: one expert at a time). Each
                worker trains on real Fashion-MNIST images after a warm-up that includes any
                compilation; the workers run at once and their rates add up. The compile time is
                reported beside it (paid once per expert process).

    python scripts/bench_throughput.py                       # against 3208f45, widths 32 and 128
    python scripts/bench_throughput.py --baseline HEAD~3 --widths 32 --threads 1

Prints markdown tables with medians and ratios (this / baseline speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a subprocess with sys.path[0] = the tree: times one outer iteration `repeats` times.
# Both probes' start: argv = tree, width, threads, ...; ddtool from the tree, the process set
# up as that tree's command line sets it up.
_PRELUDE = r"""
import json, sys, time, types, torch
tree, width, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, tree)
if threads:
    torch.set_num_threads(threads)
try:
    from ddtool.memory import keep_freed_memory  # newer trees
    keep_freed_memory()
except ImportError:
    pass
"""

_MATCHING_PROBE = _PRELUDE + r"""
steps, repeats = int(sys.argv[4]), int(sys.argv[5])
from ddtool.augment import DSA, DSAConfig
from ddtool.matching import InnerStep, MatchTarget, SyntheticBatch, Unroll, get_backend
from ddtool.methods.trajectory import TrajectoryMatching
try:
    from ddtool.methods.trajectory_config import TrajectoryConfig  # newer trees
except ImportError:
    from ddtool.methods.trajectory import TrajectoryConfig
from ddtool.networks import ParamLayout, create_network
from ddtool.data.registry import get_spec

config = TrajectoryConfig(width=width, syn_steps=steps)
default = config.backend
if default == "auto":
    ctx = types.SimpleNamespace(data=types.SimpleNamespace(spec=get_spec("fashion-mnist")), ipc=10, seed=0,
                                device=torch.device("cpu"))
    default = TrajectoryMatching(config).choose_backend(ctx).name
g = torch.Generator().manual_seed(0)
torch.manual_seed(0)
net = create_network("convnet", channels=1, num_classes=10, image_size=28, width=width)
layout = ParamLayout.from_module(net)
start = layout.flatten(net)
target = start + 0.01 * torch.randn(start.shape, generator=g)
images = torch.randn(100, 1, 28, 28, generator=g).requires_grad_(True)
labels = torch.arange(10).repeat_interleave(10)
lr = torch.tensor(0.01, requires_grad=True)
dsa = DSA(DSAConfig())
forward = lambda p, x: layout.functional_forward(net, p, x)
out = {"default_backend": default}
for name in ("default", "exact", "bptt"):
    backend = get_backend(default if name == "default" else name)
    seconds = []
    for r in range(repeats + 1):  # the first is a warm-up
        inner = [InnerStep(batch=torch.randperm(100, generator=g), augmentation=dsa.sample(100, 28, 28, g))
                 for _ in range(steps)]
        unroll = Unroll(forward=forward, start=start, steps=inner,
                        targets=[MatchTarget(steps, target, (start - target).pow(2).sum())], augmenter=dsa)
        began = time.perf_counter()
        backend(unroll, SyntheticBatch(images=images, lr=lr, fixed_targets=labels))
        if r:
            seconds.append(time.perf_counter() - began)
    out[name] = seconds
print(json.dumps(out))
"""

# Runs in a subprocess with sys.path[0] = the tree: the tree's own expert-training execution.
_EXPERT_PLAN = r"""
import json, sys, torch
tree, width, images, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree)
from ddtool.experts import ExpertConfig
try:
    from ddtool.experts.execution import plan_execution
except ImportError:  # older trees: one expert at a time, torch's default threads, eager
    print(json.dumps({"workers": 1, "threads": 0, "compile": False}))
else:
    e = plan_execution(ExpertConfig(arch_options={"width": width}, experts=3, epochs=epochs), torch.device("cpu"),
                       images)
    print(json.dumps({"workers": e.workers, "threads": e.threads, "compile": e.compile}))
"""

# One worker: train on `images` Fashion-MNIST images (batch 256, DSA) after a warm-up epoch.
_EXPERT_PROBE = _PRELUDE + r"""
images, compile_ = int(sys.argv[4]), sys.argv[5] == "1"
from ddtool.data import prepare
from ddtool.experts.config import ExpertConfig
from ddtool.experts.train import build_setup, run_epoch
data = prepare("fashion-mnist")
config = ExpertConfig(arch_options={"width": width})
x, y = data.train_x[:images], data.train_y[:images]
kwargs = {"compile": True} if compile_ else {}
setup = build_setup(config, 0, data, torch.device("cpu"), (x, y), **kwargs)
began = time.perf_counter()
run_epoch(config, setup, 0, 0, x[:512], y[:512])  # warm-up: both batch shapes of the timed epoch are 256
warm = time.perf_counter() - began
began = time.perf_counter()
run_epoch(config, setup, 0, 1, x, y)
print(json.dumps({"images_per_second": images / (time.perf_counter() - began), "warm_up_seconds": warm}))
"""


def _run(code: str, *args) -> dict:
    return _finish(_start(code, *args))


def _start(code: str, *args) -> subprocess.Popen:
    # ddtool comes from the tree the probe puts first on sys.path, not from PYTHONPATH or the cwd
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
                            env={**os.environ, "PYTHONPATH": ""})


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(f"probe failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def matching(trees: dict[str, Path], width: int, steps: int, repeats: int, rounds: int, threads: int) -> dict:
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    defaults = {}
    for _ in range(rounds):  # taking turns, a fresh process each
        for name, tree in trees.items():
            result = _run(_MATCHING_PROBE, tree, width, threads, steps, repeats)
            defaults[name] = result.pop("default_backend")
            for key, seconds in result.items():
                runs[name].setdefault(key, []).extend(seconds)
    return {name: {key: statistics.median(v) for key, v in by.items()} | {"backend": defaults[name]}
            for name, by in runs.items()}


def experts(trees: dict[str, Path], width: int, images: int, epochs: int, rounds: int) -> dict:
    out = {}
    for name, tree in trees.items():
        out[name] = {"plan": _run(_EXPERT_PLAN, tree, width, 54_000, epochs), "rates": [], "warm": []}
    for _ in range(rounds):
        for name, tree in trees.items():
            plan = out[name]["plan"]
            workers = [_start(_EXPERT_PROBE, tree, width, plan["threads"], images, int(plan["compile"]))
                       for _ in range(plan["workers"])]
            results = [_finish(w) for w in workers]
            out[name]["rates"].append(sum(r["images_per_second"] for r in results))
            out[name]["warm"].append(max(r["warm_up_seconds"] for r in results))
    return {name: {"plan": v["plan"], "images_per_second": statistics.median(v["rates"]),
                   "warm_up_seconds": statistics.median(v["warm"])} for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="3208f45", help="the commit to compare with")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=10, help="N, student steps per outer iteration")
    parser.add_argument("--repeats", type=int, default=2, help="timed outer iterations per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per tree, taking turns")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for distillation (0: torch's default)")
    parser.add_argument("--expert-images", type=int, default=5120, help="images per timed expert epoch")
    parser.add_argument("--expert-epochs", type=int, default=20, help="the experts' length (chooses the execution)")
    parser.add_argument("--skip", choices=("matching", "experts"), action="append", default=[])
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="ddtool-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.baseline],
                   check=True, capture_output=True)
    trees = {"baseline": base, "this": REPO}
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        print(f"Host: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at the start; "
              f"this = {commit} (with any uncommitted changes), baseline = {args.baseline}\n")
        if "matching" not in args.skip:
            print(f"Distillation, s per outer iteration (IPC 10, N = {args.steps}, DSA, "
                  f"{args.threads or 'default'} threads; median of {args.rounds} x {args.repeats}):\n")
            print("| width | baseline default | this default | speed-up | baseline exact | this exact | "
                  "this bptt | this exact / bptt |")
            print("|---:|---|---|---:|---:|---:|---:|---:|")
            for width in args.widths:
                r = matching(trees, width, args.steps, args.repeats, args.rounds, args.threads)
                b, t = r["baseline"], r["this"]
                print(f"| {width} | {b['default']:.2f} ({b['backend']}) | {t['default']:.2f} ({t['backend']}) | "
                      f"{b['default'] / t['default']:.2f}x | {b['exact']:.2f} | {t['exact']:.2f} | {t['bptt']:.2f} | "
                      f"{t['exact'] / t['bptt']:.2f} |", flush=True)
        if "experts" not in args.skip:
            print(f"\nExpert training, images/s on the whole machine ({args.expert_epochs}-epoch experts' "
                  f"execution; one epoch of {args.expert_images} images after a warm-up, median of {args.rounds}):\n")
            print("| width | baseline img/s | this img/s | speed-up | this execution | this warm-up s |")
            print("|---:|---:|---:|---:|---|---:|")
            for width in args.widths:
                r = experts(trees, width, args.expert_images, args.expert_epochs, args.rounds)
                b, t = r["baseline"], r["this"]
                plan = t["plan"]
                execution = (f"{plan['workers']} workers x {plan['threads'] or 'default'} threads, "
                             f"{'compiled' if plan['compile'] else 'eager'}")
                print(f"| {width} | {b['images_per_second']:,.0f} | {t['images_per_second']:,.0f} | "
                      f"{t['images_per_second'] / b['images_per_second']:.2f}x | {execution} | "
                      f"{t['warm_up_seconds']:.0f} |", flush=True)
        print(f"\nLoad at the end: {os.getloadavg()[0]:.2f}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], capture_output=True)
        shutil.rmtree(base.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
