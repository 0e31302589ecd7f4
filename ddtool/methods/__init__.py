"""Distillation methods by name: each is a small class over the shared engine (methods/base.py
holds the plug-in shape), registered under its name by `@register_method` when its module is
imported here.

    get_method_class(name); list_methods(); register_method(name)
    build_config(method_cls, preset, overrides, ipc=...): the typed configuration, checked once
    resolve_preset(method_cls, preset, ipc); parse_overrides(config_class, ("key=value", ...))
    DistillContext: what a method's distill() is given; Method: the base class

The modules: coresets (random, herding, k-center), trajectory (MTT, TESLA; the family's loop),
trajectory_config (its settings and presets), matching_state (checkpoint and log), datm, ftd,
curriculum (SRe2L, CDA); budget (sizing a run to a wall-clock budget), experts (finding or
training a run's experts), initialisation, teacher.
"""

from ddtool.methods.base import (
    DistillContext, Method, build_config, get_method_class, list_methods, parse_overrides, register_method,
    resolve_preset, run_fingerprint,
)

# Importing the method modules registers them.
from ddtool.methods import coresets, curriculum, datm, ftd, trajectory  # noqa: E402,F401

__all__ = [
    "DistillContext", "Method", "build_config", "get_method_class", "list_methods", "parse_overrides",
    "register_method", "resolve_preset", "run_fingerprint",
]
