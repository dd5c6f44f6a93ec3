"""Sharing trained weights: model cards (Markdown, from the recorded metadata) and BioImage Model
Zoo packages of saved models (``cemnet package``)."""

from cemnet._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "write_model_card": "cemnet.share.model_card",
        "write_encoder_card": "cemnet.share.model_card",
        "package_model": "cemnet.share.package",
    },
)


def __dir__() -> list[str]:
    return list(__all__)
