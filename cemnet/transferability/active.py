"""Active learning: which unlabelled target patches to annotate first.

Uncertainty comes from a *trained* segmentation head (a :class:`cemnet.models.unet.UNet`): the
per-pixel class probabilities are turned into a per-pixel uncertainty (entropy or 1 - margin)
and averaged per patch. An untrained head or a linear probe on frozen features has no idea of
the task, so its "uncertainty" is noise; the uncertainty strategies therefore refuse to run
without a head (``HeadRequiredError``), and ``kcenter`` / ``random`` need only the encoder.

Strategies (all return indices into the scored pool, in selection order):

* ``median`` - NeuroADDA (2025): the ``budget`` patches whose uncertainty is closest to the
  median. The most uncertain patches tend to be outliers (artefacts, empty resin, out-of-domain
  structures) that teach a model little; the median ones are typical *and* not yet solved.
* ``highest`` - classic uncertainty sampling: the ``budget`` most uncertain patches.
* ``kcenter`` - diversity (Sener & Savarese 2018 core-set): greedy k-center on the embeddings,
  each pick is the patch farthest from everything picked so far (a 2-approximation of the
  optimal covering radius).
* ``random`` - the baseline every strategy must beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cemnet.finetune.model_file import load_model
from cemnet.models.unet import UNet
from cemnet.transferability.embed import build_features_encoder

__all__ = [
    "STRATEGIES",
    "UNCERTAINTY_STRATEGIES",
    "HeadRequiredError",
    "select",
    "select_median",
    "select_highest",
    "select_kcenter",
    "select_random",
    "pixel_uncertainty",
    "patch_uncertainty",
    "save_head",
    "load_head",
]

STRATEGIES = ("median", "highest", "kcenter", "random")
UNCERTAINTY_STRATEGIES = ("median", "highest")
HEAD_FORMAT = "cemnet-seg-head"


class HeadRequiredError(ValueError):
    """An uncertainty strategy was asked for without a trained segmentation head."""


def _check_budget(budget: int, n: int) -> int:
    """Budget as an int in [0, n]; a budget larger than the pool takes the whole pool."""
    if int(budget) != budget or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if n == 0:
        raise ValueError("the pool of candidate patches is empty")
    return min(int(budget), n)


# --------------------------------------------------------------------------- strategies


def select_median(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the ``budget`` scores closest to the median score (closest first).

    Ties are broken by index (stable sort), so the result is deterministic.
    """
    scores = np.asarray(scores, dtype=np.float64)
    budget = _check_budget(budget, len(scores))
    if not np.all(np.isfinite(scores)):
        raise ValueError("uncertainty scores contain NaN/inf")
    distance = np.abs(scores - np.median(scores))
    return np.argsort(distance, kind="stable")[:budget]


def select_highest(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the ``budget`` highest scores (highest first, ties by index)."""
    scores = np.asarray(scores, dtype=np.float64)
    budget = _check_budget(budget, len(scores))
    if not np.all(np.isfinite(scores)):
        raise ValueError("uncertainty scores contain NaN/inf")
    return np.argsort(-scores, kind="stable")[:budget]


def select_random(n: int, budget: int, seed: int = 0) -> np.ndarray:
    """``budget`` distinct indices out of ``n``, uniformly at random."""
    budget = _check_budget(budget, n)
    return np.random.default_rng(seed).choice(n, budget, replace=False)


def select_kcenter(embeddings: np.ndarray, budget: int, first: int | None = None) -> np.ndarray:
    """Greedy k-center: each pick maximises its distance to the nearest earlier pick.

    The first pick is ``first``, or by default the point nearest the mean embedding (a typical
    patch, and deterministic). Memory is O(n): one running "distance to nearest pick" vector.
    Duplicate embeddings are never picked twice while a distinct point remains.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    budget = _check_budget(budget, len(x))
    if first is None:
        first = int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))
    picks = [int(first)]
    nearest = np.sqrt(((x - x[first]) ** 2).sum(1))
    for _ in range(budget - 1):
        nxt = int(np.argmax(nearest))
        picks.append(nxt)
        nearest = np.minimum(nearest, np.sqrt(((x - x[nxt]) ** 2).sum(1)))
    return np.array(picks, dtype=np.int64)


def select(
    strategy: str,
    budget: int,
    *,
    scores: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    n: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Dispatch to a strategy. Uncertainty strategies need ``scores`` (from a trained head)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if strategy in UNCERTAINTY_STRATEGIES:
        if scores is None:
            raise HeadRequiredError(
                f"strategy {strategy!r} needs uncertainty scores from a trained segmentation head "
                "(--head); uncertainty of an untrained head or linear probe is not meaningful. "
                "Use --strategy kcenter or random without a head."
            )
        return select_median(scores, budget) if strategy == "median" else select_highest(scores, budget)
    if strategy == "kcenter":
        if embeddings is None:
            raise ValueError("strategy 'kcenter' needs embeddings")
        return select_kcenter(embeddings, budget)
    size = n if n is not None else len(scores if scores is not None else embeddings)  # type: ignore[arg-type]
    return select_random(size, budget, seed=seed)


# --------------------------------------------------------------------------- uncertainty


def pixel_uncertainty(logits: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """Per-pixel uncertainty (B, H, W) from segmentation logits (B, C, H, W).

    ``C == 1`` is a binary sigmoid head, ``C >= 2`` a softmax head. ``entropy`` is normalised by
    ``log(classes)`` so it lies in [0, 1] for any number of classes; ``margin`` is
    ``1 - (p_top1 - p_top2)``, also in [0, 1].
    """
    if logits.ndim < 3:
        raise ValueError(f"expected (B, C, ...) logits, got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        probs = torch.stack([1 - p1, p1], 1)
    else:
        probs = torch.softmax(logits, 1)
    classes = probs.shape[1]
    if kind == "entropy":
        ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
        return ent / float(np.log(classes))
    if kind == "margin":
        top2 = probs.topk(2, dim=1).values
        return 1.0 - (top2[:, 0] - top2[:, 1])
    raise ValueError(f"unknown uncertainty {kind!r}; choose entropy or margin")


@torch.no_grad()
def patch_uncertainty(
    head: nn.Module,
    batches: Sequence[torch.Tensor] | Any,
    kind: str = "entropy",
    masks: Sequence[torch.Tensor] | None = None,
) -> np.ndarray:
    """Mean per-pixel uncertainty of each patch, over an iterable of normalised input batches.

    ``masks`` (optional, one (B, H, W) bool tensor per batch) restricts the mean to the true
    pixels of zero-padded edge patches, so padding does not count as (un)certain tissue.
    """
    head.eval()
    out = []
    for i, x in enumerate(batches):
        u = pixel_uncertainty(head(x), kind)
        if masks is not None:
            m = masks[i].to(u.dtype)
            out.append(((u * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)).cpu().numpy())
        else:
            out.append(u.flatten(1).mean(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


# --------------------------------------------------------------------------- head checkpoints


def save_head(
    unet: nn.Module,
    path: str | Path,
    *,
    encoder: str,
    num_classes: int,
    unet_kwargs: dict[str, Any] | None = None,
    mean: float | None = None,
    std: float | None = None,
    input_size: int | None = None,
) -> Path:
    """Save a fine-tuned :class:`~cemnet.models.unet.UNet` so ``cemnet transfer select --head`` can rebuild it.

    ``encoder`` is how to rebuild the (architecture of the) encoder: a ``cemnet export`` file or
    ``timm:ARCH``; the weights themselves come from the saved state dict. ``mean``/``std`` (on
    the [0, 1] scale) and ``input_size`` record how the head was fed during training.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": HEAD_FORMAT,
            "encoder": str(encoder),
            "num_classes": int(num_classes),
            "unet_kwargs": dict(unet_kwargs or {}),
            "mean": mean,
            "std": std,
            "input_size": input_size,
            "state_dict": unet.state_dict(),
        },
        path,
    )
    return path


def load_head(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a segmentation head: a ``cemnet finetune`` model file (``RUN/model.safetensors``)
    or a file saved by :func:`save_head`; returns (model in eval mode, its record: ``encoder``,
    ``num_classes``, ``mean``, ``std``, ``input_size``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such head file")
    with open(path, "rb") as fh:
        start = fh.read(16)
    if not start.startswith(b"PK") and len(start) >= 9 and start[8:9] == b"{":  # safetensors: u64 length + JSON
        return _load_model_file_head(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a segmentation head ({type(err).__name__}); pass a 'cemnet finetune' "
                         "model file (RUN/model.safetensors)") from None
    if not isinstance(record, dict) or record.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path}: not a segmentation head saved by cemnet.transferability.active.save_head or cemnet finetune")
    encoder = build_features_encoder(record["encoder"])
    unet = UNet(encoder, num_classes=record["num_classes"], **record["unet_kwargs"])
    unet.load_state_dict(record["state_dict"], strict=True)
    return unet.eval(), record


def _load_model_file_head(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    model = load_model(path)
    spec = model.cemnet_spec
    if spec.task != "semantic" or spec.dims != "2d" or spec.in_chans != 1:
        raise ValueError(f"{path}: a {spec.task} {spec.dims} model; uncertainty selection needs a semantic 2D "
                         "model (cemnet finetune --task semantic)")
    source = spec.encoder.get("source")
    encoder = f"timm:{spec.arch['encoder']}" if source in (None, "random") else str(source)
    record = {"format": "cemnet-model", "encoder": encoder, "num_classes": spec.out_channels, "mean": spec.norm[0],
              "std": spec.norm[1], "input_size": None, "classes": spec.classes}
    return model, record
