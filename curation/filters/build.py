"""Filters from command-line specs (``--filter stats:...``, ``logistic:PATH``, ``cem500k:PATH``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from curation.filters.base import PatchFilter
from curation.filters.cem500k import Cem500kClassifierFilter
from curation.filters.logistic import LogisticFilter
from curation.filters.stats import StatsFilter

_SPEC_HELP = (
    "expected 'none', 'stats', 'stats:KEY=VALUE,...', 'logistic:PATH.json[,threshold=T]' or "
    "'cem500k:PATH.pth[,threshold=T,device=D,batch_size=B]'"
)


def _parse_options(text: str, allowed: dict[str, type], spec: str) -> dict[str, Any]:
    """Parse ``k=v,k=v`` with typed values; ValueError naming the spec on anything else."""
    opts: dict[str, Any] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"filter spec {spec!r}: empty option; {_SPEC_HELP}")
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key or not val:
            raise ValueError(f"filter spec {spec!r}: option {part!r} is not KEY=VALUE")
        if key not in allowed:
            raise ValueError(
                f"filter spec {spec!r}: unknown option {key!r}; valid options: {', '.join(sorted(allowed))}"
            )
        if key in opts:
            raise ValueError(f"filter spec {spec!r}: option {key!r} given twice")
        try:
            opts[key] = allowed[key](val)
        except ValueError:
            raise ValueError(
                f"filter spec {spec!r}: option {key}={val!r} is not a valid {allowed[key].__name__}"
            ) from None
    return opts


def _path_and_options(rest: str, allowed: dict[str, type], spec: str) -> tuple[str, dict[str, Any]]:
    path, _, opts = rest.partition(",")
    path = path.strip()
    if not path:
        raise ValueError(f"filter spec {spec!r}: missing file path; {_SPEC_HELP}")
    return path, (_parse_options(opts, allowed, spec) if opts.strip() else {})


def build_filter(spec: str) -> PatchFilter | None:
    """Build a filter from a command-line spec.

    ``"none"`` -> None; ``"stats"``; ``"stats:uniform_fraction=0.85,min_std=6"``;
    ``"logistic:PATH.json"`` (optionally ``,threshold=0.6``);
    ``"cem500k:PATH.pth[,threshold=0.5,device=cpu,batch_size=64]"``.

    Raises:
        ValueError: for an unknown kind or option, a malformed value or a missing path.
    """
    if not isinstance(spec, str):
        raise ValueError(f"filter spec must be a string, got {type(spec).__name__}")
    s = spec.strip()
    kind, sep, rest = s.partition(":")
    kind = kind.strip().lower()
    if kind == "none" and not sep:
        return None
    if kind == "stats":
        if not sep:
            return StatsFilter()
        if not rest.strip():
            raise ValueError(f"filter spec {spec!r}: nothing after 'stats:'; {_SPEC_HELP}")
        allowed = {f.name: float for f in dataclasses.fields(StatsFilter)}
        return StatsFilter(**_parse_options(rest, allowed, spec))
    if kind == "logistic" and sep:
        path, opts = _path_and_options(rest, {"threshold": float}, spec)
        filt = LogisticFilter.load(path)
        if "threshold" in opts:
            filt = dataclasses.replace(filt, threshold=opts["threshold"])
        return filt
    if kind == "cem500k" and sep:
        path, opts = _path_and_options(rest, {"threshold": float, "device": str, "batch_size": int}, spec)
        return Cem500kClassifierFilter(path, **opts)
    if kind in ("logistic", "cem500k"):
        raise ValueError(f"filter spec {spec!r}: '{kind}' needs a file path; {_SPEC_HELP}")
    raise ValueError(f"unknown filter spec {spec!r}; {_SPEC_HELP}")
