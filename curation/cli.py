"""``cemnet curate``: build a corpus, and the corpus tools around it.

    cemnet curate SOURCES... --out CORPUS [options]     build or extend (resumable)
    cemnet curate export-tiff CORPUS OUT                 CEM500K-style folder of 8-bit TIFFs
    cemnet curate train-filter CORPUS --labels CSV --out filter.json
    cemnet curate report CORPUS                          rewrite the report
    cemnet curate verify CORPUS                          check every shard against its checksum
    cemnet curate recut CORPUS --status duplicate|filtered [--dataset D] [--out DIR]
                                                         re-cut removed patches (TIFFs) from their sources
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from curation.settings import CurateSettings

TOOLS = {
    "export-tiff": "write a CEM500K-style folder of 8-bit TIFF patches",
    "train-filter": "train a logistic patch filter from your labels (CSV of patch_id,informative)",
    "report": "write the corpus report again (report/report.html)",
    "verify": "check every shard against the checksum in the index; list the damaged ones",
    "recut": "re-cut removed patches (no pixels stored) from their sources as 8-bit TIFFs + patches.csv",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it states it); descriptions keep their
    line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or action.required or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {'none' if default in (None, '') else default})"


def _add_settings_options(group: argparse._ActionsContainer) -> None:
    """One option per :class:`CurateSettings` field (its flag, help, choices from the field)."""
    for f in fields(CurateSettings):
        meta, default = f.metadata, f.default
        kwargs: dict = {"dest": f.name, "default": default, "help": meta["help"]}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(default, tuple):
            kwargs.update(type=type(default[0]), nargs=len(default), metavar=meta["metavar"])
        else:
            kwargs["type"] = type(default)
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        group.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kwargs)


def settings_from_args(args: argparse.Namespace) -> CurateSettings:
    """The :class:`CurateSettings` of parsed ``cemnet curate`` options."""
    values = {f.name: getattr(args, f.name) for f in fields(CurateSettings)}
    return CurateSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _build_parser() -> argparse.ArgumentParser:
    tools = "\n".join(f"  {name:<13} {what}" for name, what in TOOLS.items())
    p = argparse.ArgumentParser(
        prog="cemnet curate", formatter_class=_HelpFormatter,
        description="Raw EM archives -> deduplicated, filtered 8-bit 2D patch corpus with provenance.\n"
        "Re-running the same command resumes; adding sources extends the corpus.",
        epilog=f"corpus tools: cemnet curate TOOL CORPUS ... (each has --help)\n{tools}",
    )
    p.add_argument("sources", nargs="*", help="files or folders (folders are searched recursively)")
    p.add_argument("--out", required=True, help="corpus folder (created, or extended/resumed if it exists)")
    p.add_argument("--manifest", action="append", default=[],
                   help="YAML/CSV list of sources with name, path, voxel_size, axes, key, ... (repeatable)")
    p.add_argument("--stack-folders", action="store_true",
                   help="treat a folder of same-sized 2D images as one volume (slices in natural order)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="voxel size (nm) for all SOURCES given on the command line (default: from the files)")
    p.add_argument("--key", help="HDF5 dataset / zarr array for all SOURCES (default: the only or largest one)")
    p.add_argument("--scale-level", type=int, default=0, help="OME-Zarr multiscale level")
    p.add_argument("--workers", type=int, default=2, help="processes (1 = in-process)")
    p.add_argument("--scheduler", help="Dask scheduler address: run the units on that cluster (shared filesystem) "
                   "(default: local processes)")
    _add_settings_options(p.add_argument_group("corpus settings (stored in CORPUS/corpus.json)"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _tool_parser(tool: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"cemnet curate {tool}", description=TOOLS[tool], formatter_class=_HelpFormatter)
    p.add_argument("corpus", help="corpus folder (written by cemnet curate)")
    if tool == "export-tiff":
        p.add_argument("out", help="folder to write the TIFFs to (created)")
        p.add_argument("--status", default="kept", choices=["kept", "duplicate", "filtered", "all"],
                       help="which patches to write")
    elif tool == "train-filter":
        p.add_argument("--labels", required=True, help="CSV: patch_id,informative (yes/no)")
        p.add_argument("--out", required=True, help="filter file to write (JSON); use with --filter logistic:FILE")
    elif tool == "verify":
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    elif tool == "recut":
        p.add_argument("--status", required=True, choices=["duplicate", "filtered", "kept", "all"],
                       help="which patches to re-cut (stored pixels are copied, the others cut from their sources)")
        p.add_argument("--dataset", action="append",
                       help="only sources of this dataset (repeatable) (default: every dataset)")
        p.add_argument("--out", help="folder for the TIFFs and patches.csv (default: CORPUS/recut/STATUS)")
        p.add_argument("--memory-mb", type=int, default=256, help="bound on the source data read at once (MB)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    from curation.corpus import CorpusError, CorpusLockedError

    tool = argv[0]
    a = _tool_parser(tool).parse_args(argv[1:])
    if tool == "verify":
        return verify(a.corpus, progress=not a.no_progress)
    try:
        return _run_tool(tool, a)
    except (CorpusError, CorpusLockedError, FileNotFoundError, ValueError) as err:  # one line, no traceback
        print(f"cemnet curate {tool}: {err}", file=sys.stderr)
        return 2


def _run_tool(tool: str, a: argparse.Namespace) -> int:
    if tool == "export-tiff":
        from curation.corpus import Corpus, export_tiff_folder

        corpus = Corpus(a.corpus, status=None if a.status == "all" else a.status)
        n = export_tiff_folder(corpus, a.out)
        print(f"wrote {n} patches to {a.out}")
        if n < len(corpus):
            print(f"{len(corpus) - n} patches have no pixels stored in {a.corpus} (it keeps kept patches only); "
                  f"`cemnet curate recut {a.corpus} --status {a.status}` cuts them from their sources")
    elif tool == "recut":
        from curation.pixels import recut_to_folder

        try:
            n, problems = recut_to_folder(a.corpus, a.status, a.out, a.dataset, a.memory_mb, not a.no_progress)
        except OSError as err:  # FileNotFoundError included
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
        from curation.corpus import CorpusIndex
        from curation.report import write_report

        index = CorpusIndex(a.corpus)
        try:
            write_report(index)
        finally:
            index.close()
    return 0


def verify(corpus: str, progress: bool = True) -> int:
    """``cemnet curate verify``: a table of the shards that fail; 1 if any does, else 0."""
    from curation.corpus import CorpusError, verify_shards

    if not (Path(corpus) / "corpus.json").is_file():
        print(f"cemnet curate verify: {corpus}: no corpus.json (not a cemnet corpus)", file=sys.stderr)
        return 2
    try:
        problems, counts = verify_shards(corpus, progress=progress)
    except CorpusError as err:
        print(f"cemnet curate verify: {err}", file=sys.stderr)
        return 2
    unverified = (f"; {counts['unverified']} written before checksums existed: their shape alone was checked"
                  if counts["unverified"] else "")
    if counts.get("no_pixels"):
        unverified += (f"; {counts['no_pixels']} work units store no pixels (their patches are duplicates or "
                       "filtered: `cemnet curate recut` cuts them from the sources)")
    if not problems:
        print(f"{corpus}: all {counts['shards']} shards ({counts['patches']} patches) intact{unverified}")
        return 0
    width = max(len("shard"), *(len(b["shard"]) for b in problems))
    print(f"{'shard':<{width}}  {'patches':>7}  problem")
    for bad in problems:
        print(f"{bad['shard']:<{width}}  {bad['patches']:>7}  {bad['problem']}")
    print(f"{corpus}: {len(problems)} of {counts['shards']} shards failed ({sum(b['patches'] for b in problems)} "
          f"of {counts['patches']} patches){unverified}. Run the `cemnet curate` command that built the "
          "corpus again: it drops the damaged shards and cuts them again")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return _tool(argv)
    args = _build_parser().parse_args(argv)
    from curation.corpus import CorpusLockedError
    from curation.pipeline import curate
    from curation.readers import ReaderError

    settings = settings_from_args(args)
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
    return 0 if _any_source_cut(args.out, specs) else 1


def _any_source_cut(corpus: str, specs: list) -> bool:
    """Whether at least one of this run's sources is in the corpus (done, or partly cut); if
    none is, say so: a run whose every input failed must not look like a success."""
    from curation.corpus import ReadOnlyIndex

    paths = {str(spec.path) for spec in specs}
    with ReadOnlyIndex(corpus) as index:
        cut = bool(paths & index.cut_source_paths())
    if not cut:
        print(f"cemnet curate: none of the {len(paths)} source(s) could be cut (see the messages above and "
              f"{Path(corpus) / 'report' / 'report.html'}); nothing was added to {corpus}", file=sys.stderr)
    return bool(cut)
