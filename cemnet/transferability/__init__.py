"""transferability: which data (or encoder) transfers to a target, and which patches to label.

Rank candidate sources or encoders by MMD^2 to the target in an encoder's feature space
(:func:`mmd2`, :func:`mmd2_test`, :func:`pairwise_mmd2`; features from :mod:`.embed`) and choose
the target patches to annotate first (:func:`select`). The ``cemnet transfer`` command
(:mod:`.cli`). See docs/transferability.md. Encoders are loaded through :mod:`cemnet.weights`.

Names are resolved lazily so that ``import cemnet.transferability`` does not import torch.
"""

from __future__ import annotations

from cemnet._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "mmd2": "cemnet.transferability.mmd",
    "mmd2_test": "cemnet.transferability.mmd",
    "pairwise_mmd2": "cemnet.transferability.mmd",
    "select": "cemnet.transferability.active",
    "save_head": "cemnet.transferability.active",
    "load_head": "cemnet.transferability.active",
}

__getattr__, __all__ = lazy_exports("cemnet.transferability", _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
