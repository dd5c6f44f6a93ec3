"""Shared fixtures, and the two test tiers.

* **data tier** (the default, never skipped in CI): tests on the real public EM data in
  ``../shared/data`` (``CEMNET_SHARED_DATA`` may point elsewhere). Every test that uses the
  ``shared_data`` fixture, directly or through another fixture (``small_corpus``...), is marked
  ``data`` here automatically; a test that reaches the data another way is marked by hand.
* **pure tier**: everything else (losses, queue, keys/meta, MMD, sampling, patching, hashing on
  arrays, metrics, masks, tiling...). ``pytest -m "not data"`` runs it on a machine without the
  data folder.

When the data folder is missing and any selected test needs it, the session is an error before
any test runs (CI must fail, not pass vacuously); a pure-tier selection runs without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CEMNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DATA_FIXTURE = "shared_data"


def data_available() -> bool:
    return (SHARED_DATA / "README.md").is_file()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``data`` every test whose fixture closure reaches ``shared_data``."""
    for item in items:
        if DATA_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


def pytest_collection_finish(session: pytest.Session) -> None:
    """After selection: a selected data-tier test without the data folder is an error."""
    needing = [item for item in session.items if item.get_closest_marker("data")]
    if needing and not data_available():
        raise pytest.UsageError(
            f"real test data not found at {SHARED_DATA} (expected ../shared/data next to the repo, "
            f"or set CEMNET_SHARED_DATA); {len(needing)} selected test(s) need it, e.g. "
            f"{needing[0].nodeid}. Only the pure tier runs without it: pytest -m \"not data\""
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


@pytest.fixture(scope="session")
def corpus(small_corpus: Path):
    """:func:`small_corpus`, opened for training (``curation.corpus.open_corpus``); a test file
    may define its own ``corpus`` (e.g. arrays in memory)."""
    from curation.corpus import open_corpus

    return open_corpus(small_corpus)
