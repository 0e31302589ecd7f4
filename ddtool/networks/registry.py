"""Networks by name (timm-style): `@register_network("name")` on a factory, `create_network`.

A factory is a function taking keyword arguments only: the data geometry (`channels`,
`num_classes`, `image_size`) plus its own options with defaults. Its signature *is* the list of
options a user may set, so unknown or misspelt options are reported as a ConfigError instead of
a TypeError deep inside a constructor.

Aliases ("convnet-bn", "convnetd4", ...) are a base factory with some options pinned; setting a
pinned option to a different value is an error rather than a silent override, because
"convnet-bn" with norm="none" would name one network and build another.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ddtool.errors import ConfigError
from ddtool.seeding import fork_rng_seed

Factory = Callable[..., nn.Module]
_GEOMETRY = ("channels", "num_classes", "image_size")


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    pinned: dict[str, Any] = field(default_factory=dict)

    def option_defaults(self) -> dict[str, Any]:
        """The options a user may still set, with their defaults."""
        params = inspect.signature(self.factory).parameters
        return {
            name: p.default
            for name, p in params.items()
            if name not in _GEOMETRY and name not in self.pinned
        }


_REGISTRY: dict[str, _Entry] = {}


def _normalise(name: str) -> str:
    return name.strip().lower()


def register_network(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering `factory(*, channels, num_classes, image_size, **options)`."""

    def decorate(factory: Factory) -> Factory:
        key = _normalise(name)
        if key in _REGISTRY:
            raise ValueError(f"network {key!r} is registered twice")
        missing = [g for g in _GEOMETRY if g not in inspect.signature(factory).parameters]
        if missing:
            raise TypeError(f"network factory {factory.__name__} lacks parameters {missing}")
        _REGISTRY[key] = _Entry(factory)
        return factory

    return decorate


def register_alias(name: str, base: str, **pinned: Any) -> None:
    """Register `name` as network `base` with `pinned` options fixed."""
    key = _normalise(name)
    if key in _REGISTRY:
        raise ValueError(f"network {key!r} is registered twice")
    entry = _REGISTRY[_normalise(base)]
    _REGISTRY[key] = _Entry(entry.factory, {**entry.pinned, **pinned})


def list_networks() -> list[str]:
    """All registered names (aliases included), sorted."""
    return sorted(_REGISTRY)


def network_options(name: str) -> dict[str, Any]:
    """The options `name` accepts, with their defaults (None = derived from the geometry)."""
    return _lookup(name).option_defaults()


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[_normalise(name)]
    except KeyError:
        raise ConfigError(
            f"Unknown network {name!r}. Known networks: {', '.join(list_networks())}."
        ) from None


def parse_arch(spec: str) -> tuple[str, dict[str, Any]]:
    """'convnet:width=32,depth=3' -> ('convnet', {'width': 32, 'depth': 3}).

    The compact form names a network with its options in one string, as the CLI's --arch and
    evaluation records use it. Values are read as int, then float, else kept as text."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"Network spec {spec!r}: expected key=value after ':', got {item!r}.")
        for convert in (int, float, str):
            try:
                options[key.strip()] = convert(text.strip())
                break
            except ValueError:
                continue
    return name.strip(), options


def same_network(a: str, b: str) -> bool:
    """Whether two specs build the same network: 'convnetw32' (an alias), 'convnet:width=32'
    and 'convnet:width=32,norm=instance' (a default spelled out) are one network. Options
    whose default depends on the image (ConvNet's depth) are compared as written."""

    def resolved(spec: str) -> tuple[Factory, dict[str, Any]]:
        name, options = parse_arch(spec)
        entry = _lookup(name)
        return entry.factory, {**entry.option_defaults(), **entry.pinned, **options}

    return resolved(a) == resolved(b)


def format_arch(name: str, options: dict[str, Any] | None = None) -> str:
    """The inverse of parse_arch."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={v}" for k, v in sorted(options.items()))


def create_network(
    name: str,
    *,
    channels: int,
    num_classes: int,
    image_size: int,
    generator: torch.Generator | None = None,
    **options: Any,
) -> nn.Module:
    """Build network `name` for square `image_size` inputs with `channels` channels.

    The weights use PyTorch's default initialisation. With `generator`, they are drawn from a
    seed taken from it inside a forked RNG scope, so the same generator state gives the same
    weights and the global RNG is left untouched; without it, the global RNG is used.
    """
    name, spec_options = parse_arch(name)
    options = {**spec_options, **options}
    entry = _lookup(name)
    for label, value in (("channels", channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"Network {name!r}: {label} must be a positive integer, got {value!r}.")
    allowed = entry.option_defaults()
    for option, value in options.items():
        if option in entry.pinned:
            if value != entry.pinned[option]:
                raise ConfigError(
                    f"Network {name!r} fixes {option}={entry.pinned[option]!r}; got {option}={value!r}. "
                    "Use the base network name to choose that option freely."
                )
        elif option not in allowed:
            accepted = ", ".join(allowed) or "none"
            raise ConfigError(f"Network {name!r} has no option {option!r}. Accepted options: {accepted}.")
    kwargs = {**entry.pinned, **options}
    if generator is None:
        return entry.factory(channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)
    seed = fork_rng_seed(generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.factory(channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)
