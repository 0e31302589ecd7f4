"""Networks by name and a flat-parameter view of any network.

    create_network(name or "name:key=value,...", *, channels, num_classes, image_size, generator=None, **options)
    list_networks(); network_options(name); same_network(a, b); parse_arch(spec); format_arch(name, options)
    check_network_options(name, options): the options' values checked and converted to their declared types
    register_network(name, options={"width": Whole(min=1), ...}); register_alias(name, base, **pinned)
    ParamLayout.from_module(module): flatten / unflatten / load_ / functional_forward
"""

from ddtool.networks.registry import (
    check_network_options, create_network, format_arch, list_networks, network_options, parse_arch, register_alias,
    register_network, same_network,
)
from ddtool.networks.functional import ParamLayout

# Importing the architecture modules registers them.
from ddtool.networks import convnet, classic, resnet  # noqa: E402,F401

__all__ = [
    "ParamLayout", "check_network_options", "create_network", "format_arch", "list_networks", "parse_arch",
    "network_options", "register_alias", "register_network", "same_network",
]
