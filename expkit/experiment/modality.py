"""A modality accessor: ``expm.spatial_bin`` gives the samples of ``spatial-bin`` and the registered methods."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from ..errors import FormatError, InputError, SampleNotFoundError
from . import dispatch
from .summary import as_html, format_adata, format_keys, merge_keys, size_text

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from .experiment import Experiment


class Modality:
    """The samples of one modality of an :class:`Experiment`.

    ``modality[sample]`` is the sample's AnnData (read on first access), ``modality.samples`` the names,
    ``modality.view(sample)`` a summary, ``modality.integrated`` the merged AnnData. Every method registered
    in :mod:`expkit.experiment.methods` is available as ``modality.<name>(run_on_samples=..., **kwargs)``;
    ``modality.run(func, run_on_samples, **kwargs)`` runs any plain function the same way.
    """

    def __init__(self, experiment: "Experiment", name: str):
        self._expm = experiment
        self.name = name

    # samples -----------------------------------------------------------------------------------------------
    @property
    def samples(self) -> list[str]:
        table = self._expm._table
        return table.loc[table["modality"] == self.name, "sample"].tolist()

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[str]:
        return iter(self.samples)

    def __contains__(self, sample: object) -> bool:
        return sample in self.samples

    def items(self) -> Iterator[tuple[str, "AnnData"]]:
        for sample in self.samples:
            yield sample, self[sample]

    def _check(self, sample: str) -> None:
        if sample not in self.samples:
            raise SampleNotFoundError(
                f"unknown sample {sample!r} in modality {self.name!r}; available: {self.samples}")

    def __getitem__(self, sample: str) -> "AnnData":
        """The sample's AnnData. It is marked changed: ``save()`` rewrites samples you touched."""
        self._check(sample)
        adata = self._expm._load(self.name, sample)
        self._mark_changed(sample)
        return adata

    def __setitem__(self, sample: str, adata: "AnnData") -> None:
        self._check(sample)
        self._replace(sample, adata)

    def _load_many(self, samples: list[str | None]) -> list["AnnData"]:
        for s in samples:
            if s is not None:
                self._check(s)
        return self._expm._load_many(self.name, samples)

    def _mark_changed(self, sample: str | None) -> None:
        self._expm._mark_changed(self.name, sample)

    def _replace(self, sample: str | None, adata) -> None:
        from anndata import AnnData

        if not isinstance(adata, AnnData):
            raise InputError(f"sample {sample!r}: expected an AnnData, got {type(adata).__name__}")
        self._expm._set(self.name, sample, adata)

    @property
    def integrated(self) -> "AnnData":
        """This modality's AnnData inside the integrated MuData (build it with ``expm.merge()``)."""
        return self._expm._load_many(self.name, [None])[0]

    def _integrated_or_none(self):
        """The integrated AnnData of this modality, or None when the experiment has none (yet)."""
        try:
            return self.integrated
        except FormatError:
            return None

    def image_store(self, sample: str | None):
        """The sample's image store (None when it has no images)."""
        return self._expm._image_store(self.name, sample)

    # running functions ---------------------------------------------------------------------------------
    def run(self, func, run_on_samples=True, *, kind: str = "sample", **kwargs):
        """Run any plain function ``func(adata, **kwargs)`` over samples; returns ``{sample: result}``."""
        return dispatch.run(self, func, run_on_samples, kind=kind, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in dispatch.METHODS:
            return dispatch.bound_method(self, name)
        raise AttributeError(f"modality {self.name!r} has no attribute or method {name!r}; "
                             f"methods: {dispatch.method_names(self.name)}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dispatch.method_names(self.name)))

    # summaries -------------------------------------------------------------------------------------------
    def view(self, sample: str | None = None, *, show: bool = True) -> str:
        """Print one sample's summary (keys with dtype tags), or the modality's when ``sample`` is None."""
        if sample is None:
            text = self._text()
        else:
            self._check(sample)
            text = format_adata(self._expm._load(self.name, sample), f"{self.name} sample {sample!r}")
        if show:
            print(text)
        return text

    def _text(self) -> str:
        summaries = self._expm._summaries(self.name)
        lines = [f"{self.name}  (expm.{self.name.replace('-', '_')}): {len(summaries)} sample(s)"]
        lines += format_keys(merge_keys(list(summaries.values())))
        for sample, summary in summaries.items():
            lines.append(f"  - {sample}: {size_text(summary)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self._text()

    def _repr_html_(self) -> str:
        return as_html(self._text())
