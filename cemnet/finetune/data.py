"""Fine-tuning data: the user's labelled images / volumes, the validation split and a fingerprint.

Sources (one of): a folder of 2D images + a folder of masks matched by name, one image volume +
label volume (any format :mod:`curation.readers` opens, HDF5/zarr keys), or a manifest of
several volumes (YAML list or CSV with ``image``, ``labels`` and optional ``key``,
``label_key``, ``split`` = ``train`` | ``validation``; relative paths are relative to the
manifest). Semantic masks become classes by :class:`~cemnet.benchmarks.masks.MaskSemantics`
(one decision over every mask, reported); instance labels are ids (0 = unlabelled).

Validation: given (``--val-*`` or manifest ``split: validation``), or held out automatically:
every k-th 2D image (spread over the set, not the last ones), or the last part of each volume
along z; a single 2D image is cut along y.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cemnet.benchmarks.datasets import BenchmarkData, Sample, _read_pairs, read_labelled_volume
from cemnet.benchmarks.masks import MaskReport, MaskSemantics

__all__ = ["VolumeEntry", "read_manifest", "load_finetune_data", "holdout", "fingerprint", "DataError"]


class DataError(ValueError):
    """Unusable fine-tuning data (the message names the file and the problem)."""


@dataclasses.dataclass
class VolumeEntry:
    """One labelled volume of a manifest."""

    image: str
    labels: str
    key: str | None = None
    label_key: str | None = None
    split: str = "train"


def read_manifest(path: str | os.PathLike) -> list[VolumeEntry]:
    """Entries of a YAML (list, or ``{volumes: [...]}``) or CSV manifest of labelled volumes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            raw: Any = list(csv.DictReader(fh))
    else:
        import yaml

        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(raw, dict):
            raw = raw.get("volumes")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{path}: expected a list of volumes with 'image' and 'labels'")
    out = []
    for i, row in enumerate(raw):
        if not isinstance(row, dict) or not row.get("image") or not row.get("labels"):
            raise DataError(f"{path}: entry {i + 1} needs 'image' and 'labels'")
        split = str(row.get("split") or "train").lower()
        if split in ("val", "valid"):
            split = "validation"
        if split not in ("train", "validation"):
            raise DataError(f"{path}: entry {i + 1}: split must be train or validation, got {split!r}")
        resolve = lambda p: str(p if Path(p).is_absolute() else path.parent / p)  # noqa: E731
        out.append(VolumeEntry(resolve(row["image"]), resolve(row["labels"]), row.get("key") or None,
                               row.get("label_key") or None, split))
    return out


def holdout(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample], str]:
    """(train, validation, rule) with ``fraction`` held out: every k-th of several 2D images, the
    last part along z of each volume, the last rows of a single 2D image."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction {fraction}: must be in (0, 1)")
    samples = list(samples)
    if len(samples) >= 2 and samples[0].image.ndim == 2:
        n_val = max(1, int(round(fraction * len(samples))))
        step = len(samples) / n_val
        idx = {min(len(samples) - 1, int(step * i + step / 2)) for i in range(n_val)}
        return ([s for i, s in enumerate(samples) if i not in idx], [s for i, s in enumerate(samples) if i in idx],
                f"every {step:g}th image ({n_val} of {len(samples)})")
    train, val = [], []
    for s in samples:
        n = s.image.shape[0]
        k = int(round((1 - fraction) * n))
        if not 0 < k < n:
            raise DataError(f"{s.name}: too small ({n} along the first axis) to hold out {fraction:g} for validation; "
                            "pass validation data (--val-images/--val-masks or --val-image/--val-labels)")
        train.append(Sample(s.image[:k], s.mask[:k], f"{s.name}[:{k}]"))
        val.append(Sample(s.image[k:], s.mask[k:], f"{s.name}[{k}:]"))
    return train, val, f"last {fraction:g} of each {'volume along z' if samples[0].image.ndim == 3 else 'image along y'}"


def fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over the names, shapes and contents (images and class masks) of ``samples``."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.name}|{s.image.shape}|{s.image.dtype}|{s.mask.dtype}".encode())
        h.update(np.ascontiguousarray(s.image).tobytes())
        h.update(np.ascontiguousarray(s.mask).tobytes())
    return h.hexdigest()


def _volumes(entries: Sequence[VolumeEntry], instance: bool, semantics: MaskSemantics) -> tuple[list[Sample], list[MaskReport]]:
    out, reports = [], []
    for e in entries:
        for p in (e.image, e.labels):
            if not Path(p).exists():
                raise DataError(f"{p}: not found")
        img, lab, rep = read_labelled_volume(e.image, e.labels, key=e.key, label_key=e.label_key, instance=instance,
                                             semantics=semantics)
        if img.ndim == 2:
            img, lab = img[None], lab[None]
        out.append(Sample(img, lab, Path(e.image).name.split(".")[0]))
        if rep is not None:
            reports.append(rep)
    return out, reports


def _volume_classes(reports: Sequence[MaskReport], where: str) -> MaskReport | None:
    if not reports:
        return None
    first = reports[0]
    for r in reports[1:]:
        if r.classes != first.classes or r.value_to_class != first.value_to_class or r.threshold != first.threshold:
            raise DataError(f"{where}: the label volumes were read differently ({first.summary()} vs {r.summary()}); "
                            "fix the semantics with --mask-mode / --threshold / --class-map")
    return first


def load_finetune_data(*, images: str | None = None, masks: str | None = None, image: str | None = None,
                       labels: str | None = None, key: str | None = None, label_key: str | None = None,
                       manifest: str | None = None, val_images: str | None = None, val_masks: str | None = None,
                       val_image: str | None = None, val_labels: str | None = None, val_fraction: float = 0.2,
                       instance: bool = False, semantics: MaskSemantics | None = None) -> tuple[BenchmarkData, dict[str, Any]]:
    """Training + validation data (``BenchmarkData.test`` is the validation set) and a record
    of how it was made (sources, validation rule and names, mask semantics report)."""
    semantics = semantics or MaskSemantics()
    given = [bool(images or masks), bool(image or labels), bool(manifest)]
    if sum(given) != 1:
        raise DataError("pass exactly one of --images/--masks (2D), --image/--labels (a volume) or --manifest")
    record: dict[str, Any] = {}
    report: MaskReport | None = None
    if images or masks:
        if not (images and masks):
            raise DataError("--images and --masks go together")
        samples, report = _read_pairs(Path(images), Path(masks), semantics)
        record["sources"] = {"images": str(images), "masks": str(masks)}
        if val_images or val_masks:
            if not (val_images and val_masks):
                raise DataError("--val-images and --val-masks go together")
            val, val_report = _read_pairs(Path(val_images), Path(val_masks), semantics)
            if val_report.value_to_class != report.value_to_class or val_report.classes != report.classes:
                raise DataError(f"{val_masks}: validation masks read as {val_report.summary()}, training masks as "
                                f"{report.summary()}; fix the semantics with --mask-mode / --class-map")
            train, rule = samples, f"given: {val_images}"
        else:
            train, val, rule = holdout(samples, val_fraction)
    else:
        if manifest:
            entries = read_manifest(manifest)
            record["sources"] = {"manifest": str(manifest)}
        else:
            if not (image and labels):
                raise DataError("--image and --labels go together")
            entries = [VolumeEntry(image, labels, key, label_key)]
            record["sources"] = {"image": str(image), "labels": str(labels), "key": key, "label_key": label_key}
            if val_image or val_labels:
                if not (val_image and val_labels):
                    raise DataError("--val-image and --val-labels go together")
                entries.append(VolumeEntry(val_image, val_labels, key, label_key, "validation"))
        train_vols, reports = _volumes([e for e in entries if e.split == "train"], instance, semantics)
        val_vols, val_reports = _volumes([e for e in entries if e.split == "validation"], instance, semantics)
        if not train_vols:
            raise DataError(f"{manifest}: no training volume (every entry is split: validation)")
        report = _volume_classes(reports + val_reports, str(manifest or labels))
        if val_vols:
            train, val, rule = train_vols, val_vols, "given"
        else:
            train, val, rule = holdout(train_vols, val_fraction)
    record["validation"] = {"rule": rule, "samples": [s.name for s in val]}
    if report is not None:
        record["masks"] = report.to_dict()
        if all(not (s.mask > 0).any() for s in train):
            raise DataError("the training labels hold no foreground at all (check --mask-mode / --class-map)")
    if instance:
        return BenchmarkData("finetune", "instance3d", ("object",), train, val), record
    task = "semantic3d" if train[0].image.ndim == 3 else "semantic2d"
    return BenchmarkData("finetune", task, report.classes if report else ("foreground",), train, val,
                         mask_report=report), record
