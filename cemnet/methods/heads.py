"""Projection heads (small nn.Modules, lightly-style)."""

from __future__ import annotations

from torch import nn

__all__ = ["MoCoV2ProjectionHead"]


class MoCoV2ProjectionHead(nn.Sequential):
    """MoCo v2's MLP head: ``Linear(d, hidden) -> ReLU -> Linear(hidden, out)``, no BatchNorm.

    This is the ``mlp=True`` head of MoCo's builder (and CEM500K): for ResNet-50, 2048-2048-128
    (``hidden_dim`` defaults to ``input_dim``, the backbone's feature width).
    """

    def __init__(self, input_dim: int, hidden_dim: int | None = None, output_dim: int = 128) -> None:
        hidden_dim = hidden_dim or input_dim
        super().__init__(nn.Linear(input_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, output_dim))
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim
