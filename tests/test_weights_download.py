"""Registry, verified/resumable downloads and publishing, against a local HTTP server."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import timm
import torch
import yaml
from test_weights_helpers import WeightsServer, cemnet_block, lightning_checkpoint, real_patch, weights_server  # noqa: F401

from cemnet.cli import main as cemnet_main
from cemnet.weights.download import ChecksumError, DownloadError, NotWeightsError, UnverifiedError, default_cache_dir, fetch, sha256_env_var
from cemnet.weights.export import export_encoder
from cemnet.weights.load import load_encoder
from cemnet.weights.registry import RegistryError, WeightsEntry, load_registry, write_entry

FAST = {"progress": False, "backoff": 0.0, "timeout": 5.0, "chunk_size": 16384}
FILE = "tiny.safetensors"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; the local server must be reached directly.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "CEMNET_REGISTRY", "CEMNET_CACHE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A real (small) encoder export: timm test_resnet pretrained-layout checkpoint -> safetensors."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=0).eval()
    folder = tmp_path_factory.mktemp("export")
    torch.save(lightning_checkpoint(model, cemnet_block("test_resnet")), folder / "last.ckpt")
    export_encoder(folder, folder / "encoder.safetensors")
    return folder / "encoder.safetensors", model


@pytest.fixture
def data(export: tuple[Path, torch.nn.Module]) -> bytes:
    return export[0].read_bytes()


def _entry(server: WeightsServer, data: bytes, *, verified: bool = True) -> WeightsEntry:
    server.files[FILE] = data
    sha = hashlib.sha256(data).hexdigest() if verified else None
    return WeightsEntry(name="tiny", url=server.url(FILE), sha256=sha, arch="test_resnet", in_chans=1)


def _free_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{FILE}"  # nothing listens there any more


def test_download_verifies_caches_and_works_offline(
    weights_server: WeightsServer, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = _entry(weights_server, data)
    path = fetch(entry, cache_dir=tmp_path, **{**FAST, "progress": True})
    assert path == tmp_path / FILE and path.read_bytes() == data
    bar = capsys.readouterr().err  # tqdm progress bar
    assert "tiny.safetensors" in bar and "100%" in bar
    assert len(weights_server.log) == 1
    assert fetch(entry, cache_dir=tmp_path, **FAST) == path
    assert len(weights_server.log) == 1  # cache hit: no request
    offline = WeightsEntry(name="tiny", url=_free_port_url(), sha256=entry.sha256)
    assert fetch(offline, cache_dir=tmp_path, **FAST) == path


@pytest.mark.parametrize("range_support", [True, False])
def test_truncated_transfer_is_resumed_or_restarted(weights_server: WeightsServer, data: bytes, tmp_path: Path, range_support: bool) -> None:
    entry = _entry(weights_server, data)
    weights_server.faults = ["truncate"]
    weights_server.range_support = range_support
    path = fetch(entry, cache_dir=tmp_path, **FAST)
    assert path.read_bytes() == data
    (first, no_range, s1), (_, resumed_at, s2) = weights_server.log
    assert no_range is None and s1 == 200
    assert resumed_at == f"bytes={len(data) // 2}-"
    assert s2 == (206 if range_support else 200)  # a server that ignores Range: start over
    assert not (tmp_path / (FILE + ".part")).exists()


def test_partial_from_an_earlier_run_is_resumed(weights_server: WeightsServer, data: bytes, tmp_path: Path) -> None:
    entry = _entry(weights_server, data)
    (tmp_path / (FILE + ".part")).write_bytes(data[:5000])
    assert fetch(entry, cache_dir=tmp_path, **FAST).read_bytes() == data
    assert [(r, s) for _, r, s in weights_server.log] == [("bytes=5000-", 206)]


def test_stale_partial_is_discarded_and_restarted(weights_server: WeightsServer, data: bytes, tmp_path: Path) -> None:
    entry = _entry(weights_server, data)
    (tmp_path / (FILE + ".part")).write_bytes(b"\0" * 5000)  # bytes of some other file
    assert fetch(entry, cache_dir=tmp_path, **FAST).read_bytes() == data
    assert [r for _, r, _ in weights_server.log] == ["bytes=5000-", None]


def test_wrong_checksum_never_lands_in_cache(weights_server: WeightsServer, data: bytes, tmp_path: Path) -> None:
    entry = _entry(weights_server, data)
    weights_server.corrupt = True
    with pytest.raises(ChecksumError, match=rf"{entry.url}.*sha256 mismatch"):
        fetch(entry, cache_dir=tmp_path, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_http_500_retries_are_bounded(weights_server: WeightsServer, data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _entry(weights_server, data)
    weights_server.faults = ["500"] * 10
    delays: list[float] = []
    monkeypatch.setattr("cemnet.weights.download.time.sleep", delays.append)
    with pytest.raises(DownloadError, match=rf"{entry.url} failed after 3 attempts: HTTP 500"):
        fetch(entry, cache_dir=tmp_path, **{**FAST, "retries": 2, "backoff": 0.5})
    assert len(weights_server.log) == 3 and not (tmp_path / FILE).exists()
    assert delays == [0.5, 1.0]  # exponential backoff between attempts, none after the last
    weights_server.faults = ["500", "500"]
    assert fetch(entry, cache_dir=tmp_path, **{**FAST, "retries": 3}).read_bytes() == data


def test_404_fails_fast(weights_server: WeightsServer, data: bytes, tmp_path: Path) -> None:
    entry = WeightsEntry(name="tiny", url=weights_server.url("missing.safetensors"), sha256="0" * 64)
    with pytest.raises(DownloadError, match=r"missing.safetensors failed: HTTP 404"):
        fetch(entry, cache_dir=tmp_path, **FAST)
    assert len(weights_server.log) == 1


def test_connection_refused_names_the_url(tmp_path: Path) -> None:
    entry = WeightsEntry(name="tiny", url=_free_port_url(), sha256="0" * 64)
    with pytest.raises(DownloadError, match=rf"{entry.url} failed after 2 attempts"):
        fetch(entry, cache_dir=tmp_path, **{**FAST, "retries": 1})


def test_unverified_entries_need_trust_or_a_pin(
    weights_server: WeightsServer, data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = _entry(weights_server, data, verified=False)
    with pytest.raises(UnverifiedError, match="--trust-unverified"):
        fetch(entry, cache_dir=tmp_path, **FAST)
    assert weights_server.log == []  # refused before touching the network

    digest = hashlib.sha256(data).hexdigest()
    path = fetch(entry, cache_dir=tmp_path, trust_unverified=True, **FAST)
    assert digest in capsys.readouterr().err
    assert (tmp_path / (FILE + ".sha256")).read_text().split()[0] == digest
    # later uses verify against the recorded hash, offline
    assert fetch(entry, cache_dir=tmp_path, **FAST) == path and len(weights_server.log) == 1
    path.write_bytes(data[:-1] + b"x")  # bit rot: re-downloaded, verified against the record
    assert fetch(entry, cache_dir=tmp_path, **FAST).read_bytes() == data

    # a user pin (env var) overrides: a wrong pin means the file is refused, not cached
    monkeypatch.setenv(sha256_env_var("tiny"), "f" * 64)
    with pytest.raises(ChecksumError):
        fetch(entry, cache_dir=tmp_path / "other", **FAST)
    assert not (tmp_path / "other" / FILE).exists()
    assert fetch(entry, cache_dir=tmp_path / "other", sha256=digest, **FAST).read_bytes() == data


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints" / "cemnet"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints" / "cemnet"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert default_cache_dir() == Path(torch.hub.get_dir()) / "checkpoints" / "cemnet"  # torch hub's own rule
    monkeypatch.setenv("CEMNET_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_builtin_registry_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = load_registry()
    cem500k, swav = entries["cem500k_mocov2_resnet50"], entries["cem15m_swav_resnet50"]
    assert cem500k.url == "https://zenodo.org/record/6453140/files/cem500k_mocov2_resnet50_200ep.pth.tar"
    assert swav.url.startswith("https://zenodo.org/record/6453160/files/")
    assert cem500k.sha256 is None and swav.sha256 is None  # not invented: unknown until verified
    assert cem500k.license == "CC-BY-4.0" and "e65894" in cem500k.citation and "Cell Systems" in swav.citation
    assert cem500k.arch == swav.arch == "resnet50"

    assert cemnet_main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "cem500k_mocov2_resnet50" in out and "unverified" in out
    assert cemnet_main(["weights", "info", "cem500k_mocov2_resnet50", "--cache-dir", str(tmp_path)]) == 0
    assert "cached: no" in capsys.readouterr().out
    # no hash, no trust: refused without any network access
    assert cemnet_main(["weights", "download", "cem500k_mocov2_resnet50", "--cache-dir", str(tmp_path)]) == 1
    assert "--trust-unverified" in capsys.readouterr().err
    assert cemnet_main(["weights", "info", "nope"]) == 1


def test_user_registries_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    user = tmp_path / "user.yaml"
    user.write_text(
        yaml.safe_dump(
            {"version": 1, "weights": {
                "cem500k_mocov2_resnet50": {"url": "https://example.org/mirror/cem500k.pth.tar", "sha256": "a" * 64, "arch": "resnet50"},
                "lab_mgmr": {"url": "https://example.org/lab_mgmr-0123abcd.safetensors", "arch": "resnet18", "in_chans": 1},
            }}
        )
    )
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"weights": {"lab_moco": {"url": "https://example.org/moco.safetensors"}}}))
    merged = load_registry([user])
    assert merged["cem500k_mocov2_resnet50"].sha256 == "a" * 64  # user file overrides the built-in
    assert merged["lab_mgmr"].file_name == "lab_mgmr-0123abcd.safetensors"
    assert "cem15m_swav_resnet50" in merged
    monkeypatch.setenv("CEMNET_REGISTRY", str(other))
    assert cemnet_main(["weights", "list", "--registry", str(user)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("lab_mgmr", "lab_moco", "cem15m_swav_resnet50"))

    bad = tmp_path / "bad.yaml"
    bad.write_text("weights:\n  x:\n    url: https://example.org/x.pt\n    sha: 123\n")
    with pytest.raises(RegistryError, match="unknown fields"):
        load_registry([bad])
    with pytest.raises(RegistryError, match="64 hex"):
        write_entry(tmp_path / "r.yaml", WeightsEntry(name="x", url="https://example.org/x.pt", sha256="123"))


def test_publish_serve_download_load_round_trip(
    weights_server: WeightsServer, export: tuple[Path, torch.nn.Module], tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, model = export
    registry, published_dir, cache = tmp_path / "my_registry.yaml", tmp_path / "published", tmp_path / "cache"
    write_entry(registry, WeightsEntry(name="keep_me", url="https://example.org/k.safetensors"))
    argv = ["weights", "publish", str(path), "--name", "tiny-enc", "--url-base", weights_server.url(""), "--registry", str(registry),
            "--out-dir", str(published_dir), "--license", "CC-BY-4.0", "--citation", "cemnet test export"]
    assert cemnet_main(argv) == 0
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    published = published_dir / f"tiny-enc-{digest[:8]}.safetensors"
    assert published.read_bytes() == path.read_bytes() and path.exists()  # copied, not moved

    record = yaml.safe_load(registry.read_text())["weights"]
    assert set(record) == {"keep_me", "tiny-enc"}
    entry = record["tiny-enc"]
    assert entry["url"] == weights_server.url(published.name) and entry["file_name"] == published.name
    assert entry["sha256"] == digest and entry["arch"] == "test_resnet" and entry["in_chans"] == 1
    assert entry["mean"] == [0.5] and entry["std"] == [0.25] and entry["license"] == "CC-BY-4.0"

    weights_server.files[published.name] = published.read_bytes()
    assert cemnet_main(["weights", "download", "tiny-enc", "--registry", str(registry), "--cache-dir", str(cache), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(published.name)
    loaded = load_encoder("tiny-enc", registry=registry, cache_dir=cache).eval()
    assert len(weights_server.log) == 1  # load_encoder used the verified cache
    assert loaded.cemnet_meta.license == "CC-BY-4.0"
    x = real_patch(shared_data)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_an_error_page_served_with_200_is_never_cached_or_pinned(
    weights_server: WeightsServer, data: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = b"<!DOCTYPE html>\n<html><head><title>Rate limit</title></head><body>Try again later</body></html>\n"
    entry = _entry(weights_server, page, verified=False)
    with pytest.raises(NotWeightsError, match=r"HTML.*nothing was cached"):
        fetch(entry, cache_dir=tmp_path, trust_unverified=True, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file, no .part, no recorded sha256
    # the CLI says it in one line, exit 1
    argv = ["weights", "download", "tiny", "--cache-dir", str(tmp_path), "--trust-unverified"]
    registry = tmp_path.parent / "reg.yaml"
    write_entry(registry, entry)
    assert cemnet_main([*argv, "--registry", str(registry)]) == 1
    err = capsys.readouterr().err
    assert "HTML" in err and "Traceback" not in err
    # a page cached and pinned by an older cemnet is discarded, and the real file fetched
    (tmp_path / FILE).write_bytes(page)
    (tmp_path / (FILE + ".sha256")).write_text(f"{hashlib.sha256(page).hexdigest()}  {FILE}\n")
    weights_server.files[FILE] = data
    assert fetch(entry, cache_dir=tmp_path, trust_unverified=True, **FAST).read_bytes() == data
    assert (tmp_path / (FILE + ".sha256")).read_text().split()[0] == hashlib.sha256(data).hexdigest()
