"""expkit: multi-sample spatial and single-cell omics experiments as one object.

Importing expkit is cheap: torch, matplotlib and the analysis modules are imported on first use.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from ._settings import settings
from .errors import ExpkitError

__version__ = "0.1.0"

_LAZY = {
    "Experiment": ("expkit.experiment.experiment", "Experiment"),
    "create_experiment": ("expkit.experiment.experiment", "create_experiment"),
    "load_experiment": ("expkit.experiment.experiment", "load_experiment"),
    "executor": ("expkit.experiment.executors", "executor"),
    "database": ("expkit.database", None),
    "io": ("expkit.io", None),
    "pp": ("expkit.pp", None),
    "tl": ("expkit.tl", None),
    "spatial": ("expkit.spatial", None),
    "pl": ("expkit.pl", None),
    "kernels": ("expkit.kernels", None),
    "datasets": ("expkit.datasets", None),
}

__all__ = ["settings", "ExpkitError", "__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from .experiment.experiment import Experiment, create_experiment, load_experiment


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'expkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
