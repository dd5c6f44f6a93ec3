"""Multi-process helpers of the contrastive methods: gathering keys across ranks and
:class:`SplitBatchNorm2d`, the single-device stand-in of MoCo's shuffle-BN.

The shuffle-BN itself is lightly's ``batch_shuffle`` / ``batch_unshuffle``
(``lightly.models.utils``, ``distributed=is_distributed()``), which is facebookresearch/moco's
``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``: under DDP, BatchNorm statistics are per GPU;
without the shuffle a query and its key see the *same* sub-batch statistics, which leaks the
positive's identity (the "BN cheating" of MoCo sec. 3.3). On one process the permutation is within
the device and changes nothing for BN statistics; use ``bn_splits`` (:class:`SplitBatchNorm2d`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightly.models.utils import concat_all_gather as lightly_concat_all_gather
from torch import Tensor, nn

__all__ = [
    "is_distributed",
    "concat_all_gather",
    "SplitBatchNorm2d",
    "convert_split_batchnorm",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order (no gradient); ``x`` itself on one
    process (lightly's ``concat_all_gather`` needs an initialised process group)."""
    return lightly_concat_all_gather(x.contiguous()) if is_distributed() else x


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
