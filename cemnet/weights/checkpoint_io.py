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
import zipfile
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
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel()):
            continue
        # one reduction pass: NaN/inf make the sum non-finite; a finite sum proves the tensor finite.
        # Only a non-finite sum (true NaN/inf, or an overflow of huge finite values) is checked elementwise.
        if not bool(torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
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


# torch.save's legacy (pre-1.6, non-zip) files start with the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
_ZIP_MAGIC = b"PK\x03\x04"


def torch_archive_problem(path: str | Path, verify_crc: bool = True) -> str | None:
    """Why ``path`` is not an intact ``torch.save`` zip archive (``None`` when it is).

    Nothing is unpickled. ``verify_crc`` also reads every member against its CRC, so a file zeroed
    or overwritten in the middle fails, not only a truncated one.
    """
    try:
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "a zip file, but not a torch.save archive (no data.pkl)"
            bad = z.testzip() if verify_crc else None
            if bad is not None:
                return f"member {bad} is corrupt (CRC mismatch)"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"unreadable ({err})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.metadata()
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: all mean "not readable"
        return f"not a readable .safetensors file ({err})"
    return None


def _describe_start(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "it is an HTML/XML page (an error or login page served instead of the file?)"
    if head[:1] == b"\x80":
        return "it is a plain Python pickle, not written by torch.save (re-save its state_dict with torch.save in a trusted environment)"
    return f"it starts with {head[:16]!r}"


def weights_file_kind(path: str | Path) -> str:
    """``"safetensors"``, ``"torch-zip"`` or ``"torch-legacy"``: what the file holds, judged by content.

    A ``.safetensors`` header must parse and a zip must be a ``torch.save`` archive; nothing is
    unpickled. Raises :class:`CheckpointError` (naming the file and what it is instead) otherwise.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err
    problem = "empty file" if not head else None
    if head.startswith(_ZIP_MAGIC):
        problem = torch_archive_problem(path, verify_crc=False)
        kind = "torch-zip"
    elif head.startswith(_LEGACY_TORCH_MAGIC):
        kind = "torch-legacy"
    elif head:
        kind = "safetensors"
        if _safetensors_problem(path) is not None:
            problem = f"not a checkpoint (.safetensors, torch.save archive or legacy torch.save): {_describe_start(head)}"
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return kind


def weights_file_problem(path: str | Path) -> str | None:
    """The :func:`weights_file_kind` complaint about ``path``, or ``None`` when it is a weights file."""
    try:
        weights_file_kind(path)
    except CheckpointError as err:
        return str(err)
    return None


def load_checkpoint(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain data (plus numpy scalars/arrays, paths)."""
    path = Path(path)
    weights_file_kind(path)  # a clear message for a plain pickle, an HTML page, a truncated file
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
    except (RuntimeError, EOFError, ValueError) as err:
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
