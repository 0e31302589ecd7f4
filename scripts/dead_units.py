"""Watch a fresh network's ReLUs while it trains on a set, the way one evaluation run trains it.

After each epoch: the fraction of each ReLU layer's units that are dead (never positive on
any of the training images, un-augmented), the spread of the logits over those images, and
the largest change of any weight in the epoch. Written to find out why AlexNet students
collapse under the KD protocol (docs/results.md, "Cross-architecture transfer"):

    python scripts/dead_units.py synthetic_sets/curriculum/fashion-mnist-cda-ipc10.h5 --arch alexnet --run 1
    python scripts/dead_units.py SET.h5 --arch alexnet --run 1 --random-subset   # the run's random draw
    python scripts/dead_units.py SET.h5 --arch alexnet --run 1 --lr 1e-4          # another lr

`--run` is the evaluation's run index: the network, batches and views are those of that run of
`ddtool evaluate SET.h5 --arch A --seed S` (eager, not compiled). A unit of a conv layer is a
channel. A ReLU module applied twice (a ResNet block's) reports its last use.
"""

from __future__ import annotations

import argparse

import torch

from ddtool.data import prepare
from ddtool.errors import DDToolError
from ddtool.evaluation import get_protocol
from ddtool.evaluation import SetLearning, fit_network, fresh_network, random_subset
from ddtool.methods.base import get_method_class
from ddtool.seeding import derive_seed
from ddtool.storage import load_synthetic_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", help="a synthetic-set HDF5 file")
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--protocol", default=None, help="default: the set's method's protocol")
    parser.add_argument("--run", type=int, default=0, help="which evaluation run to replay")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs to watch (the lr follows the protocol's whole schedule, cut here)")
    parser.add_argument("--lr", type=float, default=None, help="default: the one the evaluation uses")
    parser.add_argument("--random-subset", action="store_true", help="train the run's matched random draw instead")
    args = parser.parse_args()
    try:
        watch(args)
    except DDToolError as error:  # a bad file, network or protocol name: its message, not a traceback
        raise SystemExit(f"Error: {error}") from None


def watch(args: argparse.Namespace) -> None:
    sset = load_synthetic_set(args.set)
    protocol = get_protocol(args.protocol or get_method_class(sset.method).default_protocol)
    data = prepare(sset.dataset, preprocessing=sset.preprocessing)
    learning = SetLearning.of(sset, protocol, data.test_x.device)
    images, targets = sset.images, learning.targets
    if args.random_subset:
        images, targets = random_subset(data, ipc=sset.ipc, protocol=protocol, seed=args.seed, run=args.run,
                                        teacher=learning.teacher, like=learning.label_source)
    lr = args.lr if args.lr is not None else (protocol.lr if args.random_subset else learning.lr)
    run_seed = derive_seed(args.seed, "run", args.run)
    net = fresh_network(args.arch, data, run_seed)

    relus = [(name, m) for name, m in net.named_modules() if isinstance(m, torch.nn.ReLU)]
    if not relus:
        raise SystemExit(f"{args.arch} has no nn.ReLU modules to watch")
    outputs: dict[str, torch.Tensor] = {}
    for name, module in relus:
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach()))
    before = [p.detach().clone() for p in net.parameters()]
    epoch = 0

    def report() -> None:
        nonlocal epoch
        was_training = net.training
        net.eval()
        with torch.no_grad():
            logits = net(images.to(data.test_x.device))
        dead = []
        for name, _ in relus:
            out = outputs[name]
            per_unit = out.transpose(0, 1).flatten(1) if out.dim() > 2 else out.t()
            dead.append(f"{(per_unit.max(dim=1).values <= 0).float().mean().item():.2f}")
        change = max((p.detach() - b).abs().max().item() for p, b in zip(net.parameters(), before))
        for p, b in zip(net.parameters(), before):
            b.copy_(p.detach())
        print(f"epoch {epoch:4d}  dead {' '.join(dead)}  logit std over images {logits.std(dim=0).mean().item():.3f}"
              f"  largest weight change {change:.4f}", flush=True)
        net.train(was_training)
        epoch += 1
        if epoch > args.epochs:
            raise _Watched

    print(f"{args.arch} on {'a random subset' if args.random_subset else sset.method + ' set'}, run {args.run}, "
          f"protocol {protocol.name}, lr {lr:g}; ReLU layers: {', '.join(name for name, _ in relus)}")
    report()
    try:
        fit_network(net, images, targets, data, protocol=protocol, lr=lr, seed=run_seed, on_epoch=report)
    except _Watched:
        pass


class _Watched(Exception):
    """Raised after the last epoch to watch: the run is cut there, its schedule unchanged."""


if __name__ == "__main__":
    main()
