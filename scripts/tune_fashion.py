"""Choose a trajectory-matching preset for Fashion-MNIST on the validation split.

Short distillation runs over a small grid of settings around a base preset, each scored by
training fresh networks on the result and measuring accuracy on the validation split
(carved from the training set; the test set is never looked at). The grid point with the
best validation accuracy is what the preset should use.

    python scripts/tune_fashion.py --method mtt --ipc 10 --iterations 50 \\
        --grid lr_img=30,100,300 --grid max_start_epoch=2,4

`--baseline-lr 0.01,0.02` first scores random real subsets of the same size (a new draw per
network, hard labels) the same way, at each of those evaluation lrs: the bar a distilled set
has to clear, and a check on whether its learned lr, rather than its images, is what helps.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import numpy as np

from ddtool.data import prepare, sample_per_class
from ddtool.evaluation import get_protocol, train_fresh_network
from ddtool.methods.base import build_config, get_method_class, parse_overrides
from ddtool.run import prepare_distill
from ddtool.seeding import derive_seed, generator


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
    parser.add_argument("--baseline-lr", default=None, metavar="LR1,LR2",
                        help="also score random real subsets at these evaluation lrs")
    parser.add_argument("--baseline-only", action="store_true", help="score only the random subsets (no grid)")
    parser.add_argument("--compile", action="store_true",
                        help="train the validation networks through torch.compile (faster; rounding-level differences)")
    args = parser.parse_args()
    if args.baseline_only and not args.baseline_lr:
        parser.error("--baseline-only needs --baseline-lr (the evaluation lrs to score random subsets at)")

    method_cls = get_method_class(args.method)
    axes = [(key, values.split(",")) for key, values in (g.split("=", 1) for g in args.grid)]
    base = build_config(method_cls, args.preset, {"iterations": args.iterations}, ipc=args.ipc)
    data = prepare("fashion-mnist", zca=base.zca)
    protocol = get_protocol(method_cls.default_protocol)
    print(f"{args.method} IPC {args.ipc}, {args.iterations} iterations per point, validation split of "
          f"{data.val_x.shape[0]} images, {args.val_runs} fresh networks x {args.val_epochs} epochs each\n")
    if args.baseline_lr:
        score_random_subsets(data, method_cls(base), args, [float(v) for v in args.baseline_lr.split(",")],
                             protocol)
    if args.baseline_only:
        return
    header = [key for key, _ in axes]
    print("| " + " | ".join(header) + " | validation acc. | minutes |")
    print("|" + "---|" * (len(header) + 2))
    rows = []
    for values in itertools.product(*[vals for _, vals in axes]):
        overrides = parse_overrides(method_cls.config_class, tuple(f"{k}={v}" for k, v in zip(header, values)))
        overrides["iterations"] = args.iterations
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            run = prepare_distill(args.method, args.ipc, preset=args.preset, settings=overrides, seed=args.seed,
                                  device="cpu", progress=False, log=lambda m: None, data=data, work_dir=work)
            method, sset = run.method, run.distill()
        targets = sset.soft_targets() if sset.is_soft else sset.hard_labels()
        scores = [validation_score(sset.images, targets, data, args, protocol, sset.learned_lr or protocol.lr,
                                   method.student_arch(), run) for run in range(args.val_runs)]
        minutes = (time.perf_counter() - started) / 60
        rows.append((values, float(np.mean(scores))))
        print(f"| {' | '.join(values)} | {100 * np.mean(scores):.2f} ± {100 * np.std(scores):.2f} | {minutes:.1f} |",
              flush=True)
    best = max(rows, key=lambda r: r[1])
    print(f"\nbest on validation: {dict(zip(header, best[0]))} ({100 * best[1]:.2f}%)")


def validation_score(images, targets, data, args, protocol, lr: float, arch: str, run: int) -> float:
    """One fresh network trained on (images, targets), scored on the validation split."""
    return train_fresh_network(images, targets, data, protocol=protocol, lr=lr, arch=arch,
                               seed=derive_seed(args.seed, "tune", run), epochs=args.val_epochs,
                               held_out=(data.val_x, data.val_y), compile=args.compile)


def score_random_subsets(data, method, args, lrs: list[float], protocol) -> None:
    """Print the validation accuracy of random real subsets of the run's size, one row per lr."""
    print("| random real subset, lr | validation acc. | minutes |\n|---|---|---|")
    for lr in lrs:
        started = time.perf_counter()
        scores = []
        for run in range(args.val_runs):
            idx = sample_per_class(data.train_y, data.spec.num_classes, args.ipc,
                                   generator(args.seed, "tune-random-subset", run))
            scores.append(validation_score(data.train_x[idx], data.train_y[idx], data, args, protocol, lr,
                                           method.student_arch(), run))
        minutes = (time.perf_counter() - started) / 60
        print(f"| {lr:g} | {100 * np.mean(scores):.2f} ± {100 * np.std(scores):.2f} | {minutes:.1f} |", flush=True)
    print()


if __name__ == "__main__":
    main()
