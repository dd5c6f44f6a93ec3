"""``cemnet weights publish``: name an export by its hash and register it.

The published file is ``NAME-<first 8 hex of sha256>.safetensors`` (the torch hub / timm
convention: the name changes whenever the bytes do, so caches never serve stale weights) and its
registry entry records the full sha256, the architecture and the normalisation from the file's
own metadata.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cemnet.weights.checkpoint_io import give_usual_permissions
from cemnet.weights.convert import read_safetensors
from cemnet.weights.download import sha256_file
from cemnet.weights.registry import WeightsEntry, write_entry


def publish(
    export: str | Path,
    name: str,
    url_base: str,
    *,
    registry: str | Path | None = None,
    out_dir: str | Path | None = None,
    license: str | None = None,  # noqa: A002 - the registry field is called license
    citation: str | None = None,
    description: str | None = None,
    move: bool = False,
) -> tuple[WeightsEntry, Path]:
    """Copy (or ``move``) a ``cemnet export`` file to its hashed name and describe it.

    Returns the registry entry and the published file (in ``out_dir``, default: next to the
    export). With ``registry`` the entry is added to (or replaces its namesake in) that file.
    The file is checked first: it must be a cemnet export whose tensors fit its architecture.
    """
    export = Path(export)
    weights = read_safetensors(export)
    if weights.source_format != "cemnet-safetensors":
        raise ValueError(f"{export} has no cemnet metadata; create it with 'cemnet export' first")
    meta = weights.meta
    digest = sha256_file(export)
    file_name = f"{name}-{digest[:8]}.safetensors"
    entry = WeightsEntry(
        name=name,
        url=f"{url_base.rstrip('/')}/{file_name}",
        file_name=file_name,
        sha256=digest,
        arch=meta.arch,
        in_chans=meta.in_chans,
        mean=meta.mean,
        std=meta.std,
        method=meta.method,
        license=license or meta.license,
        citation=citation or meta.citation,
        description=description,
    )
    target = Path(out_dir or export.parent) / file_name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != export.resolve():
        if move:
            shutil.move(str(export), target)
        else:
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(export, tmp)
            os.replace(tmp, target)
        give_usual_permissions(target)  # an export written before this fix may be 0600
    if registry is not None:
        write_entry(registry, entry)
    return entry, target
