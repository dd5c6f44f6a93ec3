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
