"""Choose a trajectory-matching preset for Fashion-MNIST on the validation split.

Short distillation runs over a small grid of settings around a base preset, each scored by
training fresh networks on the result and measuring accuracy on the validation split
(carved from the training set; the test set is never looked at). The grid point with the
best validation accuracy is what the preset should use.

    python scripts/tune_fashion.py --method mtt --ipc 10 --iterations 50 \\
        --grid lr_img=30,100,300 --grid max_start_epoch=2,4
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddtool.data import prepare
from ddtool.evaluation import get_protocol, train_fresh_network
from ddtool.methods.base import DistillContext, build_config, get_method_class, parse_overrides
from ddtool.seeding import derive_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="mtt")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a setting and the values to try (repeatable; the grid is their product)")
    parser.add_argument("--val-epochs", type=int, default=300)
    parser.add_argument("--val-runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    method_cls = get_method_class(args.method)
    axes = [(key, values.split(",")) for key, values in (g.split("=", 1) for g in args.grid)]
    base = build_config(method_cls, args.preset, {"iterations": args.iterations}, ipc=args.ipc)
    data = prepare("fashion-mnist", zca=base.zca)
    protocol = get_protocol(method_cls.default_protocol)
    print(f"{args.method} IPC {args.ipc}, {args.iterations} iterations per point, validation split of "
          f"{data.val_x.shape[0]} images, {args.val_runs} fresh networks x {args.val_epochs} epochs each\n")
    header = [key for key, _ in axes]
    print("| " + " | ".join(header) + " | validation acc. | minutes |")
    print("|" + "---|" * (len(header) + 2))
    rows = []
    for values in itertools.product(*[vals for _, vals in axes]):
        overrides = parse_overrides(method_cls.config_class, tuple(f"{k}={v}" for k, v in zip(header, values)))
        overrides["iterations"] = args.iterations
        config = build_config(method_cls, args.preset, overrides, ipc=args.ipc)
        method = method_cls(config)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            ctx = DistillContext(data=data, ipc=args.ipc, seed=args.seed, device=torch.device("cpu"),
                                 work_dir=Path(work), progress=False, log=lambda m: None)
            sset = method.distill(ctx)
        targets = sset.soft_targets() if sset.is_soft else sset.hard_labels()
        scores = [train_fresh_network(sset.images, targets, data, protocol=protocol, lr=sset.learned_lr or protocol.lr,
                                      arch=method.student_arch(), seed=derive_seed(args.seed, "tune", run),
                                      epochs=args.val_epochs, held_out=(data.val_x, data.val_y))
                  for run in range(args.val_runs)]
        minutes = (time.perf_counter() - started) / 60
        rows.append((values, float(np.mean(scores))))
        print(f"| {' | '.join(values)} | {100 * np.mean(scores):.2f} ± {100 * np.std(scores):.2f} | {minutes:.1f} |",
              flush=True)
    best = max(rows, key=lambda r: r[1])
    print(f"\nbest on validation: {dict(zip(header, best[0]))} ({100 * best[1]:.2f}%)")


if __name__ == "__main__":
    main()
