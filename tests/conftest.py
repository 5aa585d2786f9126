import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    return Path(os.environ.get("EXPKIT_SHARED_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of published real datasets (skips the test when it is absent)."""
    path = _shared()
    if not path.is_dir():
        pytest.skip(f"shared real data not found at {path} (set EXPKIT_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """Peer tools' results on the shared data (SpatialDE2, SpaGCN, squidpy)."""
    path = _shared().parent / "reference"
    if not path.is_dir():
        pytest.skip(f"shared reference results not found at {path}")
    return path


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
