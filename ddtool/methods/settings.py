"""A method's settings with their meaning: what `ddtool methods NAME` lists.

Each field of a method's configuration dataclass carries its meaning beside its definition,
as field metadata:

    syn_steps: int = setting(20, "N: the student's SGD steps on the synthetic set per segment")

A subclass that only changes a default keeps the meaning (`meaning_of(Base, "name")`).
`missing_meanings(config_class)` names the fields without one (the test suite requires none).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MEANING = "help"  # the metadata key of a field's one-line meaning


def setting(default: Any, meaning: str) -> Any:
    """A configuration field with its default and its one-line meaning."""
    return dataclasses.field(default=default, metadata={MEANING: meaning})


def meaning_of(config_class: type, name: str) -> str:
    """The meaning `config_class` gives its field `name` (for a subclass that changes only its default)."""
    for f in dataclasses.fields(config_class):
        if f.name == name:
            return f.metadata[MEANING]
    raise KeyError(f"{config_class.__name__} has no setting {name!r}")


def missing_meanings(config_class: type) -> list[str]:
    """The fields of the dataclass `config_class` that carry no one-line meaning."""
    return [f.name for f in dataclasses.fields(config_class)
            if not isinstance(f.metadata.get(MEANING), str) or not f.metadata[MEANING].strip()
            or "\n" in f.metadata[MEANING]]


@dataclass(frozen=True)
class Setting:
    """One setting of a method as a run would take it."""

    name: str
    type: str
    default: Any  # the configuration class's default
    value: Any  # in the preset (or the default where there is no preset)
    meaning: str

    @property
    def changed(self) -> bool:
        return self.value != self.default

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "default": self.default, "value": self.value,
                "meaning": self.meaning}


@dataclass(frozen=True)
class MethodSettings:
    """A method's settings as `ddtool distill --method NAME [--preset P] [--ipc N]` starts from them."""

    method: str
    config_class: str
    preset: str | None  # the preset resolved for the IPC (None: the config class's defaults)
    named_preset: str | None  # the preset asked for, or the method's default
    ipc: int | None
    default_protocol: str
    presets: list[str]
    settings: list[Setting]
    notes: list[str]

    def to_dict(self) -> dict:
        return {"method": self.method, "config_class": self.config_class, "preset": self.preset,
                "named_preset": self.named_preset, "ipc": self.ipc, "default_protocol": self.default_protocol,
                "presets": list(self.presets), "settings": [s.to_dict() for s in self.settings],
                "notes": list(self.notes)}


# The two expert spans read alike; the listing says which is which wherever both exist.
EXPERT_SPANS_NOTE = ("The two expert spans: match_span_epochs is M, the matching span (the expert epochs one segment "
                     "matches, from θ*_t to θ*_{t+M}); expert_train_epochs is E, how long each expert is trained "
                     "(its whole trajectory). The last start epoch plus M must fit in E: max_start_epoch - 1 + "
                     "match_span_epochs <= expert_train_epochs.")


def describe_settings(method: str, preset: str | None = None, ipc: int | None = None) -> MethodSettings:
    """Every setting of `method`: type, default, the value in `preset` (the method's default
    preset when None; its variant for `ipc` where the method has one, as `ddtool distill`
    resolves it) and meaning. An unknown method or preset is a ConfigError."""
    from ddtool.methods.base import build_config, get_method_class, resolve_preset

    method_cls = get_method_class(method)
    config_class = method_cls.config_class
    config = build_config(method_cls, preset, {}, ipc=ipc)  # refuses an unknown preset, names the known ones
    defaults = config_class()
    settings = [Setting(f.name, _type_name(f.type), getattr(defaults, f.name), getattr(config, f.name),
                        f.metadata.get(MEANING, ""))
                for f in dataclasses.fields(config_class)]
    resolved = resolve_preset(method_cls, preset, ipc)
    named = preset or method_cls.default_preset
    notes = []
    names = {s.name for s in settings}
    if {"match_span_epochs", "expert_train_epochs"} <= names:
        notes.append(EXPERT_SPANS_NOTE)
    if preset is None and method_cls.fits_budget:
        notes += _default_budget_notes(method)
    return MethodSettings(method=method, config_class=config_class.__name__, preset=resolved, named_preset=named,
                          ipc=ipc, default_protocol=method_cls.default_protocol, presets=list(method_cls.presets),
                          settings=settings, notes=notes)


def _default_budget_notes(method: str) -> list[str]:
    from ddtool.durations import format_duration
    from ddtool.methods.base import DEFAULT_CPU_RECIPES
    from ddtool.methods.budget import SIZED_BY_BUDGET

    sized = sorted(SIZED_BY_BUDGET - {"budget_s"})
    return [f"Without --preset, `ddtool distill --method {method}` on a CPU with {dataset} sizes "
            f"{', '.join(sized[:-1])} and {sized[-1]} to a budget of {format_duration(recipe['budget_s'])} "
            "(budget_s) on the machine: its plan shows the figures; --preset or --budget chooses otherwise."
            for dataset, recipe in DEFAULT_CPU_RECIPES.items()]


def _type_name(annotation: Any) -> str:
    # with `from __future__ import annotations` a field's type is the text of its annotation
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
