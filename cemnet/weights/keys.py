"""State-dict key surgery shared by the exporter and the converters.

Wrappers add path segments that are not part of the architecture: ``torch.compile`` inserts
``_orig_mod`` wherever a module was compiled (any depth), DistributedDataParallel/DataParallel
prepend ``module``. They are removed before keys are compared with a freshly built model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")

COMPILE_SEGMENT = "_orig_mod"
PARALLEL_SEGMENT = "module"


def clean_key(key: str) -> str:
    """Drop every ``_orig_mod`` segment and any leading ``module`` segments.

    ``module`` is only stripped at the front: it is what DDP adds, and a real submodule could be
    called ``module`` deeper down.
    """
    parts = [p for p in key.split(".") if p != COMPILE_SEGMENT]
    while parts and parts[0] == PARALLEL_SEGMENT:
        parts.pop(0)
    return ".".join(parts)


def clean_keys(state_dict: Mapping[str, V]) -> dict[str, V]:
    """:func:`clean_key` applied to every key; collisions are an error (two wrappers of one net)."""
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        new = clean_key(key)
        if new in out:
            raise ValueError(f"two keys map to {new!r} after removing wrapper segments (found {key!r})")
        out[new] = value
    return out


def split_prefix(state_dict: Mapping[str, V], prefix: str) -> tuple[dict[str, V], dict[str, V]]:
    """Split cleaned keys into (under ``prefix.`` with it removed, everything else).

    ``prefix`` may be dotted (``encoder.backbone``). Keys below it are cleaned again, since a
    compiled or DDP-wrapped submodule puts its wrapper segment right after the prefix.
    """
    inside: dict[str, V] = {}
    outside: dict[str, V] = {}
    head = prefix + "."
    for key, value in clean_keys(state_dict).items():
        if key.startswith(head):
            inside[clean_key(key[len(head) :])] = value
        else:
            outside[key] = value
    return inside, outside


def drop_prefixes(state_dict: Mapping[str, V], prefixes: Iterable[str]) -> tuple[dict[str, V], dict[str, V]]:
    """Split into (kept, dropped) where dropped keys equal or start with one of ``prefixes``."""
    heads = tuple(prefixes)
    kept: dict[str, V] = {}
    dropped: dict[str, V] = {}
    for key, value in state_dict.items():
        hit = any(key == p or key.startswith(p + ".") for p in heads)
        (dropped if hit else kept)[key] = value
    return kept, dropped


def summarize(keys: Iterable[str]) -> dict[str, int]:
    """Count keys by first segment, e.g. ``{"backbone_momentum": 62, "projection_head": 4}``."""
    return dict(sorted(Counter(k.split(".", 1)[0] for k in keys).items()))
