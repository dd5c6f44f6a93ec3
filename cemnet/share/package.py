"""``cemnet package``: a saved model as a BioImage Model Zoo package (bioimageio.spec 0.5 format).

The folder holds ``rdf.yaml`` plus every file it names: ``weights.pt`` (pytorch_state_dict, rebuilt
by :func:`build_unet` from the architecture recorded in the model file, so the package needs
``cemnet`` installed), ``weights_torchscript.pt`` (traced, self-contained), ``test_input.npy`` /
``test_output.npy`` (a tile of the user's real data and the model's output on it), ``cover.png``
(the tile and its prediction side by side), ``README.md`` (the model card) and the citations of the
encoder's method. Preprocessing in the RDF reproduces cemnet's normalisation
(``(uint8 / 255 - mean) / std`` as one ``scale_linear``); the activation is the RDF's
postprocessing (``sigmoid`` / ``softmax``), so the weights give logits exactly as cemnet's do.
The input size is fixed at the model's tile (what the torchscript weights are traced at: cemnet's
decoder resizes features with Python shape arithmetic, which tracing freezes); consumers tile larger
images with the declared output halo.

Pretrained encoders alone are not packaged: see ``docs/segment.md`` (why not).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cemnet.weights.download import sha256_file

__all__ = ["package_model", "build_unet", "PackageError"]


class PackageError(ValueError):
    """A model or sample that cannot be packaged; the text names the file and the problem."""


def build_unet(arch: dict[str, Any]) -> Any:
    """The network of a cemnet model file's ``arch`` (what the package's state-dict weights load into)."""
    from cemnet.finetune.model_file import ModelSpec, build_network

    n_sp = int(arch.get("spatial_dims", 2))
    spec = ModelSpec(task="semantic", dims="3d" if n_sp == 3 else "2d", arch=dict(arch), output="sigmoid",
                     norm=(0.0, 1.0), tile=(1,) * n_sp, halo=(0,) * n_sp)
    return build_network(spec)


def _sample_tile(sample: str, spec: Any, key: str | None) -> np.ndarray:
    """A uint8 tile of the model's size from the centre of a real volume (2.5D: its neighbour slices)."""
    from curation.to_uint8 import Uint8Converter, sample_volume
    from curation.readers import ReaderError, SourceSpec, open_volume

    try:
        with open_volume(SourceSpec(sample, key=key)) as vol:
            conv = Uint8Converter.fit(sample_volume(vol), vol.dtype)
            nz, ny, nx = vol.shape
            if spec.dims == "3d":
                tz, ty, tx = (min(t, n) for t, n in zip(spec.tile, vol.shape))
            else:
                tz = spec.in_chans if spec.dims == "2.5d" else 1
                ty, tx = (min(t, n) for t, n in zip(spec.tile, (ny, nx)))
            if nz < tz:
                raise PackageError(f"{sample}: {nz} slices, the model needs {tz}")
            z0, y0, x0 = (nz - tz) // 2, (ny - ty) // 2, (nx - tx) // 2
            return conv(vol.read(slice(z0, z0 + tz), slice(y0, y0 + ty), slice(x0, x0 + tx)))
    except ReaderError as err:
        raise PackageError(str(err)) from None


def _cover(tile: np.ndarray, output: np.ndarray, path: Path) -> None:
    """The input (centre slice) and the same slice with the prediction in red, side by side (2:1)."""
    from PIL import Image

    grey = tile[tile.shape[0] // 2] if tile.ndim == 3 else tile
    prob = output[output.shape[0] // 2] if output.ndim == 3 else output
    rgb = np.stack([grey] * 3, -1).astype(np.float32)
    over = rgb.copy()
    over[..., 0] = 0.5 * over[..., 0] + 0.5 * 255 * prob
    over[..., 1:] *= 1 - 0.5 * prob[..., None]
    img = np.concatenate([rgb, over], axis=1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).resize((512, 256), Image.NEAREST).save(path)


def package_model(model_path: str | os.PathLike, out: str | os.PathLike, sample: str | os.PathLike, *,
                  key: str | None = None, name: str | None = None, authors: list[str] | None = None,
                  license: str | None = None, overwrite: bool = False, zip_package: bool = False) -> Path:
    """Write the package of ``model_path`` to the folder ``out`` (and ``out.zip`` with ``zip_package``);
    ``sample`` is a real image / volume (any curation reader) whose centre tile becomes the test input.
    Returns the ``rdf.yaml`` path (or the zip)."""
    import torch
    import yaml

    from cemnet.finetune.model_file import ModelFileError, load_model
    from cemnet.share.model_card import method_citations, write_model_card

    model_path, out = Path(model_path), Path(out)
    if out.exists() and not overwrite:
        raise PackageError(f"{out}: already exists; pass --overwrite to replace it")
    try:
        model = load_model(model_path)
    except ModelFileError as err:
        raise PackageError(str(err)) from None
    spec = model.cemnet_spec
    from cemnet.models.unet import feature_spec

    _, reductions, n_sp = feature_spec(model.encoder)
    steps = [max(max(r[i] for r in reductions), 1) for i in range(n_sp)]
    tile = _sample_tile(os.fspath(sample), spec, key)
    sizes = [n - n % s for n, s in zip(tile.shape[-n_sp:], steps)]  # the RDF's sizes: multiples of the stride
    if any(n <= 2 * h for n, h in zip(sizes, spec.halo)):
        raise PackageError(f"{sample}: too small for a test tile ({'x'.join(map(str, sizes))}; the model needs more "
                           f"than twice its halo {'x'.join(map(str, spec.halo))} in multiples of {steps})")
    tile = tile[(Ellipsis, *(slice(0, n) for n in sizes))]
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # test tensors: (batch, channel, [z,] y, x); 2.5D slices are the channels
    if spec.dims == "2.5d":
        x_in = tile[None]  # (1, k, y, x)
    elif spec.dims == "2d":
        x_in = tile[None]  # (1, 1, y, x)
    else:
        x_in = tile[None, None]  # (1, 1, z, y, x)
    mean, std = spec.norm
    with torch.no_grad():
        x = (torch.from_numpy(x_in.astype(np.float32)) / 255.0 - mean) / std
        logits = model(x)
        probs = torch.softmax(logits, 1) if spec.output == "softmax" else torch.sigmoid(logits)
    y_out = probs.numpy().astype(np.float32)
    np.save(tmp / "test_input.npy", x_in.astype(np.float32))  # grey values 0..255 as float32
    np.save(tmp / "test_output.npy", y_out)
    import tifffile

    tifffile.imwrite(tmp / "sample_input.tif", x_in.astype(np.float32))
    tifffile.imwrite(tmp / "sample_output.tif", y_out)
    _cover(tile if spec.dims != "2.5d" else tile[len(tile) // 2], y_out[0, -1], tmp / "cover.png")

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, tmp / "weights.pt")
    traced = torch.jit.trace(model, x, check_trace=False)
    traced.save(str(tmp / "weights_torchscript.pt"))
    write_model_card(model_path, tmp / "README.md")

    space = ["z", "y", "x"] if spec.dims == "3d" else ["y", "x"]
    in_channels = ([f"z{o:+d}" for o in range(-(spec.in_chans // 2), spec.in_chans - spec.in_chans // 2)]
                   if spec.dims == "2.5d" else ["raw"])
    if spec.task == "instance":
        out_channels = ["affinity_z", "affinity_y", "affinity_x", "foreground"]
    elif spec.output == "sigmoid" and spec.out_channels == 1:
        out_channels = [str(spec.classes[-1]["name"]) if spec.classes else "foreground"]
    else:
        out_channels = [str(c.get("name", i)) for i, c in enumerate(spec.classes)] or [f"class{i}" for i in range(spec.out_channels)]
    input_axes: list[dict[str, Any]] = [{"type": "batch"}, {"type": "channel", "channel_names": in_channels}]
    output_axes: list[dict[str, Any]] = [{"type": "batch"}, {"type": "channel", "channel_names": out_channels}]
    halo = spec.halo
    for i, (axis, n, step) in enumerate(zip(space, x_in.shape[2:], steps)):
        input_axes.append({"type": "space", "id": axis, "unit": "nanometer" if spec.voxel_size else None,
                           "scale": float(spec.voxel_size["zyx".index(axis)]) if spec.voxel_size else 1.0,
                           "size": int(n)})  # fixed: the torchscript weights are traced at this size
        output_axes.append({"type": "space", "id": axis, "unit": "nanometer" if spec.voxel_size else None,
                            "scale": float(spec.voxel_size["zyx".index(axis)]) if spec.voxel_size else 1.0,
                            "size": {"tensor_id": "raw", "axis_id": axis}, "halo": int(halo[i])})
    for axes in (input_axes, output_axes):
        for a in axes:
            if a.get("unit", 0) is None:
                del a["unit"]
    postprocessing = ([{"id": "softmax", "kwargs": {"axis": "channel"}}] if spec.output == "softmax"
                      else [{"id": "sigmoid"}])
    enc = spec.encoder or {}
    cite = method_citations(enc.get("method"), "unet", extra=[enc.get("citation")])
    cite = [{k: v for k, v in c.items()} for c in cite]
    for c in cite:  # the spec wants a doi or a url on every entry
        if "doi" not in c and "url" not in c:
            c["url"] = "https://github.com/cemnet/cemnet"
    torch_version = torch.__version__.split("+")[0]
    rdf: dict[str, Any] = {
        "type": "model", "format_version": "0.5.12",
        "name": name or f"cemnet {spec.dims} {spec.task} {model_path.stem}",
        "description": (f"{spec.dims} {spec.task} segmentation ({', '.join(out_channels)}) of volume EM, "
                        f"fine-tuned by cemnet from a {enc.get('method') or 'randomly initialised'} "
                        f"{spec.arch.get('encoder')} encoder."),
        "authors": [{"name": a} for a in (authors or ["cemnet user"])],
        "cite": cite,
        "license": license or spec.extra.get("license") or "CC-BY-4.0",
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "tags": ["electron-microscopy", "vem", "segmentation", spec.dims, spec.task, "cemnet"],
        "inputs": [{"id": "raw", "axes": input_axes,
                    "test_tensor": {"source": "test_input.npy", "sha256": sha256_file(tmp / "test_input.npy")},
                    "sample_tensor": {"source": "sample_input.tif", "sha256": sha256_file(tmp / "sample_input.tif")},
                    "data": {"type": "float32", "range": [0.0, 255.0]},
                    "preprocessing": [{"id": "scale_linear", "kwargs": {"gain": 1.0 / (255.0 * std), "offset": -mean / std}}]}],
        "outputs": [{"id": "probabilities", "axes": output_axes,
                     "test_tensor": {"source": "test_output.npy", "sha256": sha256_file(tmp / "test_output.npy")},
                     "sample_tensor": {"source": "sample_output.tif", "sha256": sha256_file(tmp / "sample_output.tif")},
                     "data": {"type": "float32", "range": [0.0, 1.0]},
                     "postprocessing": postprocessing}],
        "weights": {
            "pytorch_state_dict": {
                "source": "weights.pt", "sha256": sha256_file(tmp / "weights.pt"),
                "architecture": {"callable": "build_unet", "import_from": "cemnet.share.package",
                                 "kwargs": {"arch": spec.arch}},
                "pytorch_version": torch_version},
            "torchscript": {"source": "weights_torchscript.pt", "sha256": sha256_file(tmp / "weights_torchscript.pt"),
                            "pytorch_version": torch_version, "parent": "pytorch_state_dict"},
        },
        "config": {"cemnet": {"model_file": model_path.name, "dims": spec.dims, "task": spec.task,
                              "tile": list(spec.tile), "halo": list(spec.halo), "postprocess": spec.postprocess}},
    }
    # the weights output logits; the RDF's postprocessing applies the activation
    (tmp / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False), encoding="utf-8")
    write_model_card(model_path)  # the card next to the model file as well
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if zip_package:
        from bioimageio.spec import load_description, save_bioimageio_package

        from cemnet.share.bioimageio_compat import patch

        patch()

        zipped = save_bioimageio_package(load_description(out / "rdf.yaml"), output_path=out.with_suffix(".zip"))
        return Path(zipped)
    return out / "rdf.yaml"
