"""Execute the notebooks so they never rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# notebooks that train a model (tens of seconds to minutes on 2 CPU cores)
SLOW = {"finetune_and_segment.ipynb", "benchmark_quickstart.ipynb"}


def test_expected_notebooks_present():
    names = {p.name for p in NOTEBOOKS}
    assert {"quickstart.ipynb", "benchmark_quickstart.ipynb", "finetune_and_segment.ipynb"} <= names


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in NOTEBOOKS],
                         ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, shared_data, monkeypatch):
    monkeypatch.setenv("CEMNET_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("WANDB_MODE", "offline")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
