"""MoCo v2 (Chen et al. 2020) as CEM500K pretrained it (Conrad & Narayan 2021), as a LightningModule.

``training_step`` follows facebookresearch/moco ``builder.py`` step by step: encode queries ->
momentum update -> shuffle -> encode keys -> unshuffle -> InfoNCE against the queue -> enqueue
the keys gathered from all ranks. Built on lightly's blocks (projection head, momentum update,
batch shuffle); the queue is cemnet's own :class:`~cemnet.methods.memory_bank.KeyQueue` because it
must be in the checkpoint (see there).

BatchNorm: under DDP the key batch is shuffled across ranks (MoCo's shuffle-BN, lightly's
``batch_shuffle(distributed=True)``) so a query and its key never share BN statistics. On one process the in-device shuffle is kept for
the reading order but cannot change BN statistics; set ``bn_splits > 1`` to emulate per-GPU BN
(SplitBatchNorm, MoCo's single-GPU recipe), or train with ``Trainer(sync_batchnorm=True)`` and
``shuffle_bn=False`` (MoCo v3 style, fine at large batch). ViTs have no BN; nothing is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.models.utils import batch_shuffle, batch_unshuffle
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from cemnet.methods.backbones import build_backbone
from cemnet.methods.base import PretrainMethod, logs_this_step
from cemnet.methods.distributed import concat_all_gather, convert_split_batchnorm, is_distributed
from cemnet.methods.heads import MoCoV2ProjectionHead, upgrade_sequential_head_keys
from cemnet.methods.losses import info_nce_queue
from cemnet.methods.memory_bank import KeyQueue

__all__ = ["MoCoV2"]


class MoCoV2(PretrainMethod):
    """MoCo v2 with a timm encoder on single-channel EM patches.

    Args:
        arch: timm model name (``resnet50`` in CEM500K; any timm CNN or ViT).
        arch_kwargs: extra ``timm.create_model`` arguments (stored in the checkpoint).
        proj_hidden_dim: projection head hidden width (default: the backbone's feature width).
        proj_out_dim: projection dimension (MoCo ``dim``, 128).
        queue_size: number of negative keys K (65,536).
        key_momentum: EMA momentum m of the key encoder (0.999).
        temperature: InfoNCE temperature tau (0.2 for MoCo v2 / CEM500K).
        lr: base learning rate at ``lr_batch_size``; the optimizer uses
            ``lr * global_batch / lr_batch_size`` (linear scaling), global_batch = per-device batch
            x devices x nodes x accumulate_grad_batches. CEM500K: 0.015 at batch 128 (= MoCo's
            0.03 at 256); the default here, 0.015 at 256, is the project's issue setting.
        lr_batch_size: the batch size at which ``lr`` applies unscaled.
        sgd_momentum, weight_decay: SGD settings (0.9, 1e-4).
        schedule: ``"step"`` (x0.1 at each of ``milestones`` epochs, CEM500K) or ``"cosine"``.
        milestones: epochs of the step decays (CEM500K: 120 and 160 of 200).
        warmup_epochs: linear warm-up (0 in CEM500K).
        shuffle_bn: MoCo's shuffle-BN for the key encoder (see module docstring).
        bn_splits: >1 replaces BatchNorm2d by SplitBatchNorm2d (single-device shuffle-BN stand-in).
        compile, mean, std, corpus_fingerprint: see :class:`~cemnet.methods.base.PretrainMethod`
            (``compile`` compiles both encoders).
    """

    method_name = "mocov2"
    spatial_dims = 2
    # (online, momentum) attribute pairs, declared once: built, frozen and EMA-updated from this list
    momentum_pairs = (("backbone", "backbone_momentum"), ("projection_head", "projection_head_momentum"))

    def __init__(
        self,
        arch: str = "resnet50",
        arch_kwargs: dict[str, Any] | None = None,
        proj_hidden_dim: int | None = None,
        proj_out_dim: int = 128,
        queue_size: int = 65536,
        key_momentum: float = 0.999,
        temperature: float = 0.2,
        lr: float = 0.015,
        lr_batch_size: int = 256,
        sgd_momentum: float = 0.9,
        weight_decay: float = 1e-4,
        schedule: Literal["step", "cosine", "constant"] = "step",
        milestones: Sequence[float] = (120, 160),
        warmup_epochs: float = 0.0,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        compile: bool = False,
        mean: float | None = None,
        std: float | None = None,
        corpus_fingerprint: str | None = None,
    ) -> None:
        super().__init__(arch, arch_kwargs, compile, mean, std, corpus_fingerprint)
        self.save_hyperparameters()
        self.backbone = convert_split_batchnorm(build_backbone(arch, in_chans=1, **self.arch_kwargs), bn_splits)
        self.projection_head = MoCoV2ProjectionHead(self.backbone.num_features, proj_hidden_dim, proj_out_dim)
        self.build_momentum_copies()
        self.memory_bank = KeyQueue(queue_size, proj_out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features (what transfer uses)."""
        return self.backbone(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        x_q, x_k = batch["views"]
        q = self.projection_head(self.backbone(x_q))
        with torch.no_grad():
            self.update_momentum_copies(self.hparams.key_momentum)  # once per optimizer step
            shuffle_bn, distributed = self.hparams.shuffle_bn, is_distributed()
            if shuffle_bn:
                x_k, shuffle = batch_shuffle(x_k, distributed=distributed)
            k = self.projection_head_momentum(self.backbone_momentum(x_k))
            if shuffle_bn:
                k = batch_unshuffle(k, shuffle, distributed=distributed)
            k = F.normalize(k.float(), dim=1)
        loss, stats = info_nce_queue(q, k, self.memory_bank.snapshot(), self.hparams.temperature)
        self.memory_bank.enqueue(concat_all_gather(k))
        self._log_step(loss, stats, x_q.shape[0])
        return {"loss": loss, "keys": k}

    def _log_step(self, loss: Tensor, stats: dict[str, Tensor], batch_size: int) -> None:
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        if not logs_this_step(self._trainer):
            return  # the rest only on steps the loggers write (saves the queue scan and Lightning's bookkeeping)
        logged = {f"train/{k}": v for k, v in stats.items()}
        logged.update({f"train/queue_{k}": v for k, v in self.memory_bank.stats().items()})
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log_lr(batch_size)

    # -- fit plumbing -----------------------------------------------------------------------------
    def modules_to_compile(self) -> list[nn.Module]:
        return [self.backbone, self.backbone_momentum]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written before the heads were lightly's have `projection_head.0.*` keys
        if "state_dict" in checkpoint:
            heads = ("projection_head", "projection_head_momentum")
            checkpoint["state_dict"] = upgrade_sequential_head_keys(checkpoint["state_dict"], heads)
        super().on_load_checkpoint(checkpoint)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        global_batch = self.global_batch_size()
        if global_batch is None:
            rank_zero_warn("MoCoV2: per-device batch size unknown (no datamodule.batch_size); lr is not batch-scaled")
            global_batch = hp.lr_batch_size
        lr = hp.lr * global_batch / hp.lr_batch_size
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=hp.sgd_momentum, weight_decay=hp.weight_decay)
        return self.lr_schedule(opt, hp.schedule, hp.milestones, 0.1, hp.warmup_epochs)
