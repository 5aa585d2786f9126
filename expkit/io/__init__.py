"""Raw-input readers: one per technology, returning one AnnData per sample.

Readers never write to, rename or decompress anything in the input folder; every failure is an
:class:`expkit.errors.ReaderError` naming the sample and the file. :func:`read_sample` is the entry
point the Experiment calls (reader auto-detection, ``select="column=value"``, spatial checks).
"""
from __future__ import annotations

from .dispatch import READERS, detect_reader, read_sample
from .cosmx import read_cosmx
from .h5ad import read_h5ad
from .merscope import read_merscope
from .tables import read_table
from .tenx import read_10x_h5, read_10x_mtx
from .visium import read_visium
from .visium_hd import read_visium_hd
from .xenium import read_xenium

__all__ = ["read_sample", "detect_reader", "READERS", "read_10x_h5", "read_10x_mtx", "read_visium",
           "read_table", "read_xenium", "read_h5ad", "read_visium_hd", "read_merscope", "read_cosmx"]
