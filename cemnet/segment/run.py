"""``cemnet segment``: a saved model applied to a volume of any size, block by block, resumably.

Flow: open the input with the curation readers (scale level matched to the model's training voxel
size) -> fit the uint8 mapping on a sample -> plan blocks that fit ``memory_mb`` -> predict each
block with its context (:class:`~cemnet.segment.predictor.Predictor`), write its probabilities /
labels into ``OUT.partial`` and mark it done -> (instances: fragments, region graph, one global
agglomeration, relabel; :mod:`cemnet.segment.instance`) -> pyramid + metadata -> TIFF / HDF5 copy
when asked -> rename ``OUT.partial`` to ``OUT``. A file at ``OUT`` is therefore complete; a killed
run leaves ``OUT.partial``, and the same command continues it, skipping finished blocks.
Blocks run in this process or, with ``scheduler``, on a Dask cluster (the workers must see the
same file system).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cemnet.finetune.model_file import ModelFileError, ModelSpec, read_spec
from cemnet.segment.tiling import AxisGrid, Block, max_read_voxels, plan_blocks

__all__ = ["SegmentSettings", "SegmentError", "SegmentResult", "segment_volume", "output_format", "OUTPUTS"]

OUTPUTS = ("probabilities", "labels")
FORMATS = ("ome-zarr", "tiff", "hdf5")
STATE_DIR = ".cemnet_segment"
VOXEL_TOLERANCE = 0.25  # relative voxel-size difference beyond which we warn


class SegmentError(ValueError):
    """Bad input for ``cemnet segment``; the text names the file and the problem."""


@dataclasses.dataclass
class SegmentSettings:
    """Options of :func:`segment_volume` (the CLI flags)."""

    outputs: tuple[str, ...] = OUTPUTS
    memory_mb: float = 1024.0
    blend: str = "gaussian"
    tta: bool = False
    orthoplane: bool = False
    batch_size: int = 4
    tile: tuple[int, ...] | None = None
    device: str = "cpu"
    format: str | None = None  # None: from the output's extension
    overwrite: bool = False
    scale_level: int | None = None  # None: the level matching the model's voxel size
    key: str | None = None
    channel: int | None = None
    voxel_size: tuple[float, float, float] | None = None
    threshold: float | None = None  # binary labels; default spec.postprocess["threshold"] or 0.5
    agglomeration_threshold: float | None = None  # instances; default from spec.postprocess
    scheduler: str | None = None
    progress: bool = True


@dataclasses.dataclass
class SegmentResult:
    """What a run wrote."""

    out: Path
    shape: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    blocks: int
    blocks_skipped: int
    voxel_size: tuple[float, float, float] | None
    scale_level: int
    seconds: float
    forward_seconds: float
    workers: list[str]
    instances: int | None = None


def output_format(out: Path, fmt: str | None) -> str:
    """``ome-zarr`` / ``tiff`` / ``hdf5`` from ``fmt`` or the output's extension."""
    if fmt:
        if fmt not in FORMATS:
            raise SegmentError(f"{out}: unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
        return fmt
    name = out.name.lower()
    if name.endswith((".tif", ".tiff")):
        return "tiff"
    if name.endswith((".h5", ".hdf5", ".hdf")):
        return "hdf5"
    return "ome-zarr"


# --------------------------------------------------------------------------- the job (picklable)


@dataclasses.dataclass
class Job:
    """Everything a worker needs to run one block (picklable, sent to Dask workers)."""

    model: str
    input: dict[str, Any]  # SourceSpec fields
    work: str  # the OUT.partial zarr store
    converter: Any  # curation.to_uint8.Uint8Converter
    shape: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    grids: list[AxisGrid]
    predictor: dict[str, Any]  # Predictor keyword arguments
    prob_array: str | None  # where probabilities go (None: not kept)
    label_array: str | None  # where semantic labels go (instances: written by the global step)
    threshold: float
    label_values: list[int]
    instance: bool

    def blocks(self) -> list[Block]:
        return plan_blocks(self.block_shape, self.grids)

    def fingerprint(self) -> str:
        """What decides the output: a resumed run with another fingerprint starts over."""
        st = Path(self.model).stat()
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("work", "converter")}
        fields["model_stat"] = [st.st_size, st.st_mtime_ns]
        fields["converter"] = self.converter.describe()
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


_CACHE: dict[str, Any] = {}  # per process: the loaded model / open volume of the current job


def _resources(job: Job) -> tuple[Any, Any]:
    """(Predictor, Volume) of ``job``, loaded once per process (workers run many blocks)."""
    key = job.fingerprint()
    if _CACHE.get("key") != key:
        from cemnet.finetune.model_file import load_model
        from cemnet.segment.predictor import Predictor
        from curation.readers import SourceSpec, open_volume

        if "volume" in _CACHE:
            _CACHE["volume"].close()
        model = load_model(job.model, device=job.predictor.get("device", "cpu"))
        _CACHE.update(key=key, predictor=Predictor(model, model.cemnet_spec, **job.predictor),
                      volume=open_volume(SourceSpec(**job.input)))
    return _CACHE["predictor"], _CACHE["volume"]


def release_resources() -> None:
    """Close the cached volume and drop the model (the end of a run in this process)."""
    if "volume" in _CACHE:
        _CACHE["volume"].close()
    _CACHE.clear()


def _marker(work: str, stage: str, index: int) -> Path:
    return Path(work) / STATE_DIR / "done" / f"{stage}-{index}"


def _mark_done(work: str, stage: str, index: int) -> None:
    marker = _marker(work, stage, index)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text("")
    os.replace(tmp, marker)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"local:{os.getpid()}"


def run_block(job: Job, block: Block) -> dict[str, Any]:
    """Predict one block and write it; returns its statistics (and where it ran)."""
    import zarr

    predictor, volume = _resources(job)
    forward0 = predictor.forward_seconds
    probs = predictor(job.converter(volume.read(*block.read_slices)), block.origin, job.shape)[(slice(None), *block.crop)]
    if job.instance and predictor.spec.dims == "2.5d" and block.out[0][0] == 0:
        probs[0, 0] = 0.0  # the first slice has no predecessor (paired with itself), as in training
    root = zarr.open_group(job.work, mode="r+")
    if job.prob_array is not None:
        scaled = np.rint(probs * np.float32(255.0), out=np.empty(probs.shape, np.float32)).astype(np.uint8)
        arr = root[job.prob_array]
        arr[(slice(None), *block.out_slices) if arr.ndim == 4 else block.out_slices] = scaled if arr.ndim == 4 else scaled[0]
    if job.label_array is not None:
        root[job.label_array][block.out_slices] = semantic_labels(probs, job.threshold, job.label_values)
    _mark_done(job.work, "predict", block.index)
    return {"index": block.index, "voxels": block.voxels, "worker": _worker_name(),
            "forward_seconds": predictor.forward_seconds - forward0}


def semantic_labels(probs: np.ndarray, threshold: float, values: Sequence[int]) -> np.ndarray:
    """Class values per voxel: binary (one channel) by ``threshold``, else the argmax."""
    lut = np.asarray(values, dtype=np.uint16 if max(values) > 255 else np.uint8)
    index = (probs[0] >= threshold).astype(np.intp) if probs.shape[0] == 1 else probs.argmax(0)
    return lut[index]


# --------------------------------------------------------------------------- planning


def _bytes_per_voxel(channels: int, itemsize: int, orthoplane: bool, instance: bool) -> int:
    """numpy working memory per voxel of a block's read region (see docs/segment.md)."""
    per = itemsize + 1 + 4 + 4 + 8 * channels + 2 * channels  # raw, uint8, float input, weight sum, acc + result, out
    if orthoplane:
        per += 4 * 2 * channels + 4 * 2  # transposed copies and their accumulators
    if instance:
        per += 72  # fragments (int64), affinities as float, watershed / distance-transform buffers
    return per


def tile_batch_bytes(tile: Sequence[int], batch_size: int, in_chans: int, channels: int) -> int:
    """numpy/torch memory of one batch of tiles: input, output, weighted output and the window."""
    return batch_size * math.prod(tile) * 4 * (in_chans + 2 * channels + 1)


def plan_block_shape(grids: Sequence[AxisGrid], minimum: Sequence[int], bytes_per_voxel: int,
                     memory_mb: float, slices_first: bool, reserved: int = 0) -> tuple[int, int, int]:
    """Largest block whose input region fits ``memory_mb`` minus ``reserved`` bytes (the tile
    batch): halve z first for per-slice models, else the longest axis (relative to its minimum),
    never below ``minimum``."""
    budget = memory_mb * 2**20 - reserved
    block = [g.length for g in grids]

    def cost(b: Sequence[int]) -> float:
        return max_read_voxels(b, grids) * bytes_per_voxel

    while cost(block) > budget:
        order = ([0] if slices_first and block[0] > minimum[0] else []) + sorted(
            range(3), key=lambda a: -block[a] / max(minimum[a], 1))
        axis = next((a for a in order if block[a] > minimum[a]), None)
        if axis is None:
            need = (cost(block) + reserved) / 2**20
            raise SegmentError(f"--memory-mb {memory_mb:g} is too small for one tile with its context "
                               f"(needs about {need:.1f} MB)")
        block[axis] = max(minimum[axis], math.ceil(block[axis] / 2))
    return tuple(block)  # type: ignore[return-value]


def _ome_levels(path: str) -> int:
    """Number of multiscale levels of an OME-Zarr image (0 when it is none)."""
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception:  # noqa: BLE001 - not a zarr: the reader reports it
        return 0
    attrs = dict(node.attrs) if isinstance(node, zarr.Group) else {}
    ms = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    return len(ms[0]["datasets"]) if ms else 0


def _voxel_mismatch(have: Sequence[float], want: Sequence[float], axes: str) -> tuple[float, str]:
    """Largest relative difference and the axis where it is, over ``axes``."""
    worst, where = 0.0, ""
    for a in axes:
        i = "zyx".index(a)
        rel = max(have[i], want[i]) / min(have[i], want[i]) - 1.0
        if rel > worst:
            worst, where = rel, a
    return worst, where


def open_input(path: str, spec: ModelSpec, settings: SegmentSettings, log: Callable[[str], None]) -> tuple[Any, int]:
    """Open the input at the scale level to use (the one closest to the training voxel size)."""
    from curation.readers import ReaderError, SourceSpec, open_volume

    def spec_at(level: int) -> SourceSpec:
        return SourceSpec(path, voxel_size=settings.voxel_size, key=settings.key, channel=settings.channel,
                          scale_level=level)

    axes = "zyx" if spec.dims != "2d" or settings.orthoplane else "yx"
    try:
        if settings.scale_level is not None:
            return open_volume(spec_at(settings.scale_level)), settings.scale_level
        levels = _ome_levels(path) if settings.key is None else 0
        volume = open_volume(spec_at(0))
        if levels <= 1:
            return volume, 0
        if spec.voxel_size is None or volume.voxel_size is None:
            why = "the model records no training voxel size" if spec.voxel_size is None else "the input has no voxel size"
            log(f"{path}: using scale level 0 of {levels}: {why}")
            return volume, 0
        best, best_err = 0, _voxel_mismatch(volume.voxel_size, spec.voxel_size, axes)[0]
        volume.close()
        for level in range(1, levels):
            with open_volume(spec_at(level)) as v:
                err = _voxel_mismatch(v.voxel_size, spec.voxel_size, axes)[0] if v.voxel_size else math.inf
            if err < best_err:
                best, best_err = level, err
        log(f"{path}: using scale level {best} of {levels} (closest to the training voxel size "
            f"{'x'.join(f'{v:g}' for v in spec.voxel_size)} nm)")
        return open_volume(spec_at(best)), best
    except ReaderError as err:
        raise SegmentError(str(err)) from None


# --------------------------------------------------------------------------- the command


def _check_model(model: Path) -> ModelSpec:
    try:
        spec = read_spec(model)
    except ModelFileError as err:
        raise SegmentError(str(err)) from None
    try:
        from safetensors import safe_open

        with safe_open(str(model), framework="pt") as f:  # reads every tensor: truncation shows here
            for name in f.keys():
                f.get_slice(name)
    except Exception as err:  # noqa: BLE001
        raise SegmentError(f"{model}: damaged model file ({err})") from None
    return spec


def segment_volume(model: str | os.PathLike, input: str | os.PathLike, out: str | os.PathLike,
                   settings: SegmentSettings | None = None, log: Callable[[str], None] | None = None) -> SegmentResult:
    """Segment ``input`` with the saved ``model`` into ``out`` (see the module doc)."""
    import zarr

    from curation.to_uint8 import Uint8Converter, sample_volume

    settings = settings or SegmentSettings()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.perf_counter()
    model, out = Path(model), Path(out)
    fmt = output_format(out, settings.format)
    outputs = tuple(o for o in OUTPUTS if o in settings.outputs)
    unknown = set(settings.outputs) - set(OUTPUTS)
    if unknown or not outputs:
        raise SegmentError(f"--outputs: choose from {', '.join(OUTPUTS)} (got {', '.join(settings.outputs)})")
    if out.exists() and not settings.overwrite:
        raise SegmentError(f"{out}: already exists; pass --overwrite to replace it")
    spec = _check_model(model)
    if spec.dims in ("2d", "3d") and spec.in_chans != 1:
        raise SegmentError(f"{model}: the model expects {spec.in_chans} input channels but {input} is read as one "
                           "grey channel (cemnet reads every source as greyscale)")
    instance = spec.task == "instance"

    volume, level = open_input(os.fspath(input), spec, settings, log)
    with volume:
        shape, voxel_size = volume.shape, volume.voxel_size
        if spec.voxel_size is not None and voxel_size is not None:
            axes = "zyx" if spec.dims != "2d" or settings.orthoplane else "yx"
            rel, axis = _voxel_mismatch(voxel_size, spec.voxel_size, axes)
            if rel > VOXEL_TOLERANCE:
                log(f"warning: {input}: voxel size {'x'.join(f'{v:g}' for v in voxel_size)} nm differs from the "
                    f"model's training voxel size {'x'.join(f'{v:g}' for v in spec.voxel_size)} nm by "
                    f"{100 * rel:.0f} % along {axis}; results may be poor (resample the input, or pick a scale level)")
        try:
            converter = Uint8Converter.fit(sample_volume(volume), volume.dtype)
        except Exception as err:  # noqa: BLE001 - unreadable sample / no finite values
            raise SegmentError(f"{input}: cannot sample the data ({err})") from None
        input_fields = dataclasses.asdict(volume.spec)

    from cemnet.segment.predictor import axis_grids  # torch: only once the cheap checks passed

    predictor_kwargs = dict(orthoplane=settings.orthoplane, tta=settings.tta, blend=settings.blend,
                            batch_size=settings.batch_size, device=settings.device, tile=settings.tile)
    tile = tuple(settings.tile or spec.tile)
    if len(tile) != len(spec.tile):
        raise SegmentError(f"--tile needs {len(spec.tile)} values for a {spec.dims} model")
    try:
        grids = axis_grids(spec, shape, settings.orthoplane, tile)
    except ValueError as err:
        raise SegmentError(f"{model}: {err}") from None
    channels = spec.out_channels
    per_voxel = _bytes_per_voxel(channels, np.dtype(volume.dtype).itemsize, settings.orthoplane, instance)
    minimum = [min(max(1, g.tile - 2 * g.halo), g.length) for g in grids]
    reserved = tile_batch_bytes(tile, settings.batch_size, spec.in_chans, channels)
    block_shape = plan_block_shape(grids, minimum, per_voxel, settings.memory_mb,
                                   slices_first=spec.dims != "3d" and not settings.orthoplane, reserved=reserved)

    keep_probs = "probabilities" in outputs or instance  # instances need the affinities for stitching
    prob_prefix = "" if "probabilities" in outputs else "_affinities"
    label_prefix = "" if outputs == ("labels",) else "labels/segmentation"
    binary = channels == 1 and not instance
    prob_array = (f"{prob_prefix}/0" if prob_prefix else "0") if keep_probs else None
    label_array = (f"{label_prefix}/0" if label_prefix else "0") if "labels" in outputs else None
    values = [int(c.get("value", i)) for i, c in enumerate(spec.classes)] or [0, 1]
    threshold = settings.threshold if settings.threshold is not None else float(spec.postprocess.get("threshold", 0.5))

    work = Path(f"{out}.partial")
    job = Job(model=str(model.resolve()), input=input_fields, work=str(work), converter=converter, shape=shape,
              block_shape=block_shape, grids=grids, predictor=predictor_kwargs, prob_array=prob_array,
              label_array=None if instance else label_array, threshold=threshold, label_values=values,
              instance=instance)
    blocks = job.blocks()
    fingerprint = job.fingerprint()
    state = work / STATE_DIR
    resumed = False
    if work.exists():
        try:
            resumed = json.loads((state / "job.json").read_text())["fingerprint"] == fingerprint
        except (OSError, ValueError, KeyError):
            resumed = False
        if not resumed:
            log(f"{work}: left by a run with other settings (or damaged); starting over")
            shutil.rmtree(work)
    if not resumed:
        root = zarr.open_group(str(work), mode="w", zarr_format=3)
        if keep_probs:
            pshape = shape if binary else (channels, *shape)
            pchunks = block_shape if binary else (channels, *block_shape)
            from cemnet.segment.output import create_image

            create_image(root, prob_prefix, pshape, pchunks, np.uint8)
        if label_array is not None and not instance:
            from cemnet.segment.output import create_image

            create_image(root, label_prefix, shape, block_shape, np.uint16 if max(values) > 255 else np.uint8)
        (state / "done").mkdir(parents=True, exist_ok=True)
        (state / "job.json").write_text(json.dumps({"fingerprint": fingerprint, "model": str(model),
                                                    "input": os.fspath(input)}))
    todo = [b for b in blocks if not _marker(str(work), "predict", b.index).exists()]
    skipped = len(blocks) - len(todo)
    if skipped:
        log(f"{work}: resuming, {skipped} of {len(blocks)} blocks already done")
    pending = {b.index for b in todo}
    try:
        stats = _run_blocks(job, todo, settings, total_voxels=math.prod(shape), done_voxels=sum(
            b.voxels for b in blocks if b.index not in pending), desc="segment")
    finally:
        release_resources()
    instances = None
    if instance and "labels" in outputs:
        from cemnet.segment.instance import label_instances

        agg = settings.agglomeration_threshold
        if agg is None:
            agg = float(spec.postprocess.get("threshold", (spec.postprocess.get("thresholds") or [0.5])[0]))
        instances = label_instances(job, blocks, label_array, agg, float(spec.postprocess.get("fg_threshold", 0.5)),
                                    settings, log)
    _finalise(work, out, fmt, outputs, spec, voxel_size, binary, instance, settings, log)
    return SegmentResult(out=out, shape=shape, block_shape=block_shape, blocks=len(blocks), blocks_skipped=skipped,
                         voxel_size=voxel_size, scale_level=level, seconds=time.perf_counter() - started,
                         forward_seconds=sum(s["forward_seconds"] for s in stats),
                         workers=sorted({s["worker"] for s in stats}), instances=instances)


def _run_blocks(job: Job, todo: list[Block], settings: SegmentSettings, total_voxels: int, done_voxels: int,
                desc: str, fn: Callable[[Job, Block], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run ``fn`` (default :func:`run_block`) on every block (here, or on the Dask cluster), with a
    voxels/s progress bar."""
    from tqdm import tqdm

    fn = fn or run_block
    stats: list[dict[str, Any]] = []
    bar = tqdm(total=total_voxels, initial=done_voxels, unit="vox", unit_scale=True, desc=desc,
               disable=not settings.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        if settings.scheduler:
            from distributed import Client, as_completed

            with Client(settings.scheduler) as client:
                futures = [client.submit(fn, job, b, pure=False, key=f"{desc}-{job.fingerprint()}-{b.index}")
                           for b in todo]
                for future in as_completed(futures):
                    s = future.result()
                    stats.append(s)
                    bar.update(s["voxels"])
        else:
            for b in todo:
                s = fn(job, b)
                stats.append(s)
                bar.update(s["voxels"])
    finally:
        bar.close()
    return stats


def _finalise(work: Path, out: Path, fmt: str, outputs: Sequence[str], spec: ModelSpec,
              voxel_size: Sequence[float] | None, binary: bool, instance: bool, settings: SegmentSettings,
              log: Callable[[str], None]) -> None:
    """Pyramids + metadata, the TIFF / HDF5 copy, then the rename that makes ``out`` complete."""
    import zarr

    from cemnet.segment.output import build_pyramid, copy_to_hdf5, copy_to_tiff, pyramid_factors, write_multiscales

    root = zarr.open_group(str(work), mode="r+")
    images = []  # (prefix, name, channels, average)
    if "probabilities" in outputs:
        images.append(("", "affinities+foreground" if instance else "probabilities", not binary, True))
    if "labels" in outputs:
        images.append(("" if outputs == ("labels",) else "labels/segmentation", "labels", False, False))
    first_shape = None
    for prefix, name, channels, average in images:
        level0 = root[f"{prefix}/0" if prefix else "0"]
        shape_zyx = level0.shape[-3:]
        first_shape = first_shape or shape_zyx
        factors = pyramid_factors(shape_zyx, voxel_size) if fmt == "ome-zarr" else [(1, 1, 1)]
        build_pyramid(root, prefix, factors, average)
        group = root[prefix] if prefix else root
        write_multiscales(group, name, channels, voxel_size, factors,
                          label_source="../../" if prefix.startswith("labels/") else None)
    if any(p.startswith("labels/") for p, *_ in images):
        labels_group = root["labels"]
        labels_group.attrs.update({"ome": {"version": "0.5", "labels": ["segmentation"]}})
    if "_affinities" in root:
        del root["_affinities"]
    if "_fragments" in root:
        del root["_fragments"]
    shutil.rmtree(work / STATE_DIR, ignore_errors=True)
    if settings.overwrite and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if fmt == "ome-zarr":
        os.replace(work, out)
        return
    arrays = {name: root[f"{prefix}/0" if prefix else "0"] for prefix, name, *_ in images}
    tmp = out.with_name(f".{out.name}.tmp")
    if fmt == "hdf5":
        copy_to_hdf5(arrays, tmp, voxel_size)
        os.replace(tmp, out)
    else:
        extra = []
        for i, (name, arr) in enumerate(arrays.items()):
            target = out if i == 0 else out.with_name(f"{out.name.split('.')[0]}.{name}.tif")
            t = target.with_name(f".{target.name}.tmp")
            copy_to_tiff(arr, t, voxel_size)
            os.replace(t, target)
            extra.append(target)
        if len(extra) > 1:
            log(f"labels written to {extra[1]}")
    shutil.rmtree(work)
