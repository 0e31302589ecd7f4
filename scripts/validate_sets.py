"""Score synthetic-set files on the validation split, to compare settings without the test split.

Each set trains --runs fresh networks (its distilled-for network, its method's protocol, the
set's labels and learned lr), scored on the images its dataset holds out for validation: the
split the sets were distilled without. Protocol fields can be changed with --set, so the same
script compares evaluation settings on one set.

    OMP_NUM_THREADS=1 python scripts/validate_sets.py a.h5 b.h5 --runs 3
    OMP_NUM_THREADS=1 python scripts/validate_sets.py a.h5 --runs 3 --set epochs=2000

Prints one line per network and one per set: its mean and the runs' accuracies (%). The
networks of run r get the same seed in every set, as in `ddtool evaluate`.
"""

from __future__ import annotations

import argparse
import time

import torch

import ddtool
from ddtool.data import prepare
from ddtool.errors import ConfigError
from ddtool.evaluation import Protocol, get_protocol, train_fresh_network
from ddtool.evaluation.sets import SetLearning
from ddtool.memory import keep_freed_memory
from ddtool.methods.base import get_method_class, parse_overrides
from ddtool.seeding import derive_seed


def validate(path: str, runs: int, changes: dict, compile: bool) -> list[float]:
    sset = ddtool.load(path)
    data = prepare(sset.dataset)
    if not len(data.val_y):
        raise SystemExit(f"{sset.dataset} has no validation split to score {path} on.")
    protocol = get_protocol(get_method_class(sset.method).default_protocol).with_overrides(**changes)
    learning = SetLearning.of(sset, protocol, torch.device("cpu"))
    arch = sset.config.get("student_arch") or "convnet"
    accuracies = []
    for run in range(runs):
        started = time.perf_counter()
        accuracy = 100 * train_fresh_network(sset.images, learning.targets, data, protocol=protocol, lr=learning.lr,
                                             arch=arch, seed=derive_seed(0, "run", run),
                                             held_out=(data.val_x, data.val_y), compile=compile)
        accuracies.append(accuracy)
        print(f"{path} run {run}: {accuracy:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", help="set files (HDF5)")
    parser.add_argument("--runs", type=int, default=3, help="fresh networks per set")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a field of the protocol (repeatable)")
    parser.add_argument("--no-compile", action="store_true", help="train eagerly instead of through torch.compile")
    args = parser.parse_args()
    keep_freed_memory()
    try:
        changes = parse_overrides(Protocol, tuple(args.changes))
    except ConfigError as error:
        raise SystemExit(f"--set: {error}") from None
    for path in args.sets:
        accuracies = validate(path, args.runs, changes, compile=not args.no_compile)
        mean = sum(accuracies) / len(accuracies)
        print(f"{path}: validation {mean:.2f} ({', '.join(f'{a:.2f}' for a in accuracies)})", flush=True)


if __name__ == "__main__":
    main()
