"""``cemnet curate``: build a corpus, and the corpus tools around it.

    cemnet curate SOURCES... --out CORPUS [options]     build or extend (resumable)
    cemnet curate export-tiff CORPUS OUT                 CEM500K-style folder of 8-bit TIFFs
    cemnet curate train-filter CORPUS --labels CSV --out filter.json
    cemnet curate report CORPUS                          rewrite the report
    cemnet curate recut CORPUS --status duplicate|filtered [--dataset D] [--out DIR]
                                                         re-cut removed patches (TIFFs) from their sources
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curation.pipeline import CurateSettings

TOOLS = ("export-tiff", "train-filter", "report", "recut")


def _build_parser() -> argparse.ArgumentParser:
    d = CurateSettings()
    p = argparse.ArgumentParser(
        prog="cemnet curate",
        description="Raw EM archives -> deduplicated, filtered 8-bit 2D patch corpus with provenance. "
        f"Tools: cemnet curate {{{','.join(TOOLS)}}} --help",
    )
    p.add_argument("sources", nargs="*", help="files or folders (folders are searched recursively)")
    p.add_argument("--out", required=True, help="corpus folder (created, or extended/resumed if it exists)")
    p.add_argument("--manifest", action="append", default=[],
                   help="YAML/CSV list of sources with name, path, voxel_size, axes, key, ... (repeatable)")
    p.add_argument("--stack-folders", action="store_true",
                   help="treat a folder of same-sized 2D images as one volume (slices in natural order)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="voxel size (nm) for all SOURCES given on the command line")
    p.add_argument("--key", help="HDF5 dataset / zarr array for all SOURCES")
    p.add_argument("--scale-level", type=int, default=0, help="OME-Zarr multiscale level (default 0)")
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--max-anisotropy", type=float, default=d.max_anisotropy,
                   help="cut xz/yz planes too when |sx - sz| / sx <= this (default %(default)s)")
    p.add_argument("--axes", default=d.axes, help="'auto' (default) or a list such as 'xy' or 'xy,xz,yz'")
    p.add_argument("--slice-stride", type=int, default=d.slice_stride)
    p.add_argument("--uint8", dest="uint8_rule", default=d.uint8_rule, choices=["auto", "dtype", "percentile", "minmax"])
    p.add_argument("--percentiles", type=float, nargs=2, default=d.percentiles, metavar=("LOW", "HIGH"))
    p.add_argument("--dedup-distance", type=int, default=d.dedup_distance)
    p.add_argument("--dedup-scope", default=d.dedup_scope, choices=["dataset", "global", "none"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--filter", default=d.filter,
                   help="'stats' (default), 'none', 'logistic:FILE.json', 'cem500k:FILE.pth', or 'stats:key=value,...'")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2; 1 = in-process)")
    p.add_argument("--scheduler", help="Dask scheduler address: run the units on that cluster (shared filesystem)")
    p.add_argument("--memory-mb", type=int, default=d.memory_mb, help="bound on the data one unit holds")
    p.add_argument("--keep-all-pixels", action="store_true",
                   help="store the pixels of duplicates and filtered patches too (default: kept patches only; "
                   "the others keep their provenance and can be re-cut: cemnet curate recut)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _specs(args: argparse.Namespace) -> tuple[list, list]:
    from curation.readers import ReaderError, discover, load_manifest

    specs, skipped = [], []
    for manifest in args.manifest:
        specs.extend(load_manifest(manifest, skipped))
    if args.sources:
        found, not_used = discover(args.sources, stack_folders=args.stack_folders)
        skipped.extend(not_used)
        for spec in found:
            if args.voxel_size:
                spec.voxel_size = tuple(args.voxel_size)
            if args.key:
                spec.key = args.key
            spec.scale_level = args.scale_level
        specs.extend(found)
    if not specs:
        why = "; ".join(f"{path}: {problem}" for path, problem in skipped)
        raise ReaderError(", ".join(map(str, args.sources)) or "(no input)",
                          "no readable source found" + (f" ({why})" if why else ""))
    return specs, skipped


def _tool(argv: list[str]) -> int:
    tool, rest = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"cemnet curate {tool}")
    p.add_argument("corpus")
    if tool == "export-tiff":
        from curation.corpus import Corpus, export_tiff_folder

        p.add_argument("out")
        p.add_argument("--status", default="kept", help="kept (default), duplicate, filtered or all")
        a = p.parse_args(rest)
        corpus = Corpus(a.corpus, status=None if a.status == "all" else a.status)
        n = export_tiff_folder(corpus, a.out)
        print(f"wrote {n} patches to {a.out}")
        if n < len(corpus):
            print(f"{len(corpus) - n} patches have no pixels stored in {a.corpus} (it keeps kept patches only); "
                  f"`cemnet curate recut {a.corpus} --status {a.status}` cuts them from their sources")
    elif tool == "recut":
        from curation.pixels import recut_to_folder

        p.add_argument("--status", required=True, choices=["duplicate", "filtered", "kept", "all"])
        p.add_argument("--dataset", action="append", help="only sources of this dataset (repeatable)")
        p.add_argument("--out", help="folder for the TIFFs and patches.csv (default CORPUS/recut/STATUS)")
        p.add_argument("--memory-mb", type=int, default=256, help="bound on the source data read at once")
        p.add_argument("--no-progress", action="store_true")
        a = p.parse_args(rest)
        try:
            n, problems = recut_to_folder(a.corpus, a.status, a.out, a.dataset, a.memory_mb, not a.no_progress)
        except (FileNotFoundError, OSError) as err:
            print(f"cemnet curate recut: {err}", file=sys.stderr)
            return 2
        target = a.out or str(Path(a.corpus) / "recut" / a.status)
        print(f"wrote {n} patches to {target}" + (f"; {len(problems)} source(s) could not be re-cut" if problems else ""))
        return 1 if problems else 0
    elif tool == "train-filter":
        import json

        import numpy as np

        from curation.corpus import Corpus
        from curation.filters import read_label_csv, train_logistic_filter

        p.add_argument("--labels", required=True, help="CSV: patch_id,informative (yes/no)")
        p.add_argument("--out", required=True, help="filter file to write (JSON); use with --filter logistic:FILE")
        a = p.parse_args(rest)
        labels = read_label_csv(a.labels)
        corpus = Corpus(a.corpus, status=None)
        ids = np.array(sorted(labels), dtype=np.int64)
        pos = np.searchsorted(corpus.ids, ids)
        bad = ids[(pos >= len(corpus.ids)) | (corpus.ids[np.minimum(pos, len(corpus.ids) - 1)] != ids)]
        if len(bad):
            print(f"{a.labels}: patch ids not in {a.corpus}: {bad[:10].tolist()}", file=sys.stderr)
            return 2
        from curation.pixels import read_or_recut

        patches, sizes, _, problems = read_or_recut(corpus, pos)  # labelled removed patches are re-cut
        if problems:
            print(f"{a.labels}: labelled patches cannot be read: {'; '.join(problems)}", file=sys.stderr)
            return 2
        flt, metrics = train_logistic_filter(patches, sizes, np.array([labels[i] for i in ids], dtype=bool))
        flt.save(a.out)
        print(json.dumps(metrics, indent=1))
        print(f"wrote {a.out}; use: cemnet curate ... --filter logistic:{a.out}")
    else:
        from curation.corpus import CorpusIndex, CorpusLockedError
        from curation.report import write_report

        a = p.parse_args(rest)
        try:
            index = CorpusIndex(a.corpus)
        except (FileNotFoundError, CorpusLockedError) as err:
            print(f"cemnet curate {tool}: {err}", file=sys.stderr)
            return 2
        try:
            write_report(index)
        finally:
            index.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return _tool(argv)
    args = _build_parser().parse_args(argv)
    from curation.corpus import CorpusLockedError
    from curation.pipeline import curate
    from curation.readers import ReaderError

    settings = CurateSettings(
        patch_size=args.patch_size, max_anisotropy=args.max_anisotropy, axes=args.axes,
        slice_stride=args.slice_stride, uint8_rule=args.uint8_rule, percentiles=tuple(args.percentiles),
        dedup_distance=args.dedup_distance, dedup_scope=args.dedup_scope, seed=args.seed,
        filter=args.filter, memory_mb=args.memory_mb, keep_all_pixels=args.keep_all_pixels,
    )
    try:
        specs, skipped = _specs(args)
    except (ReaderError, FileNotFoundError, ValueError) as err:
        print(f"cemnet curate: {err}", file=sys.stderr)
        return 2
    try:
        curate(specs, args.out, settings, workers=args.workers, scheduler=args.scheduler,
               skipped=skipped, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    except (ValueError, CorpusLockedError, OSError) as err:  # mixing patch sizes, a bad filter spec,
        print(f"cemnet curate: {err}", file=sys.stderr)  # a second writer, an --out that is a file, a full disk
        return 2
    print(f"corpus: {Path(args.out).resolve()}")
    return 0
