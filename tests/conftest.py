"""Shared fixtures. Tests run on the real public EM data in ``../shared/data``.

The data folder is required: a missing folder is an error, never a skip (CI must fail, not pass
vacuously). ``CEMNET_SHARED_DATA`` may point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CEMNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (SHARED_DATA / "README.md").is_file():
        raise pytest.UsageError(
            f"real test data not found at {SHARED_DATA} (expected ../shared/data next to the repo, "
            "or set CEMNET_SHARED_DATA)"
        )


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real shared EM data (``../shared/data``)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, shared_data) -> Path:
    """A corpus curated from real shared data: NeuroProof FIB-SEM 250^3 (xy+xz+yz), ISBI 2012
    train slices (xy only) and one 16-bit OME-Zarr SEM tile. About 900 patches."""
    from curation.pipeline import curate
    from curation.settings import CurateSettings
    from curation.readers import SourceSpec

    sources = [
        SourceSpec(path=str(shared_data / "neuroproof_fibsem_medulla/training_sample1/grayscale_maps"),
                   name="neuroproof", stack=True, voxel_size=(10.0, 10.0, 10.0)),
        SourceSpec(path=str(shared_data / "isbi2012/train/images"), name="isbi2012", stack=True,
                   voxel_size=(50.0, 4.0, 4.0)),
        SourceSpec(path=str(shared_data / "muvis_align_sem_tiles/ome_zarr/S000/S000_000_000.ome.zarr"),
                   name="sem16bit_tile"),
    ]
    out = tmp_path_factory.mktemp("corpus") / "small_corpus"
    return curate(sources, out, CurateSettings(), workers=2, progress=False)
