"""The tutorial notebooks (``tutorials/*.ipynb``) run without error, and are committed without outputs.

The notebooks are executed by ``tutorials/run.py`` (the same code as ``bash dev.sh tutorials``), each in a
temporary working folder. Notebooks that read the shared real data skip when it is absent.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _runner():
    spec = importlib.util.spec_from_file_location("_tutorials_run", ROOT / "tutorials" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _runner()
NOTEBOOKS = run.notebooks()
IDS = [p.stem for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, tmp_path: Path):
    for module in ("nbclient", "nbformat", "ipykernel"):
        pytest.importorskip(module, reason=f"{module} is needed to run the notebooks (pip install -e .[test])")
    if run.needs_shared_data(path) and not run.shared_data().is_dir():
        pytest.skip(f"{path.name} needs the shared real data, not found at {run.shared_data()} "
                    f"(set EXPKIT_SHARED_DATA)")
    try:
        _, seconds = run.execute(path, tmp_path)
    except run.CellError as exc:
        pytest.fail(str(exc), pytrace=False)
    print(f"{path.name}: executed in {seconds:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_committed_without_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; strip them before "
                       f"committing (e.g. jupyter nbconvert --clear-output --inplace {path.name})")


def test_runner_finds_every_notebook():
    found = {p.name for p in (ROOT / "tutorials").glob("*.ipynb")}
    assert {p.name for p in NOTEBOOKS} == found
