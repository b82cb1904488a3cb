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


# issue 24, item 4: every cached artifact is verified by content

def _entry(tmp_path):
    cache = Cache(tmp_path)
    settings = {"m": 1}
    cache.array("ref", settings, lambda: np.arange(6, dtype=np.float32).reshape(2, 3))
    return cache, settings, cache.path("ref", settings, "npy")


@pytest.mark.parametrize("damage", ["zeros_same_shape", "truncated", "garbage", "other_shape"])
def test_a_damaged_array_is_recomputed_with_a_warning_naming_it(tmp_path, damage):
    cache, settings, path = _entry(tmp_path)
    if damage == "zeros_same_shape":
        np.save(path, np.zeros((2, 3), dtype=np.float32))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "garbage":
        path.write_bytes(b"not an array at all")
    else:
        np.save(path, np.zeros((5,), dtype=np.float32))
    with pytest.warns(UserWarning, match=path.name):
        got = cache.array("ref", settings, lambda: np.arange(6, dtype=np.float32).reshape(2, 3))
    assert cache.last_hit is False and got[1, 2] == 5
    assert cache.array("ref", settings, lambda: 1 / 0)[1, 2] == 5 and cache.last_hit  # rewritten whole


def test_expected_shape_and_dtype_are_checked(tmp_path):
    cache, settings, path = _entry(tmp_path)
    assert cache.get_array("ref", settings, shape=(2, None), dtype=np.float32) is not None
    with pytest.warns(UserWarning, match="shape \\(2, 3\\), expected \\(4, \\*\\)"):
        assert cache.get_array("ref", settings, shape=(4, None)) is None
    with pytest.warns(UserWarning, match="dtype float32, expected float64"):
        assert cache.get_array("ref", settings, dtype=np.float64) is None
    with pytest.raises(ValueError, match="computed array has shape"):
        cache.array("other", settings, lambda: np.zeros(3, dtype=np.float32), shape=(2, 3))


def test_an_edited_json_entry_or_one_the_caller_rejects_is_recomputed(tmp_path):
    cache = Cache(tmp_path)
    cache.json("ev", {"a": 1}, lambda: {"acc": 0.5})
    path = cache.path("ev", {"a": 1}, "json")
    path.write_text('{"acc": 0.9}')
    with pytest.warns(UserWarning, match=f"{path.name}.*does not match the digest"):
        assert cache.json("ev", {"a": 1}, lambda: {"acc": 0.5}) == {"acc": 0.5}
    with pytest.warns(UserWarning, match="short"):
        assert cache.json("ev", {"a": 1}, lambda: {"acc": 0.7},
                          validate=lambda v: "short" if v["acc"] == 0.5 else None) == {"acc": 0.7}


def test_an_entry_without_a_digest_is_recomputed(tmp_path):
    cache = Cache(tmp_path)
    cache.json("x", {"a": 1}, lambda: 1)
    path = cache.path("x", {"a": 1}, "json")
    path.with_name(path.name + ".settings.json").write_text('{"a": 1}')  # the sidecar of an older version
    with pytest.warns(UserWarning, match="without a digest"):
        assert cache.json("x", {"a": 1}, lambda: 2) == 2


def test_a_damaged_cached_evaluation_is_recomputed(tmp_path, monkeypatch):
    import json

    from nca_kit import eval as ev
    from nca_kit.tasks import train_test_prompts

    problems = train_test_prompts(2, 2, seed=0)[1]
    calls = []

    def fake(model, tokenizer, problems, **kwargs):
        calls.append(1)
        return ev.EvalResult(1.0, 1.0, 1.0, 1.0, 0.0, len(problems), 1, 0.8,
                             rows=[{"id": p.id} for p in problems])

    monkeypatch.setattr(ev, "evaluate", fake)
    first = ev.evaluate_cached(tmp_path, lambda: (None, None), problems, tag="m")
    path = next(p for p in tmp_path.glob("eval_m_*.json") if not p.name.endswith(".settings.json"))
    value = json.loads(path.read_text())
    value["rows"] = value["rows"][:1]
    path.write_text(json.dumps(value))
    with pytest.warns(UserWarning, match=path.name):
        again = ev.evaluate_cached(tmp_path, lambda: (None, None), problems, tag="m")
    assert len(calls) == 2 and again.rows == first.rows and not again.cache_hit


def test_a_tampered_reference_chunk_is_recomputed(tmp_path):
    """Item 4 on a run: a reference_logps chunk replaced by zeros of the same shape (on main the run trained on
    them, exit 0) is recomputed with a warning naming it, and the rerun equals the first run."""
    import datasets

    from nca_kit.training import train
    from test_training import reward_rows, tiny_config

    config = tiny_config(tmp_path, max_steps=2)
    first = train(config, dataset=datasets.Dataset.from_list(reward_rows(4)))
    chunk = next((tmp_path / "reference_logps").glob("*.npy"))
    np.save(chunk, np.zeros_like(np.load(chunk)))
    with pytest.warns(UserWarning, match=chunk.name):
        again = train(config, dataset=datasets.Dataset.from_list(reward_rows(4)))
    assert again.losses == pytest.approx(first.losses, abs=1e-6)


def test_shipped_entries_are_read_verified_and_never_written(tmp_path):
    import numpy as np

    from nca_kit.cache import Cache

    shipped, own = tmp_path / "shipped", tmp_path / "own"
    settings = {"texts": ["a", "b"]}
    Cache(shipped, shipped=False).array("emb", settings, lambda: np.arange(6, dtype=np.float32).reshape(2, 3))
    calls = []
    cache = Cache(own, shipped=shipped)
    value = cache.array("emb", settings, lambda: calls.append(1) or np.zeros((2, 3), np.float32))
    assert cache.last_hit and not calls and value[1, 2] == 5 and not own.exists()  # read from the shipped folder
    entry = next(shipped.glob("emb_*.npy"))
    entry.write_bytes(entry.read_bytes()[:-4] + b"\0\0\0\0")  # a damaged shipped entry is not trusted
    with pytest.warns(UserWarning, match="does not match the digest"):
        value = Cache(own, shipped=shipped).array("emb", settings, lambda: np.ones((2, 3), np.float32))
    assert value.sum() == 6 and len(list(own.glob("emb_*.npy"))) == 1  # recomputed into the own folder
    assert Cache(own, shipped=shipped).get_array("emb", settings).sum() == 6  # the own entry wins from now on


def test_shipped_cache_can_be_switched_off(monkeypatch):
    from nca_kit.cache import shipped_cache_dir

    monkeypatch.setenv("NCA_KIT_SHIPPED_CACHE", "0")
    assert shipped_cache_dir() is None
