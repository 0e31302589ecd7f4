"""Networks by name (timm-style): `@register_network("name")` on a factory, `create_network`.

A factory is a function taking keyword arguments only: the data geometry (`channels`,
`num_classes`, `image_size`) plus its own options with defaults. Its signature *is* the list of
options a user may set, so unknown or misspelt options are reported as a ConfigError instead of
a TypeError deep inside a constructor.

Aliases ("convnet-bn", "convnetd4", ...) are a base factory with some options pinned; setting a
pinned option to a different value is an error rather than a silent override, because
"convnet-bn" with norm="none" would name one network and build another.

Every option has a declared type (`Whole`, `Real`, `Flag`, `Text`, `Choice`), given to
`register_network` beside the factory. `check_network_options` is the one place option values
are checked: `parse_arch`, `create_network` and `same_network` all go through it, so a value
of the wrong type or out of range (from a spec such as "convnet:width=abc", or a keyword
argument) is a ConfigError naming the option, the value and what is expected, never a
TypeError inside a constructor. Text values ("8", "true", "batch") are converted to the
declared type; valid values come out exactly as before (same dicts, same canonical names).
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ddtool.errors import ConfigError
from ddtool.seeding import fork_rng_seed

Factory = Callable[..., nn.Module]
_GEOMETRY = ("channels", "num_classes", "image_size")


# ---------------------------------------------------------------- declared option types
# Each type's `convert` takes a typed value or its text (from a "name:key=value" spec) and
# returns the value as the declared type, or raises ValueError; `expected` says what fits,
# completing "Network option width of convnet must be ...".

_WHOLE_TEXT = re.compile(r"[+-]?[0-9]+")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _bounds(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def _within(value, low, high):
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(value)
    return value


class OptionType:
    """The declared type of a network option (see the module doc)."""

    expected = "a value"

    def convert(self, value: Any) -> Any:  # pragma: no cover - every type overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Whole(OptionType):
    """An integer, optionally bounded (inclusive). Text: decimal digits ("8", "-2")."""

    min: int | None = None
    max: int | None = None

    @property
    def expected(self) -> str:
        return "a whole number" + _bounds(self.min, self.max)

    def convert(self, value: Any) -> int:
        if isinstance(value, str):
            if not _WHOLE_TEXT.fullmatch(value.strip()):
                raise ValueError(value)
            value = int(value.strip())
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(value)  # 1.5, 32.0, True: not whole numbers of this option
        return _within(int(value), self.min, self.max)


@dataclass(frozen=True)
class Real(OptionType):
    """A finite number (an int is accepted and made a float), optionally bounded (inclusive)."""

    min: float | None = None
    max: float | None = None

    @property
    def expected(self) -> str:
        return "a number" + _bounds(self.min, self.max)

    def convert(self, value: Any) -> float:
        if isinstance(value, str):
            value = float(value.strip())  # ValueError for "" and "abc"
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(value)
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(value)
        return _within(value, self.min, self.max)


@dataclass(frozen=True)
class Flag(OptionType):
    """A boolean. Text: true/false, yes/no, on/off, 1/0 (any case)."""

    expected = "true or false"

    def convert(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(value)


@dataclass(frozen=True)
class Text(OptionType):
    """Any non-empty text."""

    expected = "a non-empty text"

    def convert(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(value)
        return value


@dataclass(frozen=True)
class Choice(OptionType):
    """One of a few names, spelt exactly."""

    names: tuple[str, ...]

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(self.names)

    def convert(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.names:
            raise ValueError(value)
        return value


# ---------------------------------------------------------------- the registry

def _factory_options(factory: Factory) -> dict[str, Any]:
    """A factory's own options (its keyword parameters beyond the geometry), with defaults."""
    params = inspect.signature(factory).parameters
    return {name: p.default for name, p in params.items() if name not in _GEOMETRY}


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    types: dict[str, OptionType]
    pinned: dict[str, Any] = field(default_factory=dict)

    def option_defaults(self) -> dict[str, Any]:
        """The options a user may still set, with their defaults."""
        return {name: default for name, default in _factory_options(self.factory).items()
                if name not in self.pinned}

    def convert(self, network: str, option: str, value: Any) -> Any:
        """`value` as the declared type of `option` (None where None is the default)."""
        if value is None and _factory_options(self.factory)[option] is None:
            return None  # "derived from the geometry", e.g. ConvNet's depth
        kind = self.types[option]
        try:
            return kind.convert(value)
        except ValueError:
            raise ConfigError(
                f"Network option {option} of {network} must be {kind.expected}, not {value!r}."
            ) from None


_REGISTRY: dict[str, _Entry] = {}


def _normalise(name: str) -> str:
    return name.strip().lower()


def register_network(name: str, *, options: Mapping[str, OptionType] | None = None
                     ) -> Callable[[Factory], Factory]:
    """Decorator registering `factory(*, channels, num_classes, image_size, **options)`.

    `options` declares the type of each of the factory's options, e.g.
    {"width": Whole(min=1), "norm": Choice(NORMS)}: exactly the factory's keyword parameters
    beyond the geometry, each with a default that fits its type (or None, "derived")."""
    declared = dict(options or {})

    def decorate(factory: Factory) -> Factory:
        key = _normalise(name)
        if key in _REGISTRY:
            raise ValueError(f"network {key!r} is registered twice")
        missing = [g for g in _GEOMETRY if g not in inspect.signature(factory).parameters]
        if missing:
            raise TypeError(f"network factory {factory.__name__} lacks parameters {missing}")
        accepted = _factory_options(factory)
        if set(declared) != set(accepted):
            raise TypeError(f"network {key!r}: the factory takes options {sorted(accepted)} but types are "
                            f"declared for {sorted(declared)}; declare one type per option")
        for option, default in accepted.items():
            if default is inspect.Parameter.empty:
                raise TypeError(f"network {key!r}: option {option!r} needs a default")
            if not isinstance(declared[option], OptionType):
                raise TypeError(f"network {key!r}: the type of option {option!r} is not an OptionType")
            if default is not None:
                try:
                    fits = declared[option].convert(default) == default
                except ValueError:
                    fits = False
                if not fits:
                    raise TypeError(f"network {key!r}: the default {option}={default!r} is not "
                                    f"{declared[option].expected}")
        _REGISTRY[key] = _Entry(factory, declared)
        return factory

    return decorate


def register_alias(name: str, base: str, **pinned: Any) -> None:
    """Register `name` as network `base` with `pinned` options fixed."""
    key = _normalise(name)
    if key in _REGISTRY:
        raise ValueError(f"network {key!r} is registered twice")
    entry = _REGISTRY[_normalise(base)]
    unknown = sorted(set(pinned) - set(entry.types))
    if unknown:
        raise ValueError(f"alias {key!r}: network {base!r} has no options {unknown}")
    try:
        pinned = {option: entry.convert(key, option, value) for option, value in pinned.items()}
    except ConfigError as e:
        raise ValueError(f"alias {key!r}: {e}") from None
    _REGISTRY[key] = _Entry(entry.factory, entry.types, {**entry.pinned, **pinned})


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


def check_network_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` of network `name`, checked and converted to their declared types.

    The one check of option values (parse_arch, create_network and same_network call it):
    ConfigError for an unknown network or option, a value that is not of the option's type or
    out of its range, or a value other than the one an alias pins. Values may be typed or text
    ("8", "true", "batch"); valid ones come back as the declared type, in the same order."""
    network = _normalise(name)
    entry = _lookup(name)
    allowed = entry.option_defaults()
    checked: dict[str, Any] = {}
    for option, value in options.items():
        if option not in allowed and option not in entry.pinned:
            accepted = ", ".join(allowed) or "none"
            raise ConfigError(f"Network {network!r} has no option {option!r}. Accepted options: {accepted}.")
        value = entry.convert(network, option, value)
        if option in entry.pinned and value != entry.pinned[option]:
            raise ConfigError(
                f"Network {network!r} fixes {option}={entry.pinned[option]!r}; got {option}={value!r}. "
                "Use the base network name to choose that option freely."
            )
        checked[option] = value
    return checked


def parse_arch(spec: str) -> tuple[str, dict[str, Any]]:
    """'convnet:width=32,depth=3' -> ('convnet', {'width': 32, 'depth': 3}).

    The compact form names a network with its options in one string, as the CLI's --arch and
    evaluation records use it. Each value is converted to its option's declared type; a
    malformed spec, an unknown network or option, or a value that does not fit is a
    ConfigError (see check_network_options)."""
    name, _, rest = spec.partition(":")
    texts: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"Network spec {spec!r}: expected key=value after ':', got {item!r}.")
        texts[key.strip()] = text.strip()
    return name.strip(), check_network_options(name, texts)


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
    entry = _lookup(name)
    for label, value in (("channels", channels), ("num_classes", num_classes), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"Network {name!r}: {label} must be a positive integer, got {value!r}.")
    options = check_network_options(name, {**spec_options, **options})
    kwargs = {**entry.pinned, **options}
    if generator is None:
        return entry.factory(channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)
    seed = fork_rng_seed(generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.factory(channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)
