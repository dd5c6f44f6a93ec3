"""Curation speed: end-to-end patches/s vs the CEM500K reference scripts, and dedup time at scale.

    python perf/bench_curation.py extract [--workers 2] [--size 500 1030 1030] [--workdir /tmp /dev/shm]
    python perf/bench_curation.py dedup [--n 1000000 10000000]
    python perf/bench_curation.py files [--workers 2] [--copies 8]
    python perf/bench_curation.py large2d [--side 12000]

``extract``: builds a near-isotropic 3D volume from the real NeuroProof FIB-SEM stacks (the two
250^3 samples, mirrored and tiled to the requested size, saved as one multipage TIFF), then times
(a) ``cemnet curate`` on it, xy + xz + yz, dedup and filter included, with ``--workers`` processes,
and (b) the CEM500K reference pipeline on the same volume with the same number of processes, as its
scripts do it: ``cross_section3d.py`` writes every xy/xz/yz slice as a TIFF (``skimage.io.imsave``;
its pool maps over volume *files*, so one volume is sliced by one process), ``crop_patches.py``
reads each slice back, cuts 224 patches, and writes every patch as a TIFF plus its hash as ``.npy``
(``imagehash.dhash`` on the PIL-resized patch), and ``deduplicate.py`` loads every hash file and
runs its greedy ``np.delete`` loop (one process per dataset). The scripts are not vendored; the
re-implementation follows their code line by line (I/O included), fixes the undefined names in
``deduplicate.py``, keeps the last slice (so both sides cut the same 22,400 patches) and reads the
volume with tifffile instead of SimpleITK (measured: same speed, same array). A second reference
run splits the slicing over the processes too, kinder to the reference than its code.
Every timed run starts after ``sync`` so no run pays for the previous run's write-back.
``--workdir /dev/shm`` puts everything in RAM and so takes the disk out of the comparison.

``files``: many small real 2D images, each its own source (all NeuroProof slices of both samples,
250 x 250, one patch each, plus the ISBI 2012 train and test slices, 512 x 512, four each): the
per-source overhead (inspection, index writes) that dominates corpora of many small images.

``large2d``: one large 16-bit 2D image (the real SEM tiles mirror-tiled), time and peak memory.

``dedup``: hashes of real patches (random 224 crops of the shared EM data at random planes and
offsets), then for 10M a cloud of hashes derived from them by flipping random bits (stated in the
output: real EM patches do not come in that number here), deduplicated with CEM500K's rule.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CEMNET_SHARED_DATA", REPO.parent / "shared" / "data"))


def _neuroproof() -> np.ndarray:
    from PIL import Image

    vols = []
    for sample in ("training_sample1", "training_sample2"):
        files = sorted((DATA / "neuroproof_fibsem_medulla" / sample / "grayscale_maps").glob("*.png"))
        vols.append(np.stack([np.asarray(Image.open(f).convert("L")) for f in files]))
    return np.concatenate(vols, axis=2)  # (250, 250, 500)


def _mirror_tile(base: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``base`` mirror-tiled (no seams of discontinuity at tile borders) and cropped to ``shape``."""
    reps = [int(np.ceil(s / b)) + 1 for s, b in zip(shape, base.shape)]
    tiled = np.pad(base, [(0, (r - 1) * b) for r, b in zip(reps, base.shape)], mode="symmetric")
    return np.ascontiguousarray(tiled[tuple(slice(0, s) for s in shape)])


def make_volume(shape: tuple[int, int, int], path: Path) -> None:
    import tifffile

    tifffile.imwrite(path, _mirror_tile(_neuroproof(), shape))


# ---- CEM500K reference pipeline (cross_section3d.py + crop_patches.py), same I/O pattern ----
def _ref_slices(args):
    volpath, jobs, outdir = args  # jobs: [(axis, slice indices)]
    import tifffile
    from skimage.io import imsave

    im = tifffile.imread(volpath)
    for axis, indices in jobs:
        for idx in indices:
            sl = im[idx] if axis == 0 else (im[:, idx] if axis == 1 else im[:, :, idx])
            imsave(os.path.join(outdir, f"vol-LOC-{axis}_{idx:04d}.tiff"), sl, check_contrast=False)


def _ref_patch_and_hash(args):
    impath, patchdir, crop_size = args
    import imagehash
    from PIL import Image
    from skimage.io import imread, imsave

    image = imread(impath)
    prefix = os.path.basename(impath).split(".tiff")[0]
    ysize, xsize = image.shape
    ny, nx = max(1, int(round(ysize / crop_size))), max(1, int(round(xsize / crop_size)))
    n = 0
    for y in range(ny):
        ys = y * crop_size
        ye = min(ys + crop_size, ysize)
        for x in range(nx):
            xs = x * crop_size
            xe = min(xs + crop_size, xsize)
            patch = image[ys:ye, xs:xe]
            h = imagehash.dhash(Image.fromarray(patch).resize((crop_size, crop_size), resample=2), hash_size=8).hash
            path = os.path.join(patchdir, f"{prefix}_{ys}_{xs}.tiff")
            imsave(path, patch, check_contrast=False)
            np.save(path.replace(".tiff", ".npy"), h)
            n += 1
    return n


def _ref_group_dedupe(args):
    """deduplicate.py's ``group_dedupe`` for one dataset (its undefined names fixed)."""
    impaths, min_distance, seed = args
    np.random.seed(seed)
    impaths = np.random.permutation(impaths)
    hashes = np.array([np.load(ip.replace(".tiff", ".npy")).ravel() for ip in impaths])
    exemplars = []
    impaths = np.array(impaths)
    while len(hashes) > 0:
        ref_hash = hashes[0]
        matches = np.where(np.logical_xor(ref_hash, hashes).sum(1) <= min_distance)[0]
        exemplars.append(impaths[matches[0]])
        hashes = np.delete(hashes, matches, axis=0)
        impaths = np.delete(impaths, matches, axis=0)
    return len(exemplars)


def reference_pipeline(volpath: Path, shape, workdir: Path, workers: int, split_slicing: bool = False) -> dict:
    """Time CEM500K's three scripts on one volume file; returns seconds per script and counts.

    ``cross_section3d.py`` maps its process pool over *files*, so one volume is sliced by one
    process; ``split_slicing=True`` instead splits the slices over ``workers`` processes (more
    generous to the reference than its code is).
    """
    slices, patches = workdir / "ref_slices", workdir / "ref_patches"
    shutil.rmtree(slices, ignore_errors=True)
    shutil.rmtree(patches, ignore_errors=True)
    slices.mkdir()
    patches.mkdir()
    out: dict = {}
    with Pool(workers) as pool:
        t0 = time.perf_counter()
        if split_slicing:
            jobs = [(str(volpath), [(axis, chunk)], str(slices))
                    for axis in (0, 1, 2) for chunk in np.array_split(np.arange(shape[axis]), workers)]
        else:  # one file -> one task: the volume is read once and sliced on all three axes
            jobs = [(str(volpath), [(axis, np.arange(shape[axis])) for axis in (0, 1, 2)], str(slices))]
        pool.map(_ref_slices, jobs)
        out["slicing"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        files = sorted(str(p) for p in slices.glob("*.tiff"))
        out["patches"] = sum(pool.map(_ref_patch_and_hash, [(f, str(patches), 224) for f in files]))
        out["patching_hashing"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        impaths = np.sort([str(p) for p in patches.glob("*.tiff")])  # one dataset
        out["exemplars"] = sum(pool.map(_ref_group_dedupe, [(impaths, 12, 0)]))
        out["dedup"] = time.perf_counter() - t0
    out["total"] = out["slicing"] + out["patching_hashing"] + out["dedup"]
    return out


def _settle() -> None:
    """Start each timed run with no dirty pages of an earlier one still being written back."""
    os.sync()
    time.sleep(1.0)


def disk_bytes_written() -> int:
    """Bytes this process and its reaped children (pool workers) handed to block devices:
    ``write_bytes - cancelled_write_bytes`` of ``/proc/self/io`` (files deleted before write-back,
    such as scratch, cost nothing; writes to /dev/shm are not disk writes). 0 where unsupported."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines() if line)
    except OSError:
        return 0
    return int(fields["write_bytes"]) - int(fields["cancelled_write_bytes"])


def _tree_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file())


def _timed_curate(specs: list, out: Path, workers: int, keep_all_pixels: bool = False) -> tuple[int, float, int]:
    """Run ``cemnet curate`` on ``specs`` after a sync; returns (patches extracted, seconds,
    disk bytes written)."""
    from curation.corpus import Corpus
    from curation.pipeline import curate
    from curation.settings import CurateSettings

    _settle()
    written = disk_bytes_written()
    t0 = time.perf_counter()
    curate(specs, out, CurateSettings(keep_all_pixels=keep_all_pixels), workers=workers, progress=False, report=False)
    total = time.perf_counter() - t0
    return len(Corpus(out, status=None)), total, disk_bytes_written() - written


def bench_extract(shape, workers: int, reference: bool = True, workdirs: list[str | None] = (None,),
                  repeat: int = 1) -> None:
    """cemnet (exemplars-only default, and ``--keep-all-pixels``) and the CEM500K scripts on one
    volume, per work folder: patches/s end to end, disk bytes written and bytes stored per input
    byte. ``repeat`` runs everything that many times (the machine is shared: take the best)."""
    from curation.corpus import CorpusIndex
    from curation.readers import SourceSpec

    volume_bytes = int(np.prod(shape))
    print(f"volume {shape} uint8 ({volume_bytes / 1e6:.0f} MB), real NeuroProof FIB-SEM mirrored; "
          f"{workers} processes; best of {repeat}")
    for workdir in workdirs:
        work = Path(tempfile.mkdtemp(prefix="cemnet-bench-", dir=workdir))
        rows: dict[str, list[tuple]] = {}
        try:
            vol = work / "neuroproof_tiled.tif"
            make_volume(shape, vol)
            for attempt in range(repeat):
                for label, keep_all in (("cemnet curate (default: exemplar pixels only)", False),
                                        ("cemnet curate --keep-all-pixels", True)):
                    out = work / "corpus"
                    shutil.rmtree(out, ignore_errors=True)
                    n, total, written = _timed_curate([SourceSpec(path=str(vol), name="neuroproof_tiled")], out,
                                                      workers, keep_all)
                    idx = CorpusIndex(out)
                    stages = {k: v[0] for k, v in idx.stages().items()}
                    n_ex = idx.exemplar_count()
                    idx.close()
                    rows.setdefault(label, []).append((n, n_ex, total, written, _tree_bytes(out)))
                    print(f"  {label}: {n} patches, {n_ex} exemplars, {total:.1f} s (extract {stages['extract']:.1f} "
                          f"s, dedup {stages['dedup']:.1f} s, pixels {stages.get('pixels', 0):.1f} s, "
                          f"filter {stages['filter']:.1f} s)")
                    sys.stdout.flush()
                    if attempt == 0:  # what the checksums of the shards this run stored cost
                        bench_verify(out)
                if not reference:
                    continue
                for split, label in ((False, "CEM500K scripts as written (one process per volume file while slicing)"),
                                     (True, "CEM500K scripts, slicing split over the processes (kinder)")):
                    _settle()
                    written = disk_bytes_written()
                    r = reference_pipeline(vol, shape, work, workers, split_slicing=split)
                    written = disk_bytes_written() - written
                    stored = _tree_bytes(work / "ref_slices", work / "ref_patches")
                    rows.setdefault(label, []).append((r["patches"], r["exemplars"], r["total"], written, stored))
                    print(f"  {label}: slicing {r['slicing']:.1f} s, patching+hashing {r['patching_hashing']:.1f} s, "
                          f"dedup {r['dedup']:.1f} s")
                    sys.stdout.flush()
            where = workdir or tempfile.gettempdir()
            print(f"\nin {where} ({'RAM' if str(where).startswith('/dev/shm') else 'disk'}), best of {repeat}:")
            print("| run | patches | exemplars | seconds | patches/s | vs scripts as written "
                  "| disk bytes written / input byte | bytes stored / input byte |")
            print("|---|---|---|---|---|---|---|---|")
            best = {k: min(v, key=lambda r: r[2]) for k, v in rows.items()}
            ref = next((v for k, v in best.items() if "as written" in k), None)
            for label, (n, n_ex, total, written, stored) in best.items():
                speed = n / total
                vs = f"{speed / (ref[0] / ref[2]):.1f}x" if ref else "-"
                print(f"| {label} | {n} | {n_ex} | {total:.1f} | {speed:.0f} | {vs} | "
                      f"{written / volume_bytes:.2f} | {stored / volume_bytes:.2f} |")
            sys.stdout.flush()
        finally:
            shutil.rmtree(work, ignore_errors=True)


def bench_verify(out: Path) -> None:
    """What shard checksums cost: computing them (as shards are written: in the workers, or in the
    main process for the exemplars-only shards it writes) and
    checking the whole corpus (`cemnet curate verify`, and the first step of every re-run)."""
    from curation.corpus import shard_checksum, verify_shards

    shards = sorted(out.glob("shards/*/*.npy"))
    nbytes = sum(p.stat().st_size for p in shards)
    arrays = [np.load(p) for p in shards]  # in memory: the checksum alone, no I/O
    t0 = time.perf_counter()
    for a in arrays:
        shard_checksum(a)
    checksum = time.perf_counter() - t0
    del arrays
    _settle()
    t0 = time.perf_counter()
    problems, counts = verify_shards(out, progress=False)
    verify = time.perf_counter() - t0
    assert not problems, problems
    print(f"shard checksums: {len(shards)} shards, {nbytes / 1e9:.2f} GB: computing them {checksum:.2f} s "
          f"({nbytes / checksum / 1e9:.1f} GB/s, one thread); verify (page cache warm) {verify:.2f} s "
          f"= {counts['patches'] / verify:.0f} patches/s, {nbytes / verify / 1e9:.1f} GB/s")


def bench_files(workers: int, copies: int = 1, workdir: str | None = None) -> None:
    import curation
    from curation.readers import discover

    folders = [DATA / "neuroproof_fibsem_medulla", DATA / "isbi2012" / "train" / "images", DATA / "isbi2012" / "test"]
    specs, _ = discover([str(f) for f in folders])
    work = Path(tempfile.mkdtemp(prefix="cemnet-bench-files-", dir=workdir))
    try:
        if copies > 1:  # more sources: hard links to the same real images under other names
            links = work / "images"
            links.mkdir()
            for k in range(copies):
                for i, spec in enumerate(specs):
                    target = links / f"c{k}_{i}{Path(spec.path).suffix}"
                    try:
                        os.link(spec.path, target)
                    except OSError:  # another file system: copy
                        shutil.copyfile(spec.path, target)
            specs, _ = discover([str(links)])
        n, total, _ = _timed_curate(specs, work / "corpus", workers)
        print(f"cemnet curate ({Path(curation.__file__).parent}): {len(specs)} 2D sources, {n} patches in "
              f"{total:.2f} s = {len(specs) / total:.0f} sources/s, {n / total:.0f} patches/s, {workers} processes")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_large_2d(side: int, workers: int, workdir: str | None = None) -> None:
    """One large 16-bit 2D image (real SEM tiles mirror-tiled to side x side): time and peak memory."""
    import resource

    import tifffile

    import curation
    from curation.readers import SourceSpec

    tiles = [tifffile.imread(p) for p in sorted((DATA / "muvis_align_sem_tiles" / "tiff_uint16").rglob("*.tiff"))[:4]]
    base = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    work = Path(tempfile.mkdtemp(prefix="cemnet-bench-2d-", dir=workdir))
    try:
        path = work / "mosaic_u16.tif"
        tifffile.imwrite(path, _mirror_tile(base, (side, side)))
        n, total, _ = _timed_curate([SourceSpec(path=str(path))], work / "corpus", workers)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        print(f"cemnet curate ({Path(curation.__file__).parent}): {side}^2 uint16 2D image ({side * side * 2 / 2**20:.0f} MB),"
              f" {n} patches in {total:.2f} s = {n / total:.0f} patches/s; largest worker {rss:.2f} GB; {workers} processes")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def real_hashes(n: int, seed: int = 0) -> np.ndarray:
    """Hashes of ``n`` random 224 crops (random plane, position) of the real shared EM data."""
    from PIL import Image

    from curation.hashing import dhash_batch

    rng = np.random.default_rng(seed)
    vol = _neuroproof()
    planes = [np.asarray(Image.open(f).convert("L")) for f in
              sorted((DATA / "drosophila_vnc_gerhard2013" / "stack1" / "raw").glob("*"))
              + sorted((DATA / "cdeep3m_mito_sbem" / "training" / "images").glob("*.png"))
              + sorted((DATA / "isbi2012" / "train" / "images").glob("*.png"))]
    out = np.empty(n, dtype=np.uint64)
    batch = 4096
    for start in range(0, n, batch):
        m = min(batch, n - start)
        crops = np.empty((m, 224, 224), np.uint8)
        for i in range(m):
            if rng.random() < 0.5:
                axis = rng.integers(3)
                k = rng.integers(vol.shape[axis])
                plane = vol[k] if axis == 0 else (vol[:, k] if axis == 1 else vol[:, :, k])
            else:
                plane = planes[rng.integers(len(planes))]
            y = rng.integers(plane.shape[0] - 223)
            x = rng.integers(plane.shape[1] - 223)
            crops[i] = plane[y : y + 224, x : x + 224]
        out[start : start + m] = dhash_batch(crops)
    return out


def bench_dedup(sizes) -> None:
    from curation.dedup import greedy_groups

    t0 = time.perf_counter()
    base = real_hashes(min(max(sizes), 1_000_000))
    print(f"hashed {len(base)} real crops in {time.perf_counter() - t0:.0f} s")
    rng = np.random.default_rng(1)
    for n in sizes:
        if n <= len(base):
            hashes, how = base[:n], "real EM crops"
        else:
            reps = int(np.ceil(n / len(base)))
            hashes = np.tile(base, reps)[:n].copy()
            for _ in range(4):  # flip up to 4 random bits per copy
                flip = rng.random(n) < 0.5
                hashes[flip] ^= np.left_shift(np.uint64(1), rng.integers(0, 64, flip.sum()).astype(np.uint64))
            how = "real EM crop hashes + random bit flips"
        t0 = time.perf_counter()
        groups = greedy_groups(hashes, 12, 0)
        dt = time.perf_counter() - t0
        ex = int((groups == np.arange(n)).sum())
        print(f"dedup {n:>9,} hashes ({how}): {dt:.1f} s, {ex:,} exemplars ({ex / n:.1%})")
        sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--size", type=int, nargs=3, default=[500, 1030, 1030])
    e.add_argument("--no-reference", action="store_true", help="time cemnet only")
    e.add_argument("--workdir", nargs="+", default=[None],
                   help="where the volume and all outputs go (default: the system temp folder); several: one "
                   "comparison in each; /dev/shm takes the disk out of the comparison")
    e.add_argument("--repeat", type=int, default=1, help="run everything this many times, report the best")
    d = sub.add_parser("dedup")
    d.add_argument("--n", type=int, nargs="+", default=[1_000_000, 10_000_000])
    g = sub.add_parser("large2d")
    g.add_argument("--side", type=int, default=12000)
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--workdir", help="where the image and the corpus go (default: the system temp folder)")
    f = sub.add_parser("files")
    f.add_argument("--workers", type=int, default=2)
    f.add_argument("--copies", type=int, default=1, help="use each image this many times (as hard links)")
    f.add_argument("--workdir", help="where the corpus goes (default: the system temp folder)")
    a = p.parse_args()
    if a.what == "extract":
        bench_extract(tuple(a.size), a.workers, reference=not a.no_reference, workdirs=a.workdir, repeat=a.repeat)
    elif a.what == "large2d":
        bench_large_2d(a.side, a.workers, workdir=a.workdir)
    elif a.what == "files":
        bench_files(a.workers, copies=a.copies, workdir=a.workdir)
    else:
        bench_dedup(a.n)


if __name__ == "__main__":
    main()
