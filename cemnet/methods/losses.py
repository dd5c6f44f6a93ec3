"""Pure loss functions (no state, no modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce_queue", "mgmr_loss"]


def info_nce_queue(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, dict[str, Tensor]]:
    """MoCo's InfoNCE: each query against its key (positive) and the ``K`` queued keys (negatives).

    Computed in fp32 with autocast off whatever the training precision: with K = 65,536 negatives
    and logits / 0.2 spanning [-5, 5], bf16's 8-bit mantissa would quantise the softmax noticeably.

    Args:
        q: ``(N, D)`` query projections (normalised here).
        k: ``(N, D)`` key projections, no gradient (normalised here).
        queue: ``(K, D)`` L2-normalised negative keys; must not be modified in place until after
            the backward pass (pass a snapshot, see :meth:`KeyQueue.snapshot`).
        temperature: softmax temperature tau.

    Returns:
        the mean cross-entropy with the positive at index 0, and detached statistics:
        ``logit_pos`` / ``logit_neg`` (mean cosine, before /tau), ``acc_top1`` (positive ranked first).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ queue.float().T  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        stats = {
            "logit_pos": l_pos.mean(),
            "logit_neg": l_neg.mean(),
            "acc_top1": (logits.argmax(dim=1) == 0).float().mean(),
        }
    return loss, stats


def mgmr_loss(
    pred_img: Tensor,
    target_img: Tensor,
    pred_hog: Tensor,
    target_hog: Tensor,
    pixel_weight: float = 0.2,
    hog_weight: float = 1.0,
    img_weight_map: Tensor | None = None,
    hog_weight_map: Tensor | None = None,
) -> dict[str, Tensor]:
    """SegNeuron's MGMR loss: ``pixel_weight * MSE(img) + hog_weight * MSE(hog)`` in fp32.

    Weight maps (broadcastable, e.g. the mask) turn each MSE into a weighted mean; ``None`` is
    the plain mean over all voxels (SegNeuron).
    """

    def mse(pred: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        err = (pred.float() - target.float()).square()
        if weight is None:
            return err.mean()
        weight = weight.float().expand_as(err)
        return (err * weight).sum() / weight.sum().clamp_min(1.0)

    pixel = mse(pred_img, target_img, img_weight_map)
    hog = mse(pred_hog, target_hog, hog_weight_map)
    return {"loss": pixel_weight * pixel + hog_weight * hog, "loss_pixel": pixel, "loss_hog": hog}
