"""cemnet: self-supervised pretraining for volume electron microscopy.

Four jobs, one direction of data flow:
curate (``curation``) -> pretrain (``cemnet.methods``) -> transfer (``cemnet.transfer``)
-> benchmark (``cemnet.benchmarks``).
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:  # PEP 562 module attribute
    # Lazy so that ``import cemnet`` stays cheap: torch/timm load on first use only.
    if name == "load_encoder":
        from cemnet.transfer.load import load_encoder

        return load_encoder
    raise AttributeError(f"module 'cemnet' has no attribute {name!r}")
