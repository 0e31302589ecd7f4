"""Named evaluation protocols: how fresh networks are trained on a synthetic set.

A protocol fixes everything that changes the number, so results stored in a file can be
compared with each other and with the baselines computed under the same protocol.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ddtool.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    name: str
    epochs: int
    lr: float  # used when the set has no learned lr, or when use_learned_lr is False
    use_learned_lr: bool
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_at: float = 0.5  # fraction of training after which lr is multiplied by lr_decay
    lr_decay: float = 0.1
    augment: bool = True  # DSA
    soft_labels: bool = True  # train on the set's soft labels when it has them
    runs: int = 5
    # The whole-dataset reference trains on the full training split; the synthetic-set epoch
    # count (hundreds of passes over 100 images) makes no sense there.
    reference_epochs: int = 30
    reference_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.runs < 1 or self.batch_size < 1:
            raise ConfigError(f"Protocol {self.name!r}: epochs, runs and batch size must be positive.")
        if not 0 < self.lr_decay_at <= 1:
            raise ConfigError(f"Protocol {self.name!r}: lr_decay_at must be in (0, 1].")

    def with_overrides(self, **overrides) -> "Protocol":
        """A copy with some fields changed (None means keep); the name records the change."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        try:
            proto = dataclasses.replace(self, **changes)
        except TypeError as exc:
            raise ConfigError(f"Unknown protocol setting: {exc}") from None
        return proto

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    # The MTT family (MTT, TESLA, FTD, AST): learned lr, DSA, 1000 epochs, lr x0.1 at half.
    "mtt": Protocol(name="mtt", epochs=1000, lr=0.01, use_learned_lr=True),
    # DATM: as mtt with batch 128 and soft labels.
    "datm": Protocol(name="datm", epochs=1000, lr=0.01, use_learned_lr=True, batch_size=128),
    # The classic DC/DSA evaluation without augmentation: fixed lr 0.01, 300 epochs.
    "classic": Protocol(name="classic", epochs=300, lr=0.01, use_learned_lr=False, augment=False),
    # The classic evaluation with DSA: 1000 epochs.
    "classic-dsa": Protocol(name="classic-dsa", epochs=1000, lr=0.01, use_learned_lr=False, augment=True),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown evaluation protocol {name!r}; known protocols: {', '.join(sorted(PROTOCOLS))}."
        ) from None
