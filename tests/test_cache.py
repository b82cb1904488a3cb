"""The on-disk cache: hit/miss, settings check, atomic writes."""

import numpy as np
import pytest

from nca_kit.cache import Cache, settings_key


def test_array_miss_then_hit(tmp_path):
    cache = Cache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    a = cache.array("emb", {"model": "m", "texts": ["a", "b"]}, compute)
    assert cache.last_hit is False
    b = cache.array("emb", {"model": "m", "texts": ["a", "b"]}, compute)
    assert cache.last_hit is True
    assert len(calls) == 1
    np.testing.assert_array_equal(a, b)
    assert b.dtype == np.float32
    cache.array("emb", {"model": "m", "texts": ["a", "c"]}, compute)  # other settings: a miss
    assert len(calls) == 2


def test_json_roundtrip_and_settings_order(tmp_path):
    cache = Cache(tmp_path)
    out = cache.json("eval", {"b": 1, "a": [1, 2]}, lambda: {"acc": 0.5})
    assert out == {"acc": 0.5}
    assert cache.json("eval", {"a": [1, 2], "b": 1}, lambda: 1 / 0) == {"acc": 0.5}  # key order does not matter
    assert settings_key({"a": 1}) != settings_key({"a": 2})


def test_mismatched_sidecar_is_refused(tmp_path):
    cache = Cache(tmp_path)
    cache.json("x", {"a": 1}, lambda: 1)
    path = cache.path("x", {"a": 1}, "json")
    path.with_name(path.name + ".settings.json").write_text('{"a": 2}')
    with pytest.raises(ValueError, match="other settings"):
        cache.json("x", {"a": 1}, lambda: 1)


def test_missing_sidecar_recomputes(tmp_path):
    cache = Cache(tmp_path)
    cache.json("x", {"a": 1}, lambda: 1)
    path = cache.path("x", {"a": 1}, "json")
    path.with_name(path.name + ".settings.json").unlink()  # an interrupted write: entry not complete
    assert cache.json("x", {"a": 1}, lambda: 2) == 2
    assert cache.last_hit is False
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_tag(tmp_path):
    with pytest.raises(ValueError, match="tag"):
        Cache(tmp_path).path("../evil", {}, "json")
