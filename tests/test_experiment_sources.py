"""nca_kit.experiment reward sources: each re-scores the committed arithmetic data, scores only the policy prompts,
is cached, measures itself against the rubric, and refuses bad input with one line (unknown source, an unfitted
reward model, a dataset without scores). Embeddings and the scoring model are replaced by small stand-ins here; the
real MiniLM / SmolLM2 scoring runs in notebook 12 and the grid."""

from __future__ import annotations

import numpy as np
import pytest

from nca_kit import experiment as xp
from nca_kit.experiment import Experiment, ExperimentSpec, check_scored, method_dataset, reward_quality
from nca_kit.rewards import embedding, heads
from nca_kit.rewards import sources as src

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train():
    run = Experiment(ExperimentSpec(), out="unused")
    run.load_data()
    return run.dataset["train"]


def features(prompts, responses, *args, **kwargs):
    """A stand-in embedder: the answer's length and whether it holds the right sum, from the text alone."""
    import re

    out = []
    for prompt, text in zip(prompts, responses):
        numbers = [int(n) for n in re.findall(r"-?\d+", prompt[0]["content"] if isinstance(prompt, list) else prompt)]
        found = re.findall(r"-?\d+", text)
        right = bool(found) and len(numbers) >= 2 and int(found[-1]) in (numbers[0] + numbers[1],
                                                                         numbers[0] - numbers[1])
        out.append([float(right), len(text.split()) / 10.0, float(len(found) == 1)])
    return np.asarray(out, dtype=np.float32)


def test_random_rewards_are_seeded_by_the_spec_and_cover_the_policy_prompts(train, tmp_path):
    spec = ExperimentSpec(reward_source="random", reward_prompts=100, reward_fit_prompts=200)
    a = src.random_rewards(train, spec.source_settings(tmp_path))
    b = src.random_rewards(train, spec.source_settings(tmp_path))
    c = src.random_rewards(train, ExperimentSpec(reward_source="random", reward_prompts=100,
                                                 seed=1).source_settings(tmp_path))
    assert len(a) == 100 and a["responses"] == train.select(range(100))["responses"]
    assert a["rewards"] == b["rewards"] and a["rewards"] != c["rewards"]
    assert all(0 <= r < 10 for row in a["rewards"] for r in row)


def test_reward_quality_is_one_for_the_rubric_and_zero_for_its_reverse(train):
    part = train.select(range(60))
    golden = src.rubric_rewards(part)
    same = reward_quality(golden, golden, alpha=0.01)
    assert same["accuracy"] == 1.0 and same["spearman"] == pytest.approx(1.0) and same["n_prompts"] == 60
    # integer rubric gaps over alpha = 0.01: the soft labels split evenly among the answers tied at the top
    assert same["top_label"] == pytest.approx(np.mean([1 / rs.count(max(rs)) for rs in golden["rewards"]]))
    reverse = golden.remove_columns("rewards").add_column("rewards", [[-r for r in rs] for rs in golden["rewards"]])
    assert reward_quality(reverse, golden)["accuracy"] == 0.0
    with pytest.raises(ValueError, match="^golden: the rows must be the scored rows"):
        reward_quality(golden, src.rubric_rewards(train.select(range(1, 61))))


def test_embedding_source_fits_on_the_last_prompts_scores_the_others_and_is_cached(train, tmp_path, monkeypatch):
    monkeypatch.setattr(embedding, "embed", features)
    spec = ExperimentSpec(reward_source="embedding_bt", reward_prompts=100, reward_fit_prompts=200, steps=10)
    scored = src.REWARD_SOURCES[spec.reward_source](train, spec.source_settings(tmp_path))
    assert len(scored) == 100 and scored["prompt"] == train.select(range(100))["prompt"]
    quality = reward_quality(scored, src.rubric_rewards(train.select(range(100))))
    assert quality["accuracy"] > 0.7, quality  # the stand-in features see correctness: the head learns it
    monkeypatch.setattr(embedding, "embed", lambda *a, **k: pytest.fail("a cached source embedded again"))
    assert src.REWARD_SOURCES[spec.reward_source](train, spec.source_settings(tmp_path))["rewards"] == scored["rewards"]


def test_a_whole_load_data_records_the_source_quality(train, tmp_path, monkeypatch):
    monkeypatch.setattr(embedding, "embed", features)
    spec = ExperimentSpec(reward_source="embedding_clf", reward_prompts=100, reward_fit_prompts=200, steps=10,
                          method="dpo")
    run = Experiment(spec, out=tmp_path, cache_dir=tmp_path / "cache")
    run.load_data()
    assert len(run.train_split) == 100 and run.reward_quality["n_prompts"] == 100
    assert 0.5 < run.reward_quality["accuracy"] <= 1.0
    assert len(run.method_rows()) == 40  # learned scores rarely tie: a pair from (nearly) every prompt


def test_followup_sources_load_the_model_once_then_read_the_cache(train, tmp_path, monkeypatch):
    from nca_kit import models

    loads = []

    def tiny(name, **kwargs):
        loads.append(name)
        return models.tiny_model(), models.tiny_tokenizer()

    monkeypatch.setattr(models, "load_model", tiny)
    for source in ("flr", "direct"):
        spec = ExperimentSpec(reward_source=source, reward_prompts=3, steps=1, batch=2)
        first = src.REWARD_SOURCES[source](train, spec.source_settings(tmp_path))
        assert len(first) == 3 and all(np.isfinite(r) for row in first["rewards"] for r in row)
        again = src.REWARD_SOURCES[source](train, spec.source_settings(tmp_path))
        assert again["rewards"] == first["rewards"]
    assert loads == ["smollm2-135m-instruct"] * 2  # once per source: the second call read the cached rewards
    flr_spec = ExperimentSpec(reward_source="flr", reward_prompts=3, steps=1, batch=2)
    assert first["rewards"] != src.REWARD_SOURCES["flr"](train, flr_spec.source_settings(tmp_path))["rewards"]  # differ


# --------------------------------------------------------------------------------------------------------------------
# bad input: one line each
# --------------------------------------------------------------------------------------------------------------------


def test_an_unknown_source_is_refused_by_the_spec():
    with pytest.raises(ValueError, match=r"^reward_source must be one of rubric, embedding_bt, .*, got 'gpt4'$"):
        ExperimentSpec(reward_source="gpt4")


def test_an_unfitted_reward_model_is_refused_before_embedding(train, monkeypatch):
    monkeypatch.setattr(embedding, "embed", lambda *a, **k: pytest.fail("embedded for an unfitted head"))
    unfitted = embedding.EmbeddingRewardModel(heads.make_head("bt_mlp"), name="minilm_bt_mlp")
    with pytest.raises(ValueError, match=r"^reward model minilm_bt_mlp is not fitted") as info:
        embedding.learned_rewards(unfitted, train.select(range(2)))
    assert "\n" not in str(info.value)


def test_a_source_that_cannot_be_fitted_says_why(train, tmp_path, monkeypatch):
    monkeypatch.setattr(embedding, "embed", features)
    tied = [i for i, rs in enumerate(train["rewards"]) if len(set(rs)) == 1]  # prompts with four equal rewards
    data = train.select(list(range(10)) + tied[:3])
    spec = ExperimentSpec(reward_source="embedding_bt", n_train=13, reward_prompts=10, reward_fit_prompts=3, steps=2,
                          batch=2)
    with pytest.raises(ValueError, match=r"^reward_source embedding_bt could not be fitted on the last "
                                         r"reward_fit_prompts = 3 training prompts: rewards: no prompt") as info:
        src.REWARD_SOURCES[spec.reward_source](data, spec.source_settings(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("rewards, message", [
    (None, r"^train: no 'rewards' column; score the responses with a reward source first$"),
    ([[1.0, 2.0]], r"^train: row 0 has 4 responses but rewards \[1.0, 2.0\]; score the responses"),
    ([[1.0, float("nan"), 0.0, 0.0]], r"^train: row 0 has 4 responses but rewards \[1.0, nan, 0.0, 0.0\]"),
])
def test_a_dataset_without_scores_is_refused(train, rewards, message):
    part = train.select(range(1)).remove_columns("rewards")
    if rewards is not None:
        part = part.add_column("rewards", rewards)
    with pytest.raises(ValueError, match=message):
        method_dataset(part, "nca")
    with pytest.raises(ValueError, match=message.replace("train:", "scored:")):
        check_scored(part, "scored")


def test_a_grid_loads_the_base_model_once_and_gives_each_run_fresh_adapters(train, monkeypatch):
    import torch

    from nca_kit import models

    loads = []

    def tiny(name, **kwargs):
        loads.append(kwargs.get("lora"))
        return models.tiny_model(), models.tiny_tokenizer()

    monkeypatch.setattr(models, "load_model", tiny)
    monkeypatch.setattr(xp, "_BASE_MODELS", {})
    test = Experiment(ExperimentSpec(), out="unused")
    test.load_data()
    runs = []
    for seed in (0, 0, 1):
        run = Experiment(ExperimentSpec(seed=seed, n_eval=2), out="unused", reuse_model=True)
        run.test_split = test.test_split
        run.load_model()
        runs.append(run)
    assert loads == [None]  # one load of the bare base model for the three runs
    lora = [{k: v for k, v in r.model.state_dict().items() if "lora_A" in k} for r in runs]
    assert all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])  # same seed, same adapters
    assert not all(torch.equal(lora[0][k], lora[2][k]) for k in lora[0])
    base = xp._BASE_MODELS[("smollm2-135m-instruct", "cpu")][0]
    with torch.no_grad():
        runs[0].model.get_base_model().lm_head.weight.add_(1.0)  # what training one run's copy could do
    assert not torch.equal(base.lm_head.weight, runs[0].model.get_base_model().lm_head.weight)
    assert not any("lora" in k for k in base.state_dict())  # the kept base model is never wrapped
    assert runs[0].model is not runs[1].model and runs[0].tokenizer is not runs[1].tokenizer


def test_an_answer_repeated_within_a_prompt_gets_one_reward(train, tmp_path):
    spec = ExperimentSpec(reward_source="random", reward_prompts=100)
    scored = src.random_rewards(train, spec.source_settings(tmp_path))
    repeats = 0
    for ys, rs in zip(scored["responses"], scored["rewards"]):
        for y in set(ys):
            values = {r for t, r in zip(ys, rs) if t == y}
            assert len(values) == 1, (y, values)
            repeats += ys.count(y) > 1
    assert repeats > 0  # the committed data has such answers
    from nca_kit.data import validate_reward_dataset

    validate_reward_dataset(scored.select_columns(["prompt", "responses", "rewards"]))  # the training checks pass


def test_embedding_source_gives_a_repeated_answer_one_reward(train, tmp_path, monkeypatch):
    """Notebook 12's full mode (embedding_bt on the first 48 prompts, some with an answer sampled twice): a real
    embedder's output drifts a little with the batch a text lands in, so scoring each copy gave one text two
    rewards and the scorer's own validation stopped on duplicate_response before the experiment layer merged them."""

    def drifting(prompts, responses, *args, **kwargs):
        return features(prompts, responses) + 1e-6 * np.arange(len(responses), dtype=np.float32)[:, None]

    monkeypatch.setattr(embedding, "embed", drifting)
    spec = ExperimentSpec(reward_source="embedding_bt", reward_prompts=48, reward_fit_prompts=240, steps=8)
    scored = src.REWARD_SOURCES[spec.reward_source](train, spec.source_settings(tmp_path))
    repeats = 0
    for ys, rs in zip(scored["responses"], scored["rewards"]):
        for y in set(ys):
            assert len({r for t, r in zip(ys, rs) if t == y}) == 1, y
            repeats += ys.count(y) > 1
    assert repeats > 0, "the first 48 committed prompts hold repeated answers"
