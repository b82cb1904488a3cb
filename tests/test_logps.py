"""Tokenization, truncation, K-response collation, selective-logits log-probs and the cached reference."""

import datasets
import pytest
import torch

from nca_kit.logps import (
    PromptTooLongError,
    RewardCollator,
    compute_reference_logps,
    reference_logps,
    sequence_logps,
    tokenize_reward_dataset,
    tokenize_reward_record,
)
from nca_kit.models import LoraSettings, tiny_model, tiny_tokenizer

from conftest import msgs, perturb_lora


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_model(arch="mistral", seed=0):
    """Tiny model with LoRA adapters whose B matrices are non-zero, so the adapters change the output."""
    from peft import get_peft_model

    model = get_peft_model(tiny_model(arch, seed=seed), LoraSettings(lora_dropout=0.0).to_peft())
    return perturb_lora(model, torch.Generator().manual_seed(seed))


def naive_logps(model, input_ids, prompt_len, average=False):
    """Reference implementation: one unpadded sequence, full logits, plain log_softmax."""
    logits = model(input_ids=input_ids[None]).logits[0]  # (T, V)
    logps = torch.log_softmax(logits.float(), dim=-1)[:-1].gather(-1, input_ids[1:, None])[:, 0]  # (T-1,)
    response = logps[prompt_len - 1:]
    return response.mean() if average else response.sum()


# ------------------------------------------------------------------------------------------------------------------
# tokenization and truncation
# ------------------------------------------------------------------------------------------------------------------


def test_record_uses_generation_prompt_and_appends_eos(tok):
    out = tokenize_reward_record({"prompt": msgs("hi"), "responses": ["hello"], "rewards": [1.0]}, tok)
    assert tok.decode(out["prompt_input_ids"]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (response,) = out["response_input_ids"]
    assert response[-1] == tok.eos_token_id
    assert tok.decode(response[:-1]) == "hello"
    assert out["length"] == len(out["prompt_input_ids"]) + len(response)


def test_plain_text_prompt_and_pairwise_record(tok):
    out = tokenize_reward_record({"prompt": "hi", "chosen": "yes", "rejected": "no"}, tok)
    assert tok.decode(out["prompt_input_ids"]).startswith("<|im_start|>user\nhi")
    assert out["rewards"] == [1.0, 0.0]
    assert [tok.decode(r[:-1]) for r in out["response_input_ids"]] == ["yes", "no"]


def test_truncation_keeps_prompt_end_then_cuts_response(tok):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    full = tokenize_reward_record({"prompt": msgs(long_prompt), "responses": ["x " * 300], "rewards": [0.0]}, tok,
                                  max_prompt_length=10_000, max_length=100_000)
    cut = tokenize_reward_record({"prompt": msgs(long_prompt), "responses": ["x " * 300], "rewards": [0.0]}, tok,
                                 max_prompt_length=50, max_length=120)
    assert len(full["prompt_input_ids"]) > 50
    assert cut["prompt_input_ids"] == full["prompt_input_ids"][-50:]  # the END of the prompt survives
    assert cut["prompt_truncated"]
    (response,) = cut["response_input_ids"]
    assert len(cut["prompt_input_ids"]) + len(response) == 120  # whole sequence cut to max_length
    assert response == full["response_input_ids"][0][:70]  # the response lost its end (and its EOS)
    assert response[-1] != tok.eos_token_id and cut["responses_truncated"] == 1


def test_short_sequences_are_untouched(tok):
    out = tokenize_reward_record({"prompt": msgs("hi"), "responses": ["a", "bb"], "rewards": [1, 0]}, tok,
                                 max_prompt_length=512, max_length=1024)
    assert not out["prompt_truncated"] and out["responses_truncated"] == 0


def test_prompt_without_room_errors_or_is_skipped_with_a_count(tok):
    rows = [{"prompt": msgs("hi"), "responses": ["a"], "rewards": [1.0]},
            {"prompt": msgs("word " * 80), "responses": ["a"], "rewards": [1.0]}]
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(PromptTooLongError, match="row 1.*leaves 0 token"):
        tokenize_reward_dataset(ds, tok, max_prompt_length=40, max_length=40)
    with pytest.warns(UserWarning) as caught:
        kept = tokenize_reward_dataset(ds, tok, max_prompt_length=40, max_length=40, overflow="skip")
    messages = " | ".join(str(w.message) for w in caught)
    assert "skipped 1 of 2 prompts" in messages and "truncation: 1 prompt(s) cut" in messages, messages
    assert len(kept) == 1 and kept[0]["rewards"] == [1.0]


def test_tokenizer_without_chat_template_is_an_error(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_reward_record({"prompt": msgs("hi"), "responses": ["a"], "rewards": [1.0]}, bare)


# ------------------------------------------------------------------------------------------------------------------
# collation
# ------------------------------------------------------------------------------------------------------------------


def test_collator_masks_exactly_the_responses(tok, tokenized):
    features = [tokenized[i] for i in range(len(tokenized))]
    batch = RewardCollator(tok.pad_token_id)(features)
    ks = [len(f["response_input_ids"]) for f in features]
    assert batch["input_ids"].shape[0] == sum(ks)
    assert batch["response_mask"].tolist() == [[j < k for j in range(max(ks))] for k in ks]
    row = 0
    for f in features:
        p = len(f["prompt_input_ids"])
        for response in f["response_input_ids"]:
            n = p + len(response)
            assert batch["input_ids"][row, :n].tolist() == f["prompt_input_ids"] + response
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            expected = [False] * p + [True] * len(response) + [False] * (batch["input_ids"].shape[1] - n)
            assert batch["loss_mask"][row].tolist() == expected  # not the prompt, not the padding
            assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
            row += 1
    assert batch["rewards"][0, :3].tolist() == pytest.approx([1.0, 0.2, 0.0])
    assert batch["rewards"][1, 2:].tolist() == [0.0, 0.0]
    assert "reference_logps" not in batch


def test_collator_carries_cached_reference_and_pads_to_multiple(tok, tokenized):
    with_ref = tokenized.add_column("reference_logps", [[-float(i + j) for j in range(len(r))]
                                                        for i, r in enumerate(tokenized["rewards"])])
    batch = RewardCollator(tok.pad_token_id, pad_to_multiple_of=8)([with_ref[0], with_ref[1]])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["reference_logps"].tolist() == [[-0.0, -1.0, -2.0], [-1.0, -2.0, 0.0]]


# ------------------------------------------------------------------------------------------------------------------
# sequence log-probs
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mistral", "llama"])
@pytest.mark.parametrize("average", [False, True])
def test_selective_logits_equal_naive_full_logits(arch, average, tok, tokenized):
    model = lora_model(arch)
    batch = RewardCollator(tok.pad_token_id)([tokenized[i] for i in range(len(tokenized))])
    selective = sequence_logps(model, batch, average=average)  # (B, K)
    full = sequence_logps(model, batch, average=average, selective=False)
    assert selective.shape == batch["response_mask"].shape
    torch.testing.assert_close(selective, full, atol=1e-5, rtol=0)
    # each response alone, unpadded, with a plain log_softmax over full logits
    for b in range(len(tokenized)):
        f = tokenized[b]
        for k, response in enumerate(f["response_input_ids"]):
            ids = torch.tensor(f["prompt_input_ids"] + response)
            expected = naive_logps(model, ids, len(f["prompt_input_ids"]), average=average)
            # unpadded vs padded batch: different matmul shapes, so allow float32 rounding (~1 ulp at |x| ~ 100)
            assert float(selective[b, k].detach()) == pytest.approx(float(expected.detach()), rel=1e-6, abs=1e-5)
    assert (selective[~batch["response_mask"]] == 0).all()


def test_varying_k_in_one_batch_equals_each_prompt_alone(tok, tokenized):
    model = lora_model("llama", seed=1)
    collate = RewardCollator(tok.pad_token_id)
    together = sequence_logps(model, collate([tokenized[i] for i in range(3)]))  # K = 3, 2, 4
    for i in range(3):
        alone = sequence_logps(model, collate([tokenized[i]]))  # (1, K_i)
        k = alone.shape[1]
        torch.testing.assert_close(together[i, :k], alone[0], atol=1e-5, rtol=0)


def test_gradient_flows_through_lora_only(tok, tokenized):
    model = lora_model("mistral")
    batch = RewardCollator(tok.pad_token_id)([tokenized[0]])
    sequence_logps(model, batch).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_A" in n)


# ------------------------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------------------------


def test_reference_disables_adapters_and_restores_mode(tok, tokenized):
    model = lora_model("mistral")
    base = tiny_model("mistral", seed=0)
    batch = RewardCollator(tok.pad_token_id)([tokenized[i] for i in range(3)])
    model.train()
    ref = reference_logps(model, batch)
    assert model.training and not ref.requires_grad
    torch.testing.assert_close(ref, sequence_logps(base, batch).detach(), atol=1e-5, rtol=0)
    policy = sequence_logps(model, batch)
    assert (policy - ref)[batch["response_mask"]].abs().max() > 1e-3  # the adapters do matter
    # a separate reference model gives the same numbers
    torch.testing.assert_close(reference_logps(model, batch, reference_model=base), ref, atol=1e-6, rtol=0)


def test_cached_reference_column_equals_per_batch_reference(tok, tokenized):
    model = lora_model("llama", seed=2)
    collate = RewardCollator(tok.pad_token_id)
    cached = compute_reference_logps(model, tokenized, collate, batch_size=2)
    assert [len(v) for v in cached["reference_logps"]] == [len(r) for r in tokenized["rewards"]]
    batch = collate([cached[i] for i in range(len(cached))])
    fresh = reference_logps(model, {k: v for k, v in batch.items() if k != "reference_logps"})
    torch.testing.assert_close(batch["reference_logps"], fresh, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# chunked output layer
# ------------------------------------------------------------------------------------------------------------------


def one_shot_token_logps(model, states, targets):
    """Today's head: the output layer on all M states at once, then log-softmax at the targets in float32."""
    from nca_kit.logps import _output_layer, _scale_logits

    logits = _scale_logits(model, _output_layer(model)(states)).float()  # (M, V)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_head_equals_one_shot_values_and_gradients(softcap, chunk):
    from nca_kit.logps import head_token_logps

    model = tiny_model("llama", seed=0)
    model.config.final_logit_softcapping = softcap
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    m, h = 23, head.weight.shape[1]
    states = torch.randn(m, h, generator=g, requires_grad=True)
    targets = torch.randint(0, head.weight.shape[0], (m,), generator=g)
    upstream = torch.randn(m, generator=g)
    grads = []
    for fn in (lambda: head_token_logps(model, states, targets, chunk=chunk),
               lambda: one_shot_token_logps(model, states, targets)):
        states.grad, head.weight.grad = None, None
        values = fn()
        (values * upstream).sum().backward()
        grads.append((values.detach(), states.grad.clone(), head.weight.grad.clone()))
    (v_chunk, gs_chunk, gw_chunk), (v_full, gs_full, gw_full) = grads
    assert v_chunk.dtype == torch.float32 and v_chunk.shape == (m,)
    torch.testing.assert_close(v_chunk, v_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(gs_chunk, gs_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw_chunk, gw_full, atol=1e-5, rtol=0)
    assert gw_full.abs().sum() > 0


def test_chunked_head_in_sequence_logps_equals_unchunked_with_lora_head(tok, tokenized, monkeypatch):
    """A LoRA-adapted output layer (its own trainable parameters) through the whole selective path, chunked into
    a few positions against one chunk: same log-probs, same gradients of every trainable parameter."""
    from peft import get_peft_model

    import nca_kit.logps as logps

    settings = LoraSettings(lora_dropout=0.0).to_peft()
    settings.target_modules = set(settings.target_modules) | {"lm_head"}
    model = get_peft_model(tiny_model("mistral", seed=2), settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    batch = RewardCollator(tok.pad_token_id)([tokenized[i] for i in range(len(tokenized))])
    vocab = model.get_output_embeddings().weight.shape[0]
    results = []
    for elements in (3 * vocab, 10**12):  # three positions per chunk; everything in one chunk
        monkeypatch.setattr(logps, "HEAD_CHUNK_ELEMENTS", elements)
        model.zero_grad(set_to_none=True)
        values = sequence_logps(model, batch)
        values.sum().backward()
        results.append((values.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.requires_grad}))
    (v_chunk, g_chunk), (v_full, g_full) = results
    torch.testing.assert_close(v_chunk, v_full, atol=1e-5, rtol=0)
    assert any("lm_head" in n for n in g_full)
    for name in g_full:  # gradient entries reach ~10 here: 1e-5 absolute or relative (fp32 sums in another order)
        torch.testing.assert_close(g_chunk[name], g_full[name], atol=1e-5, rtol=1e-5)
