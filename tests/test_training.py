"""Training engine on the tiny model: every loss trains, cached == per-step reference, resume == uninterrupted,
logged metrics mean what they say, config parsing."""

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from nca_kit.training import NCATrainer, TrainConfig, batch_metrics, prepare_data, read_metrics, train

from conftest import msgs

FIXTURES = Path(__file__).parent / "fixtures"


pytestmark = pytest.mark.usefixtures("one_thread")


def reward_rows(n=4):
    topics = ["the sea", "autumn", "a cat", "the moon", "coffee", "rain", "a river", "books"]
    return [{"prompt": msgs(f"Write a short poem about {t}."),
             "responses": [f"A calm poem about {t}: bright and kind.", f"{t} is fine.", "No."][: 3 if i % 2 else 2],
             "rewards": [8.0, 5.0, 1.0][: 3 if i % 2 else 2]}
            for i, t in enumerate(topics[:n])]


def pair_rows(n=4):
    return [{"prompt": msgs(f"What is {i} plus {i}?"), "chosen": f"{i} plus {i} is {2 * i}.",
             "rejected": f"It is {2 * i + 1}."} for i in range(n)]


def tiny_config(tmp_path, **overrides):
    """4 prompts in one batch: every step sees the same batch, so the loss must fall from step to step."""
    values = dict(model_name="tiny-mistral", dataset="<in memory>", dataset_layout=None, output_dir=str(tmp_path),
                  batch_size=4, per_device_batch_size=4, learning_rate=2e-2, beta=0.1, alpha=0.5, max_steps=2,
                  warmup_ratio=0.0, lr_scheduler_type="constant", lora_dropout=0.0, max_prompt_length=64,
                  max_length=128, disable_tqdm=True, seed=0, save_figure=False)
    values.update(overrides)
    return TrainConfig(**values)


def run(tmp_path, rows, **overrides):
    return train(tiny_config(tmp_path, **overrides), dataset=datasets.Dataset.from_list(rows))


# ------------------------------------------------------------------------------------------------------------------
# every loss trains
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["infonca", "nca", "dpo_best_vs_rest", "dpo_all_pairs"])
def test_two_steps_reward_losses(tmp_path, loss_type):
    result = run(tmp_path, reward_rows(), loss_type=loss_type)
    losses = result.losses
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[1] < losses[0]
    first = result.metrics[0]
    assert first["rewards/A0"] == 0.0 and first["kl"] == 0.0  # step 0: policy == reference
    if loss_type == "infonca":
        # K = 2 and 3 at r_theta = 0: InfoNCA = cross-entropy with a uniform softmax = mean log K
        assert losses[0] == pytest.approx((math.log(2) + math.log(3)) / 2, abs=1e-5)
    if loss_type == "nca":
        assert losses[0] == pytest.approx(2 * math.log(2), abs=1e-5)  # labels and 1/K each sum to 1


@pytest.mark.parametrize("loss_type", ["dpo", "nca", "ipo", "infonca"])
def test_two_steps_pairwise_losses(tmp_path, loss_type):
    result = run(tmp_path, pair_rows(), loss_type=loss_type)
    losses = result.losses
    assert len(losses) == 2 and losses[1] < losses[0]
    assert set(k for k in result.metrics[0] if k.startswith("rewards/A")) == {"rewards/A0", "rewards/A1"}


def test_pairwise_infonca_equals_reward_infonca_on_binary_pairs(tmp_path):
    """Pairs as K = 2 reward rows with rewards (1, 0) and alpha -> 0 train exactly like DPO."""
    as_pairs = run(tmp_path / "a", pair_rows(), loss_type="dpo", max_steps=3)
    as_rewards = run(tmp_path / "b", [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]],
                                       "rewards": [1.0, 0.0]} for r in pair_rows()],
                     loss_type="infonca", alpha=1e-6, max_steps=3)
    assert as_pairs.losses == pytest.approx(as_rewards.losses, abs=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# reference modes, resume
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["nca", "infonca"])
def test_cached_reference_equals_per_step_reference(tmp_path, loss_type):
    cached = run(tmp_path / "cached", reward_rows(8), loss_type=loss_type, max_steps=4, reference="cached")
    per_step = run(tmp_path / "per_step", reward_rows(8), loss_type=loss_type, max_steps=4, reference="per_step")
    assert len(cached.losses) == 4
    assert cached.losses == pytest.approx(per_step.losses, abs=1e-5)
    for a, b in zip(cached.metrics, per_step.metrics):
        assert a["logps/chosen_delta"] == pytest.approx(b["logps/chosen_delta"], abs=1e-4)


def test_per_step_reference_without_lora_uses_a_frozen_copy(tmp_path):
    cached = run(tmp_path / "c", reward_rows(), use_lora=False, learning_rate=1e-3, max_steps=3)
    per_step = run(tmp_path / "p", reward_rows(), use_lora=False, learning_rate=1e-3, max_steps=3,
                   reference="per_step")
    assert cached.losses == pytest.approx(per_step.losses, abs=1e-5)
    assert cached.losses[-1] < cached.losses[0]


def test_resume_from_middle_checkpoint_equals_uninterrupted_run(tmp_path):
    rows = reward_rows(8)
    settings = dict(per_device_batch_size=2, batch_size=2, max_steps=6, save_steps=3, save_total_limit=None,
                    lora_dropout=0.1, group_by_length=True, loss_type="nca")
    full = run(tmp_path / "full", rows, **settings)
    assert len(full.losses) == 6
    # an "interrupted" run: its folder holds checkpoint-3 and the metrics logged up to step 4
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", interrupted / "checkpoint-3")
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (interrupted / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= 4) + "\n")
    resumed = run(interrupted, rows, resume_from_checkpoint="latest", **settings)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4, 5, 6]  # steps after the checkpoint re-logged once
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert full.losses[3:] != pytest.approx(full.losses[:3], abs=1e-3)  # the later steps are different batches


# ------------------------------------------------------------------------------------------------------------------
# outputs and metrics
# ------------------------------------------------------------------------------------------------------------------


def test_output_folder_and_metric_meanings(tmp_path):
    result = run(tmp_path, reward_rows(), loss_type="nca", max_steps=3, beta=0.1, save_figure=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "config.yaml", "trends.png"):
        assert (tmp_path / name).exists(), name
    assert TrainConfig.from_yaml(tmp_path / "config.yaml") == result.config
    assert read_metrics(tmp_path) and [m["step"] for m in result.metrics] == [1, 2, 3]
    for m in result.metrics:
        assert m["logps/chosen_delta"] == pytest.approx(m["rewards/chosen"] / 0.1, rel=1e-4, abs=1e-5)
        assert 0.0 <= m["rewards/accuracy"] <= 1.0
        assert m["rewards/chosen"] == pytest.approx(m["rewards/A0"])
    assert result.metrics[-1]["rewards/margin"] > 0  # NCA separates the best response from the rest


def test_batch_metrics_on_handmade_tensors():
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]])
    reference = torch.tensor([[-1.5, -1.0, -3.0], [-4.0, -6.0, 0.0]])
    model_rewards = 0.1 * (policy - reference)  # [[0.05, -0.1, 0], [0, 0.1, 0]]
    rewards = torch.tensor([[1.0, 3.0, 2.0], [0.0, 1.0, 0.0]])  # best: slot 1, then 2, then 0 | slot 1, then 0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    sums = batch_metrics(policy, reference, model_rewards, rewards, mask)
    m = {k: float(total) / float(count) for k, (total, count) in sums.items()}
    assert m["rewards/A0"] == pytest.approx((-0.1 + 0.1) / 2)
    assert m["rewards/A1"] == pytest.approx((0.0 + 0.0) / 2)
    assert m["rewards/A2"] == pytest.approx(0.05)  # only the first prompt has a third response
    assert m["logps/chosen"] == pytest.approx((-2.0 + -5.0) / 2)
    assert m["logps/rejected"] == pytest.approx((-1.0 + -4.0) / 2)
    assert m["logps/chosen_delta"] == pytest.approx((-1.0 + 1.0) / 2)
    assert m["rewards/accuracy"] == pytest.approx(0.5)  # prompt 2 yes (0.1 > 0), prompt 1 no
    assert m["rewards/margin"] == pytest.approx(((-0.1 - 0.025) + 0.1) / 2)
    assert m["kl"] == pytest.approx(((0.5 - 1.0 + 0.0) / 3 + (0.0 + 1.0) / 2) / 2)


# ------------------------------------------------------------------------------------------------------------------
# config and errors
# ------------------------------------------------------------------------------------------------------------------


def test_defaults_are_appendix_c():
    c = TrainConfig()
    assert (c.beta, c.alpha, c.learning_rate, c.num_train_epochs, c.batch_size) == (0.01, 0.01, 5e-6, 1.0, 32)
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (16, 16, 0.05)
    assert c.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (c.optim, c.lr_scheduler_type, c.warmup_ratio) == ("adamw_torch", "cosine", 0.1)
    assert (c.max_prompt_length, c.max_length) == (512, 1024)


def test_overrides_are_coerced_and_unknown_keys_listed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss_type: infonca\nlearning_rate: 1.0e-5\n")
    c = TrainConfig.from_yaml(path, {"lora.r": "8", "bf16": "false", "max_train_samples": "none",
                                     "lora_target_modules": "q_proj,v_proj", "beta": "0.1", "save_steps": "10"})
    assert (c.loss_type, c.learning_rate, c.lora_r, c.bf16, c.beta) == ("infonca", 1e-5, 8, False, 0.1)
    assert c.max_train_samples is None and c.lora_target_modules == ("q_proj", "v_proj") and c.save_steps == 10
    with pytest.raises(KeyError, match="unknown config key 'lora_rank'.*valid keys:.*lora_r"):
        TrainConfig.from_yaml(path, {"lora_rank": "8"})
    with pytest.raises(ValueError, match="lora_r expects an integer"):
        TrainConfig.from_dict({"lora_r": "eight"})
    with pytest.raises(ValueError, match="loss_type must be one of"):
        TrainConfig(loss_type="ppo")


def test_loss_that_does_not_fit_the_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not apply to reward data.*dpo_best_vs_rest"):
        run(tmp_path, reward_rows(), loss_type="dpo")
    with pytest.raises(ValueError, match="does not apply to pairwise data"):
        run(tmp_path, pair_rows(), loss_type="dpo_all_pairs")


def test_batch_size_must_split_evenly(tmp_path):
    with pytest.raises(ValueError, match="not a multiple"):
        run(tmp_path, reward_rows(), batch_size=6, per_device_batch_size=4)


def test_local_files_in_both_schemas():
    reward, kind = prepare_data(TrainConfig(dataset=str(FIXTURES / "tiny_reward.jsonl"), dataset_layout=None))
    assert kind == "reward" and len(reward) == 12
    pairs, kind = prepare_data(TrainConfig(dataset=str(FIXTURES / "tiny_pairwise.jsonl"), dataset_layout=None,
                                                    max_train_samples=3))
    assert kind == "pairwise" and len(pairs) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data(TrainConfig(dataset="no/such/file.jsonl", dataset_layout=None))


def test_trainer_requires_all_columns(tmp_path):
    from transformers import TrainingArguments

    from nca_kit.models import tiny_model

    args = TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        NCATrainer(model=tiny_model(), args=args)


def test_passed_plain_model_gets_lora_from_config(tmp_path):
    from nca_kit.models import tiny_model, tiny_tokenizer

    model = tiny_model("llama", seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(tiny_config(tmp_path, model_name="(passed in)"), model=model, tokenizer=tiny_tokenizer(),
                   dataset=datasets.Dataset.from_list(reward_rows()))
    assert hasattr(result.model, "disable_adapter") and result.losses[1] < result.losses[0]
    base = result.model.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name  # the base stays frozen


def test_passed_dataset_needs_a_known_schema(tmp_path):
    with pytest.raises(ValueError, match="neither the reward schema"):
        run(tmp_path, [{"prompt": msgs("hi"), "text": "hello"}])


def test_disable_tqdm_silences_every_progress_bar_and_restores_the_switches(tmp_path, capfd):
    import datasets
    from transformers.utils import logging as hf_logging

    run(tmp_path, reward_rows(), max_steps=1)
    err = capfd.readouterr().err
    assert "tokenize" not in err and "it/s" not in err and "%|" not in err, f"progress bars despite disable_tqdm:\n{err}"
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled(), "global switches not restored"
