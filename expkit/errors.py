"""One exception family. Every error names the sample, file or key it is about."""
from __future__ import annotations


class ExpkitError(Exception):
    """Base class of every error raised by expkit."""


class InputError(ExpkitError, ValueError):
    """Bad user input: a sample table, an argument, a raw file's content."""


class ReaderError(InputError):
    """A raw input file or folder cannot be read (missing, corrupt, inconsistent)."""


class SampleNotFoundError(ExpkitError, KeyError):
    """An unknown sample name; the message lists the available ones."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class KeyNotFoundError(ExpkitError, KeyError):
    """A key (layer, obs column, obsm entry, image channel) that the data lacks."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class FormatError(ExpkitError):
    """An experiment folder that cannot be read: newer format, missing or corrupt files."""


class ResourceError(ExpkitError, MemoryError):
    """A run that cannot fit in memory, reported before it starts."""
