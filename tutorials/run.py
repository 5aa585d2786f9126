"""Execute the tutorial notebooks (used by ``tests/test_tutorials.py`` and ``bash dev.sh tutorials``).

    python tutorials/run.py [NAME ...] [--out tutorials/rendered]

Each notebook runs in a fresh temporary folder (its relative paths, e.g. ``_work/``, land there), with
``EXPKIT_SHARED_DATA`` set to the shared data folder and this checkout first on ``PYTHONPATH``. The rendered
command writes ``<out>/<name>.ipynb`` with its outputs and every figure as ``<out>/<name>/cell<NN>-<k>.png``.
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def notebooks() -> list[Path]:
    """Every tutorial notebook (``tutorials/*.ipynb``), sorted by name."""
    return sorted(HERE.glob("*.ipynb"))


def shared_data() -> Path:
    """The shared real data: ``$EXPKIT_SHARED_DATA``, else ``../shared/data`` beside the checkout."""
    return Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


def needs_shared_data(path: Path) -> bool:
    """Whether a notebook reads the shared data (it names ``EXPKIT_SHARED_DATA``, ``shared/data`` or
    ``shared_data``)."""
    text = Path(path).read_text(encoding="utf-8")
    return any(key in text for key in ("EXPKIT_SHARED_DATA", "shared/data", "shared_data"))


class CellError(RuntimeError):
    """A notebook cell raised; the message names the notebook, the cell and the error."""


def _error_cell(nb) -> tuple[int, object, dict] | None:
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return i, cell, out
    return None


def execute(path: Path, workdir: Path, *, timeout: int = 900):
    """Run notebook ``path`` with ``workdir`` as its working directory; return ``(notebook, seconds)``.

    Raises :class:`CellError` naming the first failing cell.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env["EXPKIT_SHARED_DATA"] = str(shared_data())
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # figures become PNG outputs
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spin-waiting OpenMP threads on a shared machine
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=env)
    except CellExecutionError as exc:
        found = _error_cell(nb)
        if found is None:
            raise CellError(f"{path.name}: {exc}") from None
        i, cell, out = found
        source = "\n".join("    " + line for line in cell.source.splitlines()[:15])
        trace = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(out.get("traceback", [])))  # no terminal colours
        raise CellError(f"{path.name}: cell {i} failed with {out.get('ename')}: {out.get('evalue')}\n"
                        f"cell source:\n{source}\ntraceback:\n{trace}") from None
    return nb, time.perf_counter() - t0


def write_figures(nb, folder: Path) -> list[Path]:
    """Write every PNG output of ``nb`` to ``folder/cell<NN>-<k>.png`` (old PNGs there are removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    written = []
    for i, cell in enumerate(nb.cells):
        k = 0
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png:
                k += 1
                target = folder / f"cell{i:02d}-{k}.png"
                target.write_bytes(base64.b64decode(png))
                written.append(target)
    return written


def render(path: Path, out: Path) -> tuple[Path, list[Path], float]:
    """Execute ``path`` in a temporary folder; write the executed notebook and its figures under ``out``."""
    import nbformat

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"expkit-{path.stem}-") as tmp:
        nb, seconds = execute(path, Path(tmp))
    target = out / path.name
    nbformat.write(nb, target)
    return target, write_figures(nb, out / path.stem), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tutorials/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all of tutorials/*.ipynb)")
    parser.add_argument("--out", type=Path, default=HERE / "rendered", help="output folder")
    args = parser.parse_args(argv)
    paths = notebooks()
    if args.names:
        wanted = {Path(n).stem for n in args.names}
        paths = [p for p in paths if p.stem in wanted]
        missing = wanted - {p.stem for p in paths}
        if missing:
            parser.error(f"no notebook(s) {sorted(missing)} in {HERE}")
    failed = 0
    for path in paths:
        if needs_shared_data(path) and not shared_data().is_dir():
            print(f"skipped {path.name}: shared data not found at {shared_data()} (set EXPKIT_SHARED_DATA)")
            continue
        print(f"running {path.name} ...", flush=True)
        try:
            target, figures, seconds = render(path, args.out)
        except CellError as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"  {seconds:.0f} s; wrote {target} and {len(figures)} figure(s) in {target.with_suffix('')}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
