"""Evaluation speed: training epochs per second on an IPC-10 set (100 images, one batch),
Fashion-MNIST shape, ConvNet-3 at several widths (or any networks), with and without DSA.

    python scripts/bench_evaluation.py [--device cuda] [--epochs 30]
    python scripts/bench_evaluation.py --archs alexnet vgg11 resnet18 --protocols mtt --epochs 3

Each cell eagerly and through torch.compile (`ddtool evaluate --compile`), the compile paid
by an untimed warm-up network; also prints what a full evaluation costs (5 runs x the
protocol's epochs, compile time and the final test pass excluded)."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddtool.data import PreparedData, Preprocessing, get_spec
from ddtool.evaluation import get_protocol, train_fresh_network


def fake_data(device: torch.device, ipc: int) -> tuple[PreparedData, torch.Tensor, torch.Tensor]:
    spec = get_spec("fashion-mnist")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10 * ipc, 1, 28, 28, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(ipc).to(device)
    test_x = torch.randn(1000, 1, 28, 28, generator=g).to(device)
    test_y = (torch.arange(1000) % 10).to(device)
    empty = torch.zeros(0, dtype=torch.long)
    data = PreparedData(spec, Preprocessing(spec.mean, spec.std), x, y, x[:0], y[:0], test_x, test_y, empty, empty,
                        Path("memory"))
    return data, x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--archs", nargs="+", default=None,
                        help="networks by registry name instead of the ConvNet widths (e.g. the cross-arch table's)")
    parser.add_argument("--protocols", nargs="+", default=["classic", "mtt"])
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager only (compiling a large network is minutes on a CPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the protocols' training precision (bf16: autocast, `ddtool evaluate --precision`)")
    args = parser.parse_args()
    archs = args.archs or [f"convnet:width={width}" for width in args.widths]
    modes = (False, True) if args.compile else (False,)
    device = torch.device(args.device)
    data, x, y = fake_data(device, args.ipc)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"IPC {args.ipc} (Fashion-MNIST shape), {args.epochs} timed epochs after a warm-up, {name}, "
          f"{args.precision}, torch {torch.__version__}\n")
    print("| network | protocol | epochs/s eager | epochs/s compiled | speed-up | 5 runs eager | 5 runs compiled |")
    print("|---|---|---|---|---|---|---|")
    for arch in archs:
        for protocol_name in args.protocols:
            protocol = get_protocol(protocol_name).with_overrides(precision=args.precision)
            rates = {}
            for compile in modes:
                # the warm-up network pays the one-off compile; the timed one reuses its code
                train_fresh_network(x, y, data, protocol=protocol, lr=0.01, arch=arch, seed=0, epochs=2,
                                    compile=compile)
                # timed between the ends of the first and the last epoch: the final test pass, a
                # large share of a short run on a big network, is not part of the per-epoch cost
                ends = []
                train_fresh_network(x, y, data, protocol=replace(protocol, epochs=args.epochs + 1), lr=0.01,
                                    arch=arch, seed=1, compile=compile,
                                    on_epoch=lambda: (_sync(device), ends.append(time.perf_counter())))
                rates[compile] = args.epochs / (ends[-1] - ends[0])
            five_runs = {c: f"{5 * protocol.epochs / rate / 60:.1f} min" for c, rate in rates.items()}
            compiled = f"{rates[True]:.2f}" if True in rates else "-"
            speed_up = f"{rates[True] / rates[False]:.2f}x" if True in rates else "-"
            print(f"| {_network_name(arch)} | {protocol_name} ({'DSA' if protocol.augment else 'no aug'}, "
                  f"{protocol.epochs} ep) | {rates[False]:.2f} | {compiled} | {speed_up} | "
                  f"{five_runs[False]} | {five_runs.get(True, '-')} |")


def _network_name(arch: str) -> str:
    width = arch.removeprefix("convnet:width=")
    return f"ConvNet-3 w{width}" if width != arch else arch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
