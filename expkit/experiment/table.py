"""The sample table: one row per sample and modality."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import InputError

REQUIRED = ("sample", "modality", "batch", "group", "taxa", "location")
OPTIONAL = ("reader", "select")
MODALITIES = ("rna", "spatial-bin", "spatial-cell")
SPATIAL_MODALITIES = ("spatial-bin", "spatial-cell")
TAXA = ("hsa", "mmu")
ALIASES = {"source": "location"}


def accessor_name(modality: str) -> str:
    """``spatial-bin`` -> ``spatial_bin``."""
    return modality.replace("-", "_")


def read_table(table: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, Path]:
    """Read a sample table (TSV/CSV path or DataFrame); return it validated with its base folder."""
    if isinstance(table, pd.DataFrame):
        df, base = table.copy(), Path.cwd()
    else:
        path = Path(table)
        if not path.is_file():
            raise InputError(f"sample table {str(path)!r} does not exist")
        sep = "," if path.suffix.lower() == ".csv" else "\t"
        try:
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
        except Exception as exc:  # pandas raises many kinds
            raise InputError(f"sample table {str(path)!r} cannot be parsed: {exc}") from exc
        base = path.resolve().parent
    return validate_table(df, source=str(table) if not isinstance(table, pd.DataFrame) else "DataFrame"), base


def validate_table(df: pd.DataFrame, *, source: str = "sample table") -> pd.DataFrame:
    """Check columns and values; return a clean string table indexed 0..n-1."""
    df = df.rename(columns={k: v for k, v in ALIASES.items() if k in df.columns and v not in df.columns})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}; a sample table needs {list(REQUIRED)} "
                         f"(found {list(df.columns)})")
    df = df.astype({c: str for c in REQUIRED}).reset_index(drop=True)
    for col in ("sample", "modality", "taxa"):
        empty = df.index[df[col].str.strip() == ""].tolist()
        if empty:
            raise InputError(f"{source}: empty {col!r} in row(s) {[i + 1 for i in empty]}")
    bad_mod = sorted(set(df["modality"]) - set(MODALITIES))
    if bad_mod:
        raise InputError(f"{source}: unknown modality {bad_mod}; expected one of {list(MODALITIES)}")
    bad_taxa = sorted(set(df["taxa"]) - set(TAXA))
    if bad_taxa:
        raise InputError(f"{source}: unknown taxa {bad_taxa}; expected one of {list(TAXA)}")
    bad_names = [s for s in df["sample"] if any(ch in s for ch in "/\\:") or s in (".", "..")]
    if bad_names:
        raise InputError(f"{source}: sample names may not contain '/', '\\' or ':': {bad_names}")
    dup = df.duplicated(["modality", "sample"], keep=False)
    if dup.any():
        raise InputError(f"{source}: duplicated sample name(s) {sorted(set(df.loc[dup, 'sample']))} "
                         f"within a modality")
    return df


def resolve_location(location: str, base: Path, *, sample: str, allow_outside: bool) -> Path:
    """Resolve a table's location against the table's folder.

    Relative locations must stay inside that folder unless ``allow_outside`` is set (absolute paths are
    always taken as given).
    """
    if not location:
        raise InputError(f"sample {sample!r}: empty location")
    loc = Path(location)
    if loc.is_absolute():
        path = loc.resolve()
    else:
        path = (base / loc).resolve()
        if not allow_outside and not path.is_relative_to(base.resolve()):
            raise InputError(f"sample {sample!r}: location {location!r} escapes the table's folder {str(base)!r}; "
                             f"use an absolute path or allow_outside=True")
    if not path.exists():
        raise InputError(f"sample {sample!r}: location {str(path)!r} does not exist")
    return path
