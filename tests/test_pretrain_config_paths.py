"""Relative input paths of pretrain configs resolve like the shell shows them, symlinks or not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from cemnet.methods.config_paths import ConfigPathError, resolve_input_paths

REPO = Path(__file__).resolve().parents[1]


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "experiments" / name).read_text())


def test_checkout_reached_through_a_symlink_still_finds_the_shared_folder_next_to_it(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # logical/checkout -> physical/checkout (a symlink), logical/shared -> the real shared folder;
    # the OS resolves ".." physically (physical/ has no shared/), the shell logically
    (tmp_path / "physical" / "checkout").mkdir(parents=True)
    (tmp_path / "logical").mkdir()
    (tmp_path / "logical" / "checkout").symlink_to(tmp_path / "physical" / "checkout")
    (tmp_path / "logical" / "shared").symlink_to(shared_data.parent, target_is_directory=True)
    checkout = tmp_path / "logical" / "checkout"
    monkeypatch.chdir(checkout)
    monkeypatch.setenv("PWD", str(checkout))
    assert not Path("../shared").exists()  # what open() sees
    for name in ("tiny_mgmr_2d_cpu.yaml", "tiny_mgmr_3d_cpu.yaml"):
        cfg = _config(name)
        resolve_input_paths(cfg)
        args = cfg["data"]["init_args"]
        paths = [args["corpus"]] if args.get("corpus") else [v["path"] for v in args["volumes"].values()]
        for path in paths:
            assert path.startswith(str(tmp_path / "logical" / "shared")) and os.path.exists(path), path


def test_a_missing_input_names_its_config_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    cfg = _config("tiny_mgmr_3d_cpu.yaml")
    with pytest.raises(ConfigPathError, match=r"data\.init_args\.volumes\.neuroproof\.path: \.\./shared/data/.* does not exist"):
        resolve_input_paths(cfg)


def test_cli_reports_the_key_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cemnet.methods.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["--config", str(REPO / "experiments/tiny_mocov2_cpu.yaml"), "--run_dir", str(tmp_path / "run"),
               "--data.init_args.corpus", "no_such_corpus"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"data.init_args.corpus: no_such_corpus does not exist (relative paths are taken from the directory you run in: {tmp_path})" in err


def test_wheel_ships_the_configs_and_they_are_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import subprocess
    import sys
    import warnings
    import zipfile

    from cemnet.methods import config_paths
    from cemnet.methods.cli import main

    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "project.license` as a TOML table is deprecated" not in result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("cemnet-*.whl")
    prefix = tmp_path / "prefix"
    with zipfile.ZipFile(wheel) as z:
        shipped = [n for n in z.namelist() if "/data/share/cemnet/experiments/" in n]
        for name in shipped:  # what pip puts under PREFIX
            target = prefix / name.split("/data/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
    assert {Path(n).name for n in shipped} == {p.name for p in (REPO / "experiments").glob("*.yaml")}
    # an installed package, no checkout: found by name under sys.prefix
    monkeypatch.setattr(config_paths, "CHECKOUT_EXPERIMENTS", tmp_path / "no_checkout")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert config_paths.find_config("tiny_mocov2_cpu") == prefix / "share/cemnet/experiments/tiny_mocov2_cpu.yaml"
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(), pytest.raises(SystemExit):
        main(["--config", "tiny_mocov2_cpu", "--print_config"])
    assert "class_path: cemnet.methods.mocov2.MoCoV2" in capsys.readouterr().out
