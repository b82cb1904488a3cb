"""One on-disk cache for everything the kit computes once and reads back: evaluations, sampled datasets,
embeddings, reward scores.

An entry is a file named ``<tag>_<key>.<ext>`` inside a cache folder, where ``key`` hashes the *settings* that
produced it (model, texts, options: anything that would change the result). Beside it, ``<tag>_<key>.settings.json``
stores those settings in full and the SHA-256 of the entry's bytes (and an array's shape and dtype). Every read
checks them all: other settings under the same key (a hash collision, a hand-edited sidecar) are an error; an entry
whose bytes do not match its digest (edited, truncated, replaced), that does not parse, or whose shape / dtype is not
what the caller expects is recomputed with a warning naming the file. Writes go to a temporary file that is renamed
into place, the sidecar last, so an interrupted run never leaves an entry that reads as complete.

    >>> from nca_kit.cache import Cache
    >>> cache = Cache("runs/cache")
    >>> emb = cache.array("emb_minilm", {"model": "all-MiniLM-L6-v2", "texts": texts}, lambda: embed(texts))

The folder defaults to ``$NCA_KIT_CACHE`` or the checkout's ``runs/cache`` (wherever a notebook runs from).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["Cache", "default_cache_dir", "shipped_cache_dir", "settings_key", "file_digest"]


def default_cache_dir() -> Path:
    """``$NCA_KIT_CACHE`` if set, else the checkout's ``runs/cache`` (:func:`nca_kit.paths.cache_dir`)."""
    from nca_kit.paths import cache_dir

    return cache_dir()


def _canonical(settings: Any) -> str:
    return json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False)


def settings_key(settings: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``settings`` (dict keys sorted, non-JSON values through ``str``)."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:length]


_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


_FORMAT = "nca_kit.cache/2"


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shape_problem(value: np.ndarray, shape, dtype) -> str | None:
    """Why ``value`` does not have the expected ``shape`` (``None`` entries: any size) and ``dtype``, or None."""
    if dtype is not None and value.dtype != np.dtype(dtype):
        return f"dtype {value.dtype}, expected {np.dtype(dtype)}"
    if shape is not None:
        shape = tuple(shape)
        if value.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, value.shape)):
            want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            return f"shape {tuple(value.shape)}, expected {want}"
    return None


def shipped_cache_dir() -> Path | None:
    """The read-only entries committed with the kit (``data/cache/`` of the checkout), or ``None`` when absent or
    switched off with ``NCA_KIT_SHIPPED_CACHE=0`` (what ``scripts/build_shipped_cache.py`` does to recompute them)."""
    from nca_kit.paths import repo_root

    if os.environ.get("NCA_KIT_SHIPPED_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = repo_root()
    folder = root / "data" / "cache" if root is not None else None
    return folder if folder is not None and folder.is_dir() else None


class Cache:
    """A folder of cached results, each keyed by the settings that produced it and verified by its content on every
    read. See the module docstring.

    ``shipped``: a read-only folder of entries committed with the kit, read (and verified the same way) when the
    folder has no entry of its own; writes always go to ``directory``. Default: :func:`shipped_cache_dir`."""

    def __init__(self, directory: str | Path | None = None, shipped: str | Path | None | bool = True):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        if shipped is True:
            shipped = shipped_cache_dir()
        self.shipped = Path(shipped) if shipped else None
        if self.shipped is not None and self.shipped.resolve() == self.directory.resolve():
            self.shipped = None

    def _found(self, tag: str, settings: Any, ext: str) -> Path | None:
        """The complete entry to read: the folder's own, else a shipped one, else ``None``."""
        own = self.path(tag, settings, ext)
        if self._check(own, settings):
            return own
        if self.shipped is not None and self._check(self.shipped / own.name, settings):
            return self.shipped / own.name
        return None

    def path(self, tag: str, settings: Any, ext: str) -> Path:
        """Where the entry for ``(tag, settings)`` lives (it may not exist yet)."""
        if not isinstance(tag, str) or not _TAG.match(tag):
            raise ValueError(f"tag must be letters, digits, '_', '.', '-' (a file-name stem), got {tag!r}")
        return self.directory / f"{tag}_{settings_key(settings)}.{ext}"

    def _sidecar(self, path: Path) -> Path:
        return path.with_name(path.name + ".settings.json")

    def _check(self, path: Path, settings: Any) -> bool:
        """Whether ``path`` is a complete entry for ``settings`` whose bytes match its recorded digest. Other
        settings under this key raise; anything else wrong warns (naming the file) and reads as a miss."""
        side = self._sidecar(path)
        if not (path.exists() and side.exists()):
            return False
        try:
            stored = json.loads(side.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return self._stale(path, "its settings sidecar does not parse")
        new_format = isinstance(stored, dict) and stored.get("format") == _FORMAT
        stored_settings = stored.get("settings") if new_format else stored
        if stored_settings != json.loads(_canonical(settings)):
            raise ValueError(f"cache entry {path} was computed with other settings than asked for; delete it")
        if not new_format:
            return self._stale(path, "it was written without a digest of its content")
        if file_digest(path) != stored.get("sha256"):
            return self._stale(path, "its content does not match the digest written with it (edited, truncated or "
                                     "replaced)")
        return True

    def _stale(self, path: Path, why: str) -> bool:
        warnings.warn(f"cache entry {path}: {why}; recomputing it", stacklevel=4)
        return False

    def _write(self, path: Path, settings: Any, write: Callable[[Path], None], **meta) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        sidecar = {"format": _FORMAT, "settings": json.loads(_canonical(settings)), "sha256": file_digest(tmp),
                   **meta}
        self._sidecar(path).unlink(missing_ok=True)  # the old sidecar never vouches for the new bytes
        tmp.replace(path)
        side_tmp = tmp.with_name(tmp.name + ".settings")
        side_tmp.write_text(json.dumps(sidecar, sort_keys=True, ensure_ascii=False))
        side_tmp.replace(self._sidecar(path))

    def has(self, tag: str, settings: Any, ext: str) -> bool:
        """Whether a complete entry with the right content exists (raises if one exists for different settings
        under the same key)."""
        return self._found(tag, settings, ext) is not None

    def json(self, tag: str, settings: Any, compute: Callable[[], Any],
             validate: Callable[[Any], str | None] | None = None) -> Any:
        """``compute()`` once (its result must be JSON-serialisable), then read back. ``.last_hit`` says which.
        ``validate(value)`` returns why a value is not what the caller expects (``None`` when it is): a cached
        value it rejects is recomputed with a warning; a computed one it rejects is an error."""
        path = self._found(tag, settings, "json")
        if path is not None:
            value = json.loads(path.read_text())
            problem = validate(value) if validate is not None else None
            if problem is None:
                self.last_hit = True
                return value
            self._stale(path, problem)
        value = compute()
        text = json.dumps(value, default=str, ensure_ascii=False)
        problem = validate(json.loads(text)) if validate is not None else None
        if problem is not None:
            raise ValueError(f"{tag}: the computed value is not what was expected: {problem}")
        path = self.path(tag, settings, "json")
        self._write(path, settings, lambda p: p.write_text(text))
        self.last_hit = False
        return json.loads(path.read_text())

    def get_array(self, tag: str, settings: Any, shape=None, dtype=None) -> np.ndarray | None:
        """The verified array of ``(tag, settings)``, or ``None`` when absent or not right (content digest, parse,
        ``shape`` with ``None`` for any size, ``dtype``): then a warning names the file."""
        path = self._found(tag, settings, "npy")
        if path is None:
            return None
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            self._stale(path, f"it does not load ({err})")
            return None
        problem = _shape_problem(value, shape, dtype)
        if problem is not None:
            self._stale(path, f"it holds {problem}")
            return None
        return value

    def array(self, tag: str, settings: Any, compute: Callable[[], np.ndarray], shape=None,
              dtype=None) -> np.ndarray:
        """``compute()`` once (a NumPy array or anything ``np.asarray`` takes), then read back from ``.npy``, verified
        as :meth:`get_array` does."""
        value = self.get_array(tag, settings, shape, dtype)
        if value is not None:
            self.last_hit = True
            return value
        value = np.asarray(compute())
        problem = _shape_problem(value, shape, dtype)
        if problem is not None:
            raise ValueError(f"{tag}: the computed array has {problem}")

        def write(p: Path) -> None:
            with open(p, "wb") as f:
                np.save(f, value)

        self._write(self.path(tag, settings, "npy"), settings, write, shape=list(value.shape), dtype=str(value.dtype))
        self.last_hit = False
        return value
