"""The curation report: counts per stage and source, timings, skipped inputs, montages, HTML page."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from curation.corpus import Corpus, CorpusIndex
from curation.pixels import read_or_recut


def source_counts(index: CorpusIndex) -> list[dict[str, Any]]:
    """One row per source: raw -> after dedup -> after filter, plus its provenance."""
    counts = index.status_counts()
    raw_of: dict[str, int] = {}
    for (s, _), n in counts.items():
        raw_of[s] = raw_of.get(s, 0) + n
    rows = []
    for src in index.sources():
        name = src["name"]
        dup, filt, kept = (counts.get((name, k), 0) for k in ("duplicate", "filtered", "kept"))
        raw = raw_of.get(name, 0)
        rows.append({
            "source": name, "dataset": src["dataset"], "status": src["status"], "raw": raw,
            "after_dedup": raw - dup, "kept": kept, "duplicates": dup, "filtered": filt,
            "shape_zyx": json.loads(src["shape_zyx"]) if src["shape_zyx"] else None,
            "dtype": src["dtype"], "voxel_size_zyx": json.loads(src["voxel_size_zyx"]) if src["voxel_size_zyx"] else None,
            "voxel_size_from": src["voxel_size_from"], "planes": json.loads(src["axes"]) if src["axes"] else None,
            "uint8_rule": json.loads(src["uint8_rule"])["rule"] if src["uint8_rule"] else None,
            "seconds": round(src["seconds"] or 0.0, 2), "notes": "; ".join(json.loads(src["notes"] or "[]")),
            "error": src["error"] or "",
        })
    return rows


def montage(patches: list[np.ndarray], labels: list[str] | None = None, columns: int = 8, tile: int = 112) -> Image.Image:
    """Grid of patches (each resized to ``tile``), optional caption under each."""
    n = max(1, len(patches))
    rows = (n + columns - 1) // columns
    caption = 12 if labels else 0
    sheet = Image.new("L", (columns * (tile + 2), rows * (tile + 2 + caption)), 255)
    draw = ImageDraw.Draw(sheet)
    for i, patch in enumerate(patches):
        r, c = divmod(i, columns)
        x, y = c * (tile + 2), r * (tile + 2 + caption)
        sheet.paste(Image.fromarray(patch).resize((tile, tile), Image.Resampling.BILINEAR), (x, y))
        if labels:
            draw.text((x + 1, y + tile), labels[i][:22], fill=0)
    return sheet


# Montages of removed patches show stored pixels, else xy patches re-cut from their sources
# (an exemplars-only corpus stores none of theirs): one plane region each, cheap; an xz / yz patch
# would read a column through the volume (hundreds of slices), so those are left out
# (CorpusIndex.showable_patches / showable_group_members).


def _pixels(corpus: Corpus, index: CorpusIndex, ids: list[int]) -> list[np.ndarray | None]:
    """Patches ``ids`` at true size: stored pixels, or re-cut (None where that fails)."""
    pos = np.searchsorted(corpus.ids, np.asarray(ids, dtype=np.int64))
    patches, sizes, failed, _ = read_or_recut(corpus, pos)
    return [None if bad else patch[:h, :w] for patch, (h, w), bad in zip(patches, sizes, failed)]


def _sample_status(corpus: Corpus, index: CorpusIndex, status: str, n: int, seed: int) -> tuple[list, list]:
    table = index.showable_patches(status)
    if len(table["id"]) == 0:
        return [], []
    pick = np.sort(np.random.default_rng(seed).permutation(len(table["id"]))[:n])
    shown = _pixels(corpus, index, table["id"][pick].tolist())
    return ([p for p in shown if p is not None],
            [str(r) for r, p in zip(table["reason"][pick], shown) if p is not None])


def _duplicate_groups(corpus: Corpus, index: CorpusIndex, n_groups: int, per_group: int, seed: int) -> tuple[list, list]:
    rows = index.largest_groups(n_groups * 4)
    rng = np.random.default_rng(seed)
    chosen = [rows[i] for i in np.sort(rng.permutation(len(rows))[:n_groups])] if rows else []
    patches, labels = [], []
    for group_id, size in chosen:
        members = index.showable_group_members(group_id, per_group)
        shown = [(pid, p) for pid, p in zip(members, _pixels(corpus, index, members)) if p is not None]
        for pid, patch in shown:
            patches.append(patch)
            labels.append(f"#{group_id} exemplar" if pid == group_id else f"dup of #{group_id}")
        members = shown
        for _ in range(per_group - len(members)):
            patches.append(np.full((8, 8), 255, np.uint8))
            labels.append("")
    return patches, labels


def write_report(index: CorpusIndex, seed: int = 0) -> Path:
    """Write ``report/`` (counts.csv, montages, report.html) and print the summary table."""
    out = index.root / "report"
    out.mkdir(exist_ok=True)
    rows = source_counts(index)
    with open(out / "counts.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["source"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    corpus = Corpus(index.root, status=None)
    pictures = {}
    for status, title in (("kept", "kept patches"), ("filtered", "filtered-out patches (reason)")):
        patches, labels = _sample_status(corpus, index, status, 64, seed)
        if patches:
            montage(patches, labels if status == "filtered" else None).save(out / f"montage_{status}.png")
            pictures[f"montage_{status}.png"] = title
    patches, labels = _duplicate_groups(corpus, index, n_groups=8, per_group=8, seed=seed)
    if patches:
        montage(patches, labels).save(out / "montage_duplicates.png")
        pictures["montage_duplicates.png"] = "near-duplicate groups (one row per group, exemplar first)"
    totals = {k: sum(r[k] for r in rows) for k in ("raw", "after_dedup", "kept")}
    stages = index.stages()
    skipped = index.skipped()
    (out / "report.html").write_text(_html(index, rows, totals, stages, skipped, pictures))
    (out / "summary.json").write_text(json.dumps({"totals": totals, "sources": rows, "skipped": skipped,
                                                  "stages": {k: v[0] for k, v in stages.items()}}, indent=1))
    print(summary_table(rows, totals, skipped))
    print(f"report: {out / 'report.html'}")
    return out / "report.html"


def _per_dataset(rows: list[dict]) -> list[dict]:
    """Source rows summed per dataset, for terminals that cannot show 100k sources."""
    out: dict[str, dict] = {}
    for r in rows:
        d = out.setdefault(r["dataset"] or r["source"], {
            "source": r["dataset"] or r["source"], "status": "done", "error": "", "raw": 0, "after_dedup": 0,
            "kept": 0, "planes": [], "voxel_size_zyx": None, "n": 0, "failed": 0})
        for k in ("raw", "after_dedup", "kept"):
            d[k] += r[k]
        d["planes"] = sorted(set(d["planes"]) | set(r["planes"] or []))
        d["n"] += 1
        d["failed"] += r["status"] != "done"
    for d in out.values():
        d["source"] = f"{d['source']} ({d['n']} sources)"
        if d["failed"]:
            d["status"], d["error"] = "partly failed", f"{d['failed']} failed or partial"
    return list(out.values())


def summary_table(rows: list[dict], totals: dict[str, int], skipped: list[tuple[str, str]],
                  max_rows: int = 40, max_skipped: int = 20) -> str:
    """Plain-text table of counts per source, for the terminal.

    With more than ``max_rows`` sources the rows are summed per dataset, and at most
    ``max_rows`` rows and ``max_skipped`` skipped inputs are shown (all are in ``report/``).
    """
    what = "source"
    if len(rows) > max_rows:
        rows, what = _per_dataset(rows), "dataset"
    hidden = len(rows) - max_rows
    rows = rows[:max_rows]
    width = max([len(r["source"]) for r in rows] + [6])
    lines = [f"{what:<{width}}  {'raw':>8}  {'dedup':>8}  {'kept':>8}  planes      voxel (z,y,x)"]
    for r in rows:
        voxel = "-" if "n" in r else "none (isotropic assumed)" \
            if r["voxel_size_zyx"] is None and r["planes"] and len(r["planes"]) > 1 \
            else (",".join(f"{v:g}" for v in r["voxel_size_zyx"]) if r["voxel_size_zyx"] else "-")
        state = "" if r["status"] == "done" else f"  [{r['status']}: {r['error']}]"
        lines.append(f"{r['source']:<{width}}  {r['raw']:>8}  {r['after_dedup']:>8}  {r['kept']:>8}  "
                     f"{','.join(r['planes'] or []):<10}  {voxel}{state}")
    if hidden > 0:
        lines.append(f"... and {hidden} more {what}s (every source: report/counts.csv)")
    lines.append(f"{'TOTAL':<{width}}  {totals['raw']:>8}  {totals['after_dedup']:>8}  {totals['kept']:>8}")
    for path, problem in skipped[:max_skipped]:
        lines.append(f"skipped: {path}: {problem}")
    if len(skipped) > max_skipped:
        lines.append(f"... and {len(skipped) - max_skipped} more skipped inputs (all in report/report.html)")
    return "\n".join(lines)


def _html(index: CorpusIndex, rows, totals, stages, skipped, pictures, max_rows: int = 1000) -> str:
    e = html.escape
    cols = ["source", "dataset", "status", "raw", "after_dedup", "kept", "duplicates", "filtered", "shape_zyx",
            "dtype", "voxel_size_zyx", "voxel_size_from", "planes", "uint8_rule", "seconds", "notes", "error"]

    def more(n: int, where: str) -> str:  # a page with 100k table rows is too slow to open
        return f"<tr><td colspan='{len(cols)}'>... and {n} more (all in {where})</td></tr>" if n > 0 else ""

    table = "".join(
        "<tr>" + "".join(f"<td>{e(str(r[c]) if r[c] is not None else '')}</td>" for c in cols) + "</tr>"
        for r in rows[:max_rows]
    ) + more(len(rows) - max_rows, "counts.csv")
    stage_rows = "".join(f"<tr><td>{e(k)}</td><td>{v[0]:.2f}</td><td>{e(json.dumps(v[1]))}</td></tr>"
                         for k, v in stages.items())
    skip_rows = ("".join(f"<tr><td>{e(p)}</td><td>{e(q)}</td></tr>" for p, q in skipped[:max_rows])
                 + more(len(skipped) - max_rows, "summary.json")) or "<tr><td>none</td></tr>"
    imgs = "".join(f"<h3>{e(t)}</h3><img src='{e(f)}' alt='{e(t)}'>" for f, t in pictures.items())
    settings = e(json.dumps(index.meta.get("settings", {}), indent=1))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>cemnet corpus report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}} th{{background:#eee}} img{{max-width:100%}}</style></head><body>
<h1>Corpus report: {e(str(index.root))}</h1>
<p><b>{totals['raw']}</b> raw patches &rarr; <b>{totals['after_dedup']}</b> after deduplication &rarr;
<b>{totals['kept']}</b> after filtering.</p>
<h2>Per source</h2><table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{table}</table>
<h2>Stages (seconds)</h2><table><tr><th>stage</th><th>seconds</th><th>info</th></tr>{stage_rows}</table>
<h2>Skipped inputs</h2><table><tr><th>path</th><th>problem</th></tr>{skip_rows}</table>
<h2>Pictures</h2>{imgs}
<h2>Settings</h2><pre>{settings}</pre></body></html>"""
