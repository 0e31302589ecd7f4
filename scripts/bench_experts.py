"""Expert-training throughput: ddtool's expert loop beside a plain PyTorch loop.

For ConvNet-3 at several widths on Fashion-MNIST, times one epoch over a subset of the
training images (after a warm-up) with

  plain    a minimal hand-written loop: randperm, index the on-device tensor, forward,
           cross-entropy, backward, SGD step (no DataLoader, no augmentation);
  ddtool   the expert trainer's epoch (ddtool.experts.train.run_epoch -> training.train_epoch)
           with the same model, batch size and optimiser, augmentation off: the loop's overhead;
  +DSA     the same with DSA augmentation (what `ddtool buffer` runs by default);
  +GSAM    DSA and GSAM (FTD's experts; two gradient evaluations per step).

The loops are timed in turn, --repeats rounds, and each keeps its best time, so a busy
machine disturbs the comparison as little as possible. Prints a markdown table.

    python scripts/bench_experts.py                     # CPU (and CUDA if available)
    python scripts/bench_experts.py --images 2048 --widths 32 64 128 --repeats 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from ddtool.data import prepare
from ddtool.experts.config import ExpertConfig
from ddtool.experts.train import build_setup, run_epoch
from ddtool.networks import create_network
from ddtool.seeding import generator


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch(model, optimizer, images, labels, batch_size, gen) -> None:
    order = torch.randperm(images.shape[0], generator=gen).to(images.device)
    for start in range(0, images.shape[0], batch_size):
        idx = order[start:start + batch_size]
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def bench_width(data, images, labels, width: int, device: torch.device, repeats: int) -> dict[str, float]:
    spec, n = data.spec, images.shape[0]
    configs = {
        "ddtool": ExpertConfig(arch_options={"width": width}, augment=False),
        "+DSA": ExpertConfig(arch_options={"width": width}),
        "+GSAM": ExpertConfig(arch_options={"width": width}, optimizer="gsam"),
    }
    setups = {name: build_setup(cfg, 0, data, device, (images, labels)) for name, cfg in configs.items()}
    model = create_network("convnet", channels=spec.channels, num_classes=spec.num_classes,
                           image_size=spec.image_size, generator=generator(0, "bench"), width=width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    warm = min(n, 2 * 256)

    def plain(count: int) -> float:
        return timed(lambda: plain_epoch(model, optimizer, images[:count], labels[:count], 256,
                                         torch.Generator().manual_seed(0)), device)

    def ours(name: str, count: int) -> float:
        return timed(lambda: run_epoch(configs[name], setups[name], 0, 0, images[:count], labels[:count]), device)

    plain(warm)
    for name in configs:
        ours(name, warm)
    best = {name: float("inf") for name in ("plain", *configs)}
    for _ in range(repeats):  # alternate, so load changes hit every loop alike
        best["plain"] = min(best["plain"], plain(n))
        for name in configs:
            best[name] = min(best[name], ours(name, n))
    return {name: n / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--images", type=int, default=5000, help="training images per timed epoch")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=2, help="alternating plain/ddtool timings; best kept")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if available")
    args = parser.parse_args()

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    data = prepare("fashion-mnist", args.data_root)
    print(f"Host: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; Fashion-MNIST subset of {args.images} images, batch 256, "
          f"ConvNet-3 (instance norm), SGD lr 0.01; best of {args.repeats}.\n")
    print("| device | width | plain loop img/s | ddtool img/s | ddtool / plain | +DSA img/s | +DSA+GSAM img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in devices:
        device = torch.device(name)
        images = data.train_x[: args.images].to(device)
        labels = data.train_y[: args.images].to(device)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for width in args.widths:
            r = bench_width(data, images, labels, width, device, args.repeats)
            print(f"| {label} | {width} | {r['plain']:,.0f} | {r['ddtool']:,.0f} | {r['ddtool'] / r['plain']:.2f} "
                  f"| {r['+DSA']:,.0f} | {r['+GSAM']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
