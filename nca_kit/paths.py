"""Where the kit writes: the output folder of a notebook and the cache, the same wherever a notebook is opened.

A notebook started by ``scripts/run_notebooks.py`` or ``make lab`` gets ``NCA_KIT_OUT`` (``runs/full``, ``runs/smoke``
or ``runs/lab``); one opened some other way (a plain ``jupyter lab`` in ``notebooks/``, VS Code) falls back to the
checkout's ``runs/lab`` rather than a ``runs/`` folder beside the notebook, so the three run layouts never mix. The
cache is ``NCA_KIT_CACHE`` or the checkout's ``runs/cache``. An installed (non-checkout) copy of the package falls back
to the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["repo_root", "out_dir", "cache_dir"]


def repo_root() -> Path | None:
    """The source checkout this package was imported from (the folder holding its ``pyproject.toml``), or ``None``."""
    root = Path(__file__).resolve().parents[1]
    project = root / "pyproject.toml"
    if project.is_file() and 'name = "nca-kit"' in project.read_text(errors="replace"):
        return root
    return None


def out_dir(create: bool = True) -> Path:
    """``$NCA_KIT_OUT``, else ``<checkout>/runs/lab`` (else ``./runs/lab``); created unless ``create=False``."""
    env = os.environ.get("NCA_KIT_OUT")
    root = repo_root()
    path = Path(env) if env else (root if root is not None else Path.cwd()) / "runs" / "lab"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    """``$NCA_KIT_CACHE``, else ``<checkout>/runs/cache`` (else ``./runs/cache``)."""
    env = os.environ.get("NCA_KIT_CACHE")
    if env:
        return Path(env)
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "runs" / "cache"
