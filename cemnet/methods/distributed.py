"""Multi-process helpers of the contrastive methods: gathering keys across ranks, MoCo's
shuffle-BN (:func:`batch_shuffle` / :func:`batch_unshuffle`) and :class:`SplitBatchNorm2d`, its
single-device stand-in."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "is_distributed",
    "concat_all_gather",
    "batch_shuffle",
    "batch_unshuffle",
    "SplitBatchNorm2d",
    "convert_split_batchnorm",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order (no gradient); ``x`` if not distributed."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle(x: Tensor, shuffle: bool = True) -> tuple[Tensor, Tensor | None]:
    """MoCo's ``_batch_shuffle_ddp``: redistribute the key batch across ranks before the key encoder.

    Under DDP, BatchNorm statistics are per GPU; without the shuffle a query and its key see the
    *same* sub-batch statistics, which leaks the positive's identity (the "BN cheating" of MoCo
    sec. 3.3). Gather all ranks' images, permute with rank 0's permutation (broadcast), give each
    rank one slice. On a single process the permutation is within the device and changes nothing
    for BN statistics (they are permutation-invariant); use ``bn_splits`` (SplitBatchNorm) there.

    Returns:
        this rank's shuffled images and the index that undoes the shuffle (``None`` if not shuffled).
    """
    if not shuffle:
        return x, None
    if not is_distributed():
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], torch.argsort(perm)
    x_all = concat_all_gather(x)
    n_all = x_all.shape[0]
    perm = torch.randperm(n_all, device=x.device)
    dist.broadcast(perm, src=0)
    rank, world = dist.get_rank(), dist.get_world_size()
    return x_all[perm.view(world, -1)[rank]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: Tensor, idx_unshuffle: Tensor | None) -> Tensor:
    """MoCo's ``_batch_unshuffle_ddp``: gather the shuffled keys and take back this rank's own."""
    if idx_unshuffle is None:
        return x
    if not is_distributed():
        return x[idx_unshuffle]
    x_all = concat_all_gather(x)
    rank, world = dist.get_rank(), dist.get_world_size()
    return x_all[idx_unshuffle.view(world, -1)[rank]]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over ``num_splits`` sub-batches (MoCo's single-GPU CIFAR demo).

    Sub-batch ``j`` is samples ``j, j + s, j + 2s, ...`` (a free reshape of the batch into
    ``s * C`` channels); any fixed partition plays the role of the per-GPU sub-batches.

    Simulates per-GPU BN statistics on one device; with the key batch shuffled before the split this
    is shuffle-BN without DDP. Same parameters and buffers (and state-dict keys) as BatchNorm2d, so
    exported weights load into a plain timm model; in eval mode it is a plain BatchNorm2d.
    """

    num_splits: int = 1

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s <= 1 or n % s:
            return super().forward(x)
        rm = self.running_mean.repeat(s)
        rv = self.running_var.repeat(s)
        out = F.batch_norm(
            x.view(n // s, c * s, h, w), rm, rv, self.weight.repeat(s), self.bias.repeat(s),
            True, self.momentum if self.momentum is not None else 0.1, self.eps,
        ).view(n, c, h, w)
        self.running_mean.copy_(rm.view(s, c).mean(0))
        self.running_var.copy_(rv.view(s, c).mean(0))
        return out


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Turn every ``nn.BatchNorm2d`` in ``module`` into a :class:`SplitBatchNorm2d` in place."""
    if num_splits <= 1:
        return module
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SplitBatchNorm2d
            m.num_splits = num_splits
    return module
