"""What the student network's own norm and pooling save an outer iteration of trajectory matching.

One process, three variants of the same network taking turns iteration by iteration (so a change
of load hits all alike): PyTorch's group norm and avg_pool2d; ddtool's 2x2 pooling
(ddtool/networks/pooling.py); and that with ddtool's instance norm, whose second derivative is
in closed form (ddtool/networks/instance_norm.py), which is what the networks use. ConvNet-3 on
Fashion-MNIST shapes, IPC 10 (all 100 images at every inner step), DSA on, N student steps.
Times are CPU seconds of the process (less disturbed by other jobs than wall time).

    OMP_NUM_THREADS=1 python scripts/bench_ops.py --width 32 --backend bptt
    OMP_NUM_THREADS=1 python scripts/bench_ops.py --width 128 --backend exact --rounds 3 --variants pytorch ddtool
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ddtool.augment import DSA, DSAConfig
from ddtool.matching import InnerStep, MatchTarget, SyntheticBatch, Unroll, get_backend
from ddtool.memory import keep_freed_memory
from ddtool.networks import ParamLayout, create_network
from ddtool.networks.instance_norm import InstanceNorm
from ddtool.networks.pooling import AvgPool2x2

# variant -> (the norm's forward, the pooling's forward), patched onto ddtool's modules
VARIANTS = {
    "pytorch": (nn.GroupNorm.forward, nn.AvgPool2d.forward),
    "pooling": (nn.GroupNorm.forward, AvgPool2x2.forward),
    "ddtool": (InstanceNorm.forward, AvgPool2x2.forward),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--backend", choices=("bptt", "exact"), default="bptt")
    parser.add_argument("--steps", type=int, default=10, help="N, student steps per outer iteration")
    parser.add_argument("--rounds", type=int, default=4, help="timed iterations of each variant")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()

    keep_freed_memory()  # as the command line runs
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = create_network("convnet", channels=1, num_classes=10, image_size=28, width=args.width)
    layout = ParamLayout.from_module(net)
    start = layout.flatten(net)
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    images = torch.randn(100, 1, 28, 28, generator=g).requires_grad_(True)
    labels = torch.arange(10).repeat_interleave(10)
    lr = torch.tensor(0.01, requires_grad=True)
    dsa = DSA(DSAConfig())
    backend = get_backend(args.backend)

    def iteration() -> float:
        steps = [InnerStep(batch=torch.randperm(100, generator=g), augmentation=dsa.sample(100, 28, 28, g))
                 for _ in range(args.steps)]
        unroll = Unroll(forward=lambda p, x: layout.functional_forward(net, p, x), start=start, steps=steps,
                        targets=[MatchTarget(args.steps, target, (start - target).pow(2).sum())], augmenter=dsa)
        began = time.process_time()
        backend(unroll, SyntheticBatch(images=images, lr=lr, fixed_targets=labels))
        return time.process_time() - began

    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    try:
        for round_ in range(args.rounds + 1):  # the first round warms up
            for name in args.variants:
                InstanceNorm.forward, AvgPool2x2.forward = VARIANTS[name]
                taken = iteration()
                if round_:
                    seconds[name].append(taken)
    finally:
        InstanceNorm.forward, AvgPool2x2.forward = VARIANTS["ddtool"]
    print(f"ConvNet-3 width {args.width}, {args.backend}, N = {args.steps}, {torch.get_num_threads()} thread(s); "
          f"CPU s per outer iteration, median of {args.rounds}:")
    first = statistics.median(seconds[args.variants[0]])
    for name, taken in seconds.items():
        median = statistics.median(taken)
        print(f"  {name:8s} {median:7.2f}  ({first / median:.2f}x {args.variants[0]})")


if __name__ == "__main__":
    main()
