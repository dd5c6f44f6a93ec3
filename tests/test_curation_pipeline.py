"""End-to-end curation on real EM data: provenance, bad inputs, resume, adding sources, Dask, TIFF export."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from curation import stages
from curation.corpus import Corpus, CorpusIndex, export_tiff_folder, open_corpus
from curation.executor import Executor
from curation.pipeline import curate
from curation.readers import SourceSpec, open_volume
from curation.settings import CurateSettings
from curation.staging import StagingArea
from curation_executors import FakeExecutor, KillingExecutor

NEUROPROOF = "neuroproof_fibsem_medulla/training_sample1/grayscale_maps"


def _rows(corpus_dir, sql, params=()):
    db = sqlite3.connect(corpus_dir / "index.sqlite")
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def test_small_corpus_counts_planes_and_provenance(small_corpus, shared_data):
    counts = {r[0]: r[1] for r in _rows(small_corpus, "SELECT source, COUNT(*) FROM patches GROUP BY source")}
    # NeuroProof 250^3: one 224 patch per plane (the 26 px leftover is dropped), 3 planes x 250 slices.
    assert counts["neuroproof"] == 750
    # ISBI 512x512 x 30 slices, anisotropic (50 nm z): xy only, 2x2 patches each.
    assert counts["isbi2012"] == 120
    # A 16-bit 800x800 OME-Zarr tile: 3 full + one 128 px edge strip per side = 4x4.
    assert counts["sem16bit_tile"] == 16
    planes = dict(_rows(small_corpus, "SELECT name, axes FROM sources"))
    assert json.loads(planes["neuroproof"]) == ["xy", "xz", "yz"]
    assert json.loads(planes["isbi2012"]) == ["xy"]
    statuses = dict(_rows(small_corpus, "SELECT status, COUNT(*) FROM patches GROUP BY status"))
    assert set(statuses) <= {"kept", "duplicate", "filtered"}
    assert statuses.get("duplicate", 0) > 0, "adjacent FIB-SEM slices must produce near-duplicates"
    assert statuses["kept"] > 0
    # Every removed patch says why; duplicates point at an exemplar of the same source that is not a duplicate.
    for status, reason, gid, pid in _rows(small_corpus, "SELECT status, reason, group_id, id FROM patches"):
        assert (reason == "") == (status == "kept")
        assert (status == "duplicate") == (gid != pid)
    bad = _rows(small_corpus, "SELECT COUNT(*) FROM patches p JOIN patches e ON p.group_id = e.id "
                "WHERE e.group_id != e.id OR e.source != p.source")[0][0]
    assert bad == 0

    # Pixels are stored for the kept patches only (exemplars-only storage, the default).
    corpus = Corpus(small_corpus, status=None)
    assert np.array_equal(corpus.has_pixels, np.isin(corpus.ids, Corpus(small_corpus).ids))
    # Provenance: a yz patch equals the volume's data at (slice, y, x) after uint8 conversion.
    i = int(np.nonzero((corpus.axes == "yz") & corpus.has_pixels)[0][5])
    with open_volume(SourceSpec(path=str(shared_data / NEUROPROOF), stack=True)) as vol:
        block = vol.read(slice(None), slice(None), slice(int(corpus.slices[i]), int(corpus.slices[i]) + 1))[:, :, 0]
    y, x = corpus.ys[i], corpus.xs[i]
    h, w = corpus.sizes[i]
    assert np.array_equal(corpus[i], block[y : y + h, x : x + w])
    # 16-bit tile converted with CEM500K's rule (divide by 65535, x255, truncate).
    j = int(np.nonzero(corpus.source_index == corpus.sources.index("sem16bit_tile"))[0][0])
    raw = tifffile.imread(shared_data / "muvis_align_sem_tiles/tiff_uint16/S000/000_000_0.tiff")
    y, x = corpus.ys[j], corpus.xs[j]
    h, w = corpus.sizes[j]
    assert np.array_equal(corpus[j], (raw[y : y + h, x : x + w].astype(np.float32) / 65535 * 255).astype(np.uint8))
    # Kept-corpus stats are stored for normalisation.
    meta = json.loads((small_corpus / "corpus.json").read_text())
    assert 0.2 < meta["stats"]["mean"] < 0.8 and 0.05 < meta["stats"]["std"] < 0.5


def test_report_has_tables_and_pictures(small_corpus):
    report = small_corpus / "report"
    html = (report / "report.html").read_text()
    for name in ("montage_kept.png", "montage_duplicates.png"):
        assert (report / name).is_file() and name in html
        assert Image.open(report / name).size[0] > 100
    assert "neuroproof" in html and "after deduplication" in html
    summary = json.loads((report / "summary.json").read_text())
    assert summary["totals"]["raw"] >= summary["totals"]["after_dedup"] >= summary["totals"]["kept"] > 0


def _bad_inputs(tmp_path, shared_data):
    """Real files made unusable in the ways labs meet: each must be skipped with a clear reason."""
    bad = tmp_path / "bad"
    bad.mkdir()
    png = (shared_data / "isbi2012/train/images/0.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 3])
    (bad / "empty.tif").write_bytes(b"")
    (bad / "notes.xyz").write_text("not an image")
    Image.fromarray(np.array([[7]], np.uint8)).save(bad / "one_pixel.png")
    real = np.asarray(Image.open(shared_data / "isbi2012/train/images/1.png").convert("L"))
    tifffile.imwrite(bad / "four_d.tif", np.stack([np.stack([real[:64, :64]] * 3)] * 2)[..., None].repeat(2, -1))
    tifffile.imwrite(bad / "all_nan.tif", np.full((300, 300), np.nan, np.float32))
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(shared_data / "isbi2012/train/images/2.png", good / "isbi_2.png")
    return bad, good


def test_bad_inputs_are_skipped_with_clear_reasons(tmp_path, shared_data):
    from curation.readers import discover

    bad, good = _bad_inputs(tmp_path, shared_data)
    specs, skipped = discover([bad, good])
    h5 = tmp_path / "wrongkey.h5"
    shutil.copy(shared_data / "gala_fibsem_crops/train-image.h5", h5)
    specs.append(SourceSpec(path=str(h5), key="no_such_key"))
    out = curate(specs, tmp_path / "corpus", CurateSettings(), workers=2, skipped=skipped, progress=False)
    problems = dict(_rows(out, "SELECT path, problem FROM skipped"))
    names = {p.split("/")[-1]: q for p, q in problems.items()}
    for name in ("truncated.png", "empty.tif", "notes.xyz", "one_pixel.png", "four_d.tif", "all_nan.tif", "wrongkey.h5"):
        assert name in names, f"{name} not reported; got {names}"
        assert names[name].strip(), name
    assert "half a patch" in names["one_pixel.png"]
    assert "finite" in names["all_nan.tif"]
    assert "stack" in names["wrongkey.h5"]  # the message lists the keys that exist
    # The good image still made it, untouched by its neighbours' failures.
    assert _rows(out, "SELECT COUNT(*) FROM patches WHERE source LIKE 'isbi_2%'")[0][0] == 4
    assert "one_pixel.png" in (out / "report/report.html").read_text()


def test_a_run_where_no_source_could_be_cut_exits_non_zero(tmp_path, shared_data, capsys):
    from curation.cli import main as curate_cli

    bad, good = _bad_inputs(tmp_path, shared_data)
    assert curate_cli([str(bad), "--out", str(tmp_path / "c"), "--workers", "1", "--no-progress"]) == 1
    assert "source(s) could be cut" in capsys.readouterr().err.splitlines()[-1]
    assert curate_cli([str(bad), str(good), "--out", str(tmp_path / "c"), "--workers", "1", "--no-progress"]) == 0


def test_damaged_index_or_shards_give_one_line_naming_the_file(small_corpus, shared_data, tmp_path, capsys):
    """A corrupt index.sqlite, a truncated shard, a shard of the wrong shape, an offset past the
    end of its shard: curate, the Corpus reader (pretraining), export-tiff and train-filter each
    say which file is bad and what to do, in one line."""
    from curation.cli import main as curate_cli
    from curation.corpus import CorpusError

    def damaged(name):
        copy = tmp_path / name
        shutil.copytree(small_corpus, copy)
        (copy / "index_cache.npz").unlink()
        return copy

    def one_line_error(argv, expected):
        assert curate_cli(argv) == 2
        err = capsys.readouterr().err.strip()  # progress bars, then the message
        assert "Traceback" not in err and expected in err.splitlines()[-1], err

    labels = tmp_path / "labels.csv"
    labels.write_text("patch_id,informative\n" + "".join(
        f"{i},{'yes' if k % 2 else 'no'}\n" for k, i in enumerate(Corpus(small_corpus).ids[:20].tolist())))

    index_broken = damaged("index")
    with open(index_broken / "index.sqlite", "r+b") as fh:
        fh.write(b"not a database at all" * 10)
    with pytest.raises(CorpusError, match="index.sqlite: the corpus index is damaged"):
        Corpus(index_broken)
    image = str(shared_data / "isbi2012/train/images/0.png")
    for argv in (["export-tiff", str(index_broken), str(tmp_path / "t")],
                 [image, "--out", str(index_broken), "--workers", "1", "--no-progress"]):
        one_line_error(argv, f"{index_broken / 'index.sqlite'}: the corpus index is damaged")

    truncated = damaged("truncated")
    shard = Corpus(truncated).shards[Corpus(truncated).shard_index[0]]  # holds the first labelled patch
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match="truncated"):
        Corpus(truncated).get_padded(np.arange(len(Corpus(truncated))))
    for argv in (["export-tiff", str(truncated), str(tmp_path / "t")],
                 ["train-filter", str(truncated), "--labels", str(labels), "--out", str(tmp_path / "f.json")]):
        one_line_error(argv, f"{truncated / shard}: shard unreadable, truncated?")

    reshaped = damaged("shape")
    shard = Corpus(reshaped).shards[0]
    np.save(reshaped / shard, np.load(reshaped / shard)[:, :112, :112])
    one_line_error(["export-tiff", str(reshaped), str(tmp_path / "t")], f"{reshaped / shard}: shard holds uint8")

    offset = damaged("offset")
    shard = Corpus(offset).shards[0]
    db = sqlite3.connect(offset / "index.sqlite")
    db.execute("UPDATE patches SET offset = offset + 1000 WHERE shard = ? AND status = 'kept'", (shard,))
    db.commit()
    db.close()
    one_line_error(["export-tiff", str(offset), str(tmp_path / "t")], "the index needs uint8 (")


def _units_run(executor: FakeExecutor) -> list[str]:
    return [key for fn, _, key in executor.ran if fn == "run_unit"]


def test_interrupted_run_resumes_without_losing_or_redoing_work(tmp_path, shared_data):
    spec = SourceSpec(path=str(shared_data / NEUROPROOF), name="np", stack=True)
    settings = CurateSettings(patches_per_unit=64, filter="none")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of the run, at its 7th unit
        curate([spec], tmp_path / "c", settings, progress=False, executor=FakeExecutor(1, interrupt_at=7))
    assert not list(Path("/dev/shm").glob(StagingArea(tmp_path / "c")._ram_prefix + "*")), "RAM staging left behind"
    done_before = _rows(tmp_path / "c", "SELECT key FROM tasks")
    assert 0 < len(done_before) < 7
    # The interrupted run released the corpus lock, so this process can run again at once.
    resumed = FakeExecutor(1)
    curate([spec], tmp_path / "c", settings, progress=False, executor=resumed)
    redone = {k for k in _units_run(resumed) if not k.startswith("stage-")}
    assert not redone & {k for (k,) in done_before}, "finished units must not run again"
    assert _rows(tmp_path / "c", "SELECT COUNT(*) FROM patches")[0][0] == 750
    # Same patches as an uninterrupted run (the staged uint8 volume was rebuilt correctly).
    clean = curate([spec], tmp_path / "clean", settings, workers=1, progress=False)
    a, b = Corpus(tmp_path / "c", status=None), Corpus(clean, status=None)
    key = lambda c: sorted(zip(c.axes, c.slices, c.ys, c.xs, c.hashes.tolist()))  # noqa: E731
    assert key(a) == key(b)
    # A third run finds everything done and inspects nothing.
    third = FakeExecutor(1)
    curate([spec], tmp_path / "c", settings, progress=False, executor=third)
    assert third.ran == []


def test_corpus_stats_are_mean_and_std_of_true_pixels(small_corpus):
    corpus = Corpus(small_corpus)
    patches, sizes = corpus.get_padded(np.arange(len(corpus)))
    pixels = np.concatenate([p[:h, :w].ravel() for p, (h, w) in zip(patches, sizes)]) / 255.0
    stats = stages.corpus_stats(small_corpus)
    assert stats["n_sampled"] == len(corpus) and (sizes < 224).any()  # padding must not count
    assert stats["mean"] == pytest.approx(pixels.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(pixels.std(), rel=1e-9)


def test_filter_in_worker_processes_decides_as_in_process(small_corpus, tmp_path):
    """small_corpus was filtered by 2 worker processes; filtering again in-process must agree."""
    copy = tmp_path / "c"
    shutil.copytree(small_corpus, copy)
    query = "SELECT source, axis, slice, y, x, status, reason, score FROM patches ORDER BY 1, 2, 3, 4, 5"
    parallel = _rows(copy, query)
    assert any(r[5] == "filtered" for r in parallel)  # the 16-bit tile has uninformative patches
    index = CorpusIndex(copy)
    index.db.execute("UPDATE patches SET filter_sig = NULL, score = NULL, filter_reason = NULL, status = 'new'")
    index.db.commit()
    stages.apply_filter(index, CurateSettings(), progress=False, executor=None)
    index.close()
    assert _rows(copy, query) == parallel


def test_filter_stage_judges_only_exemplars_not_yet_judged_by_that_filter(small_corpus, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(small_corpus, copy)
    query = "SELECT id, status, reason, score FROM patches ORDER BY id"
    before = _rows(copy, query)
    index = CorpusIndex(copy)
    n_exemplars = index.db.execute("SELECT COUNT(*) FROM patches WHERE group_id = id").fetchone()[0]
    assert 0 < n_exemplars < len(before)

    def evaluated(spec: str) -> int:
        stages.apply_filter(index, CurateSettings(filter=spec), progress=False, executor=None)
        return index.stages()["filter"][1]["evaluated"]

    assert evaluated("stats") == 0  # already judged by this very filter: nothing is read again
    assert evaluated("none") == n_exemplars  # another filter judges every exemplar, never a duplicate
    assert not index.db.execute("SELECT COUNT(*) FROM patches WHERE status = 'filtered'").fetchone()[0]
    assert evaluated("stats:min_std=4") == n_exemplars
    assert evaluated("stats") == n_exemplars
    index.close()
    assert _rows(copy, query) == before


def test_one_writer_at_a_time_and_a_killed_writer_leaves_no_lock(small_corpus, shared_data, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    from curation.cli import main as curate_cli
    from curation.corpus import CorpusLockedError

    copy = tmp_path / "c"
    shutil.copytree(small_corpus, copy)
    before = _rows(copy, "SELECT * FROM patches ORDER BY id")
    image = str(shared_data / "isbi2012" / "train" / "images" / "0.png")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from curation.corpus import CorpusIndex; "
         "index = CorpusIndex(sys.argv[1]); print('holding', flush=True); time.sleep(60)", str(copy)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(CorpusLockedError, match=f"being written by pid {holder.pid} on "):
            curate([SourceSpec(path=image, name="extra")], copy, workers=1, progress=False)
        assert curate_cli([image, "--out", str(copy), "--workers", "1", "--no-progress"]) == 2
        assert f"{copy}: the corpus is being written by pid {holder.pid}" in capsys.readouterr().err
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the kernel drops an flock however its holder dies
        holder.wait()
    assert _rows(copy, "SELECT * FROM patches ORDER BY id") == before  # the refused runs wrote nothing

    index = CorpusIndex(copy)  # no stale lock after the SIGKILL
    with pytest.raises(CorpusLockedError):
        CorpusIndex(copy)  # a second handle in the same process is a second writer too
    index.close()
    curate([SourceSpec(path=image, name="extra")], copy, workers=1, progress=False, report=False)
    assert _rows(copy, "SELECT COUNT(*) FROM patches WHERE source = 'extra'")[0][0] == 4


def _children(pid: int) -> set[int]:
    from pathlib import Path as _Path

    found = set()
    for task in _Path(f"/proc/{pid}/task").glob("*/children"):
        found.update(int(c) for c in task.read_text().split())
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not any(Path("/proc/self/task").glob("*/children")), reason="needs Linux /proc to find the workers")
def test_killing_only_the_parent_leaves_no_lock_and_the_same_command_resumes(shared_data, tmp_path, capsys):
    """`kill -9` of the `cemnet curate` parent alone: its forked pool workers must not keep the
    corpus lock (they used to, and every resume was refused naming the dead parent)."""
    import os
    import signal
    import subprocess
    import sys

    from curation.cli import main as curate_cli

    stack = str(shared_data / NEUROPROOF)
    args = [stack, "--stack-folders", "--voxel-size", "10", "10", "10", "--filter", "none", "--no-progress"]
    # The real CLI in a subprocess; units are slowed down so the kill lands mid-run.
    script = ("import sys, time\nfrom curation import scheduler\nfrom curation.cli import main\n"
              "real = scheduler.run_unit\n"
              "def slow(unit):\n    time.sleep(0.5)\n    return real(unit)\n"
              "scheduler.run_unit = slow\nsys.exit(main(sys.argv[1:]))\n")
    run = subprocess.Popen([sys.executable, "-c", script, *args, "--out", str(tmp_path / "c"), "--workers", "2"],
                           stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 60, set()
    while time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.1)
        workers = _children(run.pid)
        try:
            done = _rows(tmp_path / "c", "SELECT COUNT(*) FROM tasks")[0][0]
        except sqlite3.OperationalError:
            continue
        if done >= 1 and len(workers) >= 2:
            break
    assert run.poll() is None and len(workers) >= 2, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)  # the workers die with their parent

    assert curate_cli([*args, "--out", str(tmp_path / "c"), "--workers", "2"]) == 0  # nothing deleted by hand
    assert "being written" not in capsys.readouterr().err
    assert curate_cli([*args, "--out", str(tmp_path / "clean"), "--workers", "2"]) == 0
    query = "SELECT source, axis, slice, y, x, hash, status FROM patches ORDER BY 1, 2, 3, 4, 5"
    assert _rows(tmp_path / "c", query) == _rows(tmp_path / "clean", query)


def test_a_source_rewritten_since_an_earlier_run_is_cut_again(shared_data, tmp_path, capsys):
    """A lab re-exports a stack under the same name: its old patches must not linger or mix."""
    isbi = shared_data / "isbi2012" / "train" / "images"
    stack = tmp_path / "stack.tif"

    def export(first: int) -> None:
        tifffile.imwrite(stack, np.stack([np.asarray(Image.open(isbi / f"{k}.png")) for k in range(first, first + 3)]), photometric="minisblack")

    def patches(corpus) -> list:
        return _rows(corpus, "SELECT axis, slice, y, x, hash FROM patches ORDER BY 1, 2, 3, 4")

    settings = CurateSettings(filter="none")
    export(0)
    curate([SourceSpec(path=str(stack))], tmp_path / "c", settings, workers=1, progress=False, report=False)
    first = patches(tmp_path / "c")
    assert len(first) == 3 * 4  # 3 slices of 512^2 -> 2x2 xy patches; 3-px-thin xz/yz planes give none
    ids = _rows(tmp_path / "c", "SELECT id FROM patches ORDER BY id")
    curate([SourceSpec(path=str(stack))], tmp_path / "c", settings, workers=1, progress=False, report=False)
    assert _rows(tmp_path / "c", "SELECT id FROM patches ORDER BY id") == ids  # unchanged: nothing redone
    assert "cut again" not in capsys.readouterr().err

    export(10)  # same path, other slices
    curate([SourceSpec(path=str(stack))], tmp_path / "c", settings, workers=1, progress=False, report=False)
    assert f"{stack}: cut again, its files changed" in capsys.readouterr().err
    curate([SourceSpec(path=str(stack))], tmp_path / "fresh", settings, workers=1, progress=False, report=False)
    assert patches(tmp_path / "c") == patches(tmp_path / "fresh") != first
    assert len(list((tmp_path / "c" / "shards" / "stack").glob("*.npy"))) == len(
        list((tmp_path / "fresh" / "shards" / "stack").glob("*.npy")))
    notes = json.loads(_rows(tmp_path / "c", "SELECT notes FROM sources")[0][0])
    assert any(f"its {len(first)} earlier patches were discarded" in n for n in notes)

    # A corpus written before sources were fingerprinted gains the column and is not re-cut.
    db = sqlite3.connect(tmp_path / "c" / "index.sqlite")
    db.execute("ALTER TABLE sources DROP COLUMN fingerprint")
    db.commit()
    db.close()
    ids = _rows(tmp_path / "c", "SELECT id FROM patches ORDER BY id")
    curate([SourceSpec(path=str(stack))], tmp_path / "c", settings, workers=1, progress=False, report=False)
    assert _rows(tmp_path / "c", "SELECT id FROM patches ORDER BY id") == ids
    assert _rows(tmp_path / "c", "SELECT fingerprint IS NOT NULL FROM sources") == [(1,)]


def _slices_as_sources(shared_data, n):
    """n real 250^2 FIB-SEM slices as n separate 2D sources (one patch each): a many-files corpus."""
    files = sorted((shared_data / NEUROPROOF).glob("*.png"))[:n]
    return [SourceSpec(path=str(f), name=f"slice{k:03d}") for k, f in enumerate(files)]


def test_many_small_sources_few_commits_a_bounded_pool_and_a_short_summary(shared_data, tmp_path, monkeypatch,
                                                                               capsys):
    """Per-source commits made SQLite fsync ~5 times per image; 100k-image corpora took hours."""
    import curation.corpus

    statements = []
    real_connect = sqlite3.connect

    def traced_connect(*args, **kwargs):
        db = real_connect(*args, **kwargs)
        db.set_trace_callback(statements.append)
        return db

    monkeypatch.setattr(curation.corpus.sqlite3, "connect", traced_connect)
    in_pool = []

    class Recording(Executor):
        def wait_any(self, futures):
            in_pool.append(len(futures))
            return super().wait_any(futures)

    specs = _slices_as_sources(shared_data, 60)
    executor = Recording(2)
    try:
        curate(specs, tmp_path / "c", CurateSettings(filter="none"), progress=False, report=False, executor=executor)
    finally:
        executor.shutdown()
    assert _rows(tmp_path / "c", "SELECT COUNT(*) FROM sources WHERE status = 'done'")[0][0] == 60
    commits = sum(s.strip().upper() == "COMMIT" for s in statements)
    assert 1 <= commits <= 10, f"{commits} commits for 60 sources"
    assert max(in_pool) <= 8  # 4 tasks per worker process, the rest waits in the backlog

    # The terminal summary of 60 single-image sources: summed per dataset, at most 40 rows.
    from curation.report import _html, source_counts, write_report

    index = CorpusIndex(tmp_path / "c")
    write_report(index)
    rows = source_counts(index)
    page = _html(index, rows, {"raw": 60, "after_dedup": 60, "kept": 60}, {}, [("a", "b")] * 12, {}, max_rows=10)
    index.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[0] == "dataset" and "slice000 (1 sources)" in printed[1]
    assert "... and 20 more datasets (every source: report/counts.csv)" in printed
    assert printed[-2].split()[:2] == ["TOTAL", "60"] and len(printed) == 1 + 40 + 1 + 1 + 1
    assert len(rows) == 60 and sum(r["raw"] for r in rows) == 60
    assert "... and 50 more (all in counts.csv)" in page and "... and 2 more (all in summary.json)" in page


def test_killed_mid_run_loses_only_uncommitted_work_and_resumes(shared_data, tmp_path):
    import signal
    import subprocess
    import sys

    specs = _slices_as_sources(shared_data, 40)
    script = (
        "import sys, time, json\n"
        "from curation import pipeline, scheduler\n"
        "from curation.corpus import CorpusIndex\n"
        "from curation.settings import CurateSettings\n"
        "from curation.readers import SourceSpec\n"
        "CorpusIndex.commit_every = 0.2\n"
        "real = scheduler.inspect_source\n"
        "def slow(*a):\n"
        "    time.sleep(0.05)\n"
        "    return real(*a)\n"
        "scheduler.inspect_source = slow\n"
        "specs = [SourceSpec(**d) for d in json.loads(sys.argv[2])]\n"
        "pipeline.curate(specs, sys.argv[1], CurateSettings(filter='none'), workers=1, progress=False)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "c"),
                            json.dumps([{"path": s.path, "name": s.name} for s in specs])])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until some, not all, sources are committed
        time.sleep(0.1)
        try:
            done = _rows(tmp_path / "c", "SELECT COUNT(*) FROM tasks")[0][0]
        except sqlite3.OperationalError:
            continue  # not created yet, or busy
        if done >= 5:
            break
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert 5 <= done < 40
    assert _rows(tmp_path / "c", "PRAGMA integrity_check") == [("ok",)]
    curate(specs, tmp_path / "c", CurateSettings(filter="none"), workers=1, progress=False, report=False)
    curate(specs, tmp_path / "clean", CurateSettings(filter="none"), workers=1, progress=False, report=False)
    query = "SELECT source, axis, slice, y, x, hash, status FROM patches ORDER BY 1, 2, 3, 4, 5"
    assert _rows(tmp_path / "c", query) == _rows(tmp_path / "clean", query)
    assert len(_rows(tmp_path / "c", query)) == 40


def test_large_2d_image_is_cut_in_bands_with_the_same_patches(shared_data, tmp_path):
    """A 2D image beyond one unit's memory budget is cut in row bands by several units (bounded
    memory, parallel), with exactly the patches of a single pass."""
    tiles = [tifffile.imread(p) for p in sorted((shared_data / "muvis_align_sem_tiles" / "tiff_uint16").rglob("*.tiff"))]
    image = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:4], 1)], 0)[:1500, :1400]
    path = tmp_path / "mosaic_u16.tif"
    tifffile.imwrite(path, image)  # real 16-bit SEM tiles, 1500 x 1400: 7 rows (a 156 px edge row) x 6
    query = "SELECT axis, slice, y, x, h, w, hash, status FROM patches ORDER BY y, x"
    whole = curate([SourceSpec(path=str(path))], tmp_path / "whole", CurateSettings(), workers=1, progress=False,
                   report=False)
    bands = curate([SourceSpec(path=str(path))], tmp_path / "bands", CurateSettings(memory_mb=1), workers=2,
                   progress=False, report=False)
    assert _rows(whole, query) == _rows(bands, query) and len(_rows(whole, query)) == 7 * 6
    # 1 MB of budget holds less than one patch row (224 x 1400 x 4 bytes while converting): a row per band
    assert [k for (k,) in _rows(bands, "SELECT key FROM tasks ORDER BY key")] == [f"band-{y:06d}" for y in range(0, 1500, 224)]
    assert "row bands" in _rows(bands, "SELECT notes FROM sources")[0][0]
    assert _rows(whole, "SELECT key FROM tasks") == [("xy-00000",)]


def _greedy_xy_unit(task):
    """Any xy unit of the source "greedy" (it kills its worker, as the OOM killer would)."""
    return task[1] == "greedy" and task[2].startswith("xy-")


_REAL_FILTER_BATCH = stages.filter_batch
_MAIN_PID = __import__("os").getpid()


def _filter_batch_or_die(*args):
    """filter_batch, except that it kills any worker process that runs it."""
    import os
    import signal

    if os.getpid() != _MAIN_PID:
        os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_FILTER_BATCH(*args)


def test_a_worker_killed_while_filtering_does_not_end_the_run(shared_data, tmp_path, monkeypatch, capsys):
    specs = _slices_as_sources(shared_data, 30)
    query = "SELECT source, status, reason FROM patches ORDER BY source"
    clean = curate(specs, tmp_path / "clean", CurateSettings(), workers=2, progress=False, report=False)
    monkeypatch.setattr(stages, "filter_batch", _filter_batch_or_die)
    curate(specs, tmp_path / "c", CurateSettings(), workers=2, progress=False, report=False)
    assert "the filter goes on in the main process" in capsys.readouterr().err
    assert _rows(tmp_path / "c", query) == _rows(clean, query)
    assert not _rows(tmp_path / "c", "SELECT COUNT(*) FROM patches WHERE filter_sig IS NULL AND group_id = id")[0][0]


def test_a_worker_killed_mid_unit_fails_only_its_source(shared_data, tmp_path, capsys):
    """The OOM killer takes a worker: the pool is restarted, the tasks it held run again one at a
    time, the one that kills its worker again fails its source only, and the run goes on."""
    images = sorted((shared_data / "isbi2012" / "train" / "images").glob("*.png"))[:6]
    specs = [SourceSpec(path=str(shared_data / NEUROPROOF), name="greedy", stack=True)]
    specs += [SourceSpec(path=str(f), name=f"isbi{k}") for k, f in enumerate(images)]
    executor = KillingExecutor(2, _greedy_xy_unit)  # real worker processes, really killed
    try:
        curate(specs, tmp_path / "c", CurateSettings(filter="none"), progress=False, report=False, executor=executor)
    finally:
        executor.shutdown()
    status = dict(_rows(tmp_path / "c", "SELECT name, status FROM sources"))
    assert status.pop("greedy") == "failed" and set(status.values()) == {"done"} and len(status) == 6
    (error,) = _rows(tmp_path / "c", "SELECT error FROM sources WHERE name = 'greedy'")[0]
    assert "a worker process died while reading or cutting it" in error
    assert _rows(tmp_path / "c", "SELECT COUNT(*) FROM patches")[0][0] == 6 * 4
    assert "a worker process died; the pool was restarted" in capsys.readouterr().err


def test_a_corrupt_range_of_a_volume_skips_that_range_only(shared_data, tmp_path):
    """One bad page in a 5 TB stack must not throw away the rest of it: the unit covering it is
    skipped and reported, the source is 'partial', and a re-run tries the range again."""
    images = sorted((shared_data / "isbi2012" / "train" / "images").glob("*.png"), key=lambda f: int(f.stem))
    stack = np.stack([np.asarray(Image.open(f)) for f in images])  # the real 30-slice ISBI stack
    path = tmp_path / "isbi_zlib.tif"
    tifffile.imwrite(path, stack, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        start, size = tif.pages[21].dataoffsets[0], tif.pages[21].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[start + size // 3 : start + size // 3 + 64] = bytes(range(64))  # slice 21's data is now garbage
    path.write_bytes(bytes(data))
    spec = SourceSpec(path=str(path), name="isbi", voxel_size=(50, 4, 4))  # anisotropic: xy planes only
    settings = CurateSettings(filter="none", patches_per_unit=16)  # 4 slices per unit
    curate([spec], tmp_path / "c", settings, workers=2, progress=False, report=False)
    (status, error), = _rows(tmp_path / "c", "SELECT status, error FROM sources")
    assert status == "partial" and "1 unit(s) unreadable, skipped: xy 20-24" in error
    (where, problem), = _rows(tmp_path / "c", "SELECT path, problem FROM skipped")
    assert where == f"{path} (xy 20-24)" and "corrupt" in problem
    assert _rows(tmp_path / "c", "SELECT COUNT(*) FROM patches")[0][0] == (30 - 4) * 4
    assert 20 not in {z for (z,) in _rows(tmp_path / "c", "SELECT DISTINCT slice FROM patches")}

    tifffile.imwrite(path, stack, compression="zlib")  # the file is repaired: cut again, in full
    curate([spec], tmp_path / "c", settings, workers=2, progress=False, report=False)
    assert _rows(tmp_path / "c", "SELECT status, error FROM sources") == [("done", None)]
    assert _rows(tmp_path / "c", "SELECT COUNT(*) FROM patches")[0][0] == 30 * 4
    assert _rows(tmp_path / "c", "SELECT * FROM skipped") == []


def test_changed_settings_recut_a_source_and_never_overlap_units(shared_data, tmp_path, capsys):
    spec = SourceSpec(path=str(shared_data / NEUROPROOF), name="np", stack=True)
    query = "SELECT axis, slice, y, x, hash FROM patches ORDER BY 1, 2, 3, 4"
    # Interrupted with 64 patches per unit, resumed with 32: without care the new, thinner units
    # would re-cut z-ranges that old, finished units already hold.
    with pytest.raises(KeyboardInterrupt):
        curate([spec], tmp_path / "c", CurateSettings(filter="none", patches_per_unit=64), progress=False,
               executor=FakeExecutor(1, interrupt_at=7))
    curate([spec], tmp_path / "c", CurateSettings(filter="none", patches_per_unit=32), workers=1, progress=False,
           report=False)
    assert "cut again, the settings that cut it changed (patches_per_unit 64 -> 32)" in capsys.readouterr().err
    clean = curate([spec], tmp_path / "clean", CurateSettings(filter="none"), workers=1, progress=False, report=False)
    assert _rows(tmp_path / "c", query) == _rows(clean, query) and len(_rows(clean, query)) == 750

    # A finished source keeps its patches when only the unit size changes ...
    ids = _rows(tmp_path / "c", "SELECT id FROM patches ORDER BY id")
    curate([spec], tmp_path / "c", CurateSettings(filter="none", memory_mb=64), workers=1, progress=False,
           report=False)
    assert _rows(tmp_path / "c", "SELECT id FROM patches ORDER BY id") == ids
    # ... and is cut again when a setting that decides its patches changes.
    curate([spec], tmp_path / "c", CurateSettings(filter="none", slice_stride=2), workers=1, progress=False,
           report=False)
    assert "(slice_stride 1 -> 2)" in capsys.readouterr().err
    assert _rows(tmp_path / "c", "SELECT COUNT(*) FROM patches")[0][0] == 3 * 125
    curate([SourceSpec(path=spec.path, name="np", stack=True, voxel_size=(40, 4, 4))], tmp_path / "c",
           CurateSettings(filter="none", slice_stride=2), workers=1, progress=False, report=False)
    assert "reader voxel_size None -> [40.0, 4.0, 4.0]" in capsys.readouterr().err
    assert _rows(tmp_path / "c", "SELECT DISTINCT axis FROM patches") == [("xy",)]  # anisotropic now


def test_a_corrupt_range_of_an_isotropic_volume_leaves_out_only_what_crosses_it(shared_data, tmp_path):
    """xz / yz patches are cut from the staged copies: a lost xy range leaves a hole there, so
    exactly the xz / yz patches crossing it are left out, and nothing else is lost."""
    volume = np.concatenate([
        np.stack([np.asarray(Image.open(f)) for f in sorted((shared_data / d).glob("*.png"))])
        for d in (NEUROPROOF, NEUROPROOF.replace("sample1", "sample2"))])  # 500 x 250 x 250 real FIB-SEM
    path = tmp_path / "np_zlib.tif"
    tifffile.imwrite(path, volume, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        start, size = tif.pages[300].dataoffsets[0], tif.pages[300].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[start + size // 3 : start + size // 3 + 64] = bytes(range(64))  # slice 300 is now garbage
    path.write_bytes(bytes(data))
    settings = CurateSettings(filter="none", patches_per_unit=16)  # xy units of 16 slices
    curate([SourceSpec(path=str(path), name="np")], tmp_path / "c", settings, workers=2, progress=False,
           report=False)
    (status, error), = _rows(tmp_path / "c", "SELECT status, error FROM sources")
    assert status == "partial" and "skipped: xy 288-304" in error and "xz / yz patches crossing" in error

    tifffile.imwrite(path.with_name("clean.tif"), volume, compression="zlib")
    clean = curate([SourceSpec(path=str(path.with_name("clean.tif")), name="np")], tmp_path / "clean", settings,
                   workers=2, progress=False, report=False)
    query = "SELECT axis, slice, y, x, h, w, hash FROM patches ORDER BY 1, 2, 3, 4"
    expected = [r for r in _rows(clean, query)
                if not (r[0] == "xy" and 288 <= r[1] < 304) and not (r[0] != "xy" and r[2] < 304 and r[2] + r[4] > 288)]
    assert _rows(tmp_path / "c", query) == expected
    assert {r[2] for r in expected if r[0] != "xy"} == {0}  # of the two z-rows of xz / yz patches, the one at 224 is out
    assert len(expected) == 484 + 250 + 250


def test_corpus_keeps_few_shards_mapped(shared_data, tmp_path):
    """One shard per small image: a loader over 100k of them must not hold 100k memory maps
    (Linux allows 65,530 per process)."""
    out = curate(_slices_as_sources(shared_data, 12), tmp_path / "c", CurateSettings(filter="none"), workers=1,
                 progress=False, report=False)
    corpus = Corpus(out, status=None)
    assert len(corpus.shards) == 12
    expected = [corpus[i].copy() for i in range(len(corpus))]
    small = Corpus(out, status=None)
    small.max_open_shards = 3
    for _ in range(2):  # a second pass re-opens shards that were let go
        for i in np.random.default_rng(0).permutation(len(small)):
            assert np.array_equal(small[int(i)], expected[int(i)]) and len(small._maps) <= 3
    patches, _ = small.get_padded(np.arange(len(small)))
    assert all(np.array_equal(p[:e.shape[0], :e.shape[1]], e) for p, e in zip(patches, expected))


def test_staging_left_by_a_killed_run_is_removed_by_the_next_run(small_corpus, tmp_path):

    copy = tmp_path / "c"
    shutil.copytree(small_corpus, copy)
    ours, other = StagingArea(copy), StagingArea(tmp_path / "another-corpus")
    leftovers = [*ours._paths("ghost"), other._paths("ghost")[0]]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.zeros((2, 4, 4), np.uint8))
    try:
        curate([], copy, workers=1, progress=False, report=False)  # nothing to extract: just a run
        assert [p.exists() for p in leftovers] == [False, False, True]  # another corpus's file is not ours
    finally:
        for path in leftovers:
            path.unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_or_terminated_run_leaves_no_staging_behind(shared_data, tmp_path, how):
    """SIGTERM (a job scheduler's stop) ends the run like Ctrl-C: committed, staging removed,
    exit 130. After SIGKILL the run's clean-up process removes the staging (hundreds of MB of
    RAM for a real volume) without waiting for the next run on the corpus."""
    import signal
    import subprocess
    import sys


    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm: staging goes to CORPUS/work, removed by the next run")
    out = tmp_path / "c"
    ram_files = f"{StagingArea(out)._ram_prefix}*.u8.npy"
    script = ("import sys, time\nfrom curation import scheduler\nfrom curation.cli import main\n"
              "real = scheduler.run_unit\n"
              "def slow(unit):\n    time.sleep(0.5)\n    return real(unit)\n"
              "scheduler.run_unit = slow\nsys.exit(main(sys.argv[1:]))\n")
    run = subprocess.Popen([sys.executable, "-c", script, str(shared_data / NEUROPROOF), "--stack-folders",
                            "--voxel-size", "10", "10", "10", "--out", str(out), "--no-progress", "--workers", "2"],
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.poll() is None and not list(Path("/dev/shm").glob(ram_files)):
        time.sleep(0.05)
    staged = list(Path("/dev/shm").glob(ram_files))
    try:
        assert run.poll() is None and staged, "the run ended before staging its volume"
        run.send_signal(getattr(signal, how))
        err = run.communicate(timeout=60)[1]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.exists() for p in staged):
            time.sleep(0.05)
        assert not any(p.exists() for p in staged)
        assert f"staging volumes in /dev/shm ({StagingArea(out)._ram_prefix}*.u8.npy)" in err  # where it lives
        if how == "SIGTERM":
            assert run.returncode == 130 and "run the same command again to resume" in err
    finally:
        run.kill()
        for path in staged:
            path.unlink(missing_ok=True)


def test_staging_area_uses_ram_when_it_fits_and_cleans_up(tmp_path):

    area = StagingArea(tmp_path / "c")
    ram = area.create("vol", (4, 64, 64))
    assert ram.startswith("/dev/shm/") and np.load(ram, mmap_mode="r").shape == (4, 64, 64)
    stale = area.create("vol", (4, 64, 64))  # resuming: the earlier file is discarded, not reused
    assert stale == ram and not np.load(ram, mmap_mode="r").any()
    x_first = area.create("vol", (4, 64, 32), "xzy")  # the copy the yz planes are cut from
    assert np.load(x_first, mmap_mode="r").shape == (32, 4, 64) and x_first != ram
    area.release("vol")
    assert not Path(ram).exists() and not Path(x_first).exists()
    on_disk = StagingArea(tmp_path / "c", ram_fraction=0.0).create("big", (4, 64, 64))  # no RAM to spare
    assert on_disk == str(tmp_path / "c" / "work" / "big.u8.npy")
    cluster = StagingArea(tmp_path / "c", use_ram=False)  # Dask workers do not share this RAM
    assert cluster.create("vol", (2, 8, 8)).startswith(str(tmp_path))
    cluster.release_all()
    assert not list((tmp_path / "c" / "work").glob("vol*"))


def test_adding_a_source_keeps_existing_work_and_global_dedup(tmp_path, shared_data):
    isbi = shared_data / "isbi2012/train/images"
    first = SourceSpec(path=str(isbi), name="isbi_a", stack=True, voxel_size=(50, 4, 4))
    out = curate([first], tmp_path / "c", CurateSettings(filter="none"), workers=1, progress=False, report=False)
    before = sorted(_rows(out, "SELECT id, hash, status FROM patches"))
    # The same slices again under another name: per-dataset dedup keeps both, global dedup does not.
    copy = SourceSpec(path=str(isbi), name="isbi_b", stack=True, voxel_size=(50, 4, 4))
    curate([first, copy], out, CurateSettings(filter="none"), workers=1, progress=False, report=False)
    after = sorted(_rows(out, "SELECT id, hash, status FROM patches WHERE source='isbi_a'"))
    assert after == before
    kept_b = _rows(out, "SELECT COUNT(*) FROM patches WHERE source='isbi_b' AND status='kept'")[0][0]
    assert kept_b == sum(1 for r in before if r[2] == "kept")
    curate([first, copy], out, CurateSettings(filter="none", dedup_scope="global"), workers=1, progress=False,
           report=False)
    assert _rows(out, "SELECT COUNT(*) FROM patches WHERE source='isbi_b' AND status='kept'")[0][0] == 0 or \
        _rows(out, "SELECT COUNT(*) FROM patches WHERE source='isbi_a' AND status='kept'")[0][0] < len(before)
    total_kept = _rows(out, "SELECT COUNT(*) FROM patches WHERE status='kept'")[0][0]
    assert total_kept == sum(1 for r in before if r[2] == "kept")
    with pytest.raises(ValueError, match="patch_size"):
        CorpusIndex(out, CurateSettings(patch_size=128).to_json())


def test_dedup_does_not_depend_on_the_order_units_finished(small_corpus, tmp_path):
    """Parallel units commit in any order, so patch ids vary between runs; the seeded dedup must not."""
    from curation.corpus import PATCH_COLUMNS

    src = CorpusIndex(small_corpus)
    table = src.patch_table(PATCH_COLUMNS)
    sources = src.sources()
    src.close()
    by_shard: dict[str, list[tuple]] = {}
    for row in zip(*(table[c].tolist() for c in PATCH_COLUMNS)):
        by_shard.setdefault(row[1], []).append(row)
    decisions = []
    for order in (sorted(by_shard), sorted(by_shard, reverse=True)):
        index = CorpusIndex(tmp_path / f"c{len(decisions)}", CurateSettings().to_json())
        for r in sources:
            index.upsert_source(r["name"], path=r["path"], dataset=r["dataset"] or r["name"], status="done")
        for shard in order:
            index.commit_task(by_shard[shard][0][0], shard, shard, by_shard[shard], 0.0)
        stages.deduplicate(index, CurateSettings(), progress=False)
        ids = index.db.execute("SELECT id, source, axis, slice, y, x, group_id FROM patches").fetchall()
        where = {i: k for i, *k, _ in ids}
        decisions.append(sorted((tuple(k), tuple(where[g])) for i, *k, g in ids))
        index.close()
    assert decisions[0] == decisions[1]
    assert sum(k == g for k, g in decisions[0]) < len(decisions[0])  # there were duplicates to decide


def test_patch_ids_are_the_same_in_two_identical_runs_with_two_workers(shared_data, tmp_path):
    """Ids come from provenance, not from the order parallel units finish in: a label CSV keyed
    by patch id carries over to a rebuilt corpus."""
    specs = [SourceSpec(path=str(shared_data / NEUROPROOF), name="np", stack=True, voxel_size=(10, 10, 10)),
             *_slices_as_sources(shared_data, 6)]
    settings = CurateSettings(filter="none", patches_per_unit=16)  # many small units finishing in any order
    query = "SELECT id, source, axis, slice, y, x, hash FROM patches ORDER BY id"
    runs = []
    for k in range(2):
        curate(specs, tmp_path / f"c{k}", settings, workers=2, progress=False, report=False)
        runs.append(_rows(tmp_path / f"c{k}", query))
    assert runs[0] == runs[1] and len(runs[0]) == 750 + 6
    order = [s.name for s in specs]  # ids run in provenance order: source, plane, slice, row, column
    assert [r[1:6] for r in runs[0]] == sorted((r[1:6] for r in runs[0]), key=lambda r: (order.index(r[0]), r[1:]))


def test_uint32_volume_is_stretched_not_flattened_and_the_report_says_so(shared_data, tmp_path):
    """Real ISBI slices scaled to 16-bit values and stored as a uint32 TIFF stack (made here: the
    shared data has no uint32 EM). The dtype-range rule maps them all to 0 and every patch is
    filtered; `auto` falls back to the percentile stretch and notes it in the report."""
    slices = [np.asarray(Image.open(f)) for f in sorted((shared_data / "isbi2012/train/images").glob("*.png"))[:8]]
    stack = tmp_path / "wide.tif"
    tifffile.imwrite(stack, np.stack(slices).astype(np.uint32) * 257)
    spec = SourceSpec(path=str(stack), name="wide", voxel_size=(50, 4, 4))
    curate([spec], tmp_path / "auto", CurateSettings(), workers=1, progress=False)
    (rule, notes), = _rows(tmp_path / "auto", "SELECT uint8_rule, notes FROM sources")
    assert json.loads(rule)["rule"] == "percentile" and "would fill 1 of 256 grey levels" in notes
    assert _rows(tmp_path / "auto", "SELECT COUNT(*) FROM patches WHERE status = 'kept'")[0][0] > 0
    assert "stretched between its 0.5-99.5 percentiles" in (tmp_path / "auto/report/report.html").read_text()
    curate([spec], tmp_path / "dtype", CurateSettings(uint8_rule="dtype"), workers=1, progress=False, report=False)
    assert _rows(tmp_path / "dtype", "SELECT COUNT(*) FROM patches WHERE status = 'kept'")[0][0] == 0


def test_dask_cluster_gives_the_same_corpus(tmp_path, shared_data):
    """`--scheduler` sends the work to the cluster's worker processes (pids recorded by the
    scheduler's task stream), and the corpus equals a local run's."""
    import os

    from distributed import Client, LocalCluster, get_task_stream

    from curation.cli import main

    images = str(shared_data / "isbi2012/train/images")
    # named as the command line names it: the dedup's visiting order is seeded by provenance,
    # source name included (curation.exemplars.visit_keys)
    spec = SourceSpec(path=images, name="images", stack=True, voxel_size=(50, 4, 4))
    local = curate([spec], tmp_path / "local", CurateSettings(), workers=2, progress=False, report=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client, get_task_stream(client=client) as stream:
        assert main([images, "--stack-folders", "--voxel-size", "50", "4", "4", "--out", str(tmp_path / "dask"),
                     "--scheduler", cluster.scheduler_address, "--no-progress"]) == 0
        worker_pids = client.run(os.getpid)  # {worker address: pid}
    ran = [(t["key"].split("-")[0], t["worker"]) for t in stream.data]
    assert {"inspect_source", "run_unit", "filter_batch"} <= {name for name, _ in ran}
    assert all(worker_pids[w] != os.getpid() for _, w in ran)  # on the workers, not in this process
    a, b = Corpus(local, status=None), Corpus(tmp_path / "dask", status=None)
    assert sorted(a.hashes.tolist()) == sorted(b.hashes.tolist())
    assert len(Corpus(local)) == len(Corpus(tmp_path / "dask"))


def test_tiff_folder_export_and_read_back(small_corpus, tmp_path):
    corpus = Corpus(small_corpus)
    n = export_tiff_folder(corpus, tmp_path / "tiffs", progress=False)
    assert n == len(corpus)
    back = open_corpus(tmp_path / "tiffs")
    assert len(back) == n and set(back.sources) == set(corpus.sources)
    names = {p.stem: p for p in back.files}
    for i in (0, len(corpus) // 2, len(corpus) - 1):
        k = back.files.index(names[corpus.name_of(i)])
        assert np.array_equal(back[k], corpus[i])
    padded, sizes = back.get_padded([0, 1])
    assert padded.shape == (2, 224, 224)
    assert back.mean == pytest.approx(corpus.mean)


def test_cli_curate_manifest_and_tools(tmp_path, shared_data, capsys):
    from cemnet.cli import main

    manifest = tmp_path / "sources.yaml"
    manifest.write_text(
        "sources:\n"
        f"  - name: gala\n    path: {shared_data / 'gala_fibsem_crops/train-image.h5'}\n    key: stack\n"
        f"  - name: empanada\n    path: {shared_data / 'empanada_test_tiles/instance/dataset1/images/ins_seg.tiff'}\n"
    )
    out = tmp_path / "corpus"
    # The gala crop (50x100x200) is smaller than half a 224 patch in every plane: 64 px patches fit.
    assert main(["curate", "--manifest", str(manifest), "--out", str(out), "--no-progress", "--patch-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "gala" in printed and "TOTAL" in printed and "failed" not in printed
    assert main(["curate", "export-tiff", str(out), str(tmp_path / "t")]) == 0
    assert len(list((tmp_path / "t").glob("*.tiff"))) == len(Corpus(out))
    assert main(["curate", "report", str(out)]) == 0
    assert main(["curate", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    image = str(shared_data / "isbi2012" / "train" / "images" / "0.png")
    assert main(["curate", image, "--out", str(manifest), "--no-progress"]) == 2  # --out is a file
    assert capsys.readouterr().err.strip() == f"cemnet curate: {manifest}: exists and is not a folder; a corpus is a folder"


def test_curate_help_shows_every_option_with_its_default_and_a_line_of_help(capsys):
    from curation import cli

    texts = {}
    for argv, parser in [([], cli._build_parser()), *(([t], cli._tool_parser(t)) for t in cli.TOOLS)]:
        with pytest.raises(SystemExit) as done:
            cli.main([*argv, "--help"])
        assert done.value.code == 0
        text = texts[tuple(argv)] = " ".join(capsys.readouterr().out.split())  # unwrapped
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{argv}: {action.dest} has no help"
            shown = " ".join(parser._get_formatter()._expand_help(action).split())
            assert shown in text, shown
            if action.option_strings and not action.required:
                assert "(default" in shown, f"{argv}: {action.option_strings[0]} shows no default"
    assert all(f"{tool} {what}" in texts[()] for tool, what in cli.TOOLS.items())  # the tools, listed


def test_curate_options_are_the_settings_fields_and_build_the_same_settings():
    """`cemnet curate` offers one option per CurateSettings field, with the field's default."""
    from dataclasses import fields

    from curation import cli

    parser = cli._build_parser()
    dests = {action.dest: action for action in parser._actions}
    for f in fields(CurateSettings):
        assert dests[f.name].default == f.default and dests[f.name].help == f.metadata["help"]
    assert cli.settings_from_args(parser.parse_args(["x", "--out", "c"])) == CurateSettings()
    given = parser.parse_args(["x", "--out", "c", "--uint8", "percentile", "--percentiles", "1", "99",
                               "--patches-per-unit", "64", "--keep-all-pixels", "--dedup-scope", "global"])
    assert cli.settings_from_args(given) == CurateSettings(uint8_rule="percentile", percentiles=(1.0, 99.0),
                                                           patches_per_unit=64, keep_all_pixels=True,
                                                           dedup_scope="global")


def test_train_filter_from_user_labels_then_refilter(tmp_path, shared_data):
    """A lab labels some patches (CSV id -> informative), trains a filter, and re-filters its corpus."""
    from cemnet.cli import main

    label_volume = sorted((shared_data / "urocell_labels_only/mito").rglob("*.nii.gz"))[0]  # non-cellular masks
    out = tmp_path / "corpus"
    assert main(["curate", str(label_volume), str(shared_data / "isbi2012/train/images"), "--stack-folders",
                 "--slice-stride", "16", "--filter", "none", "--out", str(out), "--no-progress"]) == 0
    rows = _rows(out, "SELECT id, source FROM patches WHERE status='kept'")
    assert len({s for _, s in rows}) == 2  # the mask volume and the ISBI stack
    labels = tmp_path / "labels.csv"
    labels.write_text("patch_id,informative\n" + "".join(
        f"{pid},{'no' if src.startswith(label_volume.name.split('.')[0]) else 'yes'}\n" for pid, src in rows))
    flt = tmp_path / "filter.json"
    assert main(["curate", "train-filter", str(out), "--labels", str(labels), "--out", str(flt)]) == 0
    # Re-run on the same corpus with the trained filter: nothing is re-extracted, the masks are filtered.
    assert main(["curate", str(label_volume), str(shared_data / "isbi2012/train/images"), "--stack-folders",
                 "--slice-stride", "16", "--filter", f"logistic:{flt}", "--out", str(out), "--no-progress"]) == 0
    status = dict(_rows(out, "SELECT source, group_concat(DISTINCT status) FROM patches "
                    "WHERE group_id = id GROUP BY source"))
    mask_source = next(s for s in status if s.startswith(label_volume.name.split(".")[0]))
    assert status[mask_source] == "filtered"
    assert "kept" in status[next(s for s in status if s != mask_source)]
    bad = tmp_path / "bad.csv"
    bad.write_text("patch_id,informative\n999999,yes\n")
    assert main(["curate", "train-filter", str(out), "--labels", str(bad), "--out", str(flt)]) == 2


def test_lost_or_truncated_shard_is_redone(tmp_path, shared_data):
    """After a power loss a finished unit's shard may be gone or short: the next run redoes it."""
    spec = SourceSpec(path=str(shared_data / NEUROPROOF), name="np", stack=True)
    settings = CurateSettings(patches_per_unit=128, filter="none")
    out = curate([spec], tmp_path / "c", settings, workers=1, progress=False, report=False)
    before = Corpus(out, status=None)
    pixels = {i: np.array(before[i]) for i in np.flatnonzero(before.has_pixels)}  # a run may rewrite shards
    shards = sorted((out / "shards" / "np").glob("*.npy"))
    shards[0].unlink()
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    curate([spec], out, settings, workers=1, progress=False, report=False)
    after = Corpus(out, status=None)
    assert len(after) == len(before) == 750
    where = {(a, s, y, x): i for i, (a, s, y, x) in enumerate(zip(after.axes, after.slices, after.ys, after.xs))}
    assert after.has_pixels.sum() == before.has_pixels.sum() > 0  # the kept patches (exemplars-only storage)
    for i in np.flatnonzero(before.has_pixels):  # rows of redone units got new ids: match patches by provenance
        j = where[(before.axes[i], before.slices[i], before.ys[i], before.xs[i])]
        assert np.array_equal(after[j], pixels[i])


def test_a_shard_zeroed_in_the_middle_is_reported_by_verify_and_cut_again(tmp_path, shared_data, capsys):
    """Same size, same header, zeros in the middle: only the checksum can tell. `cemnet curate
    verify` names it; the next run drops it and cuts it again; the corpus then equals a clean one."""
    from curation.cli import main as curate_cli

    stack = str(shared_data / NEUROPROOF)
    args = [stack, "--stack-folders", "--voxel-size", "10", "10", "10", "--no-progress", "--workers", "1"]
    assert curate_cli([*args, "--out", str(tmp_path / "clean")]) == 0
    shutil.copytree(tmp_path / "clean", tmp_path / "c")
    shard = sorted((tmp_path / "c" / "shards").glob("*/xz-*.npy"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:  # zero 100 kB in the middle of the patch data
        fh.seek(size // 2)
        fh.write(bytes(100_000))
    assert shard.stat().st_size == size
    capsys.readouterr()
    assert curate_cli(["verify", str(tmp_path / "clean"), "--no-progress"]) == 0
    assert "intact" in capsys.readouterr().out
    assert curate_cli(["verify", str(tmp_path / "c"), "--no-progress"]) == 1
    table = capsys.readouterr().out
    rel = str(shard.relative_to(tmp_path / "c"))
    assert [line.split()[0] for line in table.splitlines()[1:-1]] == [rel] and "checksum mismatch" in table
    assert "1 of " in table.splitlines()[-1]

    assert curate_cli([*args, "--out", str(tmp_path / "c")]) == 0  # the resume verifies and cuts it again
    assert f"{shard}: checksum mismatch" in capsys.readouterr().err
    assert curate_cli(["verify", str(tmp_path / "c"), "--no-progress"]) == 0
    # A unit's shard file may be a rewritten version (<key>.vN.npy, exemplars-only storage): its
    # number counts the rewrites the unit went through, which a re-cut unit need not repeat.
    from curation.pixels import unit_shard

    query = "SELECT id, source, shard, offset, axis, slice, y, x, hash, group_id, status, reason FROM patches ORDER BY id"
    rows = {d: [(*r[:2], unit_shard(r[2])[0], *r[3:]) for r in _rows(tmp_path / d, query)] for d in ("c", "clean")}
    assert rows["c"] == rows["clean"]
    unit = unit_shard(rel)[0]
    stored = {d: _rows(tmp_path / d, "SELECT DISTINCT shard FROM patches WHERE shard = ? OR shard LIKE ?",
                       (unit, unit[: -len(".npy")] + ".v%")) for d in ("c", "clean")}
    assert len(stored["c"]) == len(stored["clean"]) == 1
    assert np.array_equal(np.load(tmp_path / "c" / stored["c"][0][0]), np.load(tmp_path / "clean" / stored["clean"][0][0]))


def test_columnar_index_cache_matches_sqlite_and_goes_stale(small_corpus, tmp_path):
    """Loaders open big corpora from index_cache.npz; it must equal the SQLite index, and be
    ignored as soon as the index changes."""
    from curation.corpus import INDEX_CACHE, _query_columns, index_columns

    assert (small_corpus / INDEX_CACHE).is_file()
    for status in (None, "kept", "duplicate"):
        cached, direct = index_columns(small_corpus, status), _query_columns(small_corpus, status)
        for c in direct:
            assert np.array_equal(cached[c].astype(direct[c].dtype), direct[c]), (status, c)
    copy = tmp_path / "c"
    shutil.copytree(small_corpus, copy)
    shutil.copy2(small_corpus / "index.sqlite", copy / "index.sqlite")  # keep mtime: cache valid
    with sqlite3.connect(copy / "index.sqlite") as db:
        db.execute("UPDATE patches SET status='filtered', reason='by hand' WHERE id=(SELECT MIN(id) FROM patches WHERE status='kept')")
    assert len(Corpus(copy)) == len(Corpus(small_corpus)) - 1  # stale cache ignored
