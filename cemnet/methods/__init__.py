"""Self-supervised pretraining methods (LightningModules) and their shared pieces.

``MoCoV2`` (:mod:`cemnet.methods.mocov2`), ``MGMR2D`` / ``MGMR3D`` (:mod:`cemnet.methods.mgmr`);
pure losses in :mod:`~cemnet.methods.losses`, heads in :mod:`~cemnet.methods.heads`, the MoCo queue
in :mod:`~cemnet.methods.memory_bank`, training plumbing in :mod:`~cemnet.methods.common`, the
``cemnet pretrain`` CLI in :mod:`~cemnet.methods.cli`. Exports resolve lazily.
"""

from __future__ import annotations

from cemnet._lazy import lazy_exports

_EXPORTS = {
    "MoCoV2": "cemnet.methods.mocov2",
    "MGMR2D": "cemnet.methods.mgmr",
    "MGMR3D": "cemnet.methods.mgmr",
    "info_nce_queue": "cemnet.methods.losses",
    "MoCoV2ProjectionHead": "cemnet.methods.heads",
    "KeyQueue": "cemnet.methods.memory_bank",
    "CemnetCheckpointMixin": "cemnet.methods.common",
    "DivergenceGuard": "cemnet.methods.common",
    "DivergenceError": "cemnet.methods.common",
}

__getattr__, __all__ = lazy_exports("cemnet.methods", _EXPORTS)
