"""Every corpus kind is a ``PatchCorpus`` (curation.corpus), checked on real data: a curated corpus
(the session's ``small_corpus``), the CEM500K example patches (a TIFF folder) and an in-memory
``ArrayCorpus`` tiled from ISBI 2012 slices; ``load_corpus`` refuses anything less, by name."""

from __future__ import annotations

import numpy as np
import pytest

from cemnet.data.datamodule import ArrayCorpus, load_corpus
from curation.corpus import Corpus, PatchCorpus, TiffFolderCorpus, missing_corpus_members


def _check_patch_corpus(corpus: PatchCorpus) -> None:
    assert isinstance(corpus, PatchCorpus) and not missing_corpus_members(corpus)
    n, p = len(corpus), corpus.patch_size
    assert n > 0 and p > 0 and 0 < corpus.mean < 1 and 0 < corpus.std < 1
    assert len(corpus.source_index) == n
    assert 0 <= int(np.min(corpus.source_index)) and int(np.max(corpus.source_index)) < len(corpus.sources)
    assert isinstance(corpus.fingerprint, str) and corpus.fingerprint
    assert isinstance(corpus.source_specs(), dict)
    picks = [0, n // 2, n - 1]
    padded, sizes = corpus.get_padded(picks)
    assert padded.dtype == np.uint8 and padded.shape == (3, p, p) and np.asarray(sizes).shape == (3, 2)
    for j, i in enumerate(picks):
        patch = corpus[i]
        h, w = (int(v) for v in sizes[j])
        assert patch.dtype == np.uint8 and patch.ndim == 2
        # the padded patch is the patch at its true size (cropped to P), zeros beyond
        assert np.array_equal(padded[j, :h, :w], patch[:p, :p]) and not padded[j, h:, :].any()
    assert padded.std() > 0  # real EM, not blank


def test_curated_corpus_is_a_patch_corpus(small_corpus):
    corpus = load_corpus(small_corpus)
    assert type(corpus) is Corpus
    _check_patch_corpus(corpus)
    assert corpus.source_specs()  # a curated corpus can reopen its volumes


def test_tiff_folder_is_a_patch_corpus(shared_data):
    corpus = load_corpus(shared_data / "cem500k_example_patches" / "occlusion")
    assert type(corpus) is TiffFolderCorpus
    _check_patch_corpus(corpus)


def test_array_corpus_is_a_patch_corpus(shared_data):
    files = sorted((shared_data / "isbi2012/train/images").glob("*.png"))[:2]
    corpus = ArrayCorpus.from_images(files, 200)
    assert load_corpus(corpus) is corpus
    _check_patch_corpus(corpus)


def test_load_corpus_names_what_an_object_lacks(shared_data):
    class NoPadding:  # an object with everything but get_padded and source_specs
        def __init__(self, inner: PatchCorpus) -> None:
            self.patch_size, self.mean, self.std = inner.patch_size, inner.mean, inner.std
            self.sources, self.source_index, self.fingerprint = inner.sources, inner.source_index, "x"
            self._inner = inner

        def __len__(self) -> int:
            return len(self._inner)

        def __getitem__(self, i: int) -> np.ndarray:
            return self._inner[i]

    partial = NoPadding(TiffFolderCorpus(shared_data / "cem500k_example_patches" / "occlusion"))
    assert not isinstance(partial, PatchCorpus)
    with pytest.raises(TypeError, match=r"NoPadding is not a PatchCorpus: it lacks 'get_padded', 'source_specs'"):
        load_corpus(partial)
