"""Gene look-ups against expkit's gene database (Ensembl 98, built by ``database/build.py``).

Genes are identified by a **uid**: the Ensembl gene id without version (``ENSG00000141510``,
``ENSMUSG00000059552``), stable across releases and unique across taxa. Supported taxa: ``"hsa"``
(human, GRCh38) and ``"mmu"`` (mouse, GRCm38). Tables are read on first use and cached per taxon.

Look-up rules (:func:`lookup`), first match wins:

1. a uid, or an Ensembl id with a version suffix (``ENSG00000141510.16``);
2. the current Ensembl 98 symbol, exactly; a symbol shared by several genes resolves to the
   protein-coding gene, then one on a full chromosome (not a scaffold), then the lowest uid;
3. the symbol case-insensitively (``Tp53`` -> ``TP53``, ``TRP53`` -> ``Trp53``), only where all case
   variants resolve to one gene;
4. (human) an HGNC synonym, exactly, then case-insensitively where unambiguous: a newer HGNC symbol
   (``hgnc``), then a ``previous`` symbol, then an ``alias``; among genes of the same rank the
   protein-coding one, then the lowest uid.

This module imports neither torch nor matplotlib.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ._logging import logger
from .errors import FormatError, InputError, KeyNotFoundError

__all__ = ["TAXA", "RELEASE", "genes", "lookup", "annotate", "symbols_to_uids", "homologs",
           "database_dir"]

TAXA = ("hsa", "mmu")
RELEASE = "Ensembl 98"
KEY = "db"  # prefix of the var columns and the uns entry written by annotate()
ANNOTATION_COLUMNS = ["chromosome", "start", "end", "strand", "biotype", "mito", "ribo"]
_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{11})\.\d+(?:_PAR_Y)?$")
_CHROMOSOME = r"\d+|X|Y|MT"
_ALIAS_RANK = {"hgnc": 0, "previous": 1, "alias": 2}


# --------------------------------------------------------------------------- data location / load
def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    paths = []
    if os.environ.get("EXPKIT_DATABASE"):
        paths.append(Path(os.environ["EXPKIT_DATABASE"]))
    # installed package: expkit/database_files, a committed symlink to ../database that setuptools
    # follows when building the sdist/wheel (package-data "database_files/**/*")
    paths.append(here / "database_files")
    paths.append(here.parent / "database")  # source or editable checkout (or a checkout without symlinks)
    return paths


def database_dir() -> Path:
    """The folder holding ``<taxa>/genes.tsv.gz``.

    Tried in order: ``$EXPKIT_DATABASE``, ``expkit/database_files`` (installed package; in a
    checkout a symlink to ``database/``) and ``<checkout>/database`` (source or editable checkout).
    The first holding ``hsa/genes.tsv.gz`` is returned, resolved.

    Raises
    ------
    FormatError
        When none of them holds the tables.
    """
    tried = _candidates()
    for path in tried:
        if (path / "hsa" / "genes.tsv.gz").is_file():
            return path.resolve()
    raise FormatError("gene database not found; looked in " + ", ".join(str(p) for p in tried)
                      + " (run `python database/build.py`)")


def _check_taxa(taxa: str) -> str:
    if not isinstance(taxa, str) or taxa not in TAXA:
        raise InputError(f"unknown taxa {taxa!r}; valid taxa: {', '.join(TAXA)}")
    return taxa


def _read_tsv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FormatError(f"gene database file missing: {path}")
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[])


def _resolve(keys: pd.Series, uids: pd.Series, rank: pd.DataFrame) -> pd.Series:
    """key -> one uid, choosing by the columns of ``rank`` (ascending), then by uid."""
    df = pd.concat([keys.rename("_key").reset_index(drop=True), uids.rename("_uid").reset_index(drop=True),
                    rank.reset_index(drop=True)], axis=1)
    dup = df["_key"].duplicated(keep=False).to_numpy()
    ties = df[dup].sort_values(["_key", *rank.columns, "_uid"], kind="mergesort")
    df = pd.concat([df[~dup], ties.drop_duplicates("_key", keep="first")])
    return pd.Series(df["_uid"].to_numpy(), index=pd.Index(df["_key"].to_numpy()))


def _unambiguous_upper(resolved: pd.Series) -> pd.Series:
    """upper(key) -> uid, only where every case variant of the key resolves to the same uid."""
    if not len(resolved):
        return resolved
    df = pd.DataFrame({"up": resolved.index.str.upper(), "uid": resolved.to_numpy()})
    dup = df["up"].duplicated(keep=False).to_numpy()
    ties = df[dup]
    n = ties.groupby("up")["uid"].nunique()
    df = pd.concat([df[~dup], ties[ties["up"].isin(n.index[n == 1])].drop_duplicates("up")])
    return pd.Series(df["uid"].to_numpy(), index=pd.Index(df["up"].to_numpy()))


class _Tables:
    """One taxon's tables and look-up maps (built once, cached)."""

    def __init__(self, taxa: str):
        root = database_dir()
        raw = _read_tsv(root / taxa / "genes.tsv.gz")
        g = pd.DataFrame({
            "ensembl": raw["uid"].to_numpy(),
            "gene": raw["gene"].to_numpy(),
            "chromosome": raw["chromosome"].to_numpy(),
            "start": raw["start"].astype("int64").to_numpy(),
            "end": raw["end"].astype("int64").to_numpy(),
            "strand": raw["strand"].astype("int8").to_numpy(),
            "biotype": raw["biotype"].to_numpy(),
            "assembly": raw["assembly"].to_numpy(),
            "description": raw["description"].to_numpy(),
            "mito": raw["mito"].astype("int8").astype(bool).to_numpy(),
            "ribo": raw["ribo"].astype("int8").astype(bool).to_numpy(),
        }, index=pd.Index(raw["uid"].to_numpy(), name="uid"))
        self.genes = g
        rank = pd.DataFrame({
            "_nonpc": (g["biotype"] != "protein_coding").to_numpy(),
            "_scaffold": (~g["chromosome"].str.fullmatch(_CHROMOSOME)).to_numpy(),
        })
        self.symbol = _resolve(g["gene"], pd.Series(g.index), rank)
        self.symbol_ci = _unambiguous_upper(self.symbol)
        alias_path = root / taxa / "aliases.tsv.gz"
        if alias_path.is_file():
            al = _read_tsv(alias_path)
            al = al[al["uid"].isin(g.index)]
            arank = pd.DataFrame({
                "_type": al["type"].map(_ALIAS_RANK).fillna(9).to_numpy(),
                "_nonpc": (g["biotype"].reindex(al["uid"]) != "protein_coding").to_numpy(),
            })
            self.alias = _resolve(al["alias"], al["uid"], arank)
        else:
            self.alias = pd.Series([], dtype=object, index=pd.Index([], dtype=object))
        self.alias_ci = _unambiguous_upper(self.alias)


@lru_cache(maxsize=None)
def _tables(taxa: str) -> _Tables:
    return _Tables(taxa)


@lru_cache(maxsize=None)
def _homolog_pairs() -> pd.DataFrame:
    return _read_tsv(database_dir() / "mmu" / "homologs.tsv.gz")


# --------------------------------------------------------------------------- public API
def genes(taxa: str) -> pd.DataFrame:
    """The gene table of one taxon.

    Parameters
    ----------
    taxa
        ``"hsa"`` or ``"mmu"``.

    Returns
    -------
    pandas.DataFrame
        A copy, indexed by uid, with columns ``ensembl, gene, chromosome, start, end, strand,
        biotype, assembly, description, mito, ribo`` (``mito``/``ribo`` boolean).

    Raises
    ------
    InputError
        For an unknown taxa.
    """
    return _tables(_check_taxa(taxa)).genes.copy()


def lookup(names: str | Iterable[str], taxa: str) -> np.ndarray:
    """The uid of each name, ``None`` where it is unknown.

    Parameters
    ----------
    names
        Uids, Ensembl ids with or without version, symbols or (human) HGNC synonyms; a single string
        is treated as a list of one.
    taxa
        ``"hsa"`` or ``"mmu"``.

    Returns
    -------
    numpy.ndarray
        Object array of uids (``str``) or ``None``, one per name, in order. The rules are listed in the
        module docstring.

    Raises
    ------
    InputError
        For an unknown taxa.
    """
    t = _tables(_check_taxa(taxa))
    if isinstance(names, str):
        names = [names]
    s = pd.Series(list(names), dtype=object)
    valid = s.notna()
    s = s.where(valid, "").astype(str)
    valid &= s != ""
    index = t.genes.index
    out = np.where(s.isin(index).to_numpy(), s.to_numpy(dtype=object), None)
    todo = valid.to_numpy() & pd.isna(out)
    if todo.any():
        unversioned = s[todo].str.replace(_ENSEMBL_VERSIONED, r"\1", regex=True)
        hit = unversioned.isin(index).to_numpy()
        out[np.flatnonzero(todo)[hit]] = unversioned.to_numpy(dtype=object)[hit]
    for table, case in ((t.symbol, False), (t.symbol_ci, True), (t.alias, False), (t.alias_ci, True)):
        todo = valid.to_numpy() & pd.isna(out)
        if not todo.any() or not len(table):
            continue
        key = s[todo]
        if case:
            key = key.str.upper()
        found = key.map(table).to_numpy(dtype=object)
        hit = ~pd.isna(found)
        out[np.flatnonzero(todo)[hit]] = found[hit]
    return out


def _make_unique(names: pd.Series) -> pd.Series:
    """Keep first occurrences; rename each repeat to the first free ``<name>.1``, ``<name>.2`` ...
    in order of appearance (a Python loop over the repeats only)."""
    names = names.astype(str).reset_index(drop=True)
    repeats = np.flatnonzero(names.duplicated().to_numpy())
    if not len(repeats):
        return names
    out = names.to_numpy(dtype=object).copy()
    taken = set(names.to_numpy())
    counter: dict[str, int] = {}
    for i in repeats:
        base = out[i]
        k = counter.get(base, 0) + 1
        while f"{base}.{k}" in taken:
            k += 1
        counter[base] = k
        out[i] = f"{base}.{k}"
        taken.add(out[i])
    return pd.Series(out, dtype=object)


def annotate(adata, taxa: str, *, sample: str | None = None) -> dict:
    """Map the features of one sample to the gene database, in place.

    The query per feature is ``var['gene_ids']`` when present (Cell Ranger ids), else the var name;
    a feature whose id does not map is tried once more by its var name (e.g. a symbol).

    After the call ``var_names`` are the uids of mapped features and the original names of unmapped
    ones (they are kept, never dropped). Names that repeat (several features mapping to one uid, or an
    unmapped name equal to another) are made unique in order of appearance: the first keeps the name,
    each next one gets the first free suffix ``.1``, ``.2`` ... (names already present are never
    renamed to make room). ``var`` gets ``gene`` (symbol; the original name for unmapped
    features), ``chromosome``, ``start``, ``end``, ``strand``, ``biotype``, ``mito``, ``ribo``,
    ``db.mapped`` and ``db.feature`` (the original var name, kept from a previous call); existing
    columns are kept. Annotating twice gives the same var names.
    ``uns['db']`` records the parameters and counts. One log line reports the mapping rate.

    Parameters
    ----------
    adata
        An AnnData (one sample).
    taxa
        ``"hsa"`` or ``"mmu"``.
    sample
        The sample name used in the log line (default: the single value of ``obs['sample']``).

    Returns
    -------
    dict
        ``n_features``, ``n_mapped``, ``n_unmapped``, ``n_duplicated`` (features renamed with a
        suffix), ``taxa``, ``release``.
    """
    from . import __version__

    taxa = _check_taxa(taxa)
    t = _tables(taxa)
    var = adata.var
    original = pd.Series(var.index.astype(str), dtype=object)
    query = original
    if "gene_ids" in var.columns:
        ids = pd.Series(var["gene_ids"].to_numpy(), dtype=object)
        ok = ids.notna() & (ids.astype(str) != "")
        query = ids.where(ok, original).astype(str)
    uids = pd.Series(lookup(query.tolist(), taxa), dtype=object)
    retry = uids.isna() & (query != original)
    if retry.any():
        uids[retry] = lookup(original[retry].tolist(), taxa)
    mapped = uids.notna().to_numpy()
    names = _make_unique(uids.where(uids.notna(), original))
    n_dup = int((names != uids.where(uids.notna(), original)).sum())

    g = t.genes.reindex(uids.where(uids.notna(), "").to_numpy())
    new = pd.DataFrame(index=pd.Index(names.to_numpy(), name=None))
    new["gene"] = np.where(mapped, g["gene"].to_numpy(dtype=object), original.to_numpy())
    new["chromosome"] = pd.Categorical(g["chromosome"].to_numpy())
    new["start"] = pd.array(g["start"].to_numpy(), dtype="Int64")
    new["end"] = pd.array(g["end"].to_numpy(), dtype="Int64")
    new["strand"] = pd.array(g["strand"].to_numpy(), dtype="Int8")
    new["biotype"] = pd.Categorical(g["biotype"].to_numpy())
    new["mito"] = g["mito"].eq(True).to_numpy(dtype=bool)
    new["ribo"] = g["ribo"].eq(True).to_numpy(dtype=bool)
    new[f"{KEY}.mapped"] = mapped
    if f"{KEY}.feature" in var.columns:  # annotated before: keep the first original names
        new[f"{KEY}.feature"] = var[f"{KEY}.feature"].astype(str).to_numpy()
    else:
        new[f"{KEY}.feature"] = original.to_numpy()
    keep = [c for c in var.columns if c not in new.columns]
    adata.var = pd.concat([var[keep].set_axis(new.index, axis=0), new], axis=1)

    n = len(names)
    n_mapped = int(mapped.sum())
    unmapped = original[~mapped].tolist()
    if sample is None and "sample" in adata.obs.columns:
        values = pd.unique(adata.obs["sample"].astype(str))
        sample = values[0] if len(values) == 1 else None
    prefix = f"sample {sample}: " if sample is not None else ""
    msg = f"{prefix}{n_mapped} of {n} features mapped to {taxa} {RELEASE}"
    if unmapped:
        msg += f"; {len(unmapped)} unmapped kept (e.g. {', '.join(unmapped[:5])})"
    if n_dup:
        msg += f"; {n_dup} duplicated renamed with a suffix"
    logger.info(msg)
    if n and n_mapped < 0.5 * n:
        other = [o for o in TAXA if o != taxa]
        rates = {o: int(pd.notna(lookup(query.tolist(), o)).sum()) for o in other}
        best = max(rates, key=rates.get)
        if rates[best] > n_mapped:
            logger.warning(f"{prefix}only {n_mapped} of {n} features map to {taxa}; {rates[best]} "
                           f"map to {best}: check the sample's taxa")
    result = {"n_features": n, "n_mapped": n_mapped, "n_unmapped": n - n_mapped,
              "n_duplicated": n_dup, "taxa": taxa, "release": RELEASE}
    adata.uns[KEY] = {"params": {"taxa": taxa, "release": RELEASE},
                      "version": __version__, **{k: v for k, v in result.items()
                                                 if k.startswith("n_")}}
    return result


def _adata_taxa(adata) -> str | None:
    info = adata.uns.get(KEY) if hasattr(adata, "uns") else None
    if isinstance(info, dict):
        params = info.get("params", {})
        if isinstance(params, dict) and params.get("taxa") in TAXA:
            return str(params["taxa"])
    if "taxa" in getattr(adata, "obs", {}):
        values = pd.unique(adata.obs["taxa"].astype(str))
        if len(values) == 1 and values[0] in TAXA:
            return str(values[0])
    return None


def symbols_to_uids(adata, genes: str | Iterable[str], *, taxa: str | None = None):
    """Resolve a user's gene list against an annotated AnnData.

    Each name may be a var name (uid), a symbol from ``var['gene']`` (the first feature carrying it
    when several do), or anything :func:`lookup` resolves (versioned Ensembl id, other-case symbol,
    HGNC synonym) whose uid is a var name. Every method taking gene names goes through this.

    Parameters
    ----------
    adata
        An AnnData annotated by :func:`annotate` (plain symbol var names also work).
    genes
        One name or a list of names.
    taxa
        The taxa for database look-ups; default from ``uns['db']`` or ``obs['taxa']``.

    Returns
    -------
    str or list of str
        The var name(s), in order; a string for a string input.

    Raises
    ------
    KeyNotFoundError
        Naming every gene that is not in the data.
    """
    single = isinstance(genes, str)
    names = pd.Series([genes] if single else list(genes), dtype=object).astype(str)
    var_names = pd.Index(adata.var_names.astype(str))
    out = names.where(names.isin(var_names))
    if out.isna().any() and "gene" in adata.var.columns:
        sym = pd.Series(var_names.to_numpy(), index=pd.Index(adata.var["gene"].astype(str).to_numpy()))
        sym = sym[~sym.index.duplicated(keep="first")]
        out = out.fillna(names.map(sym))
    taxa = taxa if taxa is not None else _adata_taxa(adata)
    if out.isna().any() and taxa is not None:
        todo = out.isna()
        uids = pd.Series(lookup(names[todo].tolist(), taxa), index=names.index[todo], dtype=object)
        out = out.fillna(uids.where(uids.isin(var_names)))
    if out.isna().any():
        missing = names[out.isna()].tolist()
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise KeyNotFoundError(f"gene(s) not found in the data: {shown}")
    result = out.astype(str).tolist()
    return result[0] if single else result


def homologs(names: str | Iterable[str], from_taxa: str = "mmu", to_taxa: str = "hsa") -> pd.DataFrame:
    """Homologs of genes of one taxon in another (mouse <-> human).

    Parameters
    ----------
    names
        Names of ``from_taxa`` genes, resolved by :func:`lookup`.
    from_taxa, to_taxa
        ``"mmu"`` and ``"hsa"`` in either order.

    Returns
    -------
    pandas.DataFrame
        One row per (name, homolog) pair, in input order then by homolog uid, with columns ``name``,
        ``uid`` and ``gene`` (the gene in ``from_taxa``), ``homolog`` and ``homolog_gene`` (in
        ``to_taxa``), ``source`` (``ensembl``, ``mgi`` or both). Names that are unknown or have no
        homolog get one row with ``None`` in the missing fields.

    Raises
    ------
    InputError
        For an unknown taxa or the same taxa twice.
    """
    _check_taxa(from_taxa)
    _check_taxa(to_taxa)
    if from_taxa == to_taxa:
        raise InputError(f"homologs need two different taxa, got {from_taxa!r} twice")
    if isinstance(names, str):
        names = [names]
    names = list(names)
    uids = lookup(names, from_taxa)
    pairs = _homolog_pairs().rename(columns={from_taxa: "uid", to_taxa: "homolog"})
    q = pd.DataFrame({"name": names, "uid": uids, "_order": np.arange(len(names))})
    df = q.merge(pairs[["uid", "homolog", "source"]], on="uid", how="left")
    df = df.sort_values(["_order", "homolog"], kind="mergesort", na_position="last")
    src = _tables(from_taxa).genes["gene"]
    dst = _tables(to_taxa).genes["gene"]
    df["gene"] = df["uid"].map(src)
    df["homolog_gene"] = df["homolog"].map(dst)
    df = df[["name", "uid", "gene", "homolog", "homolog_gene", "source"]].reset_index(drop=True)
    return df.astype(object).where(df.notna(), None)
