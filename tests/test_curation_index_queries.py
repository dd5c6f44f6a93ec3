"""The corpus index's named queries (curation.corpus.IndexQueries) on a real curated corpus: the
read-only handle answers while a writer holds the corpus, and agrees with the writer and with the
patch table that ``Corpus`` reads."""

from __future__ import annotations

import shutil

import numpy as np

from curation.corpus import Corpus, CorpusIndex, ReadOnlyIndex


def test_read_only_index_answers_beside_the_writer_and_agrees_with_it(small_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(small_corpus, root)  # the writer touches the index: leave the shared one alone
    everything = Corpus(root, status=None)
    writer = CorpusIndex(root)  # holds the corpus's write lock
    try:
        with ReadOnlyIndex(root) as reader:
            counts = reader.status_counts()
            assert counts == writer.status_counts()
            assert sum(counts.values()) == len(everything)
            assert set(reader.sources_by_name()) == set(everything.sources)
            assert reader.uint8_rules().keys() == {s["name"] for s in writer.sources() if s["uint8_rule"]}
            assert reader.cut_source_paths() == {s["path"] for s in writer.sources()}  # all were cut
            # shard bookkeeping: every unit that stored pixels names the file its rows point at
            stored = {shard for name in everything.sources for shard, n in reader.stored_rows_per_unit(name).values() if n}
            assert stored and stored <= reader.shards_in_use()
            kept_ids = everything.ids[everything.has_pixels]
            per_source = [len(reader.exemplar_patches(name, ["id", "axis"])["id"]) for name in everything.sources]
            assert min(per_source) > 0 and sum(per_source) == reader.exemplar_count() == writer.exemplar_count()
            dup = reader.showable_patches("duplicate")
            assert len(dup["id"]) and (dup["reason"] != "").all()
            group, size = reader.largest_groups(1)[0]
            members = reader.showable_group_members(group, size)
            assert members[0] == group  # the exemplar first
            rows = reader.patches_for_recut(("id", "status"), "kept")
            assert np.array_equal(np.sort([r[0] for r in rows]), np.sort(kept_ids))
    finally:
        writer.close()
