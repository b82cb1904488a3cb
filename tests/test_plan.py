"""The memory planner (nca_kit.plan): weight bytes against the counted parameters and bitsandbytes' own NF4 storage,
activation bytes against the tensors autograd saves on tiny Mistrals, the batch choice, the command line, and the GPU
check's CPU path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nca_kit import logps
from nca_kit import plan as P
from nca_kit.models import can_quantize_4bit, tiny_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
QLORA_OK, QLORA_WHY = can_quantize_4bit("cpu")
needs_4bit = pytest.mark.skipif(not QLORA_OK, reason=f"4-bit NF4 cannot run on this CPU: {QLORA_WHY}")

TINY = P.ModelShape(hidden_size=64, intermediate_size=224, num_layers=2, num_heads=4, num_kv_heads=2,
                    vocab_size=384, name="tiny-2-layer")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return P.save_random_model(TINY, tmp_path_factory.mktemp("tiny-mistral"))


def test_weight_bytes_equal_the_counted_parameter_bytes():
    model = tiny_model("mistral")  # float32, untied embeddings
    shape = P.model_shape(model.config)
    counted = sum(p.numel() * p.element_size() for p in model.parameters())
    counted += sum(b.numel() * b.element_size() for b in model.buffers())
    assert P.weight_bytes(shape, "full", weight_dtype_bytes=4)["total"] == counted
    assert shape.parameters() == sum(p.numel() for p in model.parameters())


@needs_4bit
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_bytes_equal_bitsandbytes_storage(double_quant):
    """One Linear4bit layer as bitsandbytes stores it (packed weight + every quant-state tensor) = nf4_bytes."""
    import bitsandbytes as bnb

    out_features, in_features = 224, 64  # 14336 weights: 224 blocks of 64, not a multiple of 256 blocks
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features), requires_grad=False,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     quant_storage=torch.bfloat16)._quantize("cpu")
    assert P.quantized_weight_bytes(layer)["total"] == P.nf4_bytes(out_features * in_features,
                                                                   double_quant=double_quant)
    # 4 bits a weight plus the block scales: fp32 per 64 weights, or 8 bits per 64 plus fp32 per 256 blocks
    bits = 8 * P.nf4_bytes(2**24, double_quant=double_quant) / 2**24
    assert bits == pytest.approx(4.5 if not double_quant else 4.127, abs=0.001)


@needs_4bit
def test_nf4_bytes_of_a_quantized_tiny_model(tiny_folder):
    model = P.load_for_step(tiny_folder, mode="qlora", gradient_checkpointing=False, compute_dtype="float32")
    stored = P.quantized_weight_bytes(model)
    assert stored["layers"] == 7 * TINY.num_layers
    predicted = P.weight_bytes(TINY, "qlora")
    assert stored["total"] == predicted["projections"]
    counted = P.count_state_bytes(model)
    assert counted["weights"] == predicted["total"]
    assert counted["adapter"] == P._trainable(TINY, "qlora", 16, P.PROJECTIONS, 2)["adapter"]


def _measure(folder, *, mode, checkpointing, attention, compute_dtype, monkeypatch, chunked):
    model = P.load_for_step(folder, mode=mode, gradient_checkpointing=checkpointing, attention=attention,
                            compute_dtype=compute_dtype)
    batch = P.synthetic_batch(prompts=2, k=2, length=40, prompt_length=8, vocab_size=TINY.vocab_size,
                              pad_token_id=3)
    targets = int(batch["loss_mask"][:, 1:].sum())
    chunk_elements = 16 * TINY.vocab_size if chunked else logps.HEAD_CHUNK_ELEMENTS  # chunks of 16 positions
    monkeypatch.setattr(logps, "HEAD_CHUNK_ELEMENTS", chunk_elements)
    measured = P.measure_saved_bytes(model, lambda: logps.sequence_logps(model, batch, forward="padded"))
    measured["output"].sum().backward()  # the graph that was measured is a working one
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    predicted = P.activation_bytes(TINY, rows=4, length=40, targets=targets, mode=mode,
                                   gradient_checkpointing=checkpointing, attention=attention, device="cpu",
                                   compute_bytes=2 if compute_dtype == "bfloat16" else 4,
                                   head_chunk_elements=chunk_elements)
    return predicted["total"], measured["total"]


@needs_4bit
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_activation_prediction_matches_saved_tensors_qlora(tiny_folder, monkeypatch, checkpointing, attention):
    """bf16 autocast as on a GPU, the chunked head as in a real batch: within 10 %."""
    predicted, measured = _measure(tiny_folder, mode="qlora", checkpointing=checkpointing, attention=attention,
                                   compute_dtype="bfloat16", monkeypatch=monkeypatch, chunked=True)
    assert predicted == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("mode,compute_dtype,chunked", [("lora", "bfloat16", False), ("qlora", "float32", True)])
def test_activation_prediction_other_settings(tiny_folder, monkeypatch, mode, compute_dtype, chunked):
    if mode == "qlora" and not QLORA_OK:
        pytest.skip(QLORA_WHY)
    predicted, measured = _measure(tiny_folder, mode=mode, checkpointing=False, attention="sdpa",
                                   compute_dtype=compute_dtype, monkeypatch=monkeypatch, chunked=chunked)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_checkpointing_keeps_far_less_than_the_full_forward():
    shape = P.model_shape("mistral-7b-sft-beta")
    on = P.activation_bytes(shape, rows=4, length=1024, gradient_checkpointing=True)
    off = P.activation_bytes(shape, rows=4, length=1024, gradient_checkpointing=False)
    assert on["per_layer"] == 4 * shape.hidden_size * 4 * 1024  # fp32 layer input under QLoRA
    assert off["total"] > 10 * on["total"]
    eager = P.activation_bytes(shape, rows=4, length=1024, gradient_checkpointing=False, attention="eager")
    assert eager["total"] > off["total"]  # the T x T softmax


def test_largest_batch_divides_the_recipe_batch():
    assert P.largest_batch(lambda b: 10 * b, 45, batch_size=32) == 4
    assert P.largest_batch(lambda b: 10 * b, 79, batch_size=32) == 4  # 5..7 fit but do not divide 32
    assert P.largest_batch(lambda b: 10 * b, 80, batch_size=32) == 8
    assert P.largest_batch(lambda b: 10 * b, 45, batch_size=32, num_processes=2) == 4
    assert P.largest_batch(lambda b: 10 * b, 5, batch_size=32) is None
    with pytest.raises(ValueError, match="num_processes"):
        P.largest_batch(lambda b: b, 1, batch_size=32, num_processes=3)


def test_plan_for_the_paper_recipe():
    small = P.plan("HuggingFaceH4/mistral-7b-sft-beta", gpu_memory_gib=24)
    big = P.plan("mistral-7b-sft-beta", gpu_memory_gib=139.8)
    assert small.model == big.model == "mistral-7b-sft-beta"
    assert big.largest_batch >= small.largest_batch >= 1
    assert big.largest_batch * big.gradient_accumulation == 32
    assert big.peak == (big.weights + big.adapter + big.gradients + big.optimizer + big.activations
                        + big.backward_working)
    assert P.plan("mistral-7b-sft-beta", gpu_memory_gib=4).largest_batch is None  # 4.3 GiB of weights alone
    full = P.plan("mistral-7b-sft-beta", mode="full")
    assert full.optimizer == 2 * full.gradients + 4 * (9 * 32 + 3)  # bf16 AdamW states, step counters
    with pytest.raises(ValueError, match="per_device_batch_size"):
        P.plan("mistral-7b-sft-beta", per_device_batch_size=0)


def test_model_shape_sources(tmp_path):
    config = tiny_model("mistral").config
    folder = tmp_path / "model"
    folder.mkdir()
    config.save_pretrained(folder)
    from_folder = P.model_shape(folder)
    from_file = P.model_shape(folder / "config.json")
    assert from_folder.hidden_size == from_file.hidden_size == config.hidden_size
    assert from_folder.num_kv_heads == config.num_key_value_heads
    assert P.model_shape("tiny-mistral").num_layers == 2
    with pytest.raises(FileNotFoundError):
        P.model_shape(tmp_path / "missing")


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "nca_kit.plan", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_cli_prints_the_plan_and_refuses_unknown_models():
    result = _cli("--model", "mistral-7b-sft-beta", "--gpu-memory-gib", "79.2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["largest_batch"] * summary["gradient_accumulation"] == 32
    assert summary["peak_gib"] > summary["weights_gib"] > 4
    table = _cli("--gradient-checkpointing", "off", "--gpu-memory-gib", "139.8")
    assert table.returncode == 0 and "largest per-device batch" in table.stdout
    missing = _cli("--model", "no-such-org/no-such-model")
    assert missing.returncode == 2
    assert "local Hugging Face cache" in missing.stderr and "mistral-7b-sft-beta" in missing.stderr


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """scripts/gpu_check.sh -> bench/gpu_check.py on CPU at a tiny shape: the GPU script's code path runs (the layout
    check under sdpa only: compiling flex attention takes minutes on CPU; tests/test_packing.py checks it)."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path), "--dry-run",
                             "--layout-attention", "sdpa"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["device"] == "cpu" and record["shape"]["layers"] == 1
    assert record["nf4_measured"] == record["nf4_predicted"]
    layouts = {entry["layout"]: entry for entry in record["layout_equality"]}
    assert set(layouts) == {"padded", "packed", "tree", "shared_prompt"}
    for entry in layouts.values():  # sums over up to 90 tokens in fp32: a few 1e-5 of rounding, no more
        assert entry["max_logp_diff"] < 1e-4 and entry["max_grad_diff"] < 1e-4, entry
    steps = [entry for entry in record["settings"] if "predicted" in entry]
    assert {entry["gradient_checkpointing"] for entry in steps} == {True, False}
    for entry in steps:
        assert entry["step_s"] > 0 and entry["loss"] == entry["loss"]  # ran, finite
        assert entry["predicted"]["activations"] == pytest.approx(entry["activations_measured"], rel=0.10)
