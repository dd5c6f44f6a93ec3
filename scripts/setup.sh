#!/usr/bin/env bash
# Create .venv and install cemnet with its test extras (torch/torchvision pinned in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "cemnet installed in $(pwd)/.venv"
