"""The published CEM500K ResNet34 patch-quality classifier as a filter."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curation.filters.base import FilterResult, check_batch, classifier_reason, empty_mask, size_groups

if TYPE_CHECKING:  # torch is imported lazily: only the logistic fit and the CEM500K model need it
    import torch

#: albumentations ``Normalize()`` defaults (ImageNet), max_pixel_value 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cem500k_preprocess(patches: np.ndarray, sizes: np.ndarray, size: int = 224) -> torch.Tensor:
    """CEM500K classifier input: crop to true size, GRAY2RGB, Resize(size, size), Normalize().

    Resize is bilinear with half-pixel centres and no antialiasing (cv2.INTER_LINEAR, the
    albumentations default); its result is rounded back to uint8 because cv2 resizes uint8 images
    to uint8 before ``Normalize`` (cv2's fixed-point arithmetic can differ by 1 grey level).
    Patches already at ``size`` x ``size`` pass through unchanged. Returns float32 (N, 3, size, size).
    """
    import torch

    patches, sizes = check_batch(patches, sizes)
    x = torch.empty((len(patches), 1, size, size), dtype=torch.float32)
    for h, w, idx in size_groups(sizes):
        if h == 0 or w == 0:
            x[idx] = 0.0
            continue
        g = torch.from_numpy(np.ascontiguousarray(patches[idx, :h, :w])).float().unsqueeze(1)
        if (h, w) != (size, size):
            g = torch.nn.functional.interpolate(g, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
            g = g.round().clamp_(0, 255)
        x[torch.from_numpy(idx)] = g
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std  # broadcasting the single grey channel = GRAY2RGB


def _build_resnet34_one_logit() -> torch.nn.Module:
    import torch
    from torchvision.models import resnet34

    model = resnet34(weights=None)
    model.fc = torch.nn.Linear(512, 1)
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Cem500kClassifierFilter:
    """The published CEM500K patch-quality classifier (``patch_quality_classifier_nn.pth``).

    That file is ``torch.save(model.state_dict())`` of torchvision's ``resnet34`` with
    ``model.fc = nn.Linear(512, 1)`` (CEM500K ``dataset/filtered/classify_nn.py``); a patch is
    "good" (kept) when ``sigmoid(logit) > threshold`` (0.5 there).

    Accepted files: a bare state_dict, a ``module.``-prefixed one (DataParallel), or
    ``{'state_dict': ...}``. Loaded with ``weights_only=True`` (no code execution).
    """

    name: str = "cem500k"

    def __init__(
        self, path: str | Path, *, threshold: float = 0.5, device: str = "cpu", batch_size: int = 64
    ) -> None:
        import torch

        self.path = Path(path)
        self.threshold = float(threshold)
        self.device = str(device)
        self.batch_size = int(batch_size)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"cem500k threshold must be in [0, 1], got {threshold}")
        if self.batch_size < 1:
            raise ValueError(f"cem500k batch_size must be >= 1, got {batch_size}")
        if not self.path.is_file():
            raise FileNotFoundError(f"CEM500K classifier weights not found: {self.path}")
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors come in many types
            raise ValueError(f"{self.path}: cannot be read as a PyTorch weights file ({e})") from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise ValueError(f"{self.path}: expected a state_dict (mapping of parameter names to tensors)")
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        model = _build_resnet34_one_logit()
        expected = model.state_dict()
        state = dict(state)
        for k in expected:
            # BatchNorm's num_batches_tracked counters (absent from pre-2018 files) are unused in
            # eval mode: take them from the fresh model rather than rejecting the file.
            if k.endswith("num_batches_tracked") and k not in state:
                state[k] = expected[k]
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        bad_shape = sorted(
            f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs expected {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape))
        )
        if missing or unexpected or bad_shape:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
            if bad_shape:
                parts.append(f"shape mismatches: {bad_shape[:3]}")
            raise ValueError(
                f"{self.path}: not a CEM500K patch-quality classifier (torchvision resnet34 with "
                f"fc = Linear(512, 1)): " + "; ".join(parts)
            )
        model.load_state_dict(state, strict=True)
        self.model = model.to(self.device).eval()
        self.sha256 = _sha256(self.path)

    def predict_proba(self, patches: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """sigmoid(logit) = P(good) per patch, batched, without gradients."""
        import torch

        patches, sizes = check_batch(patches, sizes)
        out = np.empty(len(patches), dtype=np.float64)
        with torch.no_grad():
            for s in range(0, len(patches), self.batch_size):
                x = cem500k_preprocess(patches[s : s + self.batch_size], sizes[s : s + self.batch_size])
                logit = self.model(x.to(self.device))[:, 0]
                out[s : s + len(x)] = torch.sigmoid(logit.double()).cpu().numpy()
        return out

    def __call__(self, patches: np.ndarray, sizes: np.ndarray) -> FilterResult:
        """Keep patches with ``p > threshold`` (CEM500K's rule); score = p."""
        patches, sizes = check_batch(patches, sizes)
        p = self.predict_proba(patches, sizes)
        empty = empty_mask(sizes)
        keep = (p > self.threshold) & ~empty
        reason = np.array(["" if k else classifier_reason(v) for k, v in zip(keep, p)], dtype=object)
        reason[empty] = "empty"
        return FilterResult(keep=keep, reason=reason, score=p)

    def describe(self) -> dict:
        """Name, weights file (path and sha256), threshold and the preprocessing used."""
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "threshold": self.threshold,
            "device": self.device,
            "batch_size": self.batch_size,
            "preprocess": "crop to true size; GRAY2RGB; bilinear Resize(224,224); ImageNet Normalize",
        }
