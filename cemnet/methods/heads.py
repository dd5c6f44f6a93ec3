"""Projection heads: lightly's, with the defaults cemnet's methods use."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from lightly.models.modules.heads import MoCoProjectionHead

__all__ = ["MoCoV2ProjectionHead", "upgrade_sequential_head_keys"]

V = TypeVar("V")


class MoCoV2ProjectionHead(MoCoProjectionHead):
    """MoCo v2's MLP head: ``Linear(d, hidden) -> ReLU -> Linear(hidden, out)``, no BatchNorm.

    This is the ``mlp=True`` head of MoCo's builder (and CEM500K): for ResNet-50, 2048-2048-128.
    lightly's :class:`~lightly.models.modules.heads.MoCoProjectionHead` with ``hidden_dim``
    defaulting to ``input_dim`` (the backbone's feature width). Its layers are ``layers.0`` and
    ``layers.2``; checkpoints written before cemnet used lightly's head have ``0`` and ``2``
    (see :func:`upgrade_sequential_head_keys`).
    """

    def __init__(self, input_dim: int, hidden_dim: int | None = None, output_dim: int = 128) -> None:
        hidden_dim = hidden_dim or input_dim
        super().__init__(input_dim, hidden_dim, output_dim, num_layers=2, batch_norm=False)
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim


def upgrade_sequential_head_keys(state_dict: Mapping[str, V], heads: tuple[str, ...]) -> dict[str, V]:
    """Rename ``<head>.<i>.*`` (the ``nn.Sequential`` head of older checkpoints) to lightly's
    ``<head>.layers.<i>.*`` for each attribute name in ``heads``; other keys pass unchanged."""
    pattern = re.compile(rf"^({'|'.join(map(re.escape, heads))})\.(\d+)\.")
    return {pattern.sub(r"\1.layers.\2.", k): v for k, v in state_dict.items()}
