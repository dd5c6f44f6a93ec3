"""`cemnet benchmark download` against a real HTTP server on 127.0.0.1 serving archives in each
publisher's layout, built from the shared data: a GitHub commit zip (CDeep3M), a GitHub tarball
(gala, tar.gz), the zhixuhao/unet zip of ISBI 2012 (renamed folders) and plain files. Covered:
mirror registry, lock file, verification, resume after a truncated transfer, a wrong archive, a
traversal entry, a registry checksum."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cemnet.benchmarks.download import LOCK_NAME
from cemnet.benchmarks.registry import get_benchmark
from cemnet.cli import main
from helpers import FileServer, serving


@pytest.fixture()
def server() -> Iterator[FileServer]:
    with serving(FileServer()) as s:
        yield s


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _cdeep3m_github_zip(shared_data: Path, commit: str) -> bytes:
    """CDeep3M's GitHub commit archive layout (a subset of the real slices: 3 training, 2 validation)."""
    src = shared_data / "cdeep3m_mito_sbem"
    entries = {f"cdeep3m-{commit}/README.md": b"CDeep3M\n"}
    for part, n in (("training", 3), ("validation", 2)):
        for kind in ("images", "labels"):
            for f in sorted((src / part / kind).glob("*.png"))[:n]:
                entries[f"cdeep3m-{commit}/mito_testsample/{part}/{kind}/{f.name}"] = f.read_bytes()
    return _zip(entries)


def _registry(tmp_path: Path, name: str, download: list[dict]) -> Path:
    path = tmp_path / "mirror.yaml"
    path.write_text(yaml.safe_dump({name: {"download": download}}), encoding="utf-8")
    return path


def _download(name: str, data_dir: Path, registry: Path) -> int:
    return main(["benchmark", "download", name, "--data-dir", str(data_dir), "--registry", str(registry), "-q"])


def test_github_zip_via_mirror_lock_and_verify(server, shared_data: Path, tmp_path: Path, capsys) -> None:
    commit = get_benchmark("cdeep3m_mito").download[0]["member"].split("/")[0].removeprefix("cdeep3m-")
    archive = _cdeep3m_github_zip(shared_data, commit)
    server.files[f"cdeep3m/{commit}.zip"] = archive
    member = get_benchmark("cdeep3m_mito").download[0]["member"]
    reg = _registry(tmp_path, "cdeep3m_mito", [{"url": server.url(f"cdeep3m/{commit}.zip"), "member": member}])
    data = tmp_path / "data"

    assert _download("cdeep3m_mito", data, reg) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256(archive).hexdigest()
    assert f"sha256 {sha}" in out and "layout OK" in out and "3 train / 2 test" in out
    lock = json.loads((data / LOCK_NAME).read_text(encoding="utf-8"))
    assert lock["files"][f"{commit}.zip"]["size"] == len(archive) and lock["files"][f"{commit}.zip"]["sha256"] == sha
    assert (data / "training" / "images").is_dir() and not (data / "README.md").exists()  # member only

    n = len(server.log)
    assert _download("cdeep3m_mito", data, reg) == 0  # verified against the lock, nothing fetched
    assert len(server.log) == n

    kept = data / ".downloads" / f"{commit}.zip"
    kept.write_bytes(kept.read_bytes() + b"x")  # a corrupted copy
    assert _download("cdeep3m_mito", data, reg) == 1
    err = capsys.readouterr().err
    assert "differs from the first download" in err and str(kept) in err and "Traceback" not in err


def test_truncated_download_resumes_with_range(server, shared_data: Path, tmp_path: Path, capsys) -> None:
    commit = "0" * 40
    archive = _cdeep3m_github_zip(shared_data, commit)
    server.files["a.zip"] = archive
    server.faults = ["truncate"]  # the first request gets half the body
    reg = _registry(tmp_path, "cdeep3m_mito", [{"url": server.url("a.zip"), "member": f"cdeep3m-{commit}/mito_testsample"}])
    data = tmp_path / "data"

    assert _download("cdeep3m_mito", data, reg) == 1
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and "Traceback" not in err
    part = data / ".downloads" / "a.zip.part"
    kept = part.stat().st_size
    assert 0 < kept <= len(archive) // 2 and not (data / LOCK_NAME).exists()

    assert _download("cdeep3m_mito", data, reg) == 0
    assert server.log[-1] == ("/a.zip", f"bytes={kept}-", 206)  # resumed, not restarted
    lock = json.loads((data / LOCK_NAME).read_text(encoding="utf-8"))
    assert lock["files"]["a.zip"]["sha256"] == hashlib.sha256(archive).hexdigest() and not part.exists()


def test_wrong_archive_and_wrong_layout_are_reported(server, shared_data: Path, tmp_path: Path, capsys) -> None:
    server.files["page.zip"] = b"<html>Moved to a new site</html>"
    reg = _registry(tmp_path, "cdeep3m_mito", [{"url": server.url("page.zip")}])
    assert _download("cdeep3m_mito", tmp_path / "d1", reg) == 1
    assert "not a zip archive" in capsys.readouterr().err

    # a real archive, but of another benchmark: the loader's layout check names what is missing
    gala = shared_data / "gala_fibsem_crops"
    server.files["other.zip"] = _zip({f"x/{f.name}": f.read_bytes() for f in sorted(gala.glob("*-image.h5"))})
    reg = _registry(tmp_path, "cdeep3m_mito", [{"url": server.url("other.zip"), "member": "x"}])
    assert _download("cdeep3m_mito", tmp_path / "d2", reg) == 1
    err = capsys.readouterr().err
    assert "layout check failed for cdeep3m_mito" in err and "training" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_path_traversal_is_refused_before_writing(server, tmp_path: Path, kind: str, capsys) -> None:
    entries = {"ok/train/a.txt": b"fine", "ok/../../evil.txt": b"owned"}
    if kind == "zip":
        body = _zip(entries)
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        body = buf.getvalue()
    server.files[f"evil.{kind}"] = body
    reg = _registry(tmp_path, "gala", [{"url": server.url(f"evil.{kind}")}])
    data = tmp_path / "deep" / "data"
    assert _download("gala", data, reg) == 1
    err = capsys.readouterr().err
    assert "points outside the target folder" in err and "evil.txt" in err
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (data / "ok").exists()


def test_github_tarball_and_registry_checksum(server, shared_data: Path, tmp_path: Path, capsys) -> None:
    entry = get_benchmark("gala").download[0]
    member = entry["member"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted((shared_data / "gala_fibsem_crops").glob("*.h5")):
            if "-image" in f.name or "-gt" in f.name:
                tf.add(f, arcname=f"{member}/{f.name}")
    body = buf.getvalue()
    server.files["gala.tar.gz"] = body
    bad = _registry(tmp_path, "gala", [{"url": server.url("gala.tar.gz"), "member": member, "sha256": "0" * 64}])
    assert _download("gala", tmp_path / "bad", bad) == 1
    assert "hash" in capsys.readouterr().err.lower()

    good = _registry(tmp_path, "gala", [{"url": server.url("gala.tar.gz"), "member": member,
                                         "sha256": hashlib.sha256(body).hexdigest()}])
    assert _download("gala", tmp_path / "good", good) == 0
    assert "instance3d" in capsys.readouterr().out


def test_isbi_publisher_layout_is_renamed_for_the_loader(server, shared_data: Path, tmp_path: Path, capsys) -> None:
    entry = get_benchmark("isbi2012").download[0]
    src = shared_data / "isbi2012"
    files = {}
    for i in range(3):  # zhixuhao/unet's layout: train/image, train/label, test/<i>.png
        files[f"{entry['member']}/train/image/{i}.png"] = (src / "train" / "images" / f"{i}.png").read_bytes()
        files[f"{entry['member']}/train/label/{i}.png"] = (src / "train" / "labels" / f"{i}.png").read_bytes()
        files[f"{entry['member']}/test/{i}.png"] = (src / "test" / "images" / f"{i}.png").read_bytes()
    server.files["unet.zip"] = _zip(files)
    reg = _registry(tmp_path, "isbi2012", [{**entry, "url": server.url("unet.zip")}])
    data = tmp_path / "isbi"
    assert _download("isbi2012", data, reg) == 0
    assert sorted(p.name for p in (data / "train" / "images").iterdir()) == ["0.png", "1.png", "2.png"]
    assert (data / "test" / "images" / "2.png").is_file()


def test_benchmark_without_download_list_is_one_message(tmp_path: Path, capsys) -> None:
    assert main(["benchmark", "download", "guay", "--data-dir", str(tmp_path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "no downloadable files" in err and "leapmanlab" in err
    assert main(["benchmark", "download", "nope", "--data-dir", str(tmp_path), "-q"]) == 2
