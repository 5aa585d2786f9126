"""The one mechanism that runs a plain function over the samples of a modality.

Nothing else in the package loops over samples.
"""
from __future__ import annotations

import functools
import inspect
import time
from importlib import import_module
from typing import TYPE_CHECKING, Any, Callable

from .._logging import logger, progress
from ..errors import ExpkitError, InputError, SampleNotFoundError
from . import executors
from . import provenance as prov
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
        name: str | None = None, resume: bool = False, **kwargs) -> Any:
    """Run ``func`` over the selected samples of ``modality`` and return ``{sample: result}``.

    kind "sample": ``func(adata, **kwargs)`` per sample, the sample marked changed; "read": the same, nothing
    marked; "replace": ``func`` returns a new AnnData that replaces the sample; "joint": ``func({sample:
    adata}, **kwargs)`` once over all selected samples (marked changed), its return value passed through;
    "joint-read": the same, nothing marked; "derive": ``func`` returns a new AnnData that becomes the same-named
    sample of the modality ``func.derived_modality`` (linked to its source in the table's ``derived_from``).
    The integrated data is keyed ``"integrated"``. If a sample fails, the results of the samples before it stay in
    place (in memory, saved by ``save()``); the error says which sample failed.

    Every call is logged (:mod:`expkit.experiment.provenance`; ``expm.history()``). ``resume=True`` skips the
    samples that already have this method's results with the same parameters. Inside ``ek.executor(...)``
    per-sample calls run on its workers (:mod:`expkit.experiment.executors`). Per-sample kinds load the samples
    one at a time; with ``ek.settings.max_loaded`` set, clean samples beyond it are unloaded as the loop goes
    (and changed ones saved first when ``ek.settings.autosave`` is True).
    """
    if kind not in KINDS:
        raise InputError(f"unknown method kind {kind!r}; one of {KINDS}")
    name = name or getattr(func, "__name__", "method")
    targets = resolve_samples(run_on_samples, modality.samples, modality=modality.name)
    if kind == "derive" and None in targets:
        raise InputError(f"{name} makes new samples from samples: run it on samples (True or names), "
                         f"not on the integrated data")
    params = prov.resolved(func, kwargs)
    if resume:
        skip = prov.done_samples(modality._expm, modality.name, name, prov.fingerprint(params), targets)
        if skip:
            logger.info("%s: resume: skipping %d sample(s) with results of the same parameters: %s", name,
                        len(skip), sorted(skip))
        targets = [t for t in targets if t not in skip]
        if not targets:
            return {}
    call = _Call(modality, func, name, kind, targets, kwargs, params)
    try:
        result = call.joint() if kind in ("joint", "joint-read") else call.per_sample()
    except BaseException as exc:
        call.record(f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        raise
    call.record("ok")
    return result


class _Call:
    """One method call over samples: runs it and writes its history entry."""

    def __init__(self, modality, func, name, kind, targets, kwargs, params):
        self.modality, self.func, self.name, self.kind = modality, func, name, kind
        self.targets, self.kwargs, self.params = targets, kwargs, params
        self.accepts_store = "image_store" in inspect.signature(func).parameters and "image_store" not in kwargs
        self.keys: dict[str, list[str]] = {}
        self.t0 = time.perf_counter()
        self.executor = "serial"

    def record(self, status: str) -> None:
        if self.kind in ("read", "joint-read"):
            return  # reading changes nothing: not part of the provenance
        self.modality._expm._record(prov.entry(
            name=self.name, kind=self.kind, modality=self.modality.name, samples=self.targets, given=self.kwargs,
            params=self.params, seconds=time.perf_counter() - self.t0, status=status, keys=self.keys,
            executor=self.executor))

    def joint(self):
        m, targets, kwargs = self.modality, self.targets, dict(self.kwargs)
        adatas = m._load_many(targets)
        before = {_label(s): prov.snapshot(a) for s, a in zip(targets, adatas)}
        data = {_label(s): a for s, a in zip(targets, adatas)}
        if self.accepts_store:
            kwargs["image_store"] = {_label(s): m.image_store(s) for s in targets}
        # a joint method that also writes to the integrated data gets it when it exists
        integrated = None
        if (self.kind == "joint" and None not in targets and "integrated" not in kwargs
                and "integrated" in inspect.signature(self.func).parameters):
            integrated = m._integrated_or_none()
            if integrated is not None:
                kwargs["integrated"] = integrated
        result = self.func(data, **kwargs)
        if self.kind == "joint":
            for s in targets + ([None] if integrated is not None else []):
                m._mark_changed(s)
            self.keys = {k: prov.changed_keys(before[k], a) for k, a in data.items()}
        return result

    def per_sample(self):
        pool = executors.current()
        remote = [] if pool is None or self.kind != "sample" else self._remote_targets()
        results: dict[str, Any] = {}
        if remote:
            self.executor = pool.kind
            results.update(self._run_remote(pool, remote))
        local = [s for s in self.targets if s not in remote]
        done: list[str] = list(results)
        with progress(len(local), f"{self.modality.name}.{self.name}") as advance:
            for sample in local:
                results[_label(sample)] = self._run_local(sample, done)
                done.append(_label(sample))
                advance(_label(sample))
                self.modality._expm._evict(self.modality.name, keep=sample)
        return {_label(s): results[_label(s)] for s in self.targets}

    def _run_local(self, sample, done):
        m = self.modality
        adata = m._load_many([sample])[0]
        before = prov.snapshot(adata)
        kwargs = dict(self.kwargs)
        if self.accepts_store:
            kwargs["image_store"] = m.image_store(sample)
        try:
            out = self.func(adata, **kwargs)
        except ExpkitError as exc:
            exc.add_note(f"while running {self.name} on {m.name} sample {_label(sample)!r}"
                         + (f"; finished samples kept: {done}" if done else ""))
            raise
        except Exception as exc:
            raise ExpkitError(f"{self.name} failed on {m.name} sample {_label(sample)!r}: {type(exc).__name__}: "
                              f"{exc}" + (f" (finished samples kept: {done})" if done else "")) from exc
        if self.kind == "replace":
            m._replace(sample, out)
        elif self.kind == "derive":  # a new sample of another modality, linked to this one (bins -> cells)
            m._mark_changed(sample)
            out = m._expm._add_derived(self.func.derived_modality, sample, m.name, out)
        elif self.kind == "sample":
            m._mark_changed(sample)
        if self.kind != "read":
            self.keys[_label(sample)] = prov.changed_keys(before, adata)
        return out

    def _remote_targets(self) -> list:
        """Samples a worker can read from the folder: saved, unchanged since, and a function importable by name."""
        expm = self.modality._expm
        if executors.target_of(self.func) is None:
            return []
        return [s for s in self.targets if s is not None and (self.modality.name, s) not in expm._changed
                and expm._sample_path(self.modality.name, s) is not None]

    def _run_remote(self, pool, samples) -> dict:
        m, expm = self.modality, self.modality._expm
        target = executors.target_of(self.func)
        paths = {s: str(expm._sample_path(m.name, s)) for s in samples}
        stores = {s: (str(m.image_store(s).path) if self.accepts_store and m.image_store(s) is not None else None)
                  for s in samples}

        def submit(s):
            return pool.submit(executors.remote_call, paths[s], target, self.kwargs, stores[s],
                               f"sample {s!r} ({m.name})")

        futures = {s: submit(s) for s in samples}
        results, failed = {}, {}
        with progress(len(samples), f"{m.name}.{self.name} ({pool.kind})") as advance:
            for s in samples:
                try:  # popped: a worker frees a result once the driver holds no reference to it
                    out, delta = _result(futures.pop(s), lambda s=s: submit(s))
                except Exception as exc:  # reported after the others
                    failed[s] = f"{type(exc).__name__}: {exc}"
                    continue
                adata = m._load_many([s])[0]
                before = prov.snapshot(adata)
                executors.apply_delta(adata, delta)
                m._mark_changed(s)
                keys = set(prov.changed_keys(before, adata))
                keys |= {f"{slot}:{c}" for slot in ("obs", "var") for c in delta[slot].columns}
                self.keys[s] = sorted(keys)
                results[s] = out
                advance(s)
                expm._evict(m.name, keep=s)
        if failed:
            raise ExpkitError(f"{self.name} failed on {m.name} sample(s) {sorted(failed)} after a retry (finished "
                              f"samples kept: {sorted(results)}): " + "; ".join(f"{s}: {e}" for s, e in failed.items()))
        return results


def _result(future, resubmit):
    """A task's result, retried once when the task fails."""
    try:
        return future.result()
    except Exception:
        logger.warning("a task failed; retrying it once")
        return resubmit().result()


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
