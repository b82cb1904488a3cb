"""nca_kit.experiment: the spec's validation (one-line errors before anything loads), smoke sizes that train, the
reward-source registry, the method rows, and one whole run on a tiny random model."""

import json
import math
from pathlib import Path

import pytest
import torch

from nca_kit import experiment as xp
from nca_kit.experiment import Experiment, ExperimentSpec, flat_row, method_dataset, run_experiment
from nca_kit.rewards.sources import with_rewards

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "data" / "arith_smollm2-135m-instruct_k4_472b54c0acde.json"


# --------------------------------------------------------------------------------------------------------------------
# validation: every bad parameter is one line naming it, raised when the spec is built
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"k": 7}, r"^k must be an integer from 2 to 4 \(the dataset has data_k = 4 responses per prompt\), got 7$"),
    ({"k": 1}, r"^k must be an integer from 2 to 4"),
    ({"k": 3.0}, r"^k must be an integer, got 3.0$"),
    ({"steps": 0}, r"^steps must be an integer >= 1, got 0$"),
    ({"steps": 100}, r"^steps must be at most n_train / batch = 75 \(each of the n_train = 300 prompts is seen once"),
    ({"alpha": -0.1}, r"^alpha must be a finite number >= 0, got -0.1$"),
    ({"alpha": float("nan")}, r"^alpha must be a finite number >= 0"),
    ({"beta": 0.0}, r"^beta must be a finite number > 0, got 0.0$"),
    ({"beta": "0.1"}, r"^beta must be a number, got '0.1'$"),
    ({"lr": -1e-4}, r"^lr must be a finite number > 0"),
    ({"batch": 0}, r"^batch must be an integer >= 1, got 0$"),
    ({"n_eval": 101}, r"^n_eval must be at most n_test = 100, got 101$"),
    ({"method": "ppo"}, r"^method must be one of dpo, pair_nca, dpo_x3, dpo_all_pairs, infonca, nca, got 'ppo'$"),
    ({"reward_source": "learned"},
     r"^reward_source must be one of rubric, embedding_bt, embedding_clf, flr, direct, random, got 'learned'$"),
    ({"reward_source": "random", "reward_prompts": 300},
     r"^reward_prompts must be an integer from 1 to n_train - 1 = 299, got 300$"),
    ({"reward_source": "random", "reward_fit_prompts": 201},
     r"^reward_fit_prompts must be an integer from 1 to n_train - reward_prompts = 200 \(the prompts a reward model "),
    ({"reward_source": "flr", "steps": 40},
     r"^steps must be at most 25 for reward_source flr \(it scores only the reward_prompts = 100 policy prompts"),
    ({"data": "ultrafeedback"}, r"^data must be one of arith, got 'ultrafeedback'$"),
    ({"max_length": 128}, r"^max_length must be larger than max_prompt_length = 128, got 128$"),
    ({"warmup_ratio": 1.0}, r"^warmup_ratio must be a number in \[0, 1\), got 1.0$"),
    ({"device": "gpu"}, r"^device must be cpu, cuda, cuda:N or mps, got 'gpu'$"),
    ({"smoke": 1}, r"^smoke must be True or False, got 1$"),
])
def test_bad_settings_are_one_line_errors_naming_the_setting(change, message):
    with pytest.raises(ValueError, match=message) as info:
        ExperimentSpec(**change)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"^device must be cpu on this machine \(CUDA is not available\)"):
        ExperimentSpec(device="cuda")


def test_defaults_are_notebook_20s_and_name_the_run():
    spec = ExperimentSpec()
    assert (spec.method, spec.k, spec.alpha, spec.beta, spec.lr, spec.steps, spec.batch) == \
        ("nca", 4, 0.01, 0.1, 2e-4, 20, 4)
    assert spec.run_name == "nca_k4_s0" and spec.loss_type == "nca" and spec.k_trained == 4
    assert ExperimentSpec(method="dpo", seed=2).k_trained == 2
    assert spec.generation_settings().file_name() == COMMITTED.name  # the committed dataset is the default one
    config = spec.train_config(Path("x"))
    assert (config.max_prompt_length, config.max_length, config.learning_rate) == (128, 160, 2e-4)


def test_smoke_sizes_are_announced_and_make_a_real_update():
    spec, note = ExperimentSpec(steps=20, batch=4).smoke_sized()
    assert note == "smoke sizes: steps 20 -> 3, batch 4 -> 2, n_eval 100 -> 4" and spec.smoke
    # Warmup gives the first update a learning rate of 0, and step s logs before its own update: the last logged
    # step shows a moved policy only if some earlier update had a learning rate > 0.
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(spec.steps * spec.warmup_ratio),
                             num_training_steps=spec.steps)
    rates = []
    for _ in range(spec.steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert rates[0] == 0.0 and any(lr > 0 for lr in rates[:-1]), rates


# --------------------------------------------------------------------------------------------------------------------
# reward sources and method rows
# --------------------------------------------------------------------------------------------------------------------


def test_rubric_rescoring_reproduces_the_committed_rewards(tmp_path):
    run = Experiment(ExperimentSpec(), out=tmp_path, cache_dir=tmp_path / "cache")
    run.load_data()
    assert run.dataset.cache_hit and Path(run.dataset.path) == COMMITTED
    stored = json.loads(COMMITTED.read_text())["splits"]["train"]
    assert run.train_split["rewards"] == [row["rewards"] for row in stored]


def test_a_new_reward_source_is_one_function_and_one_registry_line(tmp_path, monkeypatch):
    def constant(dataset, settings):
        return with_rewards(dataset, [[1.0] * len(r) for r in dataset["responses"]])

    monkeypatch.setitem(xp.REWARD_SOURCES, "constant", constant)
    spec = ExperimentSpec(reward_source="constant")
    assert spec.run_name == "nca_k4_s0_constant"
    run = Experiment(spec, out=tmp_path, cache_dir=tmp_path / "cache")
    run.load_data()
    assert all(r == [1.0] * 4 for r in run.train_split["rewards"])


def test_method_rows_pairs_and_k_ablation(tmp_path):
    run = Experiment(ExperimentSpec(method="dpo", steps=10), out=tmp_path, cache_dir=tmp_path / "cache")
    run.load_data()
    rows = run.method_rows()
    assert len(rows) == 40 and {"chosen", "rejected"} <= set(rows.column_names)
    assert run.usable_rows == 300 - 31  # 31 of the 300 prompts have four tied rewards: no pair
    three, loss_type = method_dataset(run.train_split, "infonca", k=3, seed=0)
    assert loss_type == "infonca" and {len(r) for r in three["rewards"]} == {3}
    assert all(max(a) == max(b) for a, b in zip(three["rewards"], run.train_split["rewards"]))  # best always kept
    with pytest.raises(RuntimeError, match="run the steps in order"):
        Experiment(ExperimentSpec(), out=tmp_path).method_rows()


# --------------------------------------------------------------------------------------------------------------------
# one whole run on a tiny random model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # samples a dataset, evaluates twice and trains: ~20 s alone, a minute on a busy CPU
def test_a_smoke_run_on_a_tiny_model_trains_evaluates_and_records(tmp_path):
    spec, _ = ExperimentSpec(model="tiny-mistral", n_train=8, n_test=4, max_new_tokens=6, lr=1e-2, steps=4, batch=2,
                             n_eval=4, method="infonca", k=3).smoke_sized()
    record = run_experiment(spec, out=tmp_path / "out", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    run_dir = tmp_path / "out" / "tiny_runs" / "infonca_k3_s0"
    assert json.loads((run_dir / "results.json").read_text()) == record
    assert record["run"] == "infonca_k3_s0" and record["k"] == 3 and record["smoke"] is True
    assert record["spec"] == spec.to_dict() and record["train_rows"] == 6
    assert set(record["seconds"]) == {"data", "model", "base_eval", "train", "eval", "total"}
    assert all(Path(record["paths"][k]).exists() for k in ("results", "metrics", "config", "adapter"))
    assert record["base"]["kl"] == 0.0 and record["base"]["n_prompts"] == 4
    trend = record["trend"]
    assert trend["step"] == [1, 2, 3] and len(record["losses"]) == 3
    assert trend["chosen"][:2] == [0.0, 0.0]  # step 1 logs before any update, and warmup's update has lr 0
    assert abs(trend["chosen"][2]) > 1e-4  # step 2's update moved the policy
    row = flat_row(record)
    assert row["reward_source"] == "rubric" and row["chosen_delta_final"] == trend["chosen"][-1]


@pytest.mark.slow
def test_a_run_reruns_from_its_config_yaml(tmp_path):
    """config.yaml names the file of the exact rows trained on (train_data.jsonl in the run folder), so
    `python -m nca_kit.train --config <run>/config.yaml --output_dir <new>` repeats the training: same losses."""
    import subprocess
    import sys

    import yaml

    spec, _ = ExperimentSpec(model="tiny-mistral", n_train=8, n_test=4, max_new_tokens=6, lr=1e-2, steps=4, batch=2,
                             n_eval=4, method="infonca", k=3).smoke_sized()
    run_experiment(spec, out=tmp_path / "out", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    run_dir = tmp_path / "out" / "tiny_runs" / "infonca_k3_s0"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert Path(config["dataset"]) == run_dir / "train_data.jsonl" and Path(config["dataset"]).exists()
    rerun = subprocess.run([sys.executable, "-m", "nca_kit.train", "--config", str(run_dir / "config.yaml"),
                            "--output_dir", str(tmp_path / "rerun")], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    def losses(folder):
        return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    assert losses(tmp_path / "rerun") == losses(run_dir) and len(losses(run_dir)) == 3
