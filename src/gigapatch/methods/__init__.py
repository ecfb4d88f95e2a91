"""gigapatch.methods: how memory is bounded. Importing this package registers the methods
``full``, ``patchgd``, ``ips``, ``patchwise`` and ``tiled`` (detection)."""

from gigapatch.methods import full, ips, patchgd, patchwise, tiled
from gigapatch.methods.base import (
    METHODS,
    Method,
    abridged_loops,
    create_method,
    method_names,
    repeated,
)

__all__ = [
    "METHODS",
    "Method",
    "abridged_loops",
    "create_method",
    "full",
    "ips",
    "method_names",
    "patchgd",
    "patchwise",
    "repeated",
    "tiled",
]
