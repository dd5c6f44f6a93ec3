"""cemnet: self-supervised pretraining for volume electron microscopy.

Five jobs, one direction of data flow:
curate (``curation``) -> pretrain (``cemnet.methods``) -> transfer (``cemnet.weights``; which data
transfers: ``cemnet.transferability``) -> apply (``cemnet.finetune``, ``cemnet.segment``) -> benchmark
(``cemnet.benchmarks``). Layout and import rules: docs/architecture.md.
"""

from cemnet._lazy import lazy_exports

__version__ = "0.1.0"

# Lazy so that ``import cemnet`` stays cheap: torch/timm load on first use only.
__getattr__, _exports = lazy_exports(
    __name__,
    {
        "load_encoder": "cemnet.weights.load",
        "load_model": "cemnet.finetune.model_file",
    },
)
__all__ = ["__version__", *_exports]


def __dir__() -> list[str]:
    return sorted(__all__)
