"""The Experiment: a sample table, per-sample AnnData objects by modality, an integrated MuData, a folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
import numpy as np
import pandas as pd

from .. import __version__
from .._logging import logger, progress
from .._settings import settings
from ..errors import ExpkitError, FormatError, InputError, SampleNotFoundError
from . import saving, store
from .modality import Modality
from .summary import as_html, format_keys, merge_keys, size_text, summarize
from .table import (MODALITIES, REQUIRED, SPATIAL_MODALITIES, accessor_name, read_table, resolve_location,
                    validate_table)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

OBS_COLUMNS = ("sample", "batch", "group", "modality", "taxa")


class Experiment:
    """Samples of one or more modalities stored in a folder.

    Create one with :func:`create_experiment`, open one with :func:`load_experiment`. Modalities are
    attributes (``expm.spatial_bin``, ``expm.rna``); ``expm.samples`` is the sample table.
    """

    def __init__(self, path: str | Path, table: pd.DataFrame, manifest: dict | None = None):
        self.path = Path(path)
        self._table = validate_table(table)
        self._manifest = manifest or _new_manifest()
        self._adatas: dict[tuple[str, str], "AnnData"] = {}
        self._changed: set[tuple[str, str]] = set()
        self._integrated = None
        self._integrated_changed = False
        self._stores: dict[tuple[str, str], object] = {}
        self._history: list[dict] = []  # method calls since the last save (written with it)

    # ---------------------------------------------------------------------------------------- table & access
    @property
    def samples(self) -> pd.DataFrame:
        """The sample table (a copy: change it with ``add_sample`` / ``remove_sample``)."""
        return self._table.copy()

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if (self._table["modality"] == m).any()]

    def __getattr__(self, name: str) -> Modality:
        if name.startswith("_"):
            raise AttributeError(name)
        for modality in self.modalities:
            if accessor_name(modality) == name:
                return Modality(self, modality)
        raise AttributeError(f"experiment has no modality or attribute {name!r}; modalities: "
                             f"{[accessor_name(m) for m in self.modalities]}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | {accessor_name(m) for m in self.modalities})

    def __getitem__(self, modality: str) -> Modality:
        if modality not in self.modalities:
            raise KeyError(f"no modality {modality!r}; modalities: {self.modalities}")
        return Modality(self, modality)

    def _row(self, modality: str, sample: str) -> pd.Series:
        rows = self._table[(self._table["modality"] == modality) & (self._table["sample"] == sample)]
        if rows.empty:
            available = self._table.loc[self._table["modality"] == modality, "sample"].tolist()
            raise SampleNotFoundError(f"unknown sample {sample!r} in modality {modality!r}; available: {available}")
        return rows.iloc[0]

    def _load(self, modality: str, sample: str) -> "AnnData":
        key = (modality, sample)
        if key not in self._adatas:
            self._row(modality, sample)
            entry = self._manifest["modalities"].get(modality, {}).get(sample)
            if entry is None:
                raise FormatError(f"sample {sample!r} ({modality}) is in the table but not in the manifest of "
                                  f"{str(self.path)!r}")
            self._adatas[key] = store.read_h5ad(self.path / entry["file"], what=f"sample {sample!r} ({modality})")
        return self._adatas[key]

    def _load_many(self, modality: str, samples: list[str | None]) -> list["AnnData"]:
        todo = [s for s in samples if s is not None and (modality, s) not in self._adatas]
        if len(todo) > 1:
            with progress(len(todo), f"loading {modality}") as advance:
                for s in todo:
                    self._load(modality, s)
                    advance(s)
        return [self._integrated_modality(modality) if s is None else self._load(modality, s) for s in samples]

    def _sample_path(self, modality: str, sample: str) -> Path | None:
        """The sample's file in the folder, when it has been saved."""
        entry = self._manifest.get("modalities", {}).get(modality, {}).get(sample)
        path = self.path / entry["file"] if entry and entry.get("file") else None
        return path if path is not None and path.is_file() else None

    def _evict(self, modality: str, keep: str | None = None) -> None:
        """Keep at most ``settings.max_loaded`` samples of ``modality`` in memory: unload the oldest clean ones
        (saving changed ones first when ``settings.autosave``)."""
        limit = settings.max_loaded
        loaded = [k for k in self._adatas if k[0] == modality and k[1] != keep]
        if limit is None or len(loaded) + 1 <= limit:
            return
        dirty = [k for k in loaded if k in self._changed]
        if dirty and settings.autosave and len(loaded) - len(dirty) + 1 <= limit:
            self.save()
        excess = len(loaded) + 1 - limit
        for key in [k for k in loaded if k not in self._changed][:excess]:
            del self._adatas[key]
        if len(self._adatas) > limit and not settings.autosave:
            logger.warning("%d changed samples are in memory (settings.max_loaded = %d): save() them, or set "
                           "ek.settings.autosave = True to let long loops save as they go", len(self._changed), limit)

    def unload(self, modality: str | None = None) -> int:
        """Drop the unchanged samples (of ``modality``, or all) from memory; they load again on access.
        Returns how many were dropped (changed ones stay until ``save()``)."""
        keys = [k for k in self._adatas if (modality is None or k[0] == modality) and k not in self._changed]
        for k in keys:
            del self._adatas[k]
        return len(keys)

    def _mark_changed(self, modality: str, sample: str | None) -> None:
        if sample is None:
            self._integrated_changed = True
        else:
            self._changed.add((modality, sample))

    def _set(self, modality: str, sample: str | None, adata: "AnnData") -> None:
        if sample is None:
            self.integrated.mod[modality] = adata
            self._integrated.update()
            self._integrated_changed = True
        else:
            self._adatas[(modality, sample)] = adata
            self._changed.add((modality, sample))

    def _summaries(self, modality: str) -> dict[str, dict]:
        out = {}
        for sample in self._table.loc[self._table["modality"] == modality, "sample"]:
            key = (modality, sample)
            if key in self._adatas:
                out[sample] = summarize(self._adatas[key])
            else:
                out[sample] = self._manifest["modalities"].get(modality, {}).get(sample, {}).get("summary", {})
        return out

    def _image_store(self, modality: str, sample: str | None):
        if sample is None:
            return None
        entry = self._manifest["modalities"].get(modality, {}).get(sample, {})
        if not entry.get("images"):
            source = self._derived_from(modality, sample)  # a derived sample shares its source's images
            return self._image_store(*source) if source is not None else None
        key = (modality, sample)
        if key not in self._stores:
            from ..io.images import ImageStore

            self._stores[key] = ImageStore(self.path / entry["images"])
        return self._stores[key]

    # ------------------------------------------------------------------------------------------ integrated
    @property
    def integrated(self):
        """The integrated MuData (one AnnData per modality), read on first access; build it with ``merge()``."""
        if self._integrated is None:
            if not self._manifest.get("integrated"):
                raise FormatError("this experiment has no integrated data yet: run expm.merge() first")
            self._integrated = store.read_h5mu(self.path / self._manifest["integrated"]["file"])
        return self._integrated

    def _integrated_modality(self, modality: str) -> "AnnData":
        mdata = self.integrated
        if modality not in mdata.mod:
            raise FormatError(f"the integrated data has no modality {modality!r} (has {list(mdata.mod)}): "
                              f"run expm.merge()")
        return mdata.mod[modality]

    def merge(self, *, join: str = "inner", modalities: list[str] | None = None) -> "object":
        """Build (or rebuild) the integrated MuData from every sample.

        ``join="inner"`` keeps the genes every sample has, ``"outer"`` all genes (absent ones as zeros).
        Observation names stay ``<sample>:<barcode>`` (unique across samples); per-sample images and
        scalefactors stay under ``uns['spatial'][sample]``; ``obsm['spatial']`` keeps each sample's own
        coordinates (graphs are never built across samples: use a ``library_key="sample"``).
        """
        import anndata as ad
        import mudata as md

        md.set_options(pull_on_update=False)
        if join not in ("inner", "outer"):
            raise InputError(f"join must be 'inner' or 'outer', not {join!r}")
        mods = modalities or self.modalities
        parts = {}
        for modality in mods:
            samples = self._table.loc[self._table["modality"] == modality, "sample"].tolist()
            adatas = self._load_many(modality, samples)
            merged = ad.concat(adatas, join=join, merge="first", uns_merge=None, fill_value=0)
            var_frames = [a.var for a in adatas]
            annot = pd.concat(var_frames, axis=0)
            annot = annot[~annot.index.duplicated(keep="first")].reindex(merged.var_names)
            merged.var = annot
            spatial = {}
            for a in adatas:
                spatial.update(a.uns.get("spatial", {}))
            if spatial:
                merged.uns["spatial"] = spatial
            units = {s: str(a.uns.get("spatial.unit", "unknown")) for s, a in zip(samples, adatas)
                     if "spatial" in a.obsm}
            if units:
                merged.uns["spatial.unit"] = units
                if len(set(units.values())) > 1:
                    logger.warning("merged %s: samples have coordinates in different units %s; obsm['spatial'] "
                                   "is per sample (never compare coordinates across samples)", modality, units)
            for col in OBS_COLUMNS:
                if col in merged.obs:
                    merged.obs[col] = pd.Categorical(merged.obs[col].astype(str))
            merged.uns["merge"] = {"join": join, "samples": samples, "expkit_version": __version__}
            parts[modality] = merged
            logger.info("merged %s: %d samples -> %d obs x %d vars (%s join)", modality, len(samples),
                        merged.n_obs, merged.n_vars, join)
        self._integrated = md.MuData(parts)
        self._integrated_changed = True
        return self._integrated

    # --------------------------------------------------------------------------------------- add / remove
    def add_sample(self, sample: str, modality: str, location: str | Path | None = None, *,
                   adata: "AnnData | None" = None, batch: str | None = None, group: str = "",
                   taxa: str = "hsa", reader: str | None = None, select: str | None = None,
                   allow_outside: bool = True, **extra) -> "AnnData":
        """Add one sample read from ``location`` (or given as ``adata``); it is written at the next ``save()``."""
        row = {"sample": sample, "modality": modality, "batch": batch if batch is not None else sample,
               "group": group, "taxa": taxa, "location": "" if location is None else str(location),
               **({"reader": reader} if reader else {}), **({"select": select} if select else {}),
               **{k: str(v) for k, v in extra.items()}}
        new_table = validate_table(pd.concat([self._table, pd.DataFrame([row])], ignore_index=True).fillna(""),
                                   source=f"add_sample({sample!r})")
        if adata is None:
            path = resolve_location(row["location"], Path.cwd(), sample=sample, allow_outside=allow_outside)
            adata = _read_sample(pd.Series(row), path)
        else:
            adata = _prepare(adata.copy(), pd.Series(row))
        self._table = new_table
        self._adatas[(modality, sample)] = adata
        self._changed.add((modality, sample))
        return adata

    def _add_derived(self, modality: str, sample: str, source_modality: str, adata: "AnnData") -> "AnnData":
        """Add (or replace) sample ``sample`` of ``modality`` made by a method from the same-named sample of
        ``source_modality`` (e.g. cells from Visium HD bins). The table links it (``derived_from``); its images
        are the source sample's (shared, never copied); ``adata`` is taken as is (not copied)."""
        link = f"{source_modality}:{sample}"
        rows = self._table[(self._table["modality"] == modality) & (self._table["sample"] == sample)]
        if not rows.empty:
            if rows.iloc[0].get("derived_from", "") != link:
                raise InputError(f"modality {modality!r} already has a sample {sample!r} that was not made from "
                                 f"{link}; remove it first (expm.remove_sample({sample!r}, {modality!r}))")
            self.remove_sample(sample, modality)
        src = self._row(source_modality, sample)
        row = {**{c: "" for c in self._table.columns}, "sample": sample, "modality": modality,
               "batch": src["batch"], "group": src["group"], "taxa": src["taxa"], "location": "",
               "derived_from": link}
        new_table = validate_table(pd.concat([self._table, pd.DataFrame([row])], ignore_index=True).fillna(""),
                                   source=f"derived sample {sample!r} ({modality})")
        adata = _prepare(adata, pd.Series(row))
        self._table = new_table
        self._adatas[(modality, sample)] = adata
        self._changed.add((modality, sample))
        return adata

    def _derived_from(self, modality: str, sample: str) -> tuple[str, str] | None:
        """(modality, sample) a derived sample was made from, or None."""
        rows = self._table[(self._table["modality"] == modality) & (self._table["sample"] == sample)]
        link = str(rows.iloc[0].get("derived_from", "")) if not rows.empty else ""
        if ":" not in link:
            return None
        src_mod, src_sample = link.split(":", 1)
        return src_mod, src_sample

    def remove_sample(self, sample: str, modality: str | None = None) -> None:
        """Remove a sample (its files go at the next ``save()``; raw inputs are never touched)."""
        mask = self._table["sample"] == sample
        if modality is not None:
            mask &= self._table["modality"] == modality
        if not mask.any():
            raise SampleNotFoundError(f"unknown sample {sample!r}; available: {self._table['sample'].tolist()}")
        for mod in self._table.loc[mask, "modality"]:
            self._adatas.pop((mod, sample), None)
            self._changed.discard((mod, sample))
            self._stores.pop((mod, sample), None)
        self._table = self._table[~mask].reset_index(drop=True)

    # ---------------------------------------------------------------------------------------- provenance
    def _record(self, entry: dict) -> None:
        self._history.append(entry)

    def _history_pending(self) -> list[dict]:
        return list(self._history)

    def _history_saved(self) -> None:
        self._history.clear()

    def history(self, *, raw: bool = False):
        """Every method call on this experiment: the saved log (``history.jsonl``) and the calls since the last
        save (``saved`` False). A DataFrame (one row per call: time, method, modality, samples, params, seed,
        device, seconds, host, versions, status), or the list of dicts with ``raw=True``."""
        saved = [{**e, "saved": True} for e in saving.read_history(self.path)]
        entries = saved + [{**e, "saved": False} for e in self._history]
        if raw:
            return entries
        cols = ["time", "method", "modality", "samples", "params", "seed", "device", "seconds", "status", "host",
                "generation", "saved"]
        df = pd.DataFrame(entries)
        return df.reindex(columns=cols + [c for c in df.columns if c not in cols])

    # ----------------------------------------------------------------------------------------------- save
    def save(self, path: str | Path | None = None) -> Path:
        """Write what changed since the last save, as one atomic commit (:mod:`expkit.experiment.saving`:
        killed at any point, the folder is as it was before or as it is after; one writer at a time).

        Writes the samples you accessed or ran methods on, the integrated data when it changed, the table, the
        history of the method calls, and the manifest (the commit). ``path`` saves a full copy to a new folder.
        """
        if path is not None and Path(path).resolve() != self.path.resolve():
            return self._save_copy(Path(path))
        return saving.save(self)

    def _save_copy(self, path: Path) -> Path:
        if path.exists() and any(path.iterdir()):
            raise InputError(f"cannot save a copy to {str(path)!r}: the folder exists and is not empty")
        for modality in self.modalities:
            self._load_many(modality, self._table.loc[self._table["modality"] == modality, "sample"].tolist())
        if self._manifest.get("integrated") and self._integrated is None:
            _ = self.integrated
        copy = Experiment(path, self._table, _new_manifest())
        copy._adatas = dict(self._adatas)
        copy._changed = set(self._adatas)
        copy._integrated = self._integrated
        copy._integrated_changed = self._integrated is not None
        return copy.save()

    # ----------------------------------------------------------------------------------------- summaries
    def _text(self) -> str:
        m = self._manifest
        lines = [f"Experiment at {self.path}  ({len(self._table)} sample(s); folder format "
                 f"{m.get('format_version')}, expkit {m.get('expkit_version', __version__)})"]
        for modality in self.modalities:
            summaries = self._summaries(modality)
            lines.append(f"{modality}  (expm.{accessor_name(modality)})")
            lines += format_keys(merge_keys(list(summaries.values())), indent="    ")
        lines.append("samples:")
        width = max([len(s) for s in self._table["sample"]] + [6])
        for _, row in self._table.iterrows():
            summary = self._summaries(row["modality"]).get(row["sample"], {})
            size = size_text(summary) if summary else "not saved"
            lines.append(f"  {row['sample']:<{width}}  {row['modality']:<12} {row['taxa']:<4} "
                         f"batch={row['batch']:<10} {size}")
        integ = m.get("integrated")
        if self._integrated is not None:
            parts = ", ".join(f"{k} {a.n_obs} x {a.n_vars}" for k, a in self._integrated.mod.items())
            lines.append(f"integrated: {parts}" + (" (unsaved)" if self._integrated_changed else ""))
        elif integ:
            parts = ", ".join(f"{k} {size_text(s)}" for k, s in integ.get("summary", {}).items())
            lines.append(f"integrated: {parts}" + (" (stale: samples changed; run merge())" if integ.get("stale")
                                                    else ""))
        else:
            lines.append("integrated: none (run expm.merge())")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self._text()

    def _repr_html_(self) -> str:
        return as_html(self._text())


# ----------------------------------------------------------------------------------------------- building
def _new_manifest() -> dict:
    return {"format": store.FORMAT_NAME, "format_version": store.FORMAT_VERSION, "expkit_version": __version__,
            "created": store.now(), "modified": store.now(), "generation": 0, "modalities": {}, "integrated": None}


def _prepare(adata: "AnnData", row: pd.Series) -> "AnnData":
    """Attach the table's metadata, unique obs names, database genes and checks to a freshly read sample."""
    import scipy.sparse as sp

    sample, modality = row["sample"], row["modality"]
    if adata.n_obs == 0:
        raise InputError(f"sample {sample!r}: no observations were read")
    if "barcode" not in adata.obs:
        adata.obs["barcode"] = adata.obs_names.astype(str)
    for col in OBS_COLUMNS:
        adata.obs[col] = str(row[col])
    for col in row.index:
        if (col not in REQUIRED and col not in ("reader", "select") and not col.startswith("reader.")
                and col not in adata.obs):
            adata.obs[col] = str(row[col])
    adata.obs_names = [f"{sample}:{b}" for b in adata.obs["barcode"].astype(str)]
    if not adata.obs_names.is_unique:
        raise InputError(f"sample {sample!r}: duplicated barcodes in the input")
    if modality in SPATIAL_MODALITIES:
        if "spatial" not in adata.obsm:
            raise InputError(f"sample {sample!r}: a {modality} sample needs spatial coordinates (obsm['spatial'])")
        coords = np.asarray(adata.obsm["spatial"], dtype=float)
        bad = ~np.isfinite(coords).all(axis=1)
        if bad.any():
            raise InputError(f"sample {sample!r}: {int(bad.sum())} observation(s) have NaN/infinite coordinates "
                             f"(e.g. {adata.obs['barcode'].iloc[int(np.flatnonzero(bad)[0])]!r})")
    X = adata.X
    if X is None:
        raise InputError(f"sample {sample!r}: no count matrix")
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) or X.dtype != np.float32 else sp.csr_matrix(X)
    adata.X = X
    adata.layers["counts"] = X
    try:
        from .. import database
    except ImportError:  # pragma: no cover - the database ships with the package
        database = None
    if database is not None:
        database.annotate(adata, row["taxa"], sample=sample)
    for col in ("sample", "batch", "group", "modality", "taxa"):
        adata.obs[col] = pd.Categorical(adata.obs[col])
    return adata


def _option_value(text: str):
    """A reader option from a ``reader.<option>`` table column: a number where it reads as one, else text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(str(text).lower(), text)


def _read_sample(row: pd.Series, path: Path) -> "AnnData":
    from ..io import read_sample

    reader = row.get("reader") or None
    select = row.get("select") or None
    options = {c[len("reader."):]: _option_value(v) for c, v in row.items()
               if c.startswith("reader.") and str(v) != ""}
    adata = read_sample(path, modality=row["modality"], sample=row["sample"], reader=reader, select=select,
                        **options)
    return _prepare(adata, row)


def create_experiment(table: str | Path | pd.DataFrame, path: str | Path, *, overwrite: bool = False,
                      allow_outside: bool = True, base: str | Path | None = None) -> Experiment:
    """Build an experiment folder from a sample table and the raw inputs it points to.

    Parameters
    ----------
    table
        TSV/CSV file or DataFrame with columns ``sample, modality, batch, group, taxa, location`` (location: the
        raw input file or folder, relative to the table's folder or absolute; optional ``reader`` and ``select``
        columns; other columns are kept and copied to ``obs``).
    path
        The experiment folder to create. It must not exist (or be empty) unless ``overwrite``.
    allow_outside
        Whether relative locations may point outside the table's folder (``../data/...``).
    base
        Folder that relative locations are resolved against when ``table`` is a DataFrame (default: cwd).

    The raw inputs are only read. Nothing is written until every sample has been read, so a bad input leaves
    nothing on disk.
    """
    df, table_base = read_table(table)
    if base is not None:
        table_base = Path(base).resolve()
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise InputError(f"experiment folder {str(path)!r} exists and is not empty (overwrite=True replaces it)")
    locations = [resolve_location(str(r["location"]), table_base, sample=r["sample"], allow_outside=allow_outside)
                 for _, r in df.iterrows()]
    inside = [loc for loc in locations if path.resolve() == loc or path.resolve() in loc.parents]
    if inside:
        raise InputError(f"experiment folder {str(path)!r} would contain raw input {str(inside[0])!r}")
    expm = Experiment(path, df)
    with progress(len(df), "reading samples") as advance:
        for (_, row), loc in zip(df.iterrows(), locations):
            adata = _read_sample(row, loc)
            expm._adatas[(row["modality"], row["sample"])] = adata
            expm._changed.add((row["modality"], row["sample"]))
            logger.info("read %s sample %s: %d x %d", row["modality"], row["sample"], adata.n_obs, adata.n_vars)
            advance(row["sample"])
    if not (path.exists() and any(path.iterdir())):
        expm.save()
        return expm
    # overwrite: build the new folder beside the old one, then swap, so a failure keeps the old experiment
    if not (path / store.MANIFEST).is_file():
        raise InputError(f"refusing to overwrite {str(path)!r}: it is not an expkit experiment folder")
    fresh = path.with_name(f".{path.name}.new")
    old = path.with_name(f".{path.name}.old")
    store.remove_quietly(fresh)
    expm.path = fresh
    expm.save()
    os.replace(path, old)
    os.replace(fresh, path)
    store.remove_quietly(old)
    expm.path = path
    return expm


def load_experiment(path: str | Path) -> Experiment:
    """Open an experiment folder. Only the manifest and the sample table are read; samples load on access."""
    path = Path(path)
    manifest = store.read_manifest(path)
    if isinstance(manifest.get("table"), list):  # format 3: the table is committed with the manifest
        table = pd.DataFrame(manifest["table"]).astype(str)
    else:
        table_path = path / store.TABLE
        if not table_path.is_file():
            raise FormatError(f"{str(path)!r}: the sample table {store.TABLE} is missing")
        try:
            table = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
        except Exception as exc:
            raise FormatError(f"{str(table_path)!r} cannot be read: {exc}") from exc
    try:
        saving.repair_history(path, manifest)
    except OSError as exc:  # a read-only copy of a folder: the log is repaired by the next save
        logger.debug("history of %s not repaired: %s", path, exc)
    stale = store.leftover_temporaries(path)
    if stale:
        logger.warning("%s holds %d temporary file(s) of an interrupted save (%s...); they are not part of the "
                       "experiment, and the next save() removes those older than an hour",
                       path, len(stale), stale[0].relative_to(path))
    return Experiment(path, table, manifest)


__all__ = ["Experiment", "create_experiment", "load_experiment", "ExpkitError"]
