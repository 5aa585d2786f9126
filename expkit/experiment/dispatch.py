"""The one mechanism that runs a plain function over the samples of a modality.

Nothing else in the package loops over samples.
"""
from __future__ import annotations

import functools
import inspect
from importlib import import_module
from typing import TYPE_CHECKING, Any, Callable

from .._logging import logger, progress
from ..errors import ExpkitError, InputError, SampleNotFoundError
from .methods import METHODS

if TYPE_CHECKING:  # pragma: no cover
    from .modality import Modality

INTEGRATED = "integrated"
KINDS = ("sample", "read", "replace", "derive", "joint", "joint-read", "table")


def resolve_samples(run_on_samples, available: list[str], *, modality: str) -> list[str | None]:
    """``None`` -> [None] (the integrated data), ``True`` -> all, a string -> one, a list -> those."""
    if run_on_samples is None:
        return [None]
    if run_on_samples is True:
        if not available:
            raise SampleNotFoundError(f"modality {modality!r} has no samples")
        return list(available)
    if run_on_samples is False:
        raise InputError("run_on_samples=False selects nothing: pass True, None, a sample name or a list")
    names = [run_on_samples] if isinstance(run_on_samples, str) else list(run_on_samples)
    if not names:
        raise InputError(f"run_on_samples is an empty list; available samples of {modality!r}: {available}")
    unknown = [s for s in names if s not in available]
    if unknown:
        raise SampleNotFoundError(f"unknown sample(s) {unknown} in modality {modality!r}; available: {available}")
    return list(dict.fromkeys(names))


def _label(sample) -> str:
    return INTEGRATED if sample is None else sample


def run(modality: "Modality", func: Callable, run_on_samples=True, *, kind: str = "sample",
        name: str | None = None, **kwargs) -> Any:
    """Run ``func`` over the selected samples of ``modality`` and return ``{sample: result}``.

    kind "sample": ``func(adata, **kwargs)`` per sample, the sample marked changed; "read": the same, nothing
    marked; "replace": ``func`` returns a new AnnData that replaces the sample; "joint": ``func({sample:
    adata}, **kwargs)`` once over all selected samples (marked changed), its return value passed through;
    "joint-read": the same, nothing marked; "derive": ``func`` returns a new AnnData that becomes the same-named
    sample of the modality ``func.derived_modality`` (linked to its source in the table's ``derived_from``). The integrated data is keyed ``"integrated"``.
    If a sample fails, the results of the samples before it stay in place (in memory, saved by ``save()``);
    the error says which sample failed.
    """
    if kind not in KINDS:
        raise InputError(f"unknown method kind {kind!r}; one of {KINDS}")
    name = name or getattr(func, "__name__", "method")
    targets = resolve_samples(run_on_samples, modality.samples, modality=modality.name)
    if kind == "derive" and None in targets:
        raise InputError(f"{name} makes new samples from samples: run it on samples (True or names), "
                         f"not on the integrated data")
    adatas = modality._load_many(targets)
    params = inspect.signature(func).parameters
    accepts_store = "image_store" in params and "image_store" not in kwargs

    if kind in ("joint", "joint-read"):
        data = {_label(s): a for s, a in zip(targets, adatas)}
        if accepts_store:
            kwargs["image_store"] = {_label(s): modality.image_store(s) for s in targets}
        # a joint method that also writes to the integrated data gets it when it exists
        integrated = None
        if (kind == "joint" and None not in targets and "integrated" not in kwargs
                and "integrated" in params):
            integrated = modality._integrated_or_none()
            if integrated is not None:
                kwargs["integrated"] = integrated
        result = func(data, **kwargs)
        if kind == "joint":
            for s in targets + ([None] if integrated is not None else []):
                modality._mark_changed(s)
        return result

    results: dict[str, Any] = {}
    done: list[str] = []
    with progress(len(targets), f"{modality.name}.{name}") as advance:
        for sample, adata in zip(targets, adatas):
            call_kwargs = dict(kwargs)
            if accepts_store:
                call_kwargs["image_store"] = modality.image_store(sample)
            try:
                out = func(adata, **call_kwargs)
            except ExpkitError as exc:
                exc.add_note(f"while running {name} on {modality.name} sample {_label(sample)!r}"
                             + (f"; finished samples kept: {done}" if done else ""))
                raise
            except Exception as exc:
                raise ExpkitError(f"{name} failed on {modality.name} sample {_label(sample)!r}: "
                                  f"{type(exc).__name__}: {exc}"
                                  + (f" (finished samples kept: {done})" if done else "")) from exc
            if kind == "replace":
                modality._replace(sample, out)
            elif kind == "derive":  # a new sample of another modality, linked to this one (bins -> cells)
                modality._mark_changed(sample)
                out = modality._expm._add_derived(func.derived_modality, sample, modality.name, out)
            elif kind == "sample":
                modality._mark_changed(sample)
            results[_label(sample)] = out
            done.append(_label(sample))
            advance(_label(sample))
    if len(targets) > 1:
        logger.debug("%s: ran on %d samples of %s", name, len(targets), modality.name)
    return results


def method_names(modality: str) -> list[str]:
    return sorted(n for n, (_, mods, _) in METHODS.items() if mods is None or modality in mods)


def bound_method(modality: "Modality", name: str) -> Callable:
    """The registered plain function lifted onto ``modality``: ``method(run_on_samples=True, **kwargs)``."""
    target, mods, kind = METHODS[name]
    if mods is not None and modality.name not in mods:
        raise AttributeError(f"{name} is not available for modality {modality.name!r} (only {list(mods)})")
    module_name, func_name = target.split(":")
    func = getattr(import_module(module_name), func_name)

    if kind == "table":  # works on a table made by another method (e.g. statistics over samples): no samples
        @functools.wraps(func)
        def on_table(table, **kwargs):
            return func(table, **kwargs)

        on_table.__doc__ = (f"``{name}(table, **kwargs)``: :func:`{module_name}.{func_name}` on a table made by "
                            f"another method of this modality.\n\n" + (func.__doc__ or ""))
        return on_table

    @functools.wraps(func)
    def method(run_on_samples=True, **kwargs):
        return run(modality, func, run_on_samples, kind=kind, name=name, **kwargs)

    method.__doc__ = (f"``{name}(run_on_samples=True, **kwargs)``: runs :func:`{module_name}.{func_name}` over "
                      f"samples (None = integrated data, True = all, a name or a list) and returns "
                      f"{{sample: result}}.\n\n" + (func.__doc__ or ""))
    return method
