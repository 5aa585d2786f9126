"""API conventions every registered method and module follows."""
from __future__ import annotations

import inspect
import re
from importlib import import_module
from pathlib import Path

import pytest

from expkit.experiment.dispatch import KINDS
from expkit.experiment.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "expkit"
FIRST = {"adata", "adatas", "adata_or_obs", "adata_or_store"}
POSITIONAL_OK = {("get_image", "channels")}  # get_image(store, "hires/r,g,b") reads naturally


def _func(target):
    module, name = target.split(":")
    return getattr(import_module(module), name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registered_method_signature(name):
    target, modalities, kind = METHODS[name]
    assert kind in KINDS
    func = _func(target)
    params = list(inspect.signature(func).parameters.values())
    if kind == "table":  # a function of a table made by another method: first parameter that table
        assert params[0].name in {"stats", "table"}, f"{name}: a table method takes the table first"
    else:
        assert params[0].name in FIRST, f"{name}: the first parameter must be the AnnData, not {params[0].name!r}"
    assert params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)
    loose = [p.name for p in params[1:] if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty
             and (name, p.name) not in POSITIONAL_OK]
    assert not loose, f"{name}: parameters after the AnnData must be keyword arguments: {loose}"
    assert "run_on_samples" not in {p.name for p in params}, "the dispatcher owns run_on_samples"
    assert func.__doc__ and len(func.__doc__.strip()) > 20, f"{name}: needs a docstring"
    if modalities is not None:
        assert set(modalities) <= {"rna", "spatial-bin", "spatial-cell"}


def test_methods_writing_results_take_key_added():
    exempt = {"filter", "get_markers", "get_image", "plot_spatial", "plot_embedding", "plot_qc",
              "plot_proportions", "integrate_domains_spagcn", "integrate_domains_deepst", "log_normalize", "add_connectivity"}
    for name, (target, _, kind) in METHODS.items():
        if kind in ("sample", "joint", "derive") and name not in exempt:
            assert "key_added" in inspect.signature(_func(target)).parameters, f"{name} lacks key_added"


def test_no_pickles_in_the_package():
    pattern = re.compile(r"^\s*(import pickle|from pickle|import dill|import joblib)|\.to_pickle\(|read_pickle\(",
                         re.M)
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders


def test_no_module_imports_torch_or_matplotlib_outside_analysis_layers():
    allowed = ("kernels", "pp", "tl", "spatial", "pl")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in allowed:
            continue
        for line in path.read_text().splitlines():
            if re.match(r"^(import|from) (torch|matplotlib)", line):
                offenders.append(f"{rel}: {line}")
    assert not offenders, offenders
