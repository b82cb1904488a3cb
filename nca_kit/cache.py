"""One on-disk cache for everything the kit computes once and reads back: evaluations, sampled datasets,
embeddings, reward scores.

An entry is a file named ``<tag>_<key>.<ext>`` inside a cache folder, where ``key`` hashes the *settings* that
produced it (model, texts, options: anything that would change the result). Beside it, ``<tag>_<key>.settings.json``
stores those settings in full, so a hash collision or a hand-edited file is caught instead of read silently.
Writes go to a temporary file that is renamed into place, so an interrupted run never leaves a half-written entry.

    >>> from nca_kit.cache import Cache
    >>> cache = Cache("runs/cache")
    >>> emb = cache.array("emb_minilm", {"model": "all-MiniLM-L6-v2", "texts": texts}, lambda: embed(texts))

The folder defaults to ``$NCA_KIT_CACHE`` or ``runs/cache``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["Cache", "default_cache_dir", "settings_key"]


def default_cache_dir() -> Path:
    """``$NCA_KIT_CACHE`` if set, else ``runs/cache`` (relative to the working directory)."""
    return Path(os.environ.get("NCA_KIT_CACHE", "runs/cache"))


def _canonical(settings: Any) -> str:
    return json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)


def settings_key(settings: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``settings`` (dict keys sorted, non-JSON values through ``str``)."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:length]


_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Cache:
    """A folder of cached results, each keyed by the settings that produced it. See the module docstring."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, tag: str, settings: Any, ext: str) -> Path:
        """Where the entry for ``(tag, settings)`` lives (it may not exist yet)."""
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise ValueError(f"tag must be letters, digits, '_', '.', '-' (a file-name stem), got {tag!r}")
        return self.directory / f"{tag}_{settings_key(settings)}.{ext}"

    def _sidecar(self, path: Path) -> Path:
        return path.with_name(path.name + ".settings.json")

    def _check(self, path: Path, settings: Any) -> bool:
        side = self._sidecar(path)
        if not (path.exists() and side.exists()):
            return False
        stored = json.loads(side.read_text())
        if stored != json.loads(_canonical(settings)):
            raise ValueError(f"cache entry {path} was computed with other settings than asked for; delete it")
        return True

    def _write(self, path: Path, settings: Any, write: Callable[[Path], None]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        tmp.replace(path)
        side_tmp = tmp.with_name(tmp.name + ".settings")
        side_tmp.write_text(_canonical(settings))
        side_tmp.replace(self._sidecar(path))

    def has(self, tag: str, settings: Any, ext: str) -> bool:
        """Whether a complete entry exists (raises if one exists for different settings under the same key)."""
        return self._check(self.path(tag, settings, ext), settings)

    def json(self, tag: str, settings: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once (its result must be JSON-serialisable), then read back. ``.last_hit`` says which."""
        path = self.path(tag, settings, "json")
        if self._check(path, settings):
            self.last_hit = True
            return json.loads(path.read_text())
        value = compute()
        self._write(path, settings, lambda p: p.write_text(json.dumps(value, default=str, ensure_ascii=False)))
        self.last_hit = False
        return json.loads(path.read_text())

    def array(self, tag: str, settings: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """``compute()`` once (a NumPy array or anything ``np.asarray`` takes), then read back from ``.npy``."""
        path = self.path(tag, settings, "npy")
        if self._check(path, settings):
            self.last_hit = True
            return np.load(path)
        value = np.asarray(compute())

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, value)

        self._write(path, settings, write)
        self.last_hit = False
        return value
