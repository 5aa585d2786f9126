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
    """

    _verbosity: str = "info"
    _device: str = "auto"
    seed: int = 0
    progress: bool = True
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
                f"progress={self.progress})")


settings = Settings()
