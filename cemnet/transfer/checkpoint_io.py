"""Safe reading of checkpoint files and run folders.

Every pickle-based checkpoint is opened with ``torch.load(..., weights_only=True)``: a published
checkpoint is untrusted input, and a full unpickle can run arbitrary code. The only globals we
additionally allow rebuild plain data: numpy's array/scalar reconstructors (research checkpoints
often keep normalisation stats as numpy floats) and ``pathlib`` paths (Lightning hyper-parameters
often hold them). They are allowed only when nothing else in the file needs allowing.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

# numpy moved its internals from numpy.core to numpy._core in 2.0; accept both spellings.
_PLAIN_DATA = re.compile(
    r"^numpy(\._core|\.core)?\.(multiarray\._reconstruct|multiarray\.scalar|ndarray|dtype)$"
    r"|^numpy\.dtypes\.\w+DType$"
    r"|^pathlib\.(Pure)?(Posix|Windows)?Path$"
)


def give_usual_permissions(path: str | Path) -> None:
    """``chmod`` a file we wrote to what ``open()`` would have given it (0666 minus the umask).

    Writers that go through a private temporary file (safetensors: 0600) would otherwise leave
    exports that other users of a shared folder cannot read.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def nonfinite_tensors(tensors: Any) -> list[str]:
    """Names of the floating-point tensors in a ``{name: tensor}`` mapping holding NaN or inf."""
    bad = []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


class CheckpointError(ValueError):
    """A file is not a checkpoint cemnet can read."""


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _plain_data_globals(names: list[str]) -> list[Any]:
    # The pickle names numpy's dtype *classes* (numpy.dtypes.Float64DType, ...) only once the
    # reconstructors are allowed, so allow every dtype class up front.
    extra: list[Any] = []
    if any(n.startswith("numpy") for n in names):
        import numpy as np

        extra = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [_resolve(n) for n in names] + extra


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain data (plus numpy scalars/arrays, paths)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe and all(_PLAIN_DATA.match(n) for n in unsafe):
            try:
                with torch.serialization.safe_globals(_plain_data_globals(unsafe)):
                    return torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, ImportError, AttributeError):
                pass
        raise CheckpointError(
            f"{path}: refusing to unpickle arbitrary objects ({', '.join(unsafe) or err}); "
            "cemnet only reads checkpoints with torch.load(weights_only=True). Re-save the "
            "state_dict from a trusted environment."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


def find_checkpoint(run_or_ckpt: str | Path) -> Path:
    """The checkpoint to export from a run folder or a checkpoint path.

    A run folder resolves to ``checkpoints/last.ckpt`` when present (Lightning's
    ``save_last``; ``last.ckpt`` directly inside also counts, for the checkpoints folder itself),
    else to the newest ``*.ckpt`` anywhere below it (by modification time; ties broken by name so
    the choice is reproducible).
    """
    path = Path(run_or_ckpt)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such run folder or checkpoint: {path}")
    for last in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
        if last.is_file():
            return last
    found = sorted(path.rglob("*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, str(p)))
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoints/last.ckpt and no *.ckpt below it")
    return found[-1]
