"""Batched sampling, scoring and the on-disk cache of nca_kit.generate, on a tiny random model (fast)."""

import dataclasses
import json

import pytest

from nca_kit.generate import (
    GenerationSettings,
    build_reward_dataset,
    cache_path,
    load_or_generate,
    reward_stats,
)
from nca_kit.sampling import sample_responses
from nca_kit.tasks import make_prompts

SMALL = GenerationSettings(model_id="tiny-mistral", n_train=5, n_test=3, k=3, max_new_tokens=6, batch_size=6)


def test_sample_responses_shapes_and_determinism(tiny):
    model, tokenizer = tiny
    prompts = [p.messages for p in make_prompts(3, seed=0)]
    texts, cut = sample_responses(model, tokenizer, prompts, k=4, max_new_tokens=5, batch_size=5, seed=1,
                                  progress=False)
    assert [len(t) for t in texts] == [4, 4, 4] and [len(c) for c in cut] == [4, 4, 4]
    assert all(isinstance(t, str) for row in texts for t in row)
    again, _ = sample_responses(model, tokenizer, prompts, k=4, max_new_tokens=5, batch_size=5, seed=1,
                                progress=False)
    other, _ = sample_responses(model, tokenizer, prompts, k=4, max_new_tokens=5, batch_size=5, seed=2,
                                progress=False)
    assert again == texts
    assert other != texts
    assert tokenizer.padding_side == "right"  # restored after left-padded generation


def test_truncation_flag_follows_the_end_of_turn_token(tiny):
    model, tokenizer = tiny
    prompts = [p.messages for p in make_prompts(2, seed=0)]
    # With the end-of-turn token as the only allowed stop, a 1-token budget is cut unless that token is sampled.
    texts, cut = sample_responses(model, tokenizer, prompts, k=2, max_new_tokens=1, batch_size=4, progress=False)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for row in texts for t in row]
    flat_cut = [c for row in cut for c in row]
    for token_ids, was_cut in zip(ids, flat_cut):
        assert was_cut == (len(token_ids) > 0)  # a kept (non-special) token means no end-of-turn was emitted


def test_greedy_copies_are_identical(tiny):
    model, tokenizer = tiny
    prompts = [p.messages for p in make_prompts(2, seed=0)]
    texts, _ = sample_responses(model, tokenizer, prompts, k=2, greedy=True, max_new_tokens=5, progress=False)
    assert all(row[0] == row[1] for row in texts)


def test_shared_prompt_cache_gives_the_same_continuations(tiny):
    model, tokenizer = tiny
    prompts = [p.messages for p in make_prompts(3, seed=0)]  # different lengths: left padding is exercised
    shared, _ = sample_responses(model, tokenizer, prompts, k=2, greedy=True, max_new_tokens=6, batch_size=6,
                                 share_prefix=True, progress=False)
    plain, _ = sample_responses(model, tokenizer, prompts, k=2, greedy=True, max_new_tokens=6, batch_size=6,
                                share_prefix=False, progress=False)
    alone = [sample_responses(model, tokenizer, [p], k=1, greedy=True, max_new_tokens=6, progress=False)[0][0]
             for p in prompts]
    assert shared == plain
    assert [row[0] for row in shared] == [a[0] for a in alone]  # padding does not change a prompt's answer


def test_build_reward_dataset_rows_follow_the_schema(tiny):
    model, tokenizer = tiny
    problems = make_prompts(4, seed=0)
    rows = build_reward_dataset(model, tokenizer, problems, k=3, max_new_tokens=4, batch_size=6, progress=False)
    assert len(rows) == 4
    for row, p in zip(rows, problems):
        assert row["prompt"] == p.messages and row["answer"] == p.answer and row["id"] == p.id
        assert len(row["responses"]) == len(row["rewards"]) == len(row["truncated"]) == 3
        assert all(0.0 <= r <= 10.0 for r in row["rewards"])


def test_cache_key_covers_every_setting():
    base = GenerationSettings()
    assert base.key() == GenerationSettings().key()
    changes = {"model_id": "x", "n_train": 7, "n_test": 7, "prompt_seed": 1, "sample_seed": 1, "k": 2,
               "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 7, "batch_size": 7, "share_prefix": False, "template_version": "v0"}
    assert set(changes) == {f.name for f in dataclasses.fields(GenerationSettings)}
    keys = {dataclasses.replace(base, **{name: value}).key() for name, value in changes.items()}
    assert len(keys) == len(changes) and base.key() not in keys


def test_second_call_hits_the_cache(tiny, tmp_path):
    model, tokenizer = tiny
    first = load_or_generate(SMALL, cache_dir=tmp_path, model=model, tokenizer=tokenizer, progress=False,
                             verbose=False)
    assert not first.cache_hit and first.path == cache_path(SMALL, tmp_path) and first.path.exists()
    assert len(first["train"]) == 5 and len(first["test"]) == 3
    assert not {r["content"] for p in first["train"]["prompt"] for r in p} & {
        r["content"] for p in first["test"]["prompt"] for r in p}
    assert not list(tmp_path.glob("*.partial.jsonl"))
    # No model passed: a cache miss would try to load "tiny-mistral" and sample; a hit reads the file.
    second = load_or_generate(SMALL, cache_dir=tmp_path, progress=False, verbose=False)
    assert second.cache_hit
    assert second["train"].to_list() == first["train"].to_list()
    assert second["test"].to_list() == first["test"].to_list()
    # A committed copy in search_dirs is found first.
    other = tmp_path / "committed"
    other.mkdir()
    (other / SMALL.file_name()).write_text(first.path.read_text())
    third = load_or_generate(SMALL, cache_dir=tmp_path / "empty", search_dirs=(other,), progress=False,
                             verbose=False)
    assert third.cache_hit and third.path.parent == other


def test_interrupted_generation_resumes_from_the_partial_file(tiny, tmp_path):
    model, tokenizer = tiny
    full = load_or_generate(SMALL, cache_dir=tmp_path / "a", model=model, tokenizer=tokenizer, progress=False,
                            verbose=False)
    # Simulate a run stopped after its first chunk (batch_size // k = 2 prompts): keep header + 2 rows.
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    partial = cache_path(SMALL, resumed_dir).with_suffix(".partial.jsonl")
    header = json.dumps({"settings": dataclasses.asdict(SMALL)})
    rows = full["train"].to_list()[:2]
    rows[0] = {**rows[0], "responses": ["kept from the partial file"] * 3}
    partial.write_text("\n".join([header, *map(json.dumps, rows)]) + "\n")
    resumed = load_or_generate(SMALL, cache_dir=resumed_dir, model=model, tokenizer=tokenizer, progress=False,
                               verbose=False)
    assert resumed["train"][0]["responses"] == ["kept from the partial file"] * 3  # not resampled
    assert resumed["train"].to_list()[1:] == full["train"].to_list()[1:]  # the rest: same seeds, same text


def test_cached_file_with_other_settings_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    first = load_or_generate(SMALL, cache_dir=tmp_path, model=model, tokenizer=tokenizer, progress=False,
                             verbose=False)
    payload = json.loads(first.path.read_text())
    payload["settings"]["k"] = 99
    first.path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="delete it"):
        load_or_generate(SMALL, cache_dir=tmp_path, progress=False, verbose=False)


def test_reward_stats_counts_mixed_and_tied_prompts():
    from datasets import Dataset

    ds = Dataset.from_list([
        {"rewards": [10.0, 4.0, 4.0, 0.0], "truncated": [False, False, False, True]},  # mixed
        {"rewards": [4.0, 4.0, 4.0, 4.0], "truncated": [False] * 4},  # all wrong, all tied
        {"rewards": [9.0, 8.0, 10.0, 6.0], "truncated": [False] * 4},  # all correct
    ])
    stats = reward_stats(ds)
    assert stats["n_prompts"] == 3 and stats["n_responses"] == 12
    assert stats["frac_mixed"] == pytest.approx(1 / 3)
    assert stats["frac_any_correct"] == pytest.approx(2 / 3)
    assert stats["frac_all_tied"] == pytest.approx(1 / 3)
    assert stats["frac_correct"] == pytest.approx(5 / 12)
    assert stats["frac_truncated"] == pytest.approx(1 / 12)
    assert stats["histogram"] == {0.0: 1, 4.0: 6, 6.0: 1, 8.0: 1, 9.0: 1, 10.0: 2}
    assert stats["mean_reward"] == pytest.approx(sum([10, 4, 4, 0, 4, 4, 4, 4, 9, 8, 10, 6]) / 12)


def test_train_prefix_is_the_start_of_the_full_dataset(tiny, tmp_path):
    model, tokenizer = tiny
    full = load_or_generate(SMALL, cache_dir=tmp_path / "full", model=model, tokenizer=tokenizer, progress=False,
                            verbose=False)
    sampled = load_or_generate(SMALL, cache_dir=tmp_path / "p", model=model, tokenizer=tokenizer, progress=False,
                               verbose=False, train_prefix=3)
    assert not sampled.complete and not sampled.cache_hit and full.complete
    assert sampled["train"].to_list() == full["train"].to_list()[:3]  # chunk seeds do not depend on n_train
    assert sampled["test"].to_list() == full["test"].to_list()
    assert not list((tmp_path / "p").glob("*")) if (tmp_path / "p").exists() else True  # nothing written
    # A generation in progress: a partial file with 4 rows and a half-written fifth line.
    partial_dir = tmp_path / "q"
    partial_dir.mkdir()
    partial = cache_path(SMALL, partial_dir).with_suffix(".partial.jsonl")
    lines = [json.dumps({"settings": dataclasses.asdict(SMALL)}), *map(json.dumps, full["train"].to_list()[:4])]
    partial.write_text("\n".join(lines) + '\n{"prompt": [')
    read = load_or_generate(SMALL, cache_dir=partial_dir, progress=False, verbose=False, train_prefix=4)
    assert read.cache_hit and read["train"].to_list() == full["train"].to_list()[:4]
    from_full = load_or_generate(SMALL, cache_dir=tmp_path / "full", progress=False, verbose=False, train_prefix=2)
    assert from_full.cache_hit and len(from_full["train"]) == 2 and not from_full.complete


def test_a_short_cached_dataset_is_not_returned_as_complete(tiny, tmp_path):
    """Issue 24, item 4: a cached file cut short (or edited) is generated again, with a warning naming it."""
    import json

    model, tokenizer = tiny
    first = load_or_generate(SMALL, cache_dir=tmp_path, model=model, tokenizer=tokenizer, progress=False,
                             verbose=False)
    payload = json.loads(first.path.read_text())
    payload["splits"]["train"] = payload["splits"]["train"][:2]
    payload.pop("digest")
    first.path.write_text(json.dumps(payload))
    with pytest.warns(UserWarning, match=f"{first.path.name}.*train split holds 2 rows, not the 5"):
        again = load_or_generate(SMALL, cache_dir=tmp_path, model=model, tokenizer=tokenizer, progress=False,
                                 verbose=False)
    assert again.complete and not again.cache_hit and again["train"].to_list() == first["train"].to_list()
    payload = json.loads(first.path.read_text())
    payload["splits"]["train"][0]["rewards"][0] += 1.0  # an edited reward: the digest catches it
    first.path.write_text(json.dumps(payload))
    with pytest.warns(UserWarning, match="digest"):
        load_or_generate(SMALL, cache_dir=tmp_path, model=model, tokenizer=tokenizer, progress=False, verbose=False)
