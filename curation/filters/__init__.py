"""Patch-quality filters: remove uninformative patches from the curated corpus.

CEM500K (Conrad & Narayan, eLife 2021) removed patches that were >= 80 % uniform (empty resin,
padding, saturated areas), low-contrast, artefacts or non-cellular content. This package offers
three interchangeable filters that all follow :class:`PatchFilter`, a module each:

* :class:`StatsFilter` (default): thresholds on cheap image statistics, chosen on real EM data
  (``perf/filter_thresholds.py``, figures in ``docs/filters.md``).
* :class:`LogisticFilter`: logistic regression on :func:`patch_features`, trained from the user's
  own labels with :func:`train_logistic_filter` (labels read by :func:`read_label_csv`).
* :class:`Cem500kClassifierFilter`: the published CEM500K ResNet34 patch-quality classifier.

Input convention (shared by every filter): ``patches`` is a uint8 array (N, P, P); a truncated
edge patch is stored zero-padded, its true content being ``patches[i, :h, :w]`` with
``(h, w) = sizes[i]``. Only the true region is ever looked at: padding is not content.

Modules: ``base`` (FilterResult, PatchFilter, the batch convention), ``features``
(:func:`patch_features`), ``stats``, ``logistic``, ``training`` (fitting a logistic filter,
label CSVs), ``cem500k``, ``build`` (:func:`build_filter` from a command-line spec).
"""

from curation.filters.base import MISSING_CHUNKS_REASON, FilterResult, PatchFilter
from curation.filters.build import build_filter
from curation.filters.cem500k import Cem500kClassifierFilter, cem500k_preprocess
from curation.filters.features import FEATURE_NAMES, patch_features
from curation.filters.logistic import LogisticFilter
from curation.filters.stats import StatsFilter
from curation.filters.training import read_label_csv, train_logistic_filter

__all__ = [
    "FEATURE_NAMES",
    "MISSING_CHUNKS_REASON",
    "Cem500kClassifierFilter",
    "FilterResult",
    "LogisticFilter",
    "PatchFilter",
    "StatsFilter",
    "build_filter",
    "cem500k_preprocess",
    "patch_features",
    "read_label_csv",
    "train_logistic_filter",
]
