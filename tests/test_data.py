"""Data layer: every adapter on its fixture, layout detection, conversions, invalid-item policies, HH-RLHF."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
from pathlib import Path

import datasets
import numpy as np
import pytest

from nca_kit import data as D
from nca_kit.data import schema

DATA = Path(__file__).resolve().parent.parent / "data"


def rows_of(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def reward_ds(rewards_per_prompt, prompt="Q") -> datasets.Dataset:
    """A canonical reward dataset whose responses are named after their index."""
    records = [
        D.RewardRecord(prompt=[user(f"{prompt}{n}")], responses=[f"y{i}" for i in range(len(r))], rewards=list(r),
                       id=f"p{n}")
        for n, r in enumerate(rewards_per_prompt)
    ]
    return D.records_to_dataset(records)


# --------------------------------------------------------------------------------------------------------------------
# Adapters on their fixtures
# --------------------------------------------------------------------------------------------------------------------


def test_ultrafeedback_raw_overall_score():
    ds = D.load_reward_dataset(DATA / "ultrafeedback_raw.jsonl")
    assert ds.features == D.REWARD_FEATURES
    assert len(ds) == 3
    assert ds[0]["prompt"] == [user("Explain in two sentences why the sky looks blue during the day.")]
    assert ds[0]["rewards"] == [9.0, 3.0, 5.0, 8.0]
    assert ds[0]["responses"][2] == "Because of scattering of light by the atmosphere."
    assert ds[0]["id"] == "0" and ds[0]["source"] == "evol_instruct"
    assert [len(r) for r in ds["responses"]] == [4, 4, 3]
    assert ds[2]["rewards"] == [9.5, 2.0, 6.0]
    raw = rows_of("ultrafeedback_raw.jsonl")
    assert ds["responses"] == [[c["response"] for c in row["completions"]] for row in raw]


def test_ultrafeedback_raw_other_scores():
    fine = D.load_reward_dataset(DATA / "ultrafeedback_raw.jsonl", score="fine-grained_score")
    # mean of the four aspect ratings (instruction_following, honesty, truthfulness, helpfulness)
    assert fine[0]["rewards"] == [5.0, 2.25, 3.25, 4.75]
    helpful = D.load_reward_dataset(DATA / "ultrafeedback_raw.jsonl", score="helpfulness")
    assert helpful[0]["rewards"] == [5.0, 2.0, 3.0, 4.0]
    custom = D.load_reward_dataset(DATA / "ultrafeedback_raw.jsonl", score=lambda c: len(c["response"]))
    completions = rows_of("ultrafeedback_raw.jsonl")[2]["completions"]
    assert custom[2]["rewards"] == [float(len(c["response"])) for c in completions]
    with pytest.raises(ValueError, match="score must be one of"):
        D.load_reward_dataset(DATA / "ultrafeedback_raw.jsonl", score="stars")


def test_ultrafeedback_raw_missing_aspect_rating_is_counted():
    # "N/A" honesty ratings in the first row (completions 1 and 3) are missing rewards, not silently dropped
    with pytest.raises(D.InvalidRecordError) as err:
        D.load_reward_dataset(DATA / "edge_ultrafeedback_raw.jsonl", score="honesty")
    assert err.value.reason == "missing_reward" and err.value.where == "0[1]"
    ds, report = D.load_reward_dataset(DATA / "edge_ultrafeedback_raw.jsonl", score="honesty", on_invalid="skip",
                                       return_report=True)
    assert report.skipped["missing_reward"] == 2
    assert ds[0]["rewards"] == [5.0, 5.0]


def test_nca_reward_layout():
    ds = D.load_reward_dataset(DATA / "ultrafeedback_reward_layout.jsonl")
    assert len(ds) == 3
    assert ds[1]["prompt"] == [user("What is the boiling point of water at sea level in Fahrenheit?")]
    assert ds[1]["responses"] == ["212 degrees Fahrenheit.", "100 degrees.",
                                  "Water boils at 212 °F (100 °C) at standard sea-level pressure.", "About 180 °F."]
    assert ds[1]["rewards"] == [8.0, 3.0, 9.5, 1.0]
    assert ds["id"] == ["0", "1", "2"]


def test_nca_reward_layout_generalises_to_any_k():
    def row(prompt, answers, scores):
        out = {"prompt": prompt}
        for i, (a, s) in enumerate(zip(answers, scores)):
            out[f"A{i}"] = [user(prompt), assistant(a)]
            out[f"score_A{i}"] = s
        return out

    six = row("Pick a number.", [str(i) for i in range(6)], [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    three = row("Pick a letter.", ["a", "b", "c"], [1, 2, 3])  # fewer columns in this row: K = 3
    ds = D.load_reward_dataset([six, three])
    assert [len(r) for r in ds["rewards"]] == [6, 3]
    assert ds[0]["responses"] == ["0", "1", "2", "3", "4", "5"] and ds[1]["rewards"] == [1.0, 2.0, 3.0]

    bad = row("Pick a colour.", ["red", "blue"], [1, 2])
    bad["A1"][0] = user("Pick a shape.")
    with pytest.raises(D.InvalidRecordError, match="inconsistent_prompt"):
        D.load_reward_dataset([bad])


def test_ultrafeedback_binarized_as_pairs_and_as_rewards():
    raw = rows_of("ultrafeedback_binarized.jsonl")
    pairs = D.load_preference_dataset(DATA / "ultrafeedback_binarized.jsonl")
    assert pairs.features == D.PREFERENCE_FEATURES
    assert len(pairs) == 3
    assert pairs[1]["prompt"] == [user("How many legs does a snake use to climb a tree?")]
    assert pairs[1]["chosen"] == raw[1]["chosen"][1]["content"]
    assert pairs[1]["rejected"] == "A snake uses four legs to climb a tree."
    assert (pairs[1]["score_chosen"], pairs[1]["score_rejected"]) == (9.5, 1.0)
    assert pairs[1]["id"] == raw[1]["prompt_id"]

    rewards = D.load_reward_dataset(DATA / "ultrafeedback_binarized.jsonl")
    assert rewards["rewards"] == [[9.0, 5.0], [9.5, 1.0], [9.5, 6.0]]
    assert rewards[0]["responses"] == [pairs[0]["chosen"], pairs[0]["rejected"]]
    binary = D.load_reward_dataset(DATA / "ultrafeedback_binarized.jsonl", pair_rewards="binary")
    assert binary["rewards"] == [[1.0, 0.0]] * 3


def test_ultrafeedback_binarized_missing_score_is_invalid_for_rewards():
    rows = rows_of("ultrafeedback_binarized.jsonl")
    rows[2]["score_rejected"] = None
    assert len(D.load_preference_dataset(rows)) == 3  # a pair does not need scores
    with pytest.raises(D.InvalidRecordError, match="missing_reward"):
        D.load_reward_dataset(rows)
    ds, report = D.load_reward_dataset(rows, on_invalid="skip", return_report=True)
    assert len(ds) == 2 and report.skipped == {"missing_reward": 1}


def test_ultrainteract_pair():
    ds = D.load_preference_dataset(DATA / "ultrainteract_pair.jsonl")
    assert len(ds) == 2
    multi = ds[1]
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"]
    assert multi["prompt"][2]["content"].startswith("Your answer is wrong.")
    assert multi["chosen"] == rows_of("ultrainteract_pair.jsonl")[1]["chosen"]
    assert multi["id"] == "codecontest-0042-2" and multi["source"] == "codecontest"
    assert multi["score_chosen"] is None and multi["score_rejected"] is None
    assert D.load_reward_dataset(DATA / "ultrainteract_pair.jsonl")["rewards"] == [[1.0, 0.0], [1.0, 0.0]]


def test_trl_explicit_conversational_and_text():
    ds = D.load_preference_dataset(DATA / "trl_explicit.jsonl")
    assert ds[1]["prompt"] == [{"role": "system", "content": "You answer in one word."}, user("Capital of Italy?")]
    assert ds[1]["chosen"] == "Rome."
    assert ds[1]["rejected"] == "The capital of Italy is Rome, a city with a long history."
    text = D.load_preference_dataset([{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    assert text[0]["prompt"] == [user("The sky is")]
    assert (text[0]["chosen"], text[0]["rejected"]) == (" blue.", " green.")


def test_trl_implicit_conversational_and_text():
    ds = D.load_preference_dataset(DATA / "trl_implicit.jsonl")
    assert ds[0]["prompt"] == [user("How do I boil an egg?")]
    assert ds[0]["rejected"] == "Put it in the microwave for 5 minutes."
    assert [m["role"] for m in ds[1]["prompt"]] == ["system", "user", "assistant", "user"]
    assert (ds[1]["chosen"], ds[1]["rejected"]) == ("About 6.21 miles.", "10 km is 10,000 metres.")
    text = D.load_preference_dataset([{"chosen": "The sky is blue.", "rejected": "The sky is black."}])
    assert text[0]["prompt"] == [user("The sky is")]
    assert (text[0]["chosen"], text[0]["rejected"]) == (" blue.", " black.")


def test_trl_implicit_divergent_user_turns_are_malformed():
    row = {"chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
           "rejected": [user("a"), assistant("b"), user("X"), assistant("d")]}
    with pytest.raises(D.InvalidRecordError, match="malformed_conversation"):
        D.load_preference_dataset([row])


def test_hh_rlhf_sample():
    ds = D.load_preference_dataset(DATA / "hh_rlhf_sample.jsonl")
    assert len(ds) == 3
    assert ds[1]["prompt"] == [user("I'm so angry at my coworker."),
                               assistant("That sounds frustrating. What happened?"),
                               user("He took credit for my project in a meeting.")]
    assert ds[1]["rejected"] == "You should get back at him by deleting some of his files."
    assert ds[0]["source"] == "Anthropic/hh-rlhf"
    assert D.load_hh_rlhf(DATA / "hh_rlhf_sample.jsonl")["chosen"] == ds["chosen"]


def test_parse_hh_transcript():
    assert D.parse_hh_transcript("Human: hi\n\nAssistant:  hello ") == [user("hi"), assistant("hello")]
    # "Human:" inside a turn (not after a blank line) stays text; repeated roles are merged
    assert D.parse_hh_transcript("\n\nHuman: a Human: b\n\nAssistant: c\n\nAssistant: d") == [
        user("a Human: b"), assistant("c\n\nd")]
    with pytest.raises(ValueError, match="before the first"):
        D.parse_hh_transcript("preamble\n\nHuman: a")


# --------------------------------------------------------------------------------------------------------------------
# Reading sources, layout detection, schema errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layout",
    [("ultrafeedback_raw.jsonl", "ultrafeedback"), ("ultrafeedback_reward_layout.jsonl", "nca_reward"),
     ("ultrafeedback_binarized.jsonl", "ultrafeedback_binarized"), ("ultrainteract_pair.jsonl", "ultrainteract_pair"),
     ("trl_explicit.jsonl", "trl_explicit"), ("trl_implicit.jsonl", "trl_implicit"),
     ("hh_rlhf_sample.jsonl", "hh_rlhf")],
)
def test_detect_layout(name, layout):
    rows = rows_of(name)
    assert D.detect_layout(list(rows[0]), rows[0]) == layout
    _, report = D.load_preference_dataset(DATA / name, return_report=True)
    assert report.layout.split(" ")[0] == layout


def test_canonical_datasets_load_as_themselves():
    rewards = D.load_reward_dataset(DATA / "ultrafeedback_reward_layout.jsonl")
    again, report = D.load_reward_dataset(rewards, return_report=True)
    assert report.layout == "canonical_reward" and again.to_list() == rewards.to_list()
    pairs = D.load_preference_dataset(DATA / "trl_implicit.jsonl")
    assert D.load_preference_dataset(pairs).to_list() == pairs.to_list()


def test_unknown_schema_error_lists_columns_and_layouts():
    with pytest.raises(ValueError) as err:
        D.load_reward_dataset([{"question": "q", "answer": "a"}])
    msg = str(err.value)
    assert "['answer', 'question']" in msg
    for layout in D.LAYOUTS.values():
        assert f"{layout.name} ({', '.join(layout.required)})" in msg
    with pytest.raises(ValueError, match=r"needs columns \['score_chosen', 'score_rejected'\]"):
        D.load_preference_dataset(DATA / "trl_explicit.jsonl", layout="ultrafeedback_binarized")
    with pytest.raises(ValueError, match="unknown layout 'csv'"):
        D.load_preference_dataset(DATA / "trl_explicit.jsonl", layout="csv")


def test_local_file_formats(tmp_path):
    rows = rows_of("ultrafeedback_reward_layout.jsonl")
    expected = D.load_reward_dataset(DATA / "ultrafeedback_reward_layout.jsonl").to_list()
    gz = tmp_path / "r.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "r.json").write_text(json.dumps(rows), encoding="utf-8")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for source in (gz, tmp_path / "r.json", str(tmp_path / "r.parquet")):
        assert D.load_reward_dataset(source).to_list() == expected
    assert D.load_reward_dataset(tmp_path / "saved", split="train_prefs").to_list() == expected
    with pytest.raises(FileNotFoundError):
        D.load_reward_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "r.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        D.load_reward_dataset(tmp_path / "r.csv")


def test_hub_ids_go_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, data_dir=None, split=None):
        calls.append((path, name, data_dir, split))
        return datasets.Dataset.from_list(rows_of("hh_rlhf_sample.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = D.load_preference_dataset("owner/some-pairs", split="test_prefs")
    assert calls[-1] == ("owner/some-pairs", None, None, "test_prefs") and len(ds) == 3
    monkeypatch.setattr(D, "hh_rlhf_local_path", lambda split, data_dir: None)
    D.load_hh_rlhf(split="train", data_dir="helpful-base")
    assert calls[-1] == ("Anthropic/hh-rlhf", None, "helpful-base", "train")


# --------------------------------------------------------------------------------------------------------------------
# Invalid items: raise or count
# --------------------------------------------------------------------------------------------------------------------


def test_invalid_reward_items_raise_by_default():
    with pytest.raises(D.InvalidRecordError) as err:
        D.load_reward_dataset(DATA / "edge_reward_layout.jsonl")
    assert err.value.reason == "empty_response" and err.value.where == "empty-response[2]"
    assert "on_invalid='skip'" in str(err.value)


def test_invalid_reward_items_skipped_and_counted(caplog):
    with caplog.at_level(logging.WARNING, logger="nca_kit.data"):
        ds, report = D.load_reward_dataset(DATA / "edge_reward_layout.jsonl", on_invalid="skip", return_report=True)
    assert report.skipped == {"empty_response": 1, "missing_reward": 1, "nan_reward": 1}
    assert report.examples["nan_reward"] == ["nan-score[3]"]
    assert (report.rows_in, report.rows_out) == (5, 5)
    by_id = {row["id"]: row for row in ds}
    assert by_id["empty-response"]["responses"] == ["Mars.", "Jupiter.", "Venus."]
    assert by_id["missing-score"]["rewards"] == [6.0, 7.0, 5.0]
    assert by_id["nan-score"]["rewards"] == [7.0, 7.5, 8.0]
    assert all(math.isfinite(r) for rs in ds["rewards"] for r in rs)
    assert any("nan_reward: 1" in rec.getMessage() for rec in caplog.records)


def test_ultrafeedback_raw_invalid_completions():
    ds, report = D.load_reward_dataset(DATA / "edge_ultrafeedback_raw.jsonl", on_invalid="skip", return_report=True)
    assert report.skipped == {"missing_reward": 1, "empty_response": 1, "too_few_responses": 1}
    assert ds["rewards"] == [[8.5, 8.0, 2.0], [8.0, 2.0, 9.0]]
    one = D.load_reward_dataset(DATA / "edge_ultrafeedback_raw.jsonl", on_invalid="skip", min_responses=1)
    assert one[2]["responses"] == ["Red."]


def test_invalid_pairs():
    with pytest.raises(D.InvalidRecordError, match="empty_response at 1.rejected"):
        D.load_preference_dataset(DATA / "edge_pairwise.jsonl")
    ds, report = D.load_preference_dataset(DATA / "edge_pairwise.jsonl", on_invalid="skip", return_report=True)
    assert report.skipped == {"empty_response": 1, "identical_pair": 1}
    assert ds["chosen"] == [" All twelve months have at least 28 days."]
    with pytest.raises(ValueError, match="on_invalid must be"):
        D.load_preference_dataset(DATA / "edge_pairwise.jsonl", on_invalid="drop")


def test_reward_parsing():
    assert schema._parse_reward("7.5") == (7.5, None)
    assert schema._parse_reward("N/A") == (None, "missing_reward")
    assert schema._parse_reward(float("inf")) == (None, "nan_reward")
    assert schema._parse_reward("great") == (None, "unparseable_reward")
    assert schema._parse_reward(True) == (None, "unparseable_reward")


def test_records_roundtrip_and_validation():
    records = [D.RewardRecord(prompt=[user("q")], responses=["a", "b"], rewards=[1.0, 0.5], id="x", source="s")]
    ds = D.records_to_dataset(records)
    assert D.dataset_to_records(ds) == records
    D.validate_reward_dataset(ds)
    pairs = [D.PreferenceRecord(prompt=[user("q")], chosen="a", rejected="b", id="y")]
    assert D.dataset_to_records(D.records_to_dataset(pairs)) == pairs
    bad = D.records_to_dataset([D.RewardRecord(prompt=[user("q")], responses=["a", " "], rewards=[1.0, float("nan")])])
    with pytest.raises(ValueError, match="row 0 .*empty_response, nan_reward"):
        D.validate_reward_dataset(bad)
    with pytest.raises(ValueError, match="expected a canonical pairwise dataset"):
        D.validate_preference_dataset(ds)
    assert D.as_messages("hi") == [user("hi")]
    assert len(D.records_to_dataset([])) == 0


# --------------------------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------------------------

RNG_REWARDS = np.random.default_rng(123).permutation(40 * 4).reshape(40, 4).astype(float).tolist()  # no ties


def test_zephyr_pairs_deterministic_per_seed():
    ds = reward_ds(RNG_REWARDS)
    a = D.rewards_to_pairs(ds, "zephyr", seed=0)
    assert a.to_list() == D.rewards_to_pairs(ds, "zephyr", seed=0).to_list()
    assert len(a) == len(ds)
    for pair, rewards in zip(a, RNG_REWARDS):
        assert pair["score_chosen"] == max(rewards) and pair["score_rejected"] < max(rewards)
        assert pair["chosen"] == f"y{int(np.argmax(rewards))}"
    b = D.rewards_to_pairs(ds, "zephyr", seed=1)
    assert a["rejected"] != b["rejected"]  # 40 draws of 1-in-3: equal under two seeds with prob. (1/3)^40


def test_best_vs_rest_and_all_pairs_counts():
    ds = reward_ds(RNG_REWARDS)
    best = D.rewards_to_pairs(ds, "best_vs_rest")
    assert len(best) == len(ds) * (4 - 1)
    assert all(p["score_chosen"] > p["score_rejected"] for p in best)
    every = D.rewards_to_pairs(ds, "all_pairs")
    assert len(every) == len(ds) * math.comb(4, 2)
    uneven = [[3.0, 1.0, 2.0], [5.0, 5.0, 1.0, 0.0, 5.0], [2.0, 2.0], [1.0, 4.0]]
    strict = sum(a > b for r in uneven for a, b in itertools.permutations(r, 2))
    assert len(D.rewards_to_pairs(reward_ds(uneven), "all_pairs")) == strict == 3 + 7 + 0 + 1


def test_ties_are_skipped_and_counted():
    ds = D.load_reward_dataset(DATA / "edge_reward_layout.jsonl", on_invalid="skip")
    ids = ds["id"]
    assert ids[0] == "all-tied" and ids[4] == "tied-best"
    for strategy, n_tied_best in (("zephyr", 1), ("best_vs_rest", 2), ("all_pairs", 5)):
        pairs, report = D.rewards_to_pairs(ds.select([0, 4]), strategy, return_report=True)
        assert report.skipped["all_tied"] == 1
        assert report.skipped["tied_pairs"] == 1  # Pacific = Atlantic = 9.0
        assert len(pairs) == n_tied_best
        assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)
        assert all(p["id"].startswith("tied-best:") for p in pairs)
    zephyr = D.rewards_to_pairs(ds.select([4]), "zephyr")
    assert zephyr[0]["chosen"] == "Pacific."  # the first of the tied best responses


def test_pairs_to_rewards():
    pairs = D.load_preference_dataset(DATA / "ultrafeedback_binarized.jsonl")
    assert D.pairs_to_rewards(pairs)["rewards"] == [[9.0, 5.0], [9.5, 1.0], [9.5, 6.0]]
    assert D.pairs_to_rewards(pairs, rewards="binary")["rewards"] == [[1.0, 0.0]] * 3
    unscored = D.load_preference_dataset(DATA / "trl_explicit.jsonl")
    assert D.pairs_to_rewards(unscored)["rewards"] == [[1.0, 0.0]] * 2
    with pytest.raises(ValueError, match="rewards='scores'"):
        D.pairs_to_rewards(unscored, rewards="scores")
    tied = pairs.map(lambda r: {"score_rejected": r["score_chosen"]})
    _, report = D.pairs_to_rewards(tied, return_report=True)
    assert report.notes["tied_scores"] == 3


def test_subsample_responses_keeps_the_best():
    ds = reward_ds(RNG_REWARDS + [[1.0, 2.0]])
    for k in (2, 3):
        sub, report = D.subsample_responses(ds, k, seed=7, return_report=True)
        assert [len(r) for r in sub["rewards"]] == [k] * 40 + [2]
        for full, kept in zip(ds, sub):
            assert max(kept["rewards"]) == max(full["rewards"])
            idx = [full["responses"].index(y) for y in kept["responses"]]
            assert idx == sorted(idx) and [full["rewards"][i] for i in idx] == kept["rewards"]
        assert report.notes["fewer_than_k"] == (1 if k == 3 else 0)
        assert sub.to_list() == D.subsample_responses(ds, k, seed=7).to_list()
    assert D.subsample_responses(ds, 2, seed=0)["responses"] != D.subsample_responses(ds, 2, seed=1)["responses"]
    with pytest.raises(ValueError, match="k must be"):
        D.subsample_responses(ds, 1)


def test_preference_loader_converts_reward_layouts():
    pairs, report = D.load_preference_dataset(DATA / "ultrafeedback_reward_layout.jsonl", strategy="best_vs_rest",
                                              return_report=True)
    assert len(pairs) == 3 * 3 and report.layout == "nca_reward -> pairs:best_vs_rest"
    assert pairs[0]["chosen"] == "Crimson maple sheds / a slow rain of paper hands / wind keeps none of them"


# --------------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------------


def test_summarize_reward_and_pairs():
    ds = D.load_reward_dataset(DATA / "ultrafeedback_raw.jsonl")
    s = D.summarize(ds)
    flat = [c["overall_score"] for row in rows_of("ultrafeedback_raw.jsonl") for c in row["completions"]]
    assert (s["n_prompts"], s["n_responses"], s["k_counts"]) == (3, 11, {3: 1, 4: 2})
    assert s["reward_mean"] == pytest.approx(np.mean(flat)) and s["reward_std"] == pytest.approx(np.std(flat))
    assert s["frac_strict_best"] == 1.0 and s["frac_all_tied"] == 0.0
    assert s["best_gap_mean"] == pytest.approx(np.mean([9.0 - 8.0, 9.5 - 7.0, 9.5 - 6.0]))
    edge = D.summarize(D.load_reward_dataset(DATA / "edge_reward_layout.jsonl", on_invalid="skip"))
    assert edge["frac_strict_best"] == pytest.approx(3 / 5) and edge["frac_all_tied"] == pytest.approx(1 / 5)
    p = D.summarize(D.load_preference_dataset(DATA / "ultrafeedback_binarized.jsonl"))
    assert (p["n_pairs"], p["frac_scored"], p["frac_identical"]) == (3, 1.0, 0.0)
    assert p["score_gap_mean"] == pytest.approx(np.mean([4.0, 8.5, 3.5]))


# --------------------------------------------------------------------------------------------------------------------
# Real data: Anthropic HH-RLHF harmless-base test split (skipped when the shared file is absent)
# --------------------------------------------------------------------------------------------------------------------

HH_PATH = D.hh_rlhf_local_path("test", "harmless-base")


@pytest.mark.skipif(HH_PATH is None or not HH_PATH.exists(), reason="HH-RLHF harmless-base test file not available")
def test_hh_rlhf_harmless_base_test():
    with gzip.open(HH_PATH, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    assert len(raw) == 2312
    assert all(r["chosen"] != r["rejected"] for r in raw)

    # Four rows have an empty chosen reply: an error by default, counted when skipped.
    with pytest.raises(D.InvalidRecordError) as err:
        D.load_hh_rlhf()
    assert err.value.reason == "empty_response"
    ds, report = D.load_hh_rlhf(on_invalid="skip", return_report=True)
    assert (report.rows_in, report.rows_out) == (2312, 2308)
    assert report.skipped == {"empty_response": 4}
    assert report.examples["empty_response"] == ["86.chosen", "516.chosen", "925.chosen", "1103.chosen"]
    empty = [i for i, r in enumerate(raw) if r["chosen"].rsplit("\n\nAssistant:", 1)[1].strip() == ""]
    assert empty == [86, 516, 925, 1103]
    # A few transcripts repeat "\n\nAssistant:" inside one reply; those turns are merged and counted.
    assert report.notes["merged_consecutive_turns"] == 9

    for row in ds:
        roles = [m["role"] for m in row["prompt"]]
        assert roles[-1] == "user"
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert row["chosen"].strip() and row["rejected"].strip()
    assert sum(c == r for c, r in zip(ds["chosen"], ds["rejected"])) == 0
    # the prompt plus each completion rebuilds the original transcript (up to whitespace and merged turns)
    first = raw[0]
    assert D.parse_hh_transcript(first["chosen"]) == ds[0]["prompt"] + [assistant(ds[0]["chosen"])]
    assert D.parse_hh_transcript(first["rejected"])[-1]["content"] == ds[0]["rejected"]
