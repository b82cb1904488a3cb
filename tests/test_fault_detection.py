"""Tests written to catch specific faults that once survived the whole suite (see tests/README.md):

* the sign of the KL estimate flipped in ``eval.kl_to_reference`` (checked against an independent computation and
  against a reference whose log-probs are known in closed form);
* ``train()`` not passing ``alpha`` to the trainer (a run where alpha changes the result);
* the reference log-probs ignoring ``average_logps`` (the trainer with ``average_logps=True`` against a hand
  computation, for the cached and the per-step reference).
"""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from nca_kit.eval import kl_to_reference
from nca_kit.models import tiny_model, tiny_tokenizer
from nca_kit.training import TrainConfig, train

from conftest import msgs


pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [msgs("What is two plus two?"), msgs("Name a colour.")]
RESPONSES = [["It is four.", "Five."], ["Blue is a colour.", "Red.", "I do not know."]]


def manual_logp(model, tokenizer, prompt, response) -> float:
    """log p(response | prompt), summed over the response tokens and the closing EOS, with a plain forward pass."""
    prompt_ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t+1
    targets = ids[0, 1:]
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1:].sum()), len(response_ids)


def test_kl_matches_an_independent_computation():
    tokenizer = tiny_tokenizer()
    policy, reference = tiny_model(seed=0).eval(), tiny_model(seed=1).eval()
    got = kl_to_reference(policy, tokenizer, PROMPTS, RESPONSES, reference_model=reference, progress=False)
    for p, rs, row in zip(PROMPTS, RESPONSES, got):
        assert len(row) == len(rs)
        for r, value in zip(rs, row):
            want = manual_logp(policy, tokenizer, p, r)[0] - manual_logp(reference, tokenizer, p, r)[0]
            assert value == pytest.approx(want, abs=1e-4), "kl_to_reference must be log pi - log mu"


def test_kl_against_a_uniform_reference_is_known_in_closed_form():
    """A reference with an all-zero output layer is uniform over the vocabulary: log mu(y|x) = -n log V exactly, so
    log pi - log mu = log pi + n log V, which is >= 0 on average over responses the policy likes and never below
    log pi."""
    tokenizer = tiny_tokenizer()
    policy, reference = tiny_model(seed=0).eval(), tiny_model(seed=1).eval()
    with torch.no_grad():
        reference.get_output_embeddings().weight.zero_()
    vocab = reference.get_output_embeddings().weight.shape[0]
    got = kl_to_reference(policy, tokenizer, PROMPTS, RESPONSES, reference_model=reference, progress=False)
    for p, rs, row in zip(PROMPTS, RESPONSES, got):
        for r, value in zip(rs, row):
            logp, n = manual_logp(policy, tokenizer, p, r)
            assert value == pytest.approx(logp + n * math.log(vocab), abs=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# training: alpha reaches the loss; average_logps reaches the reference
# ------------------------------------------------------------------------------------------------------------------


def close_rewards(n=4):
    """Reward gaps of 0.1-0.3: soft labels depend strongly on alpha in [0.05, 50]."""
    topics = ["the sea", "autumn", "a cat", "the moon"]
    return [{"prompt": msgs(f"Write a short poem about {t}."),
             "responses": [f"A calm poem about {t}.", f"{t} is fine.", "No."],
             "rewards": [1.0, 0.9, 0.6]} for t in topics[:n]]


def config(tmp_path, **overrides):
    values = dict(model_name="tiny-mistral", dataset="<in memory>", dataset_layout=None, output_dir=str(tmp_path),
                  batch_size=4, per_device_batch_size=4, learning_rate=5e-2, beta=0.5, alpha=0.5, max_steps=3,
                  warmup_ratio=0.0, lr_scheduler_type="constant", lora_dropout=0.0, max_prompt_length=64,
                  max_length=128, disable_tqdm=True, seed=0, save_figure=False, loss_type="nca")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("loss_type", ["infonca", "nca"])
def test_alpha_changes_the_training_result(tmp_path, loss_type):
    runs = {}
    for alpha in (0.05, 50.0):
        result = train(config(tmp_path / f"a{alpha}", alpha=alpha, loss_type=loss_type),
                       dataset=datasets.Dataset.from_list(close_rewards()))
        runs[alpha] = result
    sharp, flat = runs[0.05], runs[50.0]
    assert sharp.losses[0] == pytest.approx(flat.losses[0], abs=1e-6)  # at pi = mu the loss does not see alpha
    # ...but the gradient does: with alpha = 0.05 the best answer takes ~87 % of the label mass, with 50 a third.
    assert abs(sharp.losses[-1] - flat.losses[-1]) > 1e-3, "alpha must reach the loss (TrainConfig -> trainer)"
    if loss_type == "infonca":
        # InfoNCA is a K-way softmax: sharper labels widen the best-vs-worst implicit-reward margin (measured 1.74 vs
        # 0.27 at these settings). NCA's shared LoRA parameters make its direction less clear-cut at 3 steps.
        assert sharp.metrics[-1]["rewards/margin"] > flat.metrics[-1]["rewards/margin"] + 0.5


@pytest.mark.parametrize("reference", ["cached", "per_step"])
def test_average_logps_reaches_the_reference(tmp_path, reference):
    result = train(config(tmp_path, average_logps=True, reference=reference, max_steps=1),
                   dataset=datasets.Dataset.from_list(close_rewards()))
    first = result.metrics[0]
    # policy == reference at step 0: with both averaged, every implicit reward is 0 and NCA's loss is 2 ln 2.
    for i in range(3):
        assert first[f"rewards/A{i}"] == pytest.approx(0.0, abs=1e-6), "reference log-probs must be averaged too"
    assert result.losses[0] == pytest.approx(2 * math.log(2), abs=1e-5)
    if reference == "cached":
        # the cached log mu of every response equals a hand computation of its mean token log-prob
        data = result.trainer.train_dataset
        tokenizer, model = result.tokenizer, result.model
        rows = {tuple(tokenizer(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                                              tokenize=False), add_special_tokens=False)["input_ids"]): r
                for r in close_rewards()}
        with model.disable_adapter():
            for prompt_ids, cached in zip(data["prompt_input_ids"], data["reference_logps"]):
                row = rows[tuple(prompt_ids)]
                want = [manual_logp(model, tokenizer, row["prompt"], r) for r in row["responses"]]
                assert cached == pytest.approx([logp / n for logp, n in want], abs=1e-4)


# issue 24, item 6: rewards stay exact until the loss

def test_rewards_that_differ_only_in_float64_keep_their_order_in_the_loss():
    """1e8 and 1e8 + 1 tie in float32; with alpha = 0.01 their labels differ by a factor e^100. The collator keeps
    float64 and the soft labels are computed from it (on main: float32, a tie, labels 1/2 and 1/2)."""
    from nca_kit.logps import RewardCollator
    from nca_kit.losses import reward_loss, soft_labels

    feature = {"prompt_input_ids": [1, 2], "response_input_ids": [[3], [4]], "rewards": [1e8, 1e8 + 1]}
    batch = RewardCollator(0)([feature])
    assert batch["rewards"].dtype == torch.float64 and batch["rewards"][0, 1] - batch["rewards"][0, 0] == 1
    policy = torch.tensor([[-1.0, -2.0]])
    reference = torch.tensor([[-1.5, -1.5]])
    exact = torch.tensor([[0.0, 1.0]])  # softmax([0, 100]) to float32 precision
    assert torch.allclose(soft_labels(batch["rewards"], 0.01).float(), exact)
    for loss_type in ("nca", "infonca"):
        losses, _ = reward_loss(policy, reference, batch["rewards"], alpha=0.01, beta=0.1, loss_type=loss_type)
        want, _ = reward_loss(policy, reference, torch.tensor([[0.0, 1.0]], dtype=torch.float64), alpha=0.01,
                              beta=0.1, loss_type=loss_type)
        assert losses.dtype == torch.float32 and losses.item() == pytest.approx(want.item(), rel=1e-6)


def test_rewards_beyond_float32_train(tmp_path):
    """Rewards above float32's range are valid float64: the run trains (on main: a non-finite-rewards error two
    steps in, naming no row)."""
    rows = [{"prompt": msgs(f"Question {i}?"), "responses": [f"Answer {i}.", "No."], "rewards": [1e39, -1e39]}
            for i in range(4)]
    config = TrainConfig(model_name="tiny-mistral", dataset="<in memory>", dataset_layout=None,
                         output_dir=str(tmp_path), batch_size=4, per_device_batch_size=4, max_steps=2, beta=0.1,
                         alpha=0.5, warmup_ratio=0.0, max_prompt_length=32, max_length=64, disable_tqdm=True,
                         save_figure=False)
    result = train(config, dataset=datasets.Dataset.from_list(rows))
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
