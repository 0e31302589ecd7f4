"""Evaluation speed: training epochs per second on an IPC-10 set (100 images, one batch),
Fashion-MNIST shape, ConvNet-3 at several widths, with and without DSA.

    python scripts/bench_evaluation.py [--device cuda] [--epochs 30]

Each cell eagerly and through torch.compile (`ddtool evaluate --compile`), the compile paid
by an untimed warm-up network; also prints what a full evaluation costs (5 runs x the
protocol's epochs, compile time excluded)."""

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
    args = parser.parse_args()
    device = torch.device(args.device)
    data, x, y = fake_data(device, args.ipc)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"IPC {args.ipc} (Fashion-MNIST shape), {args.epochs} timed epochs after a warm-up, {name}, "
          f"torch {torch.__version__}\n")
    print("| network | protocol | epochs/s eager | epochs/s compiled | speed-up | 5 runs eager | 5 runs compiled |")
    print("|---|---|---|---|---|---|---|")
    for width in args.widths:
        for protocol_name in ("classic", "mtt"):
            protocol = get_protocol(protocol_name)
            arch = f"convnet:width={width}"
            rates = {}
            for compile in (False, True):
                # the warm-up network pays the one-off compile; the timed one reuses its code
                train_fresh_network(x, y, data, protocol=protocol, lr=0.01, arch=arch, seed=0, epochs=2,
                                    compile=compile)
                _sync(device)
                started = time.perf_counter()
                train_fresh_network(x, y, data, protocol=replace(protocol, epochs=args.epochs), lr=0.01, arch=arch,
                                    seed=1, compile=compile)
                _sync(device)
                rates[compile] = args.epochs / (time.perf_counter() - started)
            five_runs = {c: 5 * protocol.epochs / rate / 60 for c, rate in rates.items()}
            print(f"| ConvNet-3 w{width} | {protocol_name} ({'DSA' if protocol.augment else 'no aug'}, "
                  f"{protocol.epochs} ep) | {rates[False]:.1f} | {rates[True]:.1f} | {rates[True] / rates[False]:.2f}x | "
                  f"{five_runs[False]:.1f} min | {five_runs[True]:.1f} min |")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
