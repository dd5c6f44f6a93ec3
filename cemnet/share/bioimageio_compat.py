"""Compatibility of bioimageio.spec 0.5.12 with pydantic >= 2.12 (the versions in this venv).

Two wrap serializers of bioimageio.spec (file entries, ``io_packaging.package_file_descr_serializer``,
and the weights, ``model.v0_4.package_weights``) call ``handler(value, info)``; newer pydantic-core
reads that second argument as an ``index_key`` and raises ``TypeError`` ("'index_key' is expected
to be an integer or a string"), so EVERY model description fails validation, whatever it says.
:func:`patch` swaps the bodies of those two functions for the same code calling ``handler(value)``
(pydantic's documented call); validation itself is untouched. It does nothing where the
installed bioimageio.spec does not have the bug.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["patch"]

# The bodies below run with bioimageio's module globals (only __code__ is swapped), so the names
# they use (_package, packaging_context_var, Node) are bioimageio's own.


def _file_descr_serializer(value: Any, handler: Any, info: Any) -> Any:
    ret = handler(value)
    ret["source"] = _package(value.source, info, sha256=value.sha256)  # noqa: F821
    return ret


def _package_weights(value: Any, handler: Any, info: Any) -> Any:
    ctxt = packaging_context_var.get()  # noqa: F821
    if ctxt is not None and ctxt.weights_priority_order is not None:
        for wf in ctxt.weights_priority_order:
            w = getattr(value, wf, None)
            if w is not None:
                break
        else:
            raise ValueError(
                "None of the weight formats in `weights_priority_order`"
                + f" ({ctxt.weights_priority_order}) is present in the given model."
            )
        new_w = w.model_construct(**{k: v for k, v in w if k != "parent"})
        value = value.model_construct(None, **{wf: new_w})
    return handler(value)


def _buggy(fn: Any) -> bool:
    source = inspect.getsource(fn).replace(" ", "").replace("\n", "")
    return "handler(value,info," in source or "handler(value,info)" in source


def patch() -> None:
    """Make bioimageio.spec's wrap serializers work with the installed pydantic (idempotent)."""
    from bioimageio.spec._internal import io_packaging
    from bioimageio.spec.model import v0_4

    for fn, fixed in ((io_packaging.package_file_descr_serializer, _file_descr_serializer),
                      (v0_4.package_weights, _package_weights)):
        if fn.__code__ is not fixed.__code__ and _buggy(fn):
            fn.__code__ = fixed.__code__
