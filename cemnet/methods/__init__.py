"""Self-supervised pretraining methods (LightningModules) and their shared pieces.

``MoCoV2`` (:mod:`cemnet.methods.mocov2`), ``MGMR2D`` / ``MGMR3D`` (:mod:`cemnet.methods.mgmr`);
what every method shares in :mod:`~cemnet.methods.base`; pure losses in :mod:`~cemnet.methods.losses`,
heads in :mod:`~cemnet.methods.heads`, the MoCo queue in :mod:`~cemnet.methods.memory_bank`, encoders in
:mod:`~cemnet.methods.backbones`, multi-process helpers in :mod:`~cemnet.methods.distributed`, learning-rate
schedules in :mod:`~cemnet.methods.schedules`, callbacks in :mod:`~cemnet.methods.callbacks`, the
``cemnet pretrain`` CLI in :mod:`~cemnet.methods.cli`. Exports resolve lazily.
"""

from __future__ import annotations

from cemnet._lazy import lazy_exports

_EXPORTS = {
    "MoCoV2": "cemnet.methods.mocov2",
    "MGMR2D": "cemnet.methods.mgmr",
    "MGMR3D": "cemnet.methods.mgmr",
    "info_nce_queue": "cemnet.methods.losses",
    "mgmr_loss": "cemnet.methods.losses",
    "MoCoV2ProjectionHead": "cemnet.methods.heads",
    "KeyQueue": "cemnet.methods.memory_bank",
    "PretrainMethod": "cemnet.methods.base",
    "DivergenceGuard": "cemnet.methods.callbacks",
    "DivergenceError": "cemnet.methods.callbacks",
}

__getattr__, __all__ = lazy_exports("cemnet.methods", _EXPORTS)
