"""Shared fixtures.

Notebooks: a test that takes ``notebook_path`` runs once per notebook under ``notebooks/`` (test id: its name);
``notebook_env`` gives a test the environment the course notebooks expect under tests: the smoke switch on and
figures in a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"


def committed_notebooks() -> list[Path]:
    """Every notebook under ``notebooks/`` (Jupyter's checkpoint copies excluded), sorted."""
    return sorted(p for p in NOTEBOOK_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def pytest_generate_tests(metafunc):
    if "notebook_path" in metafunc.fixturenames:
        paths = committed_notebooks()
        ids = [str(p.relative_to(NOTEBOOK_DIR).with_suffix("")) for p in paths]
        metafunc.parametrize("notebook_path", paths, ids=ids)


def notebook_mode() -> str:
    """``NCA_KIT_NOTEBOOKS``: ``smoke`` (default; ``make test``) or ``full`` (``make test NOTEBOOKS=full``, what CI
    runs: every course notebook in the size ``make demo`` runs it, compared with its stored outputs)."""
    mode = os.environ.get("NCA_KIT_NOTEBOOKS", "smoke").strip().lower() or "smoke"
    if mode not in ("smoke", "full"):
        raise pytest.UsageError(f"NCA_KIT_NOTEBOOKS must be 'smoke' or 'full', got {mode!r}")
    return mode


@pytest.fixture
def notebook_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for executing notebooks in a test: ``NCA_KIT_SMOKE=1`` (unless :func:`notebook_mode` is
    ``full``), ``NCA_KIT_OUT`` a fresh temporary folder, and no ``MPLBACKEND`` (a backend forced for scripts would
    keep figures out of the notebook outputs)."""
    if notebook_mode() == "full":
        monkeypatch.delenv("NCA_KIT_SMOKE", raising=False)
    else:
        monkeypatch.setenv("NCA_KIT_SMOKE", "1")
    monkeypatch.setenv("NCA_KIT_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return dict(os.environ)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and spares a CPU shared with other jobs. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def grid():
    """``scripts/run_grid.py`` as a module, a fresh copy per test module (so one module's monkeypatches stay there)."""
    spec = importlib.util.spec_from_file_location("run_grid", REPO / "scripts" / "run_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
