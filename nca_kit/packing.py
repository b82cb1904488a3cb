r"""Two ways to run the ``N`` sequences of a collated batch through the transformer with less waste than padding.

:func:`nca_kit.logps.sequence_logps` needs the final hidden state ``h_{t-1}`` of every position that predicts a
response token. The plain layout pads every sequence to the longest one (``N x T`` tokens); the K responses of a
prompt differ in length, so even a batch of one prompt is largely padding. The two layouts here give the same
hidden states (same math, different matrix shapes, so equal up to float rounding):

**packed** (:func:`packed_states`): the ``N`` sequences are placed end to end in a few rows of width ``C`` (by
default the longest sequence, first-fit decreasing), with ``position_ids`` restarting at 0 for each sequence and no
attention mask. ``transformers`` reads sequence boundaries from the restarting positions
(``masking_utils.find_packed_sequence_indices``): the eager, sdpa and flex implementations get a block-diagonal
causal mask, flash-attention-2 gets ``cu_seq_lens`` (variable-length kernels, no mask). Rotary embeddings use the
restarted positions, so each sequence is computed as if alone. Rows of width ``C`` rather than one long row because
the masked eager/sdpa kernels (CPU) compute the full square ``row_length^2`` of attention scores: a row no wider than
the padded batch never costs more attention than padding did.

**shared prompt** (:func:`shared_prompt_states`): the ``B`` prompts are encoded once, their keys/values are
expanded over their ``K`` responses, and the responses run from that cache. Cost ``~ B*P + N*R`` tokens instead of
``N*(P + R)``. Gradients flow through the cached keys/values into the prompt's computation, so the gradient equals
that of the independent forward. The same two steps (:func:`encode_prefixes`, :func:`continue_from_prefixes`) score
many follow-ups of one shared conversation.

**auto** (:func:`choose_layout`): per batch, the cheapest of padded, packed and tree by a count of floating-point
operations (linear layers per token, attention per query-key pair, from the model's config). What a pair costs
depends on the kernel (:func:`sparse_attention`): the eager/sdpa kernels compute every pair of a row, masked or not;
flash-attention and flex attention about the allowed causal pairs only. ``bench/bench_layouts.py`` measures how well
it picks on this CPU (dense kernels); the sparse-kernel model is untested against a GPU until one runs
``bench/gpu_check.py``.

**tree** (:func:`tree_states`): one row per prefix, holding the prefix followed by all of its continuations, with
position ids that restart at the prefix length for each continuation and a 4D attention mask that lets a continuation
token see the prefix and the earlier tokens of its own continuation only. One forward, no key/value copies, no
padding between continuations: what the FLR scorer uses for its many short follow-ups of one long conversation
(``bench/bench_flr.py`` measures it against the cache expansion and the naive path). Eager and sdpa take the mask as a
dense additive ``(B, 1, L, L)`` tensor (sdpa then runs its math kernel, O(L^2) memory); flex attention takes it as a
``BlockMask`` built from a mask function (only blocks with an allowed pair are computed, nothing dense is held);
flash-attention cannot express it and uses the cache layout instead. The packed layout needs no mask of its own under
any of them: ``transformers`` turns the restarting positions into a block-diagonal ``BlockMask`` for flex attention,
``cu_seq_lens`` for flash-attention and a dense block-diagonal mask for eager/sdpa.

The cache used for that (:class:`PrefixCache`) never grows during a forward: it hands each layer ``prefix + new``
keys/values without storing them (or, while encoding, keeps only the latest ones). So when gradient checkpointing
replays a layer in the backward pass the layer sees exactly the same cache as in the forward pass; ``transformers``
drops a cache under checkpointing unless the layer declares it safe, which :func:`_cache_safe_checkpointing` does for
the duration of the call (checkpointing must be non-reentrant, the kit's default, for gradients to reach the prompt).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from nca_kit.config import FORWARD_LAYOUTS
from nca_kit.losses import require

__all__ = [
    "FORWARD_LAYOUTS",
    "final_states",
    "cache_argument",
    "pack_sequences",
    "packed_plan",
    "packed_states",
    "PrefixCache",
    "EncodedPrefixes",
    "encode_prefixes",
    "continue_from_prefixes",
    "shared_prompt_plan",
    "shared_prompt_states",
    "TREE_ATTENTION",
    "tree_supported",
    "sparse_attention",
    "tree_plan",
    "tree_states",
    "tree_prompt_plan",
    "tree_prompt_states",
    "layout_plan",
    "layout_flops",
    "choose_layout",
    "LayoutPlanner",
]



def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _hidden(out) -> torch.Tensor:
    return out.hidden_states[-1]  # (R, C, H): after the final norm


def _decoder(model):
    """The backbone (``LlamaModel`` etc.) whose output is the final hidden state, or None if it cannot be found."""
    inner = _unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    try:
        return inner.get_decoder() if hasattr(inner, "get_decoder") else None
    except (AttributeError, NotImplementedError):
        return None


def final_states(model, **kwargs):
    """``(output, last hidden state)`` of ``model(**kwargs, logits_to_keep=1)``, keeping only the last hidden state.

    The forward goes through ``model`` itself (DDP's and PEFT's wrappers apply); a forward hook on the backbone reads
    its ``last_hidden_state`` (after the final norm), so ``output_hidden_states=True`` and its per-layer states are not
    needed (without gradient, nothing else would keep them alive). Falls back to ``output_hidden_states=True`` for a
    model whose backbone ``get_decoder`` cannot find.
    """
    decoder = _decoder(model)
    if decoder is None:
        out = model(**kwargs, logits_to_keep=1, output_hidden_states=True)
        return out, _hidden(out)
    seen: list[torch.Tensor] = []

    def keep(module, args, output):
        seen.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(keep)
    try:
        out = model(**kwargs, logits_to_keep=1, output_hidden_states=False)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"expected one pass of the backbone per forward, saw {len(seen)}")
    return out, seen[0]


# --------------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------------


def pack_sequences(lengths: list[int], capacity: int) -> tuple[list[int], list[int]]:
    """First-fit decreasing: ``(row, offset)`` of each sequence in rows of at most ``capacity`` tokens.

    Longest sequences first, each into the first row with room. ``capacity`` must be at least the longest length.
    """
    if capacity < max(lengths):
        raise ValueError(f"capacity ({capacity}) must be >= the longest sequence ({max(lengths)})")
    free: list[int] = []  # tokens used per row
    row, offset = [0] * len(lengths), [0] * len(lengths)
    for n in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, used in enumerate(free) if used + lengths[n] <= capacity), len(free))
        if r == len(free):
            free.append(0)
        row[n], offset[n] = r, free[r]
        free[r] += lengths[n]
    return row, offset


def packed_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, capacity: int | None = None) -> dict:
    """The packed layout of a right-padded batch, worked out where the tensors are (the collator calls it on the host,
    so the training step reads nothing back): ``input_ids`` and ``position_ids`` ``(R, C)`` of the packed rows and
    ``start`` ``(N,)``, the flat index ``row * C + offset`` of each sequence's first token.

    A row's unused tail is one more "sequence" (positions restarting at 0) whose states are never read, so no
    attention mask is needed at all. ``capacity``: tokens per packed row; ``None`` = the longest sequence.
    """
    lengths = attention_mask.sum(-1)  # (N,)
    column = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    if bool((attention_mask.bool() != (column[None, :] < lengths[:, None])).any()):
        raise ValueError("attention_mask: packing needs right-padded rows (real tokens first)")
    length_list = lengths.tolist()
    width = capacity or max(length_list)
    row, offset = pack_sequences(length_list, width)
    n_rows = max(row) + 1
    device = input_ids.device
    row_t = torch.tensor(row, device=device)  # (N,)
    offset_t = torch.tensor(offset, device=device)  # (N,)
    seq, pos = attention_mask.bool().nonzero(as_tuple=True)  # (S,), (S,): every real token
    flat = row_t[seq] * width + offset_t[seq] + pos  # (S,): its place in the packed (R * C) layout
    packed_ids = torch.zeros(n_rows * width, dtype=input_ids.dtype, device=device)  # (R * C,)
    packed_ids[flat] = input_ids[seq, pos]
    # tails: positions 0, 1, ... from the first free column, so that they form a sequence of their own
    used = torch.zeros(n_rows, dtype=torch.long, device=device).index_add_(0, row_t, lengths.long())  # (R,)
    slot = torch.arange(width, device=device)  # (C,)
    positions = (slot[None, :] - used[:, None]).clamp(min=0)  # (R, C): tail positions
    positions = positions.reshape(-1).index_put((flat,), pos).view(n_rows, width)  # (R, C)
    return {"layout": "packed", "input_ids": packed_ids.view(n_rows, width), "position_ids": positions,
            "start": row_t * width + offset_t}


def _on(plan: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in plan.items()}


def packed_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, *, capacity: int | None = None, plan: dict | None = None) -> torch.Tensor:
    """Final hidden states ``(M, H)`` at positions ``(rows[m], cols[m])`` of a right-padded batch, computed packed.

    Args:
        input_ids, attention_mask: ``(N, T)``, right-padded (what :class:`nca_kit.logps.RewardCollator` makes).
        rows, cols: ``(M,)`` positions wanted (inside each sequence).
        capacity: tokens per packed row; ``None`` = the longest sequence. A large value packs everything into one row
            (best with flash-attention's variable-length kernels, worst with a dense mask).
        plan: :func:`packed_plan` of this batch, made in advance (by the collator); else made here, which reads the
            sequence lengths back from the device.
    """
    plan = _on(plan if plan is not None else packed_plan(input_ids, attention_mask, capacity=capacity),
               input_ids.device)
    _, hidden = final_states(model, input_ids=plan["input_ids"], position_ids=plan["position_ids"],
                             use_cache=False)  # (R, C, H)
    return hidden.reshape(-1, hidden.shape[-1])[plan["start"][rows] + cols]  # (M, H)


# --------------------------------------------------------------------------------------------------------------------
# Shared prefixes
# --------------------------------------------------------------------------------------------------------------------


class PrefixCache(DynamicCache):
    """A key/value cache that does not grow during a forward pass.

    Built from ``prefix`` (per layer ``(keys, values)``, each ``(N, heads, P, head_dim)``), :meth:`update` returns
    ``prefix ++ new`` for a layer without storing it. Built empty, it records: :meth:`update` keeps the latest
    keys/values of each layer (replacing, not appending) and returns them unchanged. Both make a repeated call of a
    layer (gradient checkpointing's replay) see the same cache as the first call.
    """

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        super().__init__(prefix)
        self.recording = prefix is None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.recording:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
            layer = self.layers[layer_idx]
            if not layer.is_initialized:
                layer.lazy_initialization(key_states, value_states)
            layer.keys, layer.values = key_states, value_states
            return key_states, value_states
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    def keys_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.layers]


def cache_argument(model) -> str:
    """The forward's name for the key/value cache: ``cache`` (recent transformers) or ``past_key_values``."""
    base = _unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@contextlib.contextmanager
def _cache_safe_checkpointing(model):
    """Let checkpointed decoder layers keep a :class:`PrefixCache` (its replay reads the same states)."""
    layers = [m for m in _unwrap(model).modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_can_checkpoint_with_cache")]
    before = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, value in zip(layers, before):
            if value is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = value


@dataclass
class EncodedPrefixes:
    """What :func:`encode_prefixes` returns for ``B`` right-padded prefixes."""

    keys_values: list  # per layer (keys, values), each (B, heads, P, head_dim)
    mask: torch.Tensor  # (B, P): 1 on real prefix tokens
    lengths: torch.Tensor  # (B,)
    last: torch.Tensor  # (B, H): final hidden state at each prefix's last token (predicts the first continuation token)


def encode_prefixes(model, ids: torch.Tensor, mask: torch.Tensor) -> EncodedPrefixes:
    """One forward over ``B`` right-padded prefixes ``ids``/``mask`` ``(B, P)``, keeping every layer's keys/values.

    Right padding: no query row is fully masked, so no NaN can reach the gradient. No ``torch.no_grad`` inside.
    """
    cache = PrefixCache()
    with _cache_safe_checkpointing(model):
        _, hidden = final_states(model, input_ids=ids, attention_mask=mask, use_cache=True,
                                 **{cache_argument(model): cache})
    lengths = mask.sum(-1)  # (B,)
    last = hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1]  # (B, H)
    return EncodedPrefixes(cache.keys_values(), mask, lengths, last)


def continue_from_prefixes(model, prefix: EncodedPrefixes, owner: torch.Tensor, ids: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``(N, T, H)`` of ``N`` right-padded continuations ``ids``/``mask`` ``(N, T)``;
    continuation ``n`` follows prefix ``owner[n]``.

    The prefix keys/values are expanded over the continuations (a view when there is one prefix, else an
    index-select); positions continue from each prefix's length; the attention mask is ``[prefix mask, mask]``.
    """
    n = ids.shape[0]
    if prefix.mask.shape[0] == 1:
        rows = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix.keys_values]
    else:
        rows = [(k[owner], v[owner]) for k, v in prefix.keys_values]
    positions = prefix.lengths[owner, None] + torch.arange(ids.shape[1], device=ids.device)  # (N, T)
    with _cache_safe_checkpointing(model):
        _, hidden = final_states(model, input_ids=ids,
                                 attention_mask=torch.cat([prefix.mask[owner], mask], dim=1),  # (N, P + T)
                                 position_ids=positions, use_cache=True, **{cache_argument(model): PrefixCache(rows)})
    return hidden  # (N, T, H)


def shared_prompt_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                       owner: torch.Tensor) -> dict:
    """The shared-prompt layout's inputs, worked out where the tensors are (the collator: on the host): each prompt's
    ids and mask ``(B, P)`` (from its first row), each row's response ids and mask ``(N, R)``, and ``prompt_len``
    ``(N,)``."""
    device = input_ids.device
    prompt_len = loss_mask.int().argmax(-1)  # (N,): first response token = prompt length
    seq_len = attention_mask.sum(-1)  # (N,)
    b = int(owner.max()) + 1
    first = torch.full((b,), input_ids.shape[0], dtype=torch.long, device=device).scatter_reduce(
        0, owner, torch.arange(owner.shape[0], device=device), reduce="amin")  # (B,): first row of each prompt
    p_len = prompt_len[first]  # (B,)
    width = int(p_len.max())
    column = torch.arange(width, device=device)  # (P,)
    p_mask = (column[None, :] < p_len[:, None]).long()  # (B, P)
    p_ids = input_ids[first, :width] * p_mask  # (B, P)
    r_len = seq_len - prompt_len  # (N,)
    r_width = int(r_len.max())
    r_cols = (prompt_len[:, None] + torch.arange(r_width, device=device)).clamp(max=input_ids.shape[1] - 1)  # (N, R)
    r_mask = (torch.arange(r_width, device=device)[None, :] < r_len[:, None]).long()  # (N, R)
    r_ids = input_ids.gather(1, r_cols) * r_mask  # (N, R)
    return {"layout": "shared_prompt", "prompt_ids": p_ids, "prompt_mask": p_mask, "response_ids": r_ids,
            "response_mask": r_mask, "prompt_len": prompt_len.long()}


def shared_prompt_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                         owner: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                         plan: dict | None = None) -> torch.Tensor:
    """Final hidden states ``(M, H)`` at positions ``(rows[m], cols[m])`` of a collated batch, each prompt encoded once.

    Args:
        input_ids, attention_mask, loss_mask: ``(N, T)`` right-padded prompt + response rows; the prompt of a row is
            everything before its first ``loss_mask`` token, and rows with the same ``owner`` share it.
        owner: ``(N,)`` prompt index ``b`` of each row (``0 .. B-1``, rows of a prompt consecutive).
        rows, cols: ``(M,)`` wanted positions; each must be at or after the prompt's last token.
        plan: :func:`shared_prompt_plan` of this batch made in advance (by the collator); else made here, which reads
            the prompt and response widths back from the device.
    """
    plan = _on(plan if plan is not None else shared_prompt_plan(input_ids, attention_mask, loss_mask, owner),
               input_ids.device)
    prompt_len = plan["prompt_len"]  # (N,)
    prefix = encode_prefixes(model, plan["prompt_ids"], plan["prompt_mask"])
    hidden = continue_from_prefixes(model, prefix, owner, plan["response_ids"], plan["response_mask"])  # (N, R, H)
    # position t of row n: t = prompt_len - 1 is the prompt's last token, t >= prompt_len is response token t - P
    local = cols - prompt_len[rows]  # (M,): -1 for the prompt's last token
    require(~(local < -1).any(), "shared_prompt_states: a wanted position lies inside the prompt")
    states = hidden[rows, local.clamp(min=0)]  # (M, H)
    return torch.where((local < 0)[:, None], prefix.last[owner[rows]], states)  # (M, H)


# --------------------------------------------------------------------------------------------------------------------
# Tree: a prefix and all its continuations in one row
# --------------------------------------------------------------------------------------------------------------------

# Attention implementations that take the tree layout's mask: eager and sdpa a dense additive (B, 1, L, L) mask,
# flex attention a BlockMask (only the blocks holding an allowed query-key pair are computed).
TREE_ATTENTION = ("eager", "sdpa", "flex_attention")


def _attention_implementation(model) -> str | None:
    return getattr(_unwrap(model).config, "_attn_implementation", None)


def tree_supported(model) -> bool:
    """Whether the model's attention implementation takes the tree layout's mask (eager and sdpa a dense 4D mask,
    flex attention a block mask)."""
    return _attention_implementation(model) in TREE_ATTENTION


def _require_tree(model) -> None:
    if not tree_supported(model):
        raise ValueError(f"the tree layout needs an attention implementation that takes its custom 4D mask (dense "
                         f"under eager/sdpa, a BlockMask under flex_attention: {TREE_ATTENTION}); this model uses "
                         f"{_attention_implementation(model)!r}: use the packed or shared_prompt layout (or "
                         "encode_prefixes/continue_from_prefixes)")


def sparse_attention(implementation: str | None) -> bool:
    """Whether an attention implementation skips masked query-key pairs rather than computing every pair of a row.

    Flash-attention (variable-length sequences from ``cu_seq_lens``, padding removed) and flex attention (block
    masks: a block of 128 x 128 pairs with nothing allowed is skipped) compute about the allowed causal pairs; eager
    and sdpa with a mask compute the full ``width^2`` of every row (sdpa's flash and memory-efficient kernels take no
    arbitrary mask). Unknown implementations count as dense.
    """
    name = (implementation or "").lower()
    return name == "flex_attention" or "flash" in name


def _tree_block_mask(segments: torch.Tensor):
    """The tree layout's mask as a flex-attention ``BlockMask`` (``(B, 1, L, L)``, never materialised densely).

    ``segments (B, L)``: -1 padding, 0 the prefix, ``j`` continuation ``j``. Query ``q`` sees key ``k <= q`` when ``k``
    is real and lies in the prefix or in ``q``'s own continuation; every query sees itself (no empty softmax row).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(b, h, q, k):
        seg_q, seg_k = segments[b, q], segments[b, k]
        return ((k <= q) & (seg_k >= 0) & ((seg_k == seg_q) | (seg_k == 0))) | (q == k)

    rows, width = segments.shape
    return create_block_mask(allowed, rows, None, width, width, device=segments.device)


def tree_plan(prefixes, continuations) -> dict:
    """The tree layout's rows, worked out on the host from token-id lists (CPU tensors).

    Row ``b`` is ``prefix_b ++ c_1 ++ c_2 ++ ...``; continuation tokens take positions ``P_b, P_b + 1, ...`` (as if
    each followed the prefix alone). Returns ``input_ids``, ``position_ids``, ``segments`` ``(B, L)`` (-1 padding,
    0 the prefix, ``j`` continuation ``j``), and per continuation (``N`` in all, flattened group by group) ``row``,
    ``prefix_last`` (column of its prefix's last token), ``start`` (column of its first token) and ``length``.
    """
    ids_rows, seg_rows, pos_rows, starts = [], [], [], []
    for prefix, group in zip(prefixes, continuations):
        ids, seg, pos = list(prefix), [0] * len(prefix), list(range(len(prefix)))
        for j, cont in enumerate(group):
            starts.append((len(ids_rows), len(prefix) - 1, len(ids), len(cont)))
            ids += list(cont)
            seg += [j + 1] * len(cont)
            pos += range(len(prefix), len(prefix) + len(cont))
        ids_rows.append(ids), seg_rows.append(seg), pos_rows.append(pos)
    width = max(len(r) for r in ids_rows)
    n_rows = len(ids_rows)
    plan = {"layout": "tree", "input_ids": torch.zeros((n_rows, width), dtype=torch.long),
            "segments": torch.full((n_rows, width), -1, dtype=torch.long),
            "position_ids": torch.zeros((n_rows, width), dtype=torch.long)}
    for b, (ids, seg, pos) in enumerate(zip(ids_rows, seg_rows, pos_rows)):
        plan["input_ids"][b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        plan["segments"][b, :len(seg)] = torch.tensor(seg, dtype=torch.long)
        plan["position_ids"][b, :len(pos)] = torch.tensor(pos, dtype=torch.long)
    for i, name in enumerate(("row", "prefix_last", "start", "length")):
        plan[name] = torch.tensor([s[i] for s in starts], dtype=torch.long)  # (N,)
    return plan


def _tree_hidden(model, plan: dict) -> torch.Tensor:
    """Final hidden states ``(B, L, H)`` of a :func:`tree_plan` (on the model's device) under the tree mask: a dense
    additive ``(B, 1, L, L)`` mask for eager/sdpa, a ``BlockMask`` for flex attention. Reads nothing back."""
    _require_tree(model)
    seg = plan["segments"]  # (B, L)
    if _attention_implementation(model) == "flex_attention":
        mask = _tree_block_mask(seg)  # BlockMask (B, 1, L, L)
    else:
        dtype = _unwrap(model).get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        width = seg.shape[1]
        column = torch.arange(width, device=seg.device)
        causal = column[None, :] <= column[:, None]  # (L, L): key <= query
        seg_q, seg_k = seg[:, :, None], seg[:, None, :]  # (B, L, 1), (B, 1, L)
        allowed = causal & (seg_k >= 0) & ((seg_k == seg_q) | (seg_k == 0))  # (B, L, L)
        allowed |= torch.eye(width, dtype=torch.bool, device=seg.device)  # a padding query sees itself
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None]  # (B, 1, L, L) additive
    _, hidden = final_states(model, input_ids=plan["input_ids"], attention_mask=mask,
                             position_ids=plan["position_ids"], use_cache=False)  # (B, L, H)
    return hidden


def tree_states(model, prefixes, continuations) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final hidden states of many continuations of a few prefixes, each prefix with all its continuations in one row.

    Args:
        prefixes: ``B`` token-id lists.
        continuations: ``continuations[b]``, the token-id lists that continue ``prefixes[b]`` (``N`` in all).

    Row ``b`` is ``prefix_b ++ c_1 ++ c_2 ++ ...`` (:func:`tree_plan`); continuation tokens attend to the prefix and
    to their own continuation, causally. Cost ``~ sum_b (P_b + sum_j |c_j|)`` tokens in ``B`` rows, with no padding
    inside a row and no key/value copies.

    Returns:
        ``(states (N, T + 1, H), ids (N, T), mask (N, T))`` in the order of ``continuations`` flattened: ``states[n,
        t]`` predicts continuation token ``t`` (``t = 0``: the prefix's last state); ``mask`` marks real tokens.
    """
    _require_tree(model)  # before the host work of the plan
    plan = tree_plan(prefixes, continuations)
    t_max = int(plan["length"].max())
    plan = _on(plan, next(_unwrap(model).parameters()).device)
    hidden = _tree_hidden(model, plan)  # (B, L, H)
    row, start, length, width = plan["row"], plan["start"], plan["length"], plan["input_ids"].shape[1]
    t = torch.arange(t_max + 1, device=row.device)  # (T + 1,)
    cols = torch.where(t[None, :] == 0, plan["prefix_last"][:, None], start[:, None] + t[None, :] - 1)  # (N, T + 1)
    cols = torch.minimum(cols, (start + length - 1)[:, None])  # past a continuation's end: its last state (unread)
    states = hidden[row[:, None], cols]  # (N, T + 1, H)
    cont_mask = t[None, :t_max] < length[:, None]  # (N, T)
    cont_ids = plan["input_ids"][row[:, None], (start[:, None] + t[None, :t_max]).clamp(max=width - 1)] * cont_mask
    return states, cont_ids, cont_mask


def tree_prompt_plan(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                     owner: torch.Tensor) -> dict:
    """:func:`tree_plan` of a collated batch (each prompt once, followed by its responses), plus ``prompt_len``
    ``(N,)``; worked out from host tensors by the collator so that the step reads nothing back."""
    prompt_len = loss_mask.int().argmax(-1)  # (N,): first response token = prompt length
    seq_len = attention_mask.sum(-1)  # (N,)
    owner_list, p_list, s_list = owner.tolist(), prompt_len.tolist(), seq_len.tolist()
    ids = input_ids.tolist()
    prefixes, continuations = [], []
    for n, b in enumerate(owner_list):
        if b == len(prefixes):
            prefixes.append(ids[n][:p_list[n]])
            continuations.append([])
        elif b != len(prefixes) - 1:
            raise ValueError("tree_prompt_states: the rows of a prompt must be consecutive, prompts numbered 0, 1, ..")
        continuations[-1].append(ids[n][p_list[n]:s_list[n]])
    plan = tree_plan(prefixes, continuations)
    plan["prompt_len"] = prompt_len.long()
    return plan


def tree_prompt_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                       owner: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                       plan: dict | None = None) -> torch.Tensor:
    """:func:`shared_prompt_states` in the tree layout: one row per prompt holding the prompt and its K responses
    (:func:`tree_plan`), one forward, gradients through the prompt as in the independent forward.

    Same arguments and result: final hidden states ``(M, H)`` at ``(rows[m], cols[m])`` of the collated batch.
    ``plan``: :func:`tree_prompt_plan` of this batch made in advance (by the collator); else made here, which reads
    the batch back from the device.
    """
    plan = _on(plan if plan is not None else tree_prompt_plan(input_ids, attention_mask, loss_mask, owner),
               input_ids.device)
    hidden = _tree_hidden(model, plan)  # (B, L, H)
    prompt_len = plan["prompt_len"][rows]  # (M,)
    local = cols + 1 - prompt_len  # (M,): 0 = the prompt's last token, t >= 1 = response token t - 1
    require(~(local < 0).any(), "tree_prompt_states: a wanted position lies inside the prompt")
    column = torch.where(local == 0, plan["prefix_last"][rows], plan["start"][rows] + local - 1)  # (M,)
    return hidden[plan["row"][rows], column]  # (M, H)


# --------------------------------------------------------------------------------------------------------------------
# Choosing a layout per batch
# --------------------------------------------------------------------------------------------------------------------


def _flop_rates(model) -> tuple[float, float]:
    """``(per token, per query-key pair)`` forward FLOPs summed over the layers, from the model's config."""
    config = _unwrap(model).config
    config = getattr(config, "text_config", None) or config
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None) or 4 * h
    layers = config.num_hidden_layers
    per_token = 2 * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter) * layers
    per_pair = 4 * heads * head_dim * layers
    return float(per_token), float(per_pair)


def layout_flops(model, attention_mask: torch.Tensor, loss_mask: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """Estimated forward FLOPs of one collated batch in each layout that :func:`choose_layout` considers.

    ``padded``: ``N`` rows of ``T``; ``packed``: the rows :func:`pack_sequences` makes, as wide as the longest
    sequence; ``tree``: one row per prompt (``P + sum of its responses``), padded to the widest. Each row costs its
    tokens times the per-token rate (linear layers see padding too) plus its attention pairs times the per-pair rate.
    The pairs depend on the attention kernel (:func:`sparse_attention`): a dense kernel (eager, sdpa with a mask)
    computes ``width^2`` per row whatever the mask; a sparse one (flash-attention, flex attention) about the allowed
    causal pairs: ``len (len + 1) / 2`` per sequence, and in a tree the prompt's triangle plus, per response of
    length ``r``, ``r P + r (r + 1) / 2`` (block granularity ignored). The tree layout is left out when the attention
    implementation cannot take its mask (flash-attention).
    """
    per_token, per_pair = _flop_rates(model)
    return _layout_costs(per_token, per_pair, tree_supported(model), attention_mask, loss_mask, owner,
                         sparse=sparse_attention(_attention_implementation(model)))


def _layout_costs(per_token: float, per_pair: float, tree: bool, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                  owner: torch.Tensor, *, sparse: bool = False) -> dict[str, float]:
    lengths = attention_mask.sum(-1).tolist()  # (N,)
    n, width = attention_mask.shape

    def triangle(length: int) -> float:
        return length * (length + 1) / 2

    def cost(rows: int, w: int, pairs: float) -> float:
        return rows * w * per_token + (pairs if sparse else rows * w * w) * per_pair

    causal = sum(triangle(length) for length in lengths)  # allowed pairs of the sequences on their own
    costs = {"padded": cost(n, width, causal)}
    longest = max(lengths)
    rows, _ = pack_sequences(lengths, longest)
    costs["packed"] = cost(max(rows) + 1, longest, causal)
    if tree:
        prompt = loss_mask.int().argmax(-1).tolist()  # (N,)
        per_prompt: dict[int, int] = {}
        pairs = 0.0
        for b, p, length in zip(owner.tolist(), prompt, lengths):
            if b not in per_prompt:
                pairs += triangle(p)
            per_prompt[b] = per_prompt.get(b, p) + length - p
            pairs += (length - p) * p + triangle(length - p)
        costs["tree"] = cost(len(per_prompt), max(per_prompt.values()), pairs)
    return costs


def choose_layout(model, attention_mask: torch.Tensor, loss_mask: torch.Tensor, owner: torch.Tensor) -> str:
    """The layout of :func:`layout_flops` with the fewest estimated FLOPs (``padded`` on a tie)."""
    costs = layout_flops(model, attention_mask, loss_mask, owner)
    return min(costs, key=lambda name: (costs[name], name != "padded"))


def layout_plan(layout: str, batch: dict) -> dict | None:
    """The host-side part of ``layout`` for a collated batch (what :class:`nca_kit.logps.LayoutCollator` attaches as
    ``batch["layout_plan"]``): :func:`packed_plan`, :func:`tree_prompt_plan` or :func:`shared_prompt_plan`; ``None``
    for ``padded`` (nothing to plan)."""
    if layout == "packed":
        return packed_plan(batch["input_ids"], batch["attention_mask"])
    if layout in ("tree", "shared_prompt"):
        owner = batch["owner"] if "owner" in batch else batch["response_mask"].nonzero(as_tuple=True)[0]
        make = tree_prompt_plan if layout == "tree" else shared_prompt_plan
        return make(batch["input_ids"], batch["attention_mask"], batch["loss_mask"].bool(), owner)
    return None


class LayoutPlanner:
    """:func:`choose_layout` for a batch on the host, before it reaches the device (no synchronisation in the
    forward). Keeps only the numbers it needs from the model (FLOP rates, whether the tree mask is taken), so it
    pickles into DataLoader workers without the model."""

    def __init__(self, model):
        self.per_token, self.per_pair = _flop_rates(model)
        self.tree = tree_supported(model)
        self.sparse = sparse_attention(_attention_implementation(model))

    def __call__(self, batch: dict) -> str:
        owner = batch["owner"] if "owner" in batch else batch["response_mask"].nonzero(as_tuple=True)[0]
        costs = _layout_costs(self.per_token, self.per_pair, self.tree, batch["attention_mask"], batch["loss_mask"],
                              owner, sparse=self.sparse)
        return min(costs, key=lambda name: (costs[name], name != "padded"))
