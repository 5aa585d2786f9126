"""Helpers shared by the image functions (processing, segmentation, features): which sample a call is about,
for error messages, and the package version for ``uns``."""
from __future__ import annotations


def version() -> str:
    from .. import __version__

    return __version__


def sample_name(adata, sample, source) -> str | None:
    """The sample a call is about: the ``sample`` given, the store's, the single ``uns['spatial']`` entry or the
    single ``obs['sample']`` value; None when none tells."""
    if sample is not None:
        return str(sample)
    if getattr(source, "sample", None) is not None:
        return str(source.sample)
    spatial = adata.uns.get("spatial") if hasattr(adata, "uns") else None
    if isinstance(spatial, dict) and len(spatial) == 1:
        return str(next(iter(spatial)))
    obs = getattr(adata, "obs", None)
    if obs is not None and "sample" in obs and obs["sample"].nunique() == 1:
        return str(obs["sample"].iloc[0])
    return None


def where(sample: str | None) -> str:
    return f"sample {sample!r}" if sample is not None else "the AnnData"
