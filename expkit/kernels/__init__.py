"""Numerical kernels: arrays in, arrays out. No AnnData, no I/O.

Every kernel takes a ``device`` (see :mod:`expkit.kernels.device`) and runs the same code on CPU and CUDA.
"""
