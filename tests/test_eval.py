"""Held-out evaluation (nca_kit.eval) on a tiny random model, plus its bookkeeping on scripted responses."""

import copy

import pytest
import torch

import nca_kit.eval as ev
from nca_kit.models import LoraSettings
from nca_kit.tasks import make_prompts

from conftest import perturb_lora


def _lora(model, perturb: bool):
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraSettings(r=2, lora_alpha=2, lora_dropout=0.0).to_peft())
    if perturb:
        perturb_lora(peft_model, torch.Generator().manual_seed(0), scale=0.5)
    return peft_model


def test_evaluate_on_a_tiny_model(tiny):
    model, tokenizer = tiny
    problems = make_prompts(3, seed=0)
    result = ev.evaluate(model, tokenizer, problems, n_samples=2, max_new_tokens=4, batch_size=4, progress=False)
    assert result.n_prompts == 3 and result.n_samples == 2 and len(result.rows) == 3
    assert 0.0 <= result.greedy_accuracy <= 1.0 and 0.0 <= result.sample_reward <= 10.0
    assert result.kl == 0.0  # no adapters, no reference model: the policy is its own reference
    assert all(len(r["samples"]) == 2 == len(r["log_ratios"]) for r in result.rows)
    again = ev.evaluate(model, tokenizer, problems, n_samples=2, max_new_tokens=4, batch_size=4, progress=False)
    assert again.summary() == result.summary()
    assert set(result.summary()) == {"greedy_accuracy", "greedy_reward", "sample_reward", "sample_accuracy", "kl",
                                     "n_prompts", "n_samples", "temperature"}


def test_kl_is_zero_for_fresh_adapters_and_matches_an_explicit_reference(tiny):
    model, tokenizer = tiny
    prompts = [p.messages for p in make_prompts(2, seed=0)]
    responses = [["12", "7 + 5 = 12"], ["hello", "4"]]
    fresh = ev.kl_to_reference(_lora(model, perturb=False), tokenizer, prompts, responses, progress=False)
    assert fresh == [[pytest.approx(0.0, abs=1e-5)] * 2] * 2  # LoRA starts at B = 0: policy == reference
    moved = _lora(model, perturb=True)
    moved.train()
    via_adapters = ev.kl_to_reference(moved, tokenizer, prompts, responses, batch_size=1, progress=False)
    assert any(abs(x) > 1e-3 for row in via_adapters for x in row)
    merged = copy.deepcopy(moved).merge_and_unload()  # the same policy as a plain model ...
    explicit = ev.kl_to_reference(merged, tokenizer, prompts, responses, reference_model=model, progress=False)
    for a, b in zip(via_adapters, explicit):  # ... against the base as an explicit reference: same log-ratios
        assert a == pytest.approx(b, abs=1e-4)
    assert moved.training  # the caller's train mode is restored


def test_metrics_aggregate_scripted_responses(monkeypatch):
    problems = make_prompts(2, seed=0)  # answers are checked against the scripted texts below
    a0, a1 = problems[0].answer, problems[1].answer

    def scripted(model, tokenizer, prompts, *, k=1, greedy=False, **kwargs):
        if greedy:
            return [[str(a0)], ["no idea"]], [[False], [False]]
        return [[str(a0), str(a0 + 1)], [f"{a1 - 1} + 1 = {a1}", "x"]], [[False, False], [False, True]]

    monkeypatch.setattr(ev, "sample_responses", scripted)
    result = ev.evaluate(object(), None, problems, n_samples=2, progress=False)
    assert result.greedy_accuracy == 0.5
    assert result.greedy_reward == pytest.approx((10.0 + 0.0) / 2)
    assert result.sample_accuracy == 0.5
    assert result.sample_reward == pytest.approx((10.0 + 4.0 + 9.0 + 0.0) / 4)
    assert result.kl == 0.0


def test_problems_from_a_held_out_split():
    from datasets import Dataset

    problems = make_prompts(3, seed=2)
    ds = Dataset.from_list([{"prompt": p.messages, "answer": p.answer, "id": p.id, "kind": p.kind}
                            for p in problems])
    assert ev.problems_from(ds) == problems
    assert ev.problems_from(problems) is problems


def test_evaluate_cached_runs_once(tiny, tmp_path):
    model, tokenizer = tiny
    problems = make_prompts(2, seed=0)
    calls = []

    def load():
        calls.append(1)
        return model, tokenizer

    kwargs = dict(n_samples=1, max_new_tokens=3, batch_size=2, progress=False)
    first = ev.evaluate_cached(tmp_path, load, problems, tag="tiny", **kwargs)
    second = ev.evaluate_cached(tmp_path, load, problems, tag="tiny", **kwargs)
    assert len(calls) == 1 and not first.cache_hit and second.cache_hit
    assert second.summary() == first.summary() and second.rows == first.rows
    ev.evaluate_cached(tmp_path, load, problems, tag="tiny", **{**kwargs, "max_new_tokens": 2})
    ev.evaluate_cached(tmp_path, load, problems[:1], tag="tiny", **kwargs)
    entries = [p for p in tmp_path.glob("eval_tiny_*.json") if not p.name.endswith(".settings.json")]
    assert len(calls) == 3 and len(entries) == 3  # other settings: other files


def test_likelihood_trends_reads_trainer_metrics():
    metrics = [
        {"step": 0, "loss": 0.7},
        {"step": 1, "loss": 0.6, "logps/chosen_delta": 0.1, "logps/rejected_delta": -0.2},
        {"step": 2, "loss": 0.5, "logps/chosen_delta": -0.3, "logps/rejected_delta": -0.9},
    ]
    assert ev.likelihood_trends(metrics) == {"step": [1, 2], "chosen": [0.1, -0.3], "rejected": [-0.2, -0.9]}


def test_the_kl_pass_truncates_with_the_lengths_it_is_given(tiny):
    model, tokenizer = tiny
    problems = make_prompts(2, seed=0)  # chat prompts of ~30 tokens: a 16-token cap cuts them
    with pytest.warns(UserWarning, match="prompt\\(s\\) cut to their last 16 tokens"):
        ev.evaluate(_lora(model, perturb=False), tokenizer, problems, max_new_tokens=3, max_prompt_length=16,
                    max_length=24, progress=False)
