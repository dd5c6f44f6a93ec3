"""A logistic-regression filter on :func:`~curation.filters.features.patch_features`, trained
on the user's labels (:mod:`curation.filters.training`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from curation.filters.base import FilterResult, check_batch, classifier_reason, empty_mask
from curation.filters.features import DEFAULT_UNIFORM_STD, FEATURE_NAMES, patch_features

_LOGISTIC_FORMAT = "cemnet-logistic-patch-filter"
_LOGISTIC_VERSION = 1


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function, float64, without overflow (split by sign so that exp never overflows)."""
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


@dataclass(eq=False)  # array fields: element-wise == would make dataclass equality ambiguous
class LogisticFilter:
    """Logistic regression on standardised :func:`patch_features`.

    ``p(informative) = sigmoid(weights . (features - mean) / std + bias)``; kept when
    ``p >= threshold``. Build one with :func:`train_logistic_filter`; persist with
    :meth:`save` / :meth:`load` (JSON, exact round trip).
    """

    name: ClassVar[str] = "logistic"

    feature_names: list[str]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float = 0.5
    uniform_std: float = DEFAULT_UNIFORM_STD
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.feature_names = list(self.feature_names)
        self.mean = np.asarray(self.mean, dtype=np.float64)
        self.std = np.asarray(self.std, dtype=np.float64)
        self.weights = np.asarray(self.weights, dtype=np.float64)
        self.bias = float(self.bias)
        self.threshold = float(self.threshold)
        self.uniform_std = float(self.uniform_std)
        f = len(self.feature_names)
        if not (self.mean.shape == self.std.shape == self.weights.shape == (f,)):
            raise ValueError(
                f"LogisticFilter: mean/std/weights must each have {f} entries (one per feature), "
                f"got {self.mean.shape}, {self.std.shape}, {self.weights.shape}"
            )
        if list(self.feature_names) != list(FEATURE_NAMES):
            raise ValueError(
                f"LogisticFilter was built on features {self.feature_names}, but this version of "
                f"patch_features computes {list(FEATURE_NAMES)}; retrain it"
            )
        if np.any(self.std <= 0) or not np.all(np.isfinite(self.std)):
            raise ValueError("LogisticFilter: feature std must be finite and > 0")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"LogisticFilter.threshold must be in [0, 1], got {self.threshold}")

    def predict_proba_features(self, feats: np.ndarray) -> np.ndarray:
        """P(informative) from precomputed features (N, F)."""
        z = ((np.asarray(feats, dtype=np.float64) - self.mean) / self.std) @ self.weights + self.bias
        return sigmoid(z)

    def predict_proba(self, patches: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """P(informative) for each patch."""
        feats, _ = patch_features(patches, sizes, uniform_std=self.uniform_std)
        return self.predict_proba_features(feats)

    def __call__(self, patches: np.ndarray, sizes: np.ndarray) -> FilterResult:
        """Keep patches with ``p >= threshold``; score = p."""
        patches, sizes = check_batch(patches, sizes)
        p = self.predict_proba(patches, sizes)
        empty = empty_mask(sizes)
        p[empty] = 0.0
        keep = (p >= self.threshold) & ~empty
        reason = np.array([classifier_reason(v) for v in p], dtype=object)
        reason[keep] = ""
        reason[empty] = "empty"
        return FilterResult(keep=keep, reason=reason, score=p)

    def describe(self) -> dict:
        """Everything needed to reproduce the decisions (the model itself, not just a path)."""
        return {"name": self.name, **self._to_json()}

    def _to_json(self) -> dict:
        return {
            "format": _LOGISTIC_FORMAT,
            "version": _LOGISTIC_VERSION,
            "feature_names": list(self.feature_names),
            "uniform_std": self.uniform_std,
            # Python floats serialise via repr, which round-trips float64 exactly.
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "weights": [float(v) for v in self.weights],
            "bias": self.bias,
            "threshold": self.threshold,
            "training": self.training,
        }

    def save(self, path: str | Path) -> None:
        """Write the model as JSON (exact float64 round trip)."""
        Path(path).write_text(json.dumps(self._to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LogisticFilter:
        """Read a model written by :meth:`save`; ValueError naming the file if it is not one."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"logistic filter file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a cemnet logistic filter (invalid JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != _LOGISTIC_FORMAT:
            raise ValueError(f"{path}: not a cemnet logistic filter (format != {_LOGISTIC_FORMAT!r})")
        if d.get("version") != _LOGISTIC_VERSION:
            raise ValueError(f"{path}: unsupported logistic filter version {d.get('version')!r}")
        try:
            return cls(
                feature_names=d["feature_names"], mean=d["mean"], std=d["std"],
                weights=d["weights"], bias=d["bias"], threshold=d.get("threshold", 0.5),
                uniform_std=d.get("uniform_std", DEFAULT_UNIFORM_STD), training=d.get("training", {}),
            )
        except KeyError as e:
            raise ValueError(f"{path}: logistic filter is missing field {e.args[0]!r}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
