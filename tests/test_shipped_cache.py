"""The cache entries shipped in data/cache (scripts/build_shipped_cache.py): complete, listed, verified."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from nca_kit.cache import Cache

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_shipped_cache", REPO / "scripts" / "build_shipped_cache.py")
builder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(builder)


def test_the_shipped_folder_matches_its_manifest():
    if not builder.SHIPPED.exists():
        pytest.skip("no data/cache in this checkout")
    assert builder.check() == []
    manifest = json.loads((builder.SHIPPED / builder.MANIFEST).read_text())
    assert manifest["entries"], "an empty shipped cache"
    assert all(row["bytes"] <= builder.MAX_ENTRY_BYTES for row in manifest["entries"].values())


def _entries(folder: Path):
    cache = Cache(folder, shipped=False)
    cache.array("emb_sentence", {"texts": "a"}, lambda: np.ones((2, 3), np.float32))
    cache.json("eval_base", {"problems": [1]}, lambda: {"accuracy": 0.5})
    return builder.entries(folder)


def test_ship_copies_entries_with_sidecars_and_check_finds_tampering(tmp_path):
    found = {name: (path, "10") for name, path in _entries(tmp_path / "cold").items()}
    target = tmp_path / "shipped"
    manifest = builder.ship(found, target)
    assert set(manifest["entries"]) == set(found) and builder.check(target) == []
    # The shipped entries read back through Cache's shipped layer, without touching the own folder.
    assert Cache(tmp_path / "own", shipped=target).json("eval_base", {"problems": [1]}, lambda: 1 / 0) == {"accuracy": 0.5}
    name = next(n for n in found if n.endswith(".npy"))
    (target / name).write_bytes((target / name).read_bytes() + b"x")
    problems = builder.check(target)
    assert any("manifest's digest" in p for p in problems) and any("sidecar's digest" in p for p in problems)
    (target / "stray.json").write_text("{}")
    (target / "stray.json.settings.json").write_text("{}")
    assert any("stray.json: not in the manifest" in p for p in builder.check(target))


def test_rebuilding_one_notebook_keeps_the_others_and_drops_its_stale_entries(tmp_path):
    cold = _entries(tmp_path / "cold")
    npy = next(n for n in cold if n.endswith(".npy"))
    js = next(n for n in cold if n.endswith(".json"))
    target = tmp_path / "shipped"
    builder.ship({npy: (cold[npy], "10"), js: (cold[js], "20")}, target)
    builder.ship({}, target, replace_notebooks={"20"})  # notebook 20 now writes nothing
    assert set(json.loads((target / builder.MANIFEST).read_text())["entries"]) == {npy}
    assert not (target / js).exists() and builder.check(target) == []


def test_model_copies_and_large_files_are_not_shipped(tmp_path):
    (tmp_path / "models").mkdir()
    big = tmp_path / "emb_big.npy"
    big.write_bytes(b"\0" * (builder.MAX_ENTRY_BYTES + 1))
    assert "over" in builder.shippable(big)
    assert builder.shippable(tmp_path / "models") is not None
