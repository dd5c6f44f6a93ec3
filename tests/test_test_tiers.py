"""The two test tiers of tests/conftest.py, checked on a tiny pytest run in a subprocess that
uses the repository's own conftest with the data folder pointed at a missing path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

TINY_TESTS = '''
import pytest


@pytest.fixture
def a_volume(shared_data):
    return shared_data / "neuroproof_fibsem_medulla"


def test_pure():
    assert sum(range(4)) == 6


def test_direct(shared_data):
    assert shared_data.is_dir()


def test_through_a_fixture(a_volume):
    assert a_volume.is_dir()
'''


@pytest.fixture
def tiny_suite(tmp_path: Path) -> Path:
    """A folder with the repo's conftest, one pure test and two data tests (one reaching the
    data only through another fixture)."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\nmarkers =\n    data: real data\n")
    return tmp_path


def _pytest(folder: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    # third-party plugins are not needed by the tiny suite; not loading them keeps this fast
    env = {**os.environ, "CEMNET_SHARED_DATA": str(data), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=120)


def test_missing_data_folder_fails_the_default_run(tiny_suite: Path) -> None:
    missing = tiny_suite / "no" / "data"
    run = _pytest(tiny_suite, missing)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert f"real test data not found at {missing}" in run.stderr and "2 selected test(s) need it" in run.stderr
    assert "passed" not in run.stdout and "skipped" not in run.stdout  # an error, not a skip


def test_pure_tier_runs_without_the_data_folder(tiny_suite: Path) -> None:
    run = _pytest(tiny_suite, tiny_suite / "no" / "data", "-m", "not data")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 2 deselected" in run.stdout


def test_data_tier_is_marked_through_fixtures(tiny_suite: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "neuroproof_fibsem_medulla").mkdir(parents=True)
    (data / "README.md").write_text("stand-in for ../shared/data: only its presence is checked here\n")
    run = _pytest(tiny_suite, data, "-m", "data", "-rA")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASSED test_tiny.py::test_direct" in run.stdout
    assert "PASSED test_tiny.py::test_through_a_fixture" in run.stdout and "2 passed, 1 deselected" in run.stdout
