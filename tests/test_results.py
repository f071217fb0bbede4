"""Where a run's results go: never the directory a background SuperLink happened to start in."""

from __future__ import annotations

from pathlib import Path

from fedpipe_core.results import output_root


def test_the_default_output_dir_is_the_users_data_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPIPE_OUTPUT_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    assert output_root("") == tmp_path / "data" / "fedpipe" / "runs"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert output_root("  ") == tmp_path / "home" / ".local" / "share" / "fedpipe" / "runs"
    monkeypatch.setenv("FEDPIPE_OUTPUT_DIR", str(tmp_path / "chosen"))
    assert output_root("") == tmp_path / "chosen"


def test_a_configured_output_dir_wins_and_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPIPE_OUTPUT_DIR", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    assert output_root("mine") == tmp_path / "mine" and output_root("mine").is_absolute()
    assert output_root("~/x") == Path.home() / "x"
