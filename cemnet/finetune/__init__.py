"""Fine-tuning: train a segmentation model on a user's labels and keep it as one file.

``model_file`` is the saved-model format (the contract between ``cemnet finetune``, which writes
it, and ``cemnet segment`` / ``cemnet package``, which read it); ``engine`` the one training loop
(LightningModule + data module) that ``cemnet finetune`` and ``cemnet benchmark`` share; ``data``
reads the user's images / volumes / manifests and makes the validation split; ``run`` runs
``cemnet finetune`` (best / last model, logs, resume, overlays); ``cli`` is the command.
"""

from cemnet._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "ModelSpec": "cemnet.finetune.model_file",
        "save_model": "cemnet.finetune.model_file",
        "load_model": "cemnet.finetune.model_file",
        "read_spec": "cemnet.finetune.model_file",
        "build_network": "cemnet.finetune.model_file",
        "ModelFileError": "cemnet.finetune.model_file",
    },
)


def __dir__() -> list[str]:
    return list(__all__)
