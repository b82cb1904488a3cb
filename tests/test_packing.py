"""Padding-free packing, the shared-prompt and tree forwards: same log-probs and gradients as the padded batch."""

import pytest
import torch

from nca_kit.logps import RewardCollator, compute_reference_logps, sequence_logps
from nca_kit.models import LoraSettings, enable_checkpointing, tiny_model
from nca_kit.packing import pack_sequences, packed_states

from conftest import perturb_lora

LAYOUTS = ["packed", "shared_prompt", "tree", "auto"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(tok, tokenized):
    return RewardCollator(tok.pad_token_id)([tokenized[i] for i in range(len(tokenized))])


def sharp_model(arch="mistral", attn="eager", seed=0, lora=True):
    """Tiny model whose attention matters: larger random weights (the default init barely mixes tokens), and LoRA
    adapters with non-zero B so the adapters change the output."""
    model = tiny_model(arch, seed=seed)
    model.config._attn_implementation = attn
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    if not lora:
        return model
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):  # LoRA A's init draws from the global stream: same model in any test order
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraSettings(lora_dropout=0.0).to_peft())
    return perturb_lora(model, g)


def test_first_fit_decreasing_places_every_sequence_once_within_capacity():
    lengths = [7, 3, 9, 2, 5, 5, 1]
    row, offset = pack_sequences(lengths, 9)
    spans = {}
    for n, (r, o) in enumerate(zip(row, offset)):
        assert o + lengths[n] <= 9
        spans.setdefault(r, []).append((o, o + lengths[n]))
    for r, s in spans.items():
        s.sort()
        assert all(a[1] <= b[0] for a, b in zip(s, s[1:])), f"row {r} overlaps: {s}"
    assert max(row) + 1 == 4  # 32 tokens in rows of 9: 4 rows is the fewest
    with pytest.raises(ValueError, match="capacity"):
        pack_sequences(lengths, 8)


def test_the_model_is_context_sensitive(batch):
    """Guards the tests below: a layout that leaked attention across sequences would move log-probs by >> 1e-5."""
    model = sharp_model()
    ids = batch["input_ids"].clone()
    ids[:, 1] = (ids[:, 1] + 1) % 100 + 3  # change one prompt token
    moved = sequence_logps(model, dict(batch, input_ids=ids)) - sequence_logps(model, batch)
    assert moved[batch["response_mask"]].abs().min() > 1e-3
    # the same tokens end to end in one row without restarting positions: attention crosses sequences
    real = batch["attention_mask"].bool()
    rows, cols = batch["loss_mask"][:, 1:].nonzero(as_tuple=True)
    flat = (real.sum(-1).cumsum(0) - real.sum(-1))[rows] + cols  # where each wanted position lands in the row
    leaky = model(input_ids=batch["input_ids"][real][None], output_hidden_states=True).hidden_states[-1][0, flat]
    packed = packed_states(model, batch["input_ids"], batch["attention_mask"], rows, cols, capacity=10_000)
    assert (leaky - packed).abs().max() > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch,attn", [("mistral", "eager"), ("llama", "sdpa"), ("mistral", "sdpa")])
@pytest.mark.parametrize("average", [False, True])
def test_layouts_give_the_padded_logps(layout, arch, attn, average, batch):
    model = sharp_model(arch, attn)
    padded = sequence_logps(model, batch, average=average)  # (B, K)
    other = sequence_logps(model, batch, average=average, forward=layout)
    assert other.shape == padded.shape
    torch.testing.assert_close(other, padded, atol=1e-5, rtol=0)
    assert (other[~batch["response_mask"]] == 0).all()


@pytest.mark.parametrize("capacity", [None, 10_000])
def test_packing_into_one_row_or_several(capacity, batch):
    model = sharp_model("llama", "sdpa")
    rows, cols = batch["loss_mask"][:, 1:].nonzero(as_tuple=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    expected = out.hidden_states[-1][rows, cols]
    got = packed_states(model, batch["input_ids"], batch["attention_mask"], rows, cols, capacity=capacity)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _grads(model, batch, layout):
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch, forward=layout)
    (logps * torch.linspace(-1, 1, logps.numel()).view_as(logps)).sum().backward()  # weights differ per response
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lora", [True, False])
def test_layouts_give_the_padded_gradients(layout, checkpointing, lora, batch):
    model = sharp_model("mistral", "sdpa", lora=lora)
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    padded, expected = _grads(model, batch, "padded")
    logps, grads = _grads(model, batch, layout)
    # Sequence log-probs here reach ~-115, where one float32 step is 7.6e-6: allow 1e-5 plus a 1e-6 relative part
    # (two rounding steps; seen as 1.5e-5 at -114 under a different summation order).
    torch.testing.assert_close(logps, padded, atol=1e-5, rtol=1e-6)
    assert grads.keys() == expected.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    if lora:  # the prompt's computation gets gradient through the shared keys/values: lora_A of k/v projections
        assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_A" in n)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_reference_with_each_layout(layout, tok, tokenized):
    model = sharp_model("llama", "sdpa", seed=2)
    collate = RewardCollator(tok.pad_token_id)
    padded = compute_reference_logps(model, tokenized, collate, batch_size=2)
    other = compute_reference_logps(model, tokenized, collate, batch_size=2, forward=layout)
    for a, b in zip(padded["reference_logps"], other["reference_logps"]):
        assert b == pytest.approx(a, abs=1e-5)


def test_auto_layout_picks_by_estimated_flops():
    from nca_kit.logps import RewardCollator
    from nca_kit.packing import choose_layout, layout_flops

    model = sharp_model("mistral", "sdpa", lora=False)
    collate = RewardCollator(0)

    def batch_of(prompt_len, response_lens, prompts=2):
        record = {"prompt_input_ids": list(range(1, prompt_len + 1)),
                  "response_input_ids": [list(range(5, 5 + r)) for r in response_lens],
                  "rewards": [0.0] * len(response_lens)}
        b = collate([record] * prompts)
        return b["attention_mask"], b["loss_mask"].bool(), b["response_mask"].nonzero(as_tuple=True)[0]

    long_prompt = batch_of(112, [16] * 8)  # the prompt is most of every row: run it once
    assert choose_layout(model, *long_prompt) == "tree"
    long_responses = batch_of(4, [120, 30, 20, 10] * 2)  # short prompt, long ragged responses: pack them
    costs = layout_flops(model, *long_responses)
    assert choose_layout(model, *long_responses) == "packed" and costs["tree"] > costs["packed"] < costs["padded"]
    equal = batch_of(4, [20] * 2, prompts=1)  # nothing to remove: padded (ties go to padded)
    assert choose_layout(model, *equal) in ("padded", "tree")
    model.config._attn_implementation = "flash_attention_2"  # no custom mask: tree is not considered
    assert "tree" not in layout_flops(model, *long_prompt)


def test_sparse_kernels_count_only_the_allowed_pairs():
    """Under flash/flex attention a pair costs only where the mask allows it; the counts by hand for one batch."""
    from nca_kit.logps import RewardCollator
    from nca_kit.packing import _flop_rates, layout_flops, sparse_attention

    assert sparse_attention("flex_attention") and sparse_attention("flash_attention_2")
    assert not sparse_attention("sdpa") and not sparse_attention("eager") and not sparse_attention(None)
    model = sharp_model("mistral", "sdpa", lora=False)
    per_token, per_pair = _flop_rates(model)
    record = {"prompt_input_ids": list(range(1, 11)), "response_input_ids": [list(range(5, 5 + r)) for r in (6, 2)],
              "rewards": [0.0, 1.0]}  # sequences of 16 and 12 tokens (collated width 16)
    b = RewardCollator(0)([record])
    args = b["attention_mask"], b["loss_mask"].bool(), b["response_mask"].nonzero(as_tuple=True)[0]
    dense = layout_flops(model, *args)
    assert dense["padded"] == pytest.approx(2 * 16 * per_token + 2 * 16 ** 2 * per_pair)
    assert dense["tree"] == pytest.approx(18 * per_token + 18 ** 2 * per_pair)
    model.config._attn_implementation = "flex_attention"
    sparse = layout_flops(model, *args)
    causal = (16 * 17 + 12 * 13) / 2
    assert sparse["padded"] == pytest.approx(2 * 16 * per_token + causal * per_pair)
    assert sparse["packed"] == pytest.approx(2 * 16 * per_token + causal * per_pair)  # 16 + 12 > 16: two rows
    tree_pairs = 10 * 11 / 2 + (6 * 10 + 6 * 7 / 2) + (2 * 10 + 2 * 3 / 2)
    assert sparse["tree"] == pytest.approx(18 * per_token + tree_pairs * per_pair)


def test_auto_layout_under_sparse_kernels():
    from nca_kit.logps import RewardCollator
    from nca_kit.packing import LayoutPlanner, choose_layout, layout_flops

    model = sharp_model("mistral", "flex_attention", lora=False)
    collate = RewardCollator(0)
    record = {"prompt_input_ids": list(range(1, 41)), "response_input_ids": [list(range(5, 5 + r)) for r in (30, 8)],
              "rewards": [0.0, 1.0]}
    b = collate([record] * 2)
    args = b["attention_mask"], b["loss_mask"].bool(), b["response_mask"].nonzero(as_tuple=True)[0]
    assert choose_layout(model, *args) == "tree"  # the prompt once, no dense mask to pay for
    assert LayoutPlanner(model)(b) == "tree"
    ragged = collate([{"prompt_input_ids": list(range(1, 11)),
                       "response_input_ids": [list(range(5, 5 + r)) for r in (40, 10, 10)],
                       "rewards": [0.0, 1.0, 2.0]}] * 2)  # sequences 50, 20, 20: the short ones share a row
    args = ragged["attention_mask"], ragged["loss_mask"].bool(), ragged["response_mask"].nonzero(as_tuple=True)[0]
    assert choose_layout(model, *args) == "tree"
    model.config._attn_implementation = "flash_attention_2"  # sparse but no tree mask: packing removes the padding
    assert choose_layout(model, *args) == "packed" and "tree" not in layout_flops(model, *args)
    assert LayoutPlanner(model)(ragged) == "packed"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packed", "tree", "auto"])
def test_flex_attention_layouts_give_the_padded_logps(layout, batch):
    """Flex attention (the tree mask as a BlockMask, packed rows from restarting positions) equals the padded eager
    forward. Forward only: flex attention has no backward on CPU (gradients are checked by bench/gpu_check.py on a
    GPU). Head dim 32: on torch 2.13's CPU the compiled flex kernel was measured wrong at head dim 16 and below."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("flex attention compiles a CPU kernel: no C++ compiler on this machine")
    torch.manual_seed(0)
    model = tiny_model("mistral", hidden_size=128).eval()
    with torch.no_grad():
        padded = sequence_logps(model, batch)
        model.config._attn_implementation = "flex_attention"
        other = sequence_logps(model, batch, forward=layout)
    torch.testing.assert_close(other, padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["packed", "tree", "shared_prompt", "auto"])
def test_the_collator_plans_the_layout_on_the_host(layout, tok, tokenized, monkeypatch):
    """LayoutCollator attaches the packed / tree rows as CPU tensors; sequence_logps uses them (planning again in
    the forward is made to fail) and gives the padded log-probs and gradients."""
    import nca_kit.packing as packing
    from nca_kit.logps import LayoutCollator

    model = sharp_model("llama", "sdpa")
    planner = packing.LayoutPlanner(model) if layout == "auto" else None
    batch = LayoutCollator(RewardCollator(tok.pad_token_id), planner, layout=layout)(
        [tokenized[i] for i in range(len(tokenized))])
    chosen = batch["layout"]
    assert chosen in ("packed", "tree") if layout == "auto" else chosen == layout
    plan = batch["layout_plan"]
    assert plan["layout"] == chosen and all(v.device.type == "cpu" for v in plan.values() if torch.is_tensor(v))
    padded = sequence_logps(model, batch)
    padded.sum().backward()
    expected = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again inside the forward")

    monkeypatch.setattr(packing, "packed_plan", no_planning)
    monkeypatch.setattr(packing, "tree_prompt_plan", no_planning)
    monkeypatch.setattr(packing, "shared_prompt_plan", no_planning)
    planned = sequence_logps(model, batch, forward=chosen)
    torch.testing.assert_close(planned, padded, atol=1e-5, rtol=0)
    planned.sum().backward()
    for got, want in zip([p.grad for p in model.parameters() if p.requires_grad], expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_fixed_layout_needs_no_planner_and_auto_does(tok):
    from nca_kit.logps import LayoutCollator

    with pytest.raises(ValueError, match="needs a planner"):
        LayoutCollator(RewardCollator(tok.pad_token_id))
    LayoutCollator(RewardCollator(tok.pad_token_id), layout="padded")  # nothing to plan: no plan attached


def test_layout_is_validated(batch):
    model = sharp_model(lora=False)
    with pytest.raises(ValueError, match="forward must be one of"):
        sequence_logps(model, batch, forward="ragged")
    with pytest.raises(ValueError, match="selective=False"):
        sequence_logps(model, batch, forward="packed", selective=False)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(-1))
    with pytest.raises(ValueError, match="right-padded"):
        sequence_logps(model, left, forward="packed")
    model.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask: tree says so before running
    with pytest.raises(ValueError, match="custom 4D mask"):
        sequence_logps(model, batch, forward="tree")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trainer_loss_is_the_same_with_each_layout(layout, tok, tokenized, tmp_path):
    from transformers import TrainingArguments

    from nca_kit.training import NCATrainer, TrainConfig

    with pytest.raises(ValueError, match="logps_forward"):
        TrainConfig(logps_forward="ragged")
    model = sharp_model("llama", "sdpa", seed=3)
    args = TrainingArguments(output_dir=str(tmp_path), remove_unused_columns=False, use_cpu=True, report_to="none")
    batch = RewardCollator(tok.pad_token_id)([tokenized[i] for i in range(len(tokenized))])
    losses = {}
    for name in ("padded", layout):
        trainer = NCATrainer(model=model, args=args, loss_type="nca", logps_forward=name)
        losses[name] = float(trainer.compute_loss(model, batch).detach())  # per-step reference: adapters disabled
    assert losses[layout] == pytest.approx(losses["padded"], abs=1e-6)


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_final_states_keeps_only_the_last_hidden_state(arch, batch):
    """The backbone's last hidden state equals a plain forward's hidden_states[-1], and the forward no longer asks
    for every layer's states (without gradient nothing else keeps them)."""
    from nca_kit.packing import final_states

    model = sharp_model(arch, attn="sdpa")
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    with torch.no_grad():
        out, hidden = final_states(model, **kwargs)
        expected = model(**kwargs, output_hidden_states=True).hidden_states[-1]
    assert out.hidden_states is None
    torch.testing.assert_close(hidden, expected, atol=0, rtol=0)
