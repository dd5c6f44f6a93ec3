"""Mask semantics: how the values stored in a user's masks become classes.

A mask file holds numbers; what they mean is a decision, made once for the whole label set and
reported (``cemnet benchmark custom`` and ``cemnet finetune`` print it):

* ``binary``: foreground = value > ``threshold`` (default: half the largest value found, so 0/1,
  0/255, JPEG-compressed 0/255 and 16-bit 0/65535 masks all work).
* ``labels``: the values are class ids (0 = background). With a ``class_map`` (value -> name),
  only the listed values (and 0, or the value named ``background``) are allowed; any other value
  is an error naming the file. Without one, more than ``max_classes`` distinct values, or values
  above it, are refused: they are intensities, not class ids.
* ``auto`` (default): ``binary`` for two values (``{0, v}``), ``labels`` for small class ids
  ``0..K``, and for a few other values (AxonDeepSeg's ``{0, 128, 255}``) the sorted values as
  classes 0, 1, 2...; anything else is refused with the options to choose from.

``ignore_value`` marks unlabelled pixels (sparse labels): they become :data:`IGNORE`, carry no
loss and are not scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MaskError", "MaskSemantics", "MaskReport", "parse_class_map", "IGNORE"]

IGNORE = -1
MODES = ("auto", "binary", "labels")
_AUTO_VALUE_MAP_MAX = 8  # up to this many non-id values are read as an implicit value -> class map


class MaskError(ValueError):
    """Masks whose values do not fit the chosen semantics (the message names the file)."""


def parse_class_map(items: Sequence[str] | None) -> dict[int, str] | None:
    """``["128=myelin", "255=axon"]`` -> ``{128: "myelin", 255: "axon"}`` (CLI ``--class-map``)."""
    if not items:
        return None
    out: dict[int, str] = {}
    for item in items:
        value, sep, name = item.partition("=")
        try:
            out[int(value)] = name.strip() if sep and name.strip() else f"class{value}"
        except ValueError:
            raise MaskError(f"--class-map {item!r}: expected VALUE=NAME with an integer VALUE (e.g. 255=axon)") from None
    return out


@dataclasses.dataclass
class MaskReport:
    """What the masks were read as: mode, class names (background excluded), value -> class,
    per-class frequency over labelled pixels, ignored fraction, and warnings."""

    mode: str
    classes: tuple[str, ...]
    value_to_class: dict[int, int]
    threshold: float | None
    frequencies: dict[str, float]
    ignored_fraction: float
    warnings: list[str]

    def summary(self) -> str:
        rule = (f"binary, foreground = value > {self.threshold:g}" if self.mode == "binary"
                else "labels, " + ", ".join(f"{v}->{k}" for v, k in sorted(self.value_to_class.items())))
        freq = ", ".join(f"{n} {f * 100:.1f}%" for n, f in self.frequencies.items())
        ign = f"; {self.ignored_fraction * 100:.1f}% of pixels unlabelled (ignored)" if self.ignored_fraction else ""
        return f"masks read as {rule}; class frequencies: {freq}{ign}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MaskSemantics:
    """How mask values become classes (see the module docstring)."""

    mode: str = "auto"
    threshold: float | None = None
    class_map: Mapping[int, str] | None = None
    ignore_value: int | None = None
    max_classes: int = 32
    classes: Sequence[str] | None = None  # names of classes 1..K (labels mode) or of the foreground

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MaskError(f"mask mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.class_map and self.mode == "binary":
            raise MaskError("--class-map and --mask-mode binary exclude each other (a class map means labels)")

    # ------------------------------------------------------------------ decision

    def _values(self, masks: Sequence[np.ndarray]) -> np.ndarray:
        vals = np.unique(np.concatenate([np.unique(m) for m in masks])) if masks else np.zeros(0)
        if self.ignore_value is not None:
            vals = vals[vals != self.ignore_value]
        return vals

    def _decide(self, vals: np.ndarray, names: Sequence[str], masks: Sequence[np.ndarray]) -> tuple[str, dict[int, int], float | None, tuple[str, ...]]:
        mode = self.mode
        where = names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} other mask files)"
        if self.class_map:
            mode = "labels"
        integral = bool(np.all(np.equal(np.mod(vals, 1), 0))) if vals.size else True
        if mode == "auto":
            if vals.size <= 2 and (vals.size == 0 or vals.min() >= 0):
                mode = "binary"
            elif integral and vals.min(initial=0) >= 0 and vals.max(initial=0) <= self.max_classes:
                mode = "labels"
            elif integral and vals.size <= _AUTO_VALUE_MAP_MAX:
                mode = "valuemap"
            else:
                raise MaskError(
                    f"{where}: {vals.size} distinct mask values ({_preview(vals)}) are neither binary nor class "
                    "ids (a JPEG-compressed or anti-aliased mask?): pass --mask-mode binary (optionally --threshold T), "
                    "or --class-map VALUE=NAME ... for label masks")
        if mode == "binary":
            top = float(vals.max()) if vals.size else 1.0
            threshold = self.threshold if self.threshold is not None else (0.5 if top <= 1 else top / 2)
            fg = (self.classes[0],) if self.classes else ("foreground",)
            return "binary", {}, float(threshold), fg
        if mode == "valuemap" or self.class_map:
            cmap = dict(self.class_map or {})
            if not cmap:  # implicit: the sorted values are classes 0, 1, 2...
                order = [int(v) for v in vals]
                names_ = list(self.classes or [f"class{v}" for v in order[1:]])
                cmap = {order[0]: "background", **{v: n for v, n in zip(order[1:], names_)}}
            background = [v for v, n in cmap.items() if n == "background"]
            fg_items = [(v, n) for v, n in cmap.items() if n != "background"]
            lut = {v: k for k, (v, _) in enumerate(fg_items, start=1)}
            for v in background or ([0] if 0 not in cmap else []):
                lut[int(v)] = 0
            stray = [v for v in vals.tolist() if v not in lut]
            if stray:
                bad = next(n for n, m in zip(names, masks) if np.isin(m, stray).any())
                raise MaskError(f"{bad}: mask values {_preview(np.array(stray))} are not in the class map "
                                f"({', '.join(f'{v}={n}' for v, n in cmap.items())}); add them to --class-map or "
                                "declare them unlabelled with --ignore-value")
            return "labels", lut, None, tuple(n for _, n in fg_items)
        # labels: values are class ids
        if not integral or vals.min(initial=0) < 0 or vals.max(initial=0) > self.max_classes or vals.size > self.max_classes + 1:
            raise MaskError(
                f"{where}: mask values {_preview(vals)} do not look like class ids 0..{self.max_classes} "
                "(intensities?): pass --mask-mode binary (with --threshold) or --class-map VALUE=NAME ...")
        k = int(vals.max(initial=0))
        names_ = tuple(self.classes) if self.classes else tuple(f"class{i}" for i in range(1, max(k, 1) + 1))
        if len(names_) < k:
            raise MaskError(f"{where}: mask values go up to {k} but only {len(names_)} class names were given")
        return "labels", {i: i for i in range(len(names_) + 1)}, None, names_

    # ------------------------------------------------------------------ apply

    def apply(self, masks: Sequence[np.ndarray], names: Sequence[str]) -> tuple[list[np.ndarray], MaskReport]:
        """Class masks (int64; 0 background, k = class k, :data:`IGNORE` unlabelled) for every
        mask (one decision for the whole set) and the report of what was decided."""
        masks = [np.asarray(m) for m in masks]
        masks = [m.astype(np.uint8) if m.dtype == bool else m for m in masks]
        vals = self._values(masks)
        mode, lut, threshold, classes = self._decide(vals, list(names), masks)
        out = []
        for m in masks:
            ignore = (m == self.ignore_value) if self.ignore_value is not None else None
            if mode == "binary":
                cls = (m > threshold).astype(np.int64)
            else:
                cls = np.zeros(m.shape, np.int64)
                for v, k in lut.items():
                    if k:
                        cls[m == v] = k
            if ignore is not None:
                cls[ignore] = IGNORE
            out.append(cls)
        report = _report(out, mode, classes, lut, threshold)
        return out, report


def _preview(vals: np.ndarray, n: int = 6) -> str:
    vals = np.asarray(vals).ravel()
    shown = ", ".join(f"{v:g}" for v in vals[:n].tolist())
    return f"{shown}, ... ({vals.size} values)" if vals.size > n else shown


def _report(masks: Sequence[np.ndarray], mode: str, classes: tuple[str, ...], lut: dict[int, int],
            threshold: float | None) -> MaskReport:
    counts = np.zeros(len(classes) + 1)
    total = ignored = 0
    for m in masks:
        total += m.size
        lab = m[m != IGNORE]
        ignored += m.size - lab.size
        counts += np.bincount(lab.ravel(), minlength=len(counts))[: len(counts)]
    freq_arr = counts / max(counts.sum(), 1)
    frequencies = {"background": float(freq_arr[0]), **{n: float(f) for n, f in zip(classes, freq_arr[1:])}}
    warnings = []
    if counts.sum() == 0:
        warnings.append("no labelled pixels at all (every pixel is the ignore value)")
    for name, f in list(frequencies.items())[1:]:
        if f > 0.5:
            warnings.append(f"the scored class {name!r} covers {f * 100:.0f}% of the labelled pixels: predicting it "
                            f"everywhere already scores IoU {f:.2f}. Check which value is the object "
                            "(--class-map VALUE=NAME with the other value =background flips it)")
        if f == 0:
            warnings.append(f"class {name!r} never occurs in the masks")
    return MaskReport(mode, classes, {int(k): int(v) for k, v in lut.items()}, threshold, frequencies,
                      float(ignored / max(total, 1)), warnings)
