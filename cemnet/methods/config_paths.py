"""Input paths of a ``cemnet pretrain`` config: resolved the way the shell shows them, checked up front.

A relative path in a config (``data.init_args.corpus: ../shared/data/...``) is relative to the
directory the command runs from. The operating system resolves ``..`` against the *physical*
working directory, so when the checkout is reached through a symlink, ``../shared`` would silently
mean a sibling of the link's target instead of the folder next to the checkout that ``ls ..`` shows.
We join relative paths with the *logical* working directory (``$PWD``, as the shell keeps it) and
collapse ``..`` textually, so the same config finds the same files whether or not ``../shared``, the
checkout or any folder above it is a symlink. A path that does not exist is reported with the
config key that held it, before any model is built.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path
from typing import Any

__all__ = ["ConfigPathError", "logical_cwd", "resolve_input_paths", "config_dirs", "find_config", "expand_config_names"]

# a checkout (or editable install): <repo>/experiments next to the cemnet package
CHECKOUT_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SHIPPED_SUBDIR = Path("share") / "cemnet" / "experiments"  # where the wheel installs them (pyproject data-files)


class ConfigPathError(ValueError):
    """An input path of the config does not exist (the message names its key)."""


def logical_cwd() -> str:
    """``$PWD`` when it names the current directory (the shell's logical path), else ``os.getcwd()``."""
    pwd, cwd = os.environ.get("PWD"), os.getcwd()
    try:
        if pwd and os.path.isabs(pwd) and os.path.samefile(pwd, cwd):
            return pwd
    except OSError:
        pass
    return cwd


def _resolve(value: Any, key: str, base: str) -> Any:
    if not isinstance(value, (str, os.PathLike)) or "://" in os.fspath(value):
        return value  # objects and remote URLs are not ours to check
    path = os.fspath(value)
    full = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
    if not os.path.exists(full):
        where = "" if os.path.isabs(path) else f" (relative paths are taken from the directory you run in: {base})"
        raise ConfigPathError(f"{key}: {path} does not exist{where}")
    return full


def resolve_input_paths(cfg: Any, base: str | None = None) -> None:
    """Make the input paths of a parsed ``fit`` config absolute (logically) and check they exist.

    Inputs: ``data.init_args.corpus``, every entry of ``data.init_args.volumes`` (a path, or a
    dict with ``path``) and ``ckpt_path``. Outputs (``run_dir``) are left as given.
    """
    base = base or logical_cwd()
    data = cfg.get("data")
    args = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if args is not None:
        if args.get("corpus") is not None:
            args["corpus"] = _resolve(args["corpus"], "data.init_args.corpus", base)
        volumes = args.get("volumes")
        if isinstance(volumes, (list, tuple)):
            args["volumes"] = [_resolve(v, f"data.init_args.volumes[{i}]", base) for i, v in enumerate(volumes)]
        elif volumes is not None and hasattr(volumes, "items"):
            for name, spec in list(volumes.items()):
                key = f"data.init_args.volumes.{name}"
                if hasattr(spec, "get") and spec.get("path") is not None:
                    spec["path"] = _resolve(spec["path"], f"{key}.path", base)
                else:
                    volumes[name] = _resolve(spec, key, base)
    if cfg.get("ckpt_path"):
        cfg["ckpt_path"] = _resolve(cfg["ckpt_path"], "ckpt_path", base)


def config_dirs() -> list[Path]:
    """Folders searched for a config given by name: the checkout's ``experiments/``, then the
    installed copies (``PREFIX/share/cemnet/experiments``, also for ``pip install --user``)."""
    dirs = [CHECKOUT_EXPERIMENTS, Path(sys.prefix) / SHIPPED_SUBDIR, Path(sys.base_prefix) / SHIPPED_SUBDIR]
    user_base = getattr(site, "USER_BASE", None)
    if user_base:
        dirs.append(Path(user_base) / SHIPPED_SUBDIR)
    return list(dict.fromkeys(dirs))


def find_config(name: str) -> Path | None:
    """The shipped config called ``name`` (``tiny_mocov2_cpu`` or ``tiny_mocov2_cpu.yaml``), if any."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return None
    for folder in config_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    return None


def expand_config_names(argv: list[str]) -> list[str]:
    """``--config NAME`` (or ``-c NAME``) -> the shipped config's path, when NAME is not a file here."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, sep, value = arg.partition("=")
        if flag not in ("--config", "-c"):
            continue
        if sep:
            if not os.path.exists(value) and (found := find_config(value)) is not None:
                out[i] = f"{flag}={found}"
        elif i + 1 < len(out) and not os.path.exists(out[i + 1]) and (found := find_config(out[i + 1])) is not None:
            out[i + 1] = str(found)
    return out
