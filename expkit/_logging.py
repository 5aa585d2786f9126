"""A rich logger and progress bars shared by the package."""
from __future__ import annotations

import logging
from contextlib import contextmanager

logger = logging.getLogger("expkit")
if not logger.handlers:
    try:
        from rich.logging import RichHandler

        _handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        _handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    except Exception:  # pragma: no cover - rich is a dependency
        _handler = logging.StreamHandler()
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextmanager
def progress(total: int, description: str, *, enabled: bool | None = None):
    """A rich progress bar yielding an ``advance(label)`` callable.

    Disabled when ``settings.progress`` is off or when there is a single step.
    """
    from ._settings import settings

    if enabled is None:
        enabled = settings.progress and total > 1
    if not enabled:
        yield lambda label=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[label]}"), TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task(description, total=total, label="")

        def advance(label: str | None = None) -> None:
            bar.update(task, advance=1, label=label or "")

        yield advance
