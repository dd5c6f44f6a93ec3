"""``cemnet export``: backbone-only weights with clean timm names, as safetensors.

The export holds exactly the tensors of ``timm.create_model(arch, num_classes=0)`` (no
``backbone.``/``module.``/``_orig_mod.`` prefixes, no momentum encoder, heads or classifier) and
the :class:`~cemnet.weights.meta.EncoderMeta` fields in the safetensors header.
"""

from __future__ import annotations

import os
from pathlib import Path

from cemnet.share.model_card import write_encoder_card
from cemnet.weights.checkpoint_io import give_usual_permissions, nonfinite_tensors
from cemnet.weights.convert import EncoderWeights, read_weights


def save_encoder(weights: EncoderWeights, out: str | Path) -> Path:
    """Write ``weights`` to ``out`` (.safetensors), atomically: a crash leaves no half file."""
    from safetensors.torch import save_file

    out = Path(out)
    bad = nonfinite_tensors(weights.state_dict)
    if bad:  # a diverged run's weights (e.g. BatchNorm running_var inf) would give non-finite features
        raise ValueError(
            f"{weights.source}: {len(bad)} tensor(s) hold NaN/inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
            "refusing to export a diverged encoder: export an earlier checkpoint of the run"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (views, tied weights); own copies are safe.
    tensors = {k: v.detach().contiguous().clone() for k, v in weights.state_dict.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=weights.meta.to_safetensors())
    give_usual_permissions(tmp)
    os.replace(tmp, out)
    return out


def export_encoder(run_or_ckpt: str | Path, out: str | Path, arch: str | None = None) -> EncoderWeights:
    """Export the encoder of a run folder or checkpoint (any format :mod:`convert` reads) to ``out``.

    A run folder resolves to ``checkpoints/last.ckpt``, else its newest ``*.ckpt``. Returns the
    converted weights, whose :meth:`~EncoderWeights.describe` says what was kept and dropped.
    A model card (``<out stem>.md``, :mod:`cemnet.share.model_card`) is written next to it.
    """
    weights = read_weights(run_or_ckpt, arch=arch)
    save_encoder(weights, out)
    write_encoder_card(out)
    return weights
