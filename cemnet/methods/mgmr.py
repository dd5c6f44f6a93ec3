"""MGMR: SegNeuron's multi-scale Gaussian-mask reconstruction pretraining, 2D and 3D.

Per sample, blocks of one randomly chosen scale are masked (ratio ~ U[0.5, 0.7)) and *replaced*
by Gaussian noise with the crop's own mean/std; an encoder (``self.backbone``) and two decoders
predict the clean image and a HOG target of it; loss = 0.2 MSE(pixels) + 1.0 MSE(HOG), over all
voxels as in SegNeuron (``loss_on="masked"`` restricts it to masked voxels). See docs/mgmr.md.

* :class:`MGMR2D` -- any timm model (CNN or ViT) with ``in_chans=1``; crops (B, 1, H, W).
* :class:`MGMR3D` -- a ``cemnet3d_*`` encoder (:mod:`cemnet.models.encoder3d`); crops (B, 1, D, H, W)
  from :class:`cemnet.data.subvolumes.SubvolumeDataModule`.

Batches are uint8 crops (or [0, 1] floats); corruption, HOG targets and input normalisation run
on the accelerator, so data workers only read and flip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cemnet.methods.backbones import build_backbone
from cemnet.methods.base import PretrainMethod, batch_images
from cemnet.methods.hog import HogKind, hog_channels, hog_target
from cemnet.methods.losses import mgmr_loss
from cemnet.methods.masking import (
    mgmr_scales_2d,
    mgmr_scales_3d,
    replace_with_noise,
    sample_block_masks,
)
from cemnet.models.decoders import ReconDecoder
from cemnet.models.encoder3d import build_encoder3d, resolve_arch_kwargs
from cemnet.weights.keys import clean_keys

__all__ = ["MGMR2D", "MGMR3D", "MGMRBase"]

MASKFEAT_CELL = 8


class MGMRBase(PretrainMethod):
    """Shared MGMR training logic; subclasses build ``backbone`` and implement :meth:`encode`.

    Args:
        hog: ``"segneuron"`` (scikit-image HOG visualisation, 4x4 cells) or ``"maskfeat"``
            (Sobel HOG, 9 bins, 8x8 cells, L2 per cell).
        mask_ratio: ``[low, high)`` of the per-sample uniform mask ratio.
        pixel_weight, hog_weight: loss weights (SegNeuron 0.2 and 1.0).
        loss_on: ``"all"`` voxels (SegNeuron) or ``"masked"`` only.
        decoder_width: channels of the decoders' coarsest stage (halved per stage, >= 16).
        decoder_skips: U-Net skips in the decoders; SegNeuron zeroes them during pretraining.
        head_activation: ``"sigmoid"`` (SegNeuron) or ``"none"``.
        lr, weight_decay, warmup_epochs: AdamW, linear warm-up then cosine decay per step
            (``lr`` is not batch-scaled).
        arch, arch_kwargs, compile, corpus_fingerprint: see
            :class:`~cemnet.methods.base.PretrainMethod` (``compile`` compiles the forward pass,
            encoder + decoders).
        mean, std: input normalisation on the [0, 1] scale; ``None`` takes them from the
            datamodule (its corpus) at fit time, falling back to 0.5 / 0.25.
    """

    method_name: str = "mgmr"
    spatial_dims: int = 2

    def __init__(
        self,
        arch: str,
        arch_kwargs: dict[str, Any] | None = None,
        hog: HogKind = "segneuron",
        mask_ratio: tuple[float, float] = (0.5, 0.7),
        pixel_weight: float = 0.2,
        hog_weight: float = 1.0,
        loss_on: Literal["all", "masked"] = "all",
        decoder_width: int = 256,
        decoder_skips: bool = False,
        head_activation: Literal["sigmoid", "none"] = "sigmoid",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        compile: bool = False,
        mean: float | None = None,
        std: float | None = None,
        corpus_fingerprint: str | None = None,
    ) -> None:
        super().__init__(arch, arch_kwargs, compile, mean, std, corpus_fingerprint)
        if hog not in ("segneuron", "maskfeat"):
            raise ValueError(f"hog must be 'segneuron' or 'maskfeat', got {hog!r}")
        if loss_on not in ("all", "masked"):
            raise ValueError(f"loss_on must be 'all' or 'masked', got {loss_on!r}")
        self.hog = hog
        self.mask_ratio = (float(mask_ratio[0]), float(mask_ratio[1]))
        self.pixel_weight = pixel_weight
        self.hog_weight = hog_weight
        self.loss_on = loss_on
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self._view_stats = (mean or 0.5, std or 0.25)
        self._decoder_cfg = {
            "base_width": decoder_width,
            "use_skips": decoder_skips,
            "activation": head_activation,
        }
        self.mask_scales: list[tuple[int, ...]] = []

    # -- subclass interface --------------------------------------------------------------------
    def encode(self, x: Tensor) -> list[Tensor]:
        """Multi-scale features of normalised input ``x``, finest first."""
        raise NotImplementedError

    def _build_decoders(self, channels: Sequence[int], reductions: Sequence[Any]) -> None:
        dims = self.spatial_dims
        self.pixel_decoder = ReconDecoder(channels, reductions, 1, dims, **self._decoder_cfg)
        self.hog_decoder = ReconDecoder(channels, reductions, hog_channels(self.hog), dims, **self._decoder_cfg)

    # -- model ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted clean image and HOG target for a normalised, corrupted batch."""
        feats = self.encode(x)
        size = tuple(x.shape[2:])
        img = self.pixel_decoder(feats, size)
        hog = self.hog_decoder(feats, size)
        if self.hog == "maskfeat":  # one descriptor per 8x8 cell of every yx slice
            hog = self._cell_pool(hog)
        return img, hog

    def _cell_pool(self, x: Tensor) -> Tensor:
        if self.spatial_dims == 2:
            return F.avg_pool2d(x, MASKFEAT_CELL)
        return F.avg_pool3d(x, (1, MASKFEAT_CELL, MASKFEAT_CELL))

    def normalize(self, x: Tensor) -> Tensor:
        """[0, 1] intensities -> the backbone's input scale (stored as mean/std in the checkpoint)."""
        mean = 0.5 if self.mean is None else self.mean
        std = 0.25 if self.std is None else self.std
        return (x - mean) / std

    def unit_images(self, batch: Any) -> Tensor:
        """``(B, 1, *spatial)`` float intensities in [0, 1] from any supported batch format.

        uint8 is divided by 255; normalised views of ``EMPatchDataModule`` are mapped back with
        the datamodule's mean/std (MGMR needs raw intensities for its noise and targets); other
        float tensors are taken to be in [0, 1] already.
        """
        x = batch_images(batch)
        if x.ndim == self.spatial_dims + 1:
            x = x.unsqueeze(1)  # (B, *spatial) -> (B, 1, *spatial)
        if x.dtype == torch.uint8:
            return x.float() / 255.0
        if isinstance(batch, Mapping) and "views" in batch:
            mean, std = self._view_stats
            return (x.float() * std + mean).clamp_(0.0, 1.0)
        return x.float()

    def shared_step(self, batch: Any) -> dict[str, Tensor]:
        """Corrupt, predict, score one batch; returns the loss terms."""
        x = self.unit_images(batch)
        masks = sample_block_masks(x.shape[0], x.shape[2:], self.mask_scales, self.mask_ratio, x.device)
        corrupted = replace_with_noise(x, masks.mask)
        with torch.no_grad():
            target_hog = hog_target(x, self.hog, self.spatial_dims)
        pred_img, pred_hog = self(self.normalize(corrupted))
        img_w = hog_w = None
        if self.loss_on == "masked":
            img_w = masks.mask
            hog_w = masks.mask
            if self.hog == "maskfeat":  # a cell counts as masked when most of its pixels are
                hog_w = self._cell_pool(masks.mask.float()) >= 0.5
        out = mgmr_loss(pred_img, x, pred_hog, target_hog, self.pixel_weight, self.hog_weight, img_w, hog_w)
        out["mask_fraction"] = masks.mask.float().mean()
        return out

    @torch.no_grad()
    def sample_panels(self, batch: Any, num: int) -> tuple[str, list[Tensor]]:
        """Pictures for the sample logger, one row per sample: image, masked input,
        reconstruction, and for the SegNeuron target the HOG image and its prediction
        (3D: the middle z slice). Eval mode, so BatchNorm statistics are not touched."""
        x = self.unit_images(batch)[:num]
        masks = sample_block_masks(x.shape[0], x.shape[2:], self.mask_scales, self.mask_ratio, x.device)
        corrupted = replace_with_noise(x, masks.mask)
        was_training = self.training
        self.eval()
        pred_img, pred_hog = self(self.normalize(corrupted))
        self.train(was_training)
        panels = [x, corrupted.clamp(0, 1), pred_img]
        if self.hog == "segneuron":
            panels += [hog_target(x, self.hog, self.spatial_dims), pred_hog]
        if self.spatial_dims == 3:
            panels = [p[:, :, p.shape[2] // 2] for p in panels]
        for k in range(3, len(panels)):  # HOG images are faint: stretch each to its own maximum
            panels[k] = panels[k] / panels[k].amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        return "masked_reconstruction", [p.float() for p in panels]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self.shared_step(batch)
        bs = batch_images(batch).shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        for k in ("loss_pixel", "loss_hog", "mask_fraction"):
            self.log(f"train/{k}", out[k], batch_size=bs)
        self.log_lr(bs)
        return out["loss"]

    # -- fit plumbing --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Take mean/std and the corpus fingerprint from the datamodule when not given."""
        super().setup(stage)
        # record what normalize() really uses, so the checkpoint never says None
        self.mean = 0.5 if self.mean is None else float(self.mean)
        self.std = 0.25 if self.std is None else float(self.std)
        # what the datamodule normalised its views with (may differ from the model's mean/std)
        stats = self.datamodule_stats()
        self._view_stats = (float(stats.mean), float(stats.std)) if stats is not None else (self.mean, self.std)

    def configure_optimizers(self) -> Any:
        # no weight decay on norms and biases (1-D parameters), as usual for AdamW
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim <= 1]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        return self.lr_schedule(opt, "cosine", warmup_epochs=self.warmup_epochs)

    def backbone_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights with clean keys (no ``backbone.`` / ``_orig_mod.``)."""
        return clean_keys(self.backbone.state_dict())


class MGMR2D(MGMRBase):
    """MGMR on 2D patches with a timm encoder (``in_chans=1``, no classifier).

    Args:
        arch: timm model name (CNN such as ``resnet50``/``convnext_tiny``, or a ViT).
        arch_kwargs: extra ``timm.create_model`` arguments, stored in the checkpoint so the
            export rebuilds the same model (a ViT needs ``img_size`` = the crop size).
        input_size: crop side used to probe the encoder's feature shapes at construction.
        mask_scales: block sides in pixels; one is drawn per sample (SegNeuron: 4, 8, 16).
        **kwargs: :class:`MGMRBase` options.

    CNN features come from timm's ``forward_intermediates`` (every stage, finest first); a ViT
    (all features at one stride) uses its last block's patch tokens as one feature map. The
    backbone is the plain ``timm.create_model(arch, in_chans=1, num_classes=0, **arch_kwargs)``,
    so its state dict has timm's own keys.
    """

    method_name = "mgmr2d"
    spatial_dims = 2

    def __init__(
        self,
        arch: str = "resnet18",
        arch_kwargs: dict[str, Any] | None = None,
        input_size: int = 128,
        mask_scales: Sequence[int] = (4, 8, 16),
        **kwargs: Any,
    ) -> None:
        super().__init__(arch, arch_kwargs, **kwargs)
        self.save_hyperparameters()
        self.mask_scales = mgmr_scales_2d(mask_scales)
        self.backbone = build_backbone(arch, in_chans=1, **self.arch_kwargs)
        if not hasattr(self.backbone, "forward_intermediates"):
            raise ValueError(f"timm model {arch!r} has no forward_intermediates; pick another encoder")
        self._single_scale = False
        channels, reductions = self._probe(input_size)
        self._build_decoders(channels, reductions)

    @torch.no_grad()
    def _probe(self, size: int) -> tuple[list[int], list[int]]:
        was_training = self.backbone.training
        self.backbone.eval()  # batch-norm on a 1-sample probe would fail in train mode
        feats = self.backbone.forward_intermediates(torch.zeros(1, 1, size, size), intermediates_only=True)
        self.backbone.train(was_training)
        reductions = [size // f.shape[-1] for f in feats]
        if len(set(reductions)) == 1:  # ViT-like: every block at the patch stride
            self._single_scale = True
            feats = feats[-1:]
            reductions = reductions[-1:]
        return [f.shape[1] for f in feats], reductions

    def encode(self, x: Tensor) -> list[Tensor]:
        if self._single_scale:
            return self.backbone.forward_intermediates(x, indices=1, intermediates_only=True)
        return self.backbone.forward_intermediates(x, intermediates_only=True)


class MGMR3D(MGMRBase):
    """MGMR on 3D sub-volumes with a ``cemnet3d_*`` encoder (SegNeuron's setting).

    Args:
        arch: a :func:`cemnet.models.encoder3d.build_encoder3d` name.
        arch_kwargs: overrides of the preset (``widths``, ``depths``, ``strides``, ``norm``); the
            fully resolved set is stored in the checkpoint.
        z_scales, xy_scales: block sizes; z and yx are drawn independently per sample
            (SegNeuron: z in 2, 4, 5 and yx in 4, 8, 16).
        **kwargs: :class:`MGMRBase` options.
    """

    method_name = "mgmr3d"
    spatial_dims = 3

    def __init__(
        self,
        arch: str = "cemnet3d_res_small",
        arch_kwargs: dict[str, Any] | None = None,
        z_scales: Sequence[int] = (2, 4, 5),
        xy_scales: Sequence[int] = (4, 8, 16),
        **kwargs: Any,
    ) -> None:
        super().__init__(arch, arch_kwargs, **kwargs)
        self.save_hyperparameters()
        self.arch_kwargs = resolve_arch_kwargs(arch, **(arch_kwargs or {}))
        self.mask_scales = mgmr_scales_3d(z_scales, xy_scales)
        self.backbone = build_encoder3d(arch, in_chans=1, **self.arch_kwargs)
        info = self.backbone.feature_info
        self._build_decoders([f["num_chs"] for f in info], [f["reduction"] for f in info])

    def encode(self, x: Tensor) -> list[Tensor]:
        return self.backbone.forward_features(x)
