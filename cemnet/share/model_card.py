"""Model cards: a Markdown page next to every exported encoder and saved model, written from the
metadata the file records (nothing is typed in by hand, so a card cannot drift from its weights).

``write_model_card(model_path)`` (a ``cemnet finetune`` model; ``cemnet package`` calls it too) and
``write_encoder_card(encoder_path)`` (``cemnet export`` calls it) write ``<file stem>.md`` beside
the weights: method, corpus fingerprint and size, steps, normalisation, scores, licence, citation.
Fields a file does not record are written as "not recorded" rather than left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cemnet.weights.download import sha256_file
from cemnet.weights.meta import EncoderMeta

__all__ = ["write_model_card", "write_encoder_card", "method_citations", "card_path"]

NOT_RECORDED = "not recorded"

# Citations of the methods cemnet implements, by the method name the metadata records.
CITATIONS: dict[str, list[dict[str, str]]] = {
    "mocov2": [
        {"text": "Chen, Fan, Girshick, He (2020). Improved Baselines with Momentum Contrastive Learning (MoCo v2). arXiv:2003.04297",
         "url": "https://arxiv.org/abs/2003.04297"},
        {"text": "Conrad, Narayan (2021). CEM500K, a large-scale heterogeneous unlabeled cellular electron microscopy "
                 "image dataset for deep learning. eLife 10:e65894", "doi": "10.7554/eLife.65894"},
    ],
    "mgmr": [
        {"text": "Zhang et al. (2024). SegNeuron: 3D Neuron Instance Segmentation in Any EM Volume with a "
                 "Generalist Model (MICCAI 2024)", "url": "https://github.com/yanchaoz/SegNeuron"},
    ],
    "unet": [
        {"text": "Ronneberger, Fischer, Brox (2015). U-Net: Convolutional Networks for Biomedical Image Segmentation. "
                 "MICCAI 2015", "doi": "10.1007/978-3-319-24574-4_28"},
    ],
}


def card_path(weights: str | os.PathLike) -> Path:
    """Where the card of a weights file goes: ``model.safetensors`` -> ``model.md``."""
    return Path(weights).with_suffix(".md")


def method_citations(*methods: str | None, extra: Iterable[str | None] = ()) -> list[dict[str, str]]:
    """Citation entries (``text`` + ``doi`` or ``url``) for the named methods, then ``extra`` texts."""
    out: list[dict[str, str]] = []
    for method in methods:
        for entry in CITATIONS.get(str(method or "").lower(), []):
            if entry not in out:
                out.append(entry)
    for text in extra:
        if text and all(text != e["text"] for e in out):
            out.append({"text": " ".join(str(text).split())})
    return out


def _value(v: Any) -> str:
    if v is None or v == "" or v == {} or v == []:
        return NOT_RECORDED
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _table(rows: Iterable[tuple[str, Any]]) -> list[str]:
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v).replace('|', '/')} |" for k, v in rows]
    return lines


def _cite_lines(entries: list[dict[str, str]]) -> list[str]:
    if not entries:
        return [f"- {NOT_RECORDED}"]
    return [f"- {e['text']}" + (f" (doi:{e['doi']})" if e.get("doi") else f" <{e['url']}>" if e.get("url") else "")
            for e in entries]


def write_model_card(model_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the card of a saved (fine-tuned) model; returns its path (default :func:`card_path`)."""
    from cemnet.finetune.model_file import read_spec

    model_path = Path(model_path)
    spec = read_spec(model_path)
    enc: Mapping[str, Any] = spec.encoder or {}
    training: Mapping[str, Any] = spec.training or {}
    classes = ", ".join(f"{c.get('name', i)}={c.get('value', i)}" for i, c in enumerate(spec.classes)) or (
        "instances (3 affinities + foreground)" if spec.task == "instance" else NOT_RECORDED)
    lines = [f"# Model card: {model_path.name}", "",
             f"A {spec.dims} {spec.task} segmentation model ({spec.arch.get('kind', 'unet')} on "
             f"{spec.arch.get('encoder', '?')}), saved by cemnet. Load it with `cemnet.load_model(path)`; "
             "apply it with `cemnet segment`.", "", "## Model", ""]
    lines += _table([
        ("file sha256", sha256_file(model_path)),
        ("task / dims", f"{spec.task} / {spec.dims}"),
        ("classes (name=label value)", classes),
        ("output", spec.output),
        ("architecture", f"{spec.arch.get('encoder')} encoder, {spec.arch.get('in_chans', 1)} input channel(s), "
                         f"{spec.arch.get('out_channels')} output(s)"),
        ("input normalisation", f"x = (uint8 / 255 - {spec.norm[0]:g}) / {spec.norm[1]:g}"),
        ("training voxel size (z, y, x nm)", spec.voxel_size),
        ("tile / halo", f"{'x'.join(map(str, spec.tile))} / {'x'.join(map(str, spec.halo))}"),
        ("post-processing", spec.postprocess),
    ])
    lines += ["", "## Encoder (initial weights)", ""]
    lines += _table([
        ("source", enc.get("source")), ("sha256", enc.get("sha256")), ("method", enc.get("method")),
        ("architecture", enc.get("arch")), ("pretraining corpus fingerprint", enc.get("corpus_fingerprint")),
        ("pretraining corpus size", enc.get("corpus_size")), ("pretraining steps", enc.get("global_step")),
        ("frozen", enc.get("frozen")), ("licence", enc.get("license")),
    ])
    lines += ["", "## Training", ""]
    lines += _table([
        ("data fingerprint", training.get("data_fingerprint")), ("data size", training.get("data_size")),
        ("iterations / steps", training.get("iterations", training.get("steps"))),
        ("configuration", training.get("config")),
    ])
    lines += ["", "## Validation scores", ""]
    lines += _table(sorted((str(k), v) for k, v in (spec.scores or {}).items())) if spec.scores else [f"{NOT_RECORDED}."]
    licence = spec.extra.get("license") or enc.get("license")
    lines += ["", "## Licence", "", _value(licence) + (
        "" if licence else ": ask the model's author; the encoder's licence (above) may restrict redistribution."),
        "", "## Citation", ""]
    lines += _cite_lines(method_citations(enc.get("method"), "unet", extra=[enc.get("citation")]))
    lines += ["", "## Validation", "",
              "Scores above are on the validation split recorded at training time. Check a model on your own "
              "data before trusting it: segment a labelled region with `cemnet segment` and score it.", ""]
    path = Path(out) if out else card_path(model_path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_encoder_card(encoder_path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the card of an exported encoder (``cemnet export``); returns its path."""
    from safetensors import safe_open

    encoder_path = Path(encoder_path)
    with safe_open(str(encoder_path), framework="pt") as f:
        header = f.metadata() or {}
        n_tensors = len(list(f.keys()))
    meta = EncoderMeta.from_safetensors(header)
    if meta is None:
        raise ValueError(f"{encoder_path}: no cemnet encoder metadata (not written by cemnet export)")
    extra = {k: v for k, v in header.items() if k.startswith("corpus_")}
    lines = [f"# Model card: {encoder_path.name}", "",
             f"A pretrained {meta.spatial_dims}D {meta.arch} encoder exported by `cemnet export`. Load it with "
             "`cemnet.load_encoder(path)`; fine-tune it with `cemnet finetune --encoder PATH`.", "", "## Encoder", ""]
    lines += _table([
        ("file sha256", sha256_file(encoder_path)), ("architecture", meta.arch), ("architecture options", meta.arch_kwargs),
        ("input channels", meta.in_chans), ("tensors", n_tensors), ("pretraining method", meta.method),
        ("source format", meta.source_format),
        ("corpus fingerprint", meta.corpus_fingerprint), ("corpus size", extra.get("corpus_size")),
        ("epochs", meta.epochs), ("steps", meta.global_step),
        ("normalisation (on uint8 / 255)", f"mean {_value(meta.mean)}, std {_value(meta.std)}"),
        ("scores", NOT_RECORDED + " (an encoder alone has none; see `cemnet benchmark`)"),
    ])
    lines += ["", "## Licence", "", _value(meta.license), "", "## Citation", ""]
    lines += _cite_lines(method_citations(meta.method, extra=[meta.citation]))
    lines.append("")
    path = Path(out) if out else card_path(encoder_path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
