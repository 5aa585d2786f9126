"""Global settings: ``expkit.settings``."""
from __future__ import annotations

from dataclasses import dataclass, field

_DEVICES = ("auto", "cpu", "cuda")
_VERBOSITY = {"error": 40, "warning": 30, "info": 20, "debug": 10}


@dataclass
class Settings:
    """Package-wide settings.

    verbosity : "error" | "warning" | "info" | "debug"
    device    : "auto" (CUDA when ``use_gpu=True`` and available), "cpu" or "cuda"
    seed      : default random seed of every stochastic method (a method's ``seed=`` overrides it)
    progress  : show rich progress bars
    max_loaded: at most this many samples of a modality in memory during per-sample methods (None: no limit);
                unchanged samples are unloaded as a loop goes
    autosave  : with ``max_loaded``, save changed samples when the limit is reached (your consent to the loop
                writing the folder); otherwise they stay in memory and a warning says so
    """

    _verbosity: str = "info"
    _device: str = "auto"
    seed: int = 0
    progress: bool = True
    max_loaded: int | None = None
    autosave: bool = False
    _extra: dict = field(default_factory=dict, repr=False)

    @property
    def verbosity(self) -> str:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: str) -> None:
        if value not in _VERBOSITY:
            from .errors import InputError

            raise InputError(f"settings.verbosity must be one of {list(_VERBOSITY)}, not {value!r}")
        self._verbosity = value
        from ._logging import logger

        logger.setLevel(_VERBOSITY[value])

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        if value not in _DEVICES:
            from .errors import InputError

            raise InputError(f"settings.device must be one of {list(_DEVICES)}, not {value!r}")
        self._device = value

    def __repr__(self) -> str:
        return (f"Settings(verbosity={self.verbosity!r}, device={self.device!r}, seed={self.seed}, "
                f"progress={self.progress}, max_loaded={self.max_loaded}, autosave={self.autosave})")


settings = Settings()
