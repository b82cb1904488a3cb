"""Where notebooks write: the same folder wherever a notebook is opened (nca_kit.paths)."""

from __future__ import annotations

from pathlib import Path

from nca_kit import paths
from nca_kit.cache import default_cache_dir

REPO = Path(__file__).resolve().parents[1]


def test_the_checkout_is_found_from_the_package():
    assert paths.repo_root() == REPO


def test_out_dir_follows_nca_kit_out(monkeypatch, tmp_path):
    monkeypatch.setenv("NCA_KIT_OUT", str(tmp_path / "full"))
    assert paths.out_dir() == tmp_path / "full" and (tmp_path / "full").is_dir()


def test_without_the_variables_a_notebook_folder_does_not_get_its_own_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("NCA_KIT_OUT", raising=False)
    monkeypatch.delenv("NCA_KIT_CACHE", raising=False)
    monkeypatch.chdir(REPO / "notebooks")  # what a plain `jupyter lab` in notebooks/ gives a kernel
    assert paths.out_dir(create=False) == REPO / "runs" / "lab"
    assert paths.cache_dir() == REPO / "runs" / "cache" == default_cache_dir()
    monkeypatch.chdir(tmp_path)
    assert paths.out_dir(create=False) == REPO / "runs" / "lab"
    assert default_cache_dir() == REPO / "runs" / "cache"


def test_cache_follows_nca_kit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NCA_KIT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
