"""The method plug-in shape.

A method is a small class with a typed configuration (a dataclass, with named presets for
published settings) and one job: turn a PreparedData into a SyntheticSet. Everything shared
(data, networks, experts, the matching engine, checkpoints, storage, evaluation) lives
elsewhere; adding a method touches one file plus its registry decorator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ddtool.data import PreparedData
from ddtool.data.preprocess import ZCA_FITTED_ON
from ddtool.errors import ConfigError
from ddtool.paths import key_digest
from ddtool.storage import SyntheticSet


@dataclass
class DistillContext:
    """What every method receives besides its own configuration."""

    data: PreparedData
    ipc: int
    seed: int
    device: torch.device
    work_dir: Path  # checkpoints and logs of this run
    data_root: str | None = None
    resume: bool = False
    progress: bool = True
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)
    # Set by the method as it runs, for the set's timings: the recorded wall-clock seconds of
    # the experts it used (0: none; None: not recorded), the part of this process's time spent
    # training them, and the seconds earlier, interrupted processes spent on a resumed run.
    experts_s: float | None = 0.0
    experts_trained_s: float = 0.0
    resumed_s: float = 0.0


class Method(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type]
    presets: ClassVar[dict[str, Any]] = {}
    # The evaluation protocol a set made by this method is judged under by default.
    default_protocol: ClassVar[str] = "classic"
    # The preset used when none is named (None: the config class's defaults).
    default_preset: ClassVar[str | None] = None
    # Bumped when a fix changes what a run of the method computes, so that --resume does not
    # continue from a checkpoint the old code made (see run_fingerprint).
    revision: ClassVar[int] = 1
    # Whether the method takes real images of each class (initialisation, selection, a feature
    # network's pool): an IPC beyond the smallest class is then refused before any work.
    draws_real_images: ClassVar[bool] = True
    # The file in the run's work folder that --resume continues from (None: the method keeps
    # no checkpoint and always runs from the start).
    checkpoint_name: ClassVar[str | None] = None
    # Whether its sets carry a teacher (or its soft labels of stored views): only those can be
    # evaluated under a knowledge-distillation protocol.
    makes_teacher: ClassVar[bool] = False
    # Whether `ddtool distill --budget` can size its runs (ddtool.methods.budget).
    fits_budget: ClassVar[bool] = False
    # Besides ddtool.methods.budget.SIZED_BY_BUDGET, the settings a budget sizes for this method.
    budget_sized_settings: ClassVar[frozenset[str]] = frozenset()
    # Whether a run can split its work over torchrun processes.
    splits_over_processes: ClassVar[bool] = False

    def __init__(self, config: Any):
        if not isinstance(config, self.config_class):
            raise ConfigError(f"Method {self.name!r} needs a {self.config_class.__name__}.")
        self.config = config

    def plan(self, ctx: DistillContext) -> list[str]:
        """Human-readable lines: what will run, and roughly how long it should take."""
        return [f"{self.name}: {ctx.ipc} image{'s' if ctx.ipc != 1 else ''} per class of {ctx.data.spec.name}"]

    @abstractmethod
    def distill(self, ctx: DistillContext) -> SyntheticSet: ...

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    @property
    def whitens(self) -> bool:
        """Whether the method works on ZCA-whitened images (its data are prepared so)."""
        return False

    @property
    def teacher_labels_live(self) -> bool:
        """Whether its sets' soft labels come from a teacher run at evaluation time (rather than
        stored in the file), so that an evaluation's cost is the teacher's as well."""
        return False

    def student_arch(self) -> str | None:
        """The network the set was made for ('name:key=value' form), which evaluation trains
        by default; None for methods not tied to one."""
        return None

    def make_set(self, ctx: DistillContext, images: torch.Tensor, labels: torch.Tensor, *,
                 label_kind: str = "hard", learned_lr: float | None = None, **fields) -> SyntheticSet:
        """A SyntheticSet carrying this method's name and full configuration."""
        data = ctx.data
        return SyntheticSet(
            images=images.detach().float().cpu(),
            labels=labels.detach().cpu(),
            label_kind=label_kind,
            learned_lr=learned_lr,
            classes=list(data.spec.classes),
            preprocessing=data.preprocessing,
            dataset=data.spec.name,
            ipc=ctx.ipc,
            method=self.name,
            config={"method": self.name, "student_arch": self.student_arch(), **self.config_dict()},
            seed=ctx.seed,
            **fields,
        )


METHODS: dict[str, type[Method]] = {}

# The default recipe of `ddtool distill` on these datasets with a CPU, chosen on the validation
# split (docs/budget.md): the method when none is named, and the budget a method that can be
# sized to one gets when the run names no preset and sizes nothing itself (ddtool.run). Elsewhere
# the default method is DEFAULT_METHOD and a method's default preset runs as it is.
DEFAULT_METHOD = "mtt"
DEFAULT_CPU_RECIPES = {"fashion-mnist": {"method": "datm", "budget_s": 30 * 60.0}}


def register_method(name: str):
    def decorate(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


def get_method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"Unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}.") from None


def run_fingerprint(method: str, config, dataset: str, ipc: int, seed: int) -> str:
    """Names the work folder of a run, so --resume finds it: the settings, and the method's
    revision, as the settings alone cannot tell a checkpoint made before a fix from one after."""
    # a renamed setting is hashed under its first name: runs made before the rename stay findable
    first_names = {new: old for old, new in getattr(type(config), "renamed_settings", {}).items()}
    settings = {first_names.get(name, name): value for name, value in dataclasses.asdict(config).items()}
    # settings added later keep the runs made before them findable while at their default
    for name, default in _ADDED_LATER.items():
        if settings.get(name, object()) == default:
            del settings[name]
    if settings.get("backend") in ("auto", "bptt"):
        # auto picks bptt or exact, which compute the same gradient: one run, named as exact (the
        # default auto replaced, so a run begun under the old default resumes under the new one);
        # a set records the backend that computed it, so its re-run names bptt for the same run
        settings["backend"] = "exact"
    if settings.get("zca"):  # a checkpoint of images whitened the old way must not resume
        settings["zca_fitted_on"] = ZCA_FITTED_ON
    return key_digest({"method": method, "revision": get_method_class(method).revision,
                       "config": settings, "dataset": dataset, "ipc": ipc, "seed": seed})


# Config fields added after runs were made with their classes, and the default they take:
# left out of run fingerprints while at it. (Fields added before this list existed changed
# the fingerprints of the runs of their time.)
_ADDED_LATER = {"expert_precision": "fp32", "eval_networks": 1, "budget_s": 0.0, "max_image_scale": 10.0,
                "lr_floor_patience": 10, "loss_window": 20, "max_loss_rise": 1.5, "budget_start_share": 0.8,
                "budget_window_start_share": 0.2}


def list_methods() -> list[str]:
    return sorted(METHODS)


def resolve_preset(method_cls: type[Method], preset: str | None, ipc: int | None = None) -> str | None:
    """The preset a run uses: the one named (or the method's default), or, when the method has
    a variant of it for the run's IPC ("fashion-cpu" at IPC 1 -> "fashion-cpu-ipc1"), that."""
    preset = preset or method_cls.default_preset
    if preset is not None and ipc is not None and f"{preset}-ipc{ipc}" in method_cls.presets:
        return f"{preset}-ipc{ipc}"
    return preset


def build_config(method_cls: type[Method], preset: str | None, overrides: dict[str, Any],
                 ipc: int | None = None) -> Any:
    """Start from a named preset (or the defaults; its variant for `ipc` where the method has
    one), apply overrides, validate once."""
    preset = resolve_preset(method_cls, preset, ipc)
    if preset is not None:
        if preset not in method_cls.presets:
            known = ", ".join(sorted(method_cls.presets)) or "none"
            raise ConfigError(f"Method {method_cls.name!r} has no preset {preset!r}; its presets: {known}.")
        base = method_cls.presets[preset]
    else:
        base = method_cls.config_class()
    overrides = current_names(method_cls.config_class, overrides)
    valid = {f.name for f in dataclasses.fields(method_cls.config_class)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        settings = f"its settings: {', '.join(sorted(valid))}" if valid else "it has no settings"
        raise ConfigError(f"Method {method_cls.name!r} has no setting {', '.join(unknown)}; {settings}.")
    config = dataclasses.replace(base, **overrides)
    # A preset's setting that the chosen network ignores (every preset carries a width) is fine;
    # the same setting given by the user would be silently dropped, so it is refused.
    unused = config.unused_settings() if hasattr(config, "unused_settings") else {}
    given = [name for name in overrides if name in unused]
    if given:
        raise ConfigError("; ".join(f"{unused[name]}: drop {name}={overrides[name]}" for name in given) + ".")
    return config


def current_name(config_class: type, name: str) -> str:
    """The setting `name` of `config_class` as it is called now (an old name from its
    `renamed_settings` becomes the new one; any other name stays)."""
    return getattr(config_class, "renamed_settings", {}).get(name, name)


def current_names(config_class: type, settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with each old name `config_class` lists in its `renamed_settings` replaced by
    the current one; ConfigError when a setting is given under both names."""
    current: dict[str, Any] = {}
    for name, value in settings.items():
        new = current_name(config_class, name)
        if new != name and new in settings:
            raise ConfigError(f"{name} is the former name of {new}, and both were given; keep {new}={settings[new]} "
                              f"or {name}={value}, not both.")
        current[new] = value
    return current


def require_finite(config: Any) -> None:
    """ConfigError if a float field of the dataclass `config` is NaN or infinite (comparisons
    such as `lr <= 0` let NaN through)."""
    not_finite = [f.name for f in dataclasses.fields(config)
                  if isinstance(getattr(config, f.name), float) and not math.isfinite(getattr(config, f.name))]
    if not_finite:
        raise ConfigError(f"Settings must be finite numbers; these are not: {', '.join(not_finite)}.")


def parse_overrides(config_class: type, pairs: tuple[str, ...]) -> dict:
    """`key=value` texts (the CLI's --set), each value converted to the type of the config field."""
    hints = typing.get_type_hints(config_class)
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}.")
        key, text = (part.strip() for part in pair.split("=", 1))
        key = current_name(config_class, key)
        if key not in hints:
            known = f"settings: {', '.join(sorted(hints))}" if hints else "this method has no settings"
            raise ConfigError(f"No setting {key!r}; {known}.")
        overrides[key] = _convert(key, text, hints[key])
    return overrides


def _convert(key: str, text: str, hint) -> object:
    kind = hint if isinstance(hint, type) else next((t for t in typing.get_args(hint) if t is not type(None)), str)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float):
            value = kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
            if not math.isfinite(value):  # float("nan"), float("inf") parse
                raise ValueError
            return value
        if kind in (dict, list, tuple):
            return kind(json.loads(text))
        return text
    except (ValueError, json.JSONDecodeError):
        expected = {int: "a whole number", float: "a finite number", bool: "true or false"}.get(
            kind, f"a {getattr(kind, '__name__', kind)}")
        raise ConfigError(f"--set {key}={text}: expected {expected}.") from None

