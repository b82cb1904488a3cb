r"""From reward records to sequence log-probabilities ``log pi(y|x)``: tokenization, K-response collation,
selective-logits log-probs and the cached reference.

Every loss of :mod:`nca_kit.losses` needs, for each prompt ``x`` and each of its ``K`` responses ``y_i``::

    log pi(y_i | x) = sum_{t in response} log softmax(lm_head(h_{t-1}))[y_{i,t}]

Pipeline:

1. :func:`tokenize_reward_record` / :func:`tokenize_reward_dataset`: the prompt messages go through the chat
   template with the generation prompt (``<|im_start|>assistant\n`` for ChatML); each response is tokenized on its
   own and followed by EOS. Truncation follows the paper's (DPO-style) rule: the prompt keeps its last
   ``max_prompt_length`` tokens, then each response is cut so that prompt + response fit in ``max_length``.
2. :class:`RewardCollator`: all responses of a batch become rows of one ``(N, T)`` tensor (``N`` = total number of
   responses, at most ``B*K``; prompts with fewer responses add fewer rows), with an attention mask, a loss mask
   over response tokens, and ``(B, K)`` response mask / rewards / cached reference log-probs.
3. :func:`sequence_logps`: runs the transformer once, selects the hidden states that predict response tokens and
   applies the output layer to those only (the vocabulary projection is a large share of compute for small models:
   49k x 576 on SmolLM2), then sums (or averages) per response into ``(B, K)``. The transformer runs on the padded
   batch, on the same sequences packed without padding, or on each prompt once with its K responses continuing from
   its keys/values (``forward=``, see :mod:`nca_kit.packing`); all three give the same numbers.
4. :func:`compute_reference_logps`: ``log mu(y|x)`` of the frozen reference computed once, stored as a column.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterable

import numpy as np
import torch

from nca_kit.data.schema import as_reward_row
from nca_kit.losses import require
from nca_kit.packing import (FORWARD_LAYOUTS, choose_layout, final_states, layout_plan, packed_states,
                             shared_prompt_states, tree_prompt_states, tree_supported)

__all__ = [
    "PromptTooLongError",
    "padded_length",
    "tokenize_reward_record",
    "tokenize_reward_dataset",
    "RewardCollator",
    "LayoutCollator",
    "response_positions",
    "sequence_logps",
    "reference_logps",
    "compute_reference_logps",
    "unwrap_model",
    "has_adapters",
    "output_logits",
    "head_token_logps",
]

OVERFLOW_POLICIES = ("error", "skip")


class PromptTooLongError(ValueError):
    """A prompt leaves no room for its responses within ``max_length``."""


# --------------------------------------------------------------------------------------------------------------------
# Tokenization and truncation
# --------------------------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def padded_length(prompt_ids: list[int], response_ids: list[list[int]]) -> int:
    """Prompt + longest response: the width a record's K sequences are padded to, what length grouping sorts by."""
    return len(prompt_ids) + max(len(r) for r in response_ids)


def tokenize_reward_record(
    record: dict,
    tokenizer,
    *,
    max_prompt_length: int = 512,
    max_length: int = 1024,
    min_response_tokens: int = 1,
) -> dict:
    """Token ids of one reward (or pairwise) record, truncated by the paper's rule.

    * prompt: ``apply_chat_template(messages, add_generation_prompt=True)``; if longer than ``max_prompt_length``
      it keeps its **last** ``max_prompt_length`` tokens (the question sits at the end of a conversation);
    * each response: its tokens followed by ``tokenizer.eos_token_id``; cut at the end so that prompt + response
      is at most ``max_length`` (a cut response loses its EOS: it did not end there).

    Returns ``{"prompt_input_ids": list[int], "response_input_ids": list[list[int]], "rewards": list[float],
    "length": int, "prompt_truncated": bool, "responses_truncated": int}``; ``length`` is the token count of the
    longest of the K sequences (prompt + longest response): the padded width the record forces on its batch, which is
    what length grouping sorts by.

    Raises :class:`PromptTooLongError` when the (truncated) prompt leaves fewer than ``min_response_tokens`` tokens
    for a response, which happens only when ``max_prompt_length`` is close to ``max_length``.
    """
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError(f"need max_prompt_length >= 1 and max_length >= 2, got {max_prompt_length}, {max_length}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template (e.g. "
                         "nca_kit.models.CHATML_TEMPLATE) before tokenizing chat prompts")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token")
    record = as_reward_row(record)
    prompt_text = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_ids = _encode(tokenizer, prompt_text)
    if not prompt_ids:
        raise ValueError("the chat template produced an empty prompt")
    prompt_truncated = len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[-max_prompt_length:]  # keep the END of the prompt
    room = max_length - len(prompt_ids)
    if room < min_response_tokens:
        raise PromptTooLongError(f"prompt of {len(prompt_ids)} tokens leaves {room} token(s) for the response "
                                 f"(max_length={max_length}, min_response_tokens={min_response_tokens}); "
                                 "lower max_prompt_length or raise max_length")
    responses, n_cut = [], 0
    for text in record["responses"]:
        ids = _encode(tokenizer, text) + [tokenizer.eos_token_id]
        if len(ids) > room:
            ids, n_cut = ids[:room], n_cut + 1
        responses.append(ids)
    return {
        "prompt_input_ids": prompt_ids,
        "response_input_ids": responses,
        "rewards": record["rewards"],
        "length": padded_length(prompt_ids, responses),
        "prompt_truncated": prompt_truncated,
        "responses_truncated": n_cut,
    }


def tokenize_reward_dataset(
    dataset,
    tokenizer,
    *,
    max_prompt_length: int = 512,
    max_length: int = 1024,
    overflow: str = "error",
    min_response_tokens: int = 1,
):
    """Tokenize a ``datasets.Dataset`` in the canonical reward or pairwise schema (see
    :func:`nca_kit.data.schema.as_reward_row`).

    ``overflow`` decides what happens to a prompt that leaves no room for its response: ``"error"`` raises
    :class:`PromptTooLongError` naming the row; ``"skip"`` drops such rows and warns with their count. Truncation
    counts are warned about too (never silent). Columns of the result: ``prompt_input_ids``,
    ``response_input_ids``, ``rewards``, ``length`` (and ``id`` when present).
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")

    def encode(record, index):
        try:
            out = tokenize_reward_record(record, tokenizer, max_prompt_length=max_prompt_length,
                                         max_length=max_length, min_response_tokens=min_response_tokens)
        except PromptTooLongError as err:
            if overflow == "error":
                raise PromptTooLongError(f"row {index}: {err} (or pass overflow='skip')") from None
            return {"prompt_input_ids": [], "response_input_ids": [], "rewards": [], "length": 0,
                    "prompt_truncated": True, "responses_truncated": 0, "_keep": False}
        return {**out, "_keep": True}

    keep_columns = [c for c in ("id",) if c in dataset.column_names]
    remove = [c for c in dataset.column_names if c not in keep_columns]
    encoded = dataset.map(encode, with_indices=True, remove_columns=remove, desc="tokenize")
    n_total = len(encoded)
    keep = encoded["_keep"]
    n_prompts_cut = sum(encoded["prompt_truncated"])
    n_responses_cut = sum(encoded["responses_truncated"])
    if not all(keep):
        encoded = encoded.select([i for i, k in enumerate(keep) if k])
        warnings.warn(f"skipped {n_total - len(encoded)} of {n_total} prompts that leave no room for a response "
                      f"within max_length={max_length}", stacklevel=2)
    if n_prompts_cut or n_responses_cut:
        warnings.warn(f"truncation: {n_prompts_cut} prompt(s) cut to their last {max_prompt_length} tokens, "
                      f"{n_responses_cut} response(s) cut to fit max_length={max_length}", stacklevel=2)
    return encoded.remove_columns(["_keep", "prompt_truncated", "responses_truncated"])


# --------------------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------------------


class RewardCollator:
    """Batch tokenized reward records into one ``(N, T)`` tensor of all their responses.

    Rows are ordered prompt by prompt, response by response: row ``n`` is the ``n``-th ``True`` of
    ``response_mask`` in row-major order, so ``flat (N,) -> (B, K)`` is ``out[response_mask] = flat``.

    Output keys:
        ``input_ids`` ``(N, T)``: prompt + response, right-padded with ``pad_token_id``;
        ``attention_mask`` ``(N, T)``: 1 on real tokens;
        ``loss_mask`` ``(N, T)`` bool: ``True`` exactly on response tokens (EOS included; prompt and padding not);
        ``response_mask`` ``(B, K)`` bool: ``True`` for real responses (K = the largest count in the batch);
        ``rewards`` ``(B, K)`` float64 (0 in padded slots): rewards that differ in the data stay different until
        the soft labels are computed from them (:mod:`nca_kit.losses`);
        ``reference_logps`` ``(B, K)`` float32, when every record carries a cached ``reference_logps``;
        ``row_index`` ``(B,)``, when every record carries a ``row_index``.

    ``pad_to_multiple_of`` rounds ``T`` up (8 suits tensor cores).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        b = len(features)
        k = max(len(f["response_input_ids"]) for f in features)
        sequences, prompt_lengths = [], []
        for f in features:
            prompt = list(f["prompt_input_ids"])
            for response in f["response_input_ids"]:
                sequences.append(prompt + list(response))
                prompt_lengths.append(len(prompt))
        t = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            t = math.ceil(t / self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(sequences)
        input_ids = torch.full((n, t), self.pad_token_id, dtype=torch.long)  # (N, T)
        attention_mask = torch.zeros((n, t), dtype=torch.long)  # (N, T)
        loss_mask = torch.zeros((n, t), dtype=torch.bool)  # (N, T)
        for row, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
            loss_mask[row, p : len(seq)] = True
        response_mask = torch.zeros((b, k), dtype=torch.bool)  # (B, K)
        rewards = torch.zeros((b, k), dtype=torch.float64)  # (B, K): float64, exact until the soft labels
        for i, f in enumerate(features):
            ki = len(f["response_input_ids"])
            response_mask[i, :ki] = True
            rewards[i, :ki] = torch.tensor([float(r) for r in f["rewards"]], dtype=torch.float64)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "loss_mask": loss_mask,
            "response_mask": response_mask,
            "rewards": rewards,
        }
        if all("row_index" in f for f in features):  # lets a sharded, reordered pass map results back to rows
            batch["row_index"] = torch.tensor([int(f["row_index"]) for f in features], dtype=torch.long)  # (B,)
        if all(f.get("reference_logps") is not None for f in features):
            reference = torch.zeros((b, k), dtype=torch.float32)  # (B, K)
            for i, f in enumerate(features):
                reference[i, : len(f["reference_logps"])] = torch.tensor(f["reference_logps"], dtype=torch.float32)
            batch["reference_logps"] = reference
        batch.update(response_positions(loss_mask, response_mask))
        return batch


class LayoutCollator:
    """A collator followed by the host-side part of the forward layout, so that the training step reads nothing back
    from the device: ``batch["layout"]`` (``layout``, or for ``"auto"`` a :class:`nca_kit.packing.LayoutPlanner`'s
    pick, which ``sequence_logps(forward="auto")`` then uses) and, for every layout but ``padded``,
    ``batch["layout_plan"]`` (:func:`nca_kit.packing.layout_plan`: the packed rows, the tree rows or the shared
    prompts as CPU tensors, moved to the device with the rest of the batch). Picklable (DataLoader workers)."""

    def __init__(self, collator, planner=None, *, layout: str = "auto"):
        if layout == "auto" and planner is None:
            raise ValueError("LayoutCollator(layout='auto') needs a planner (nca_kit.packing.LayoutPlanner(model))")
        self.collator, self.planner, self.layout = collator, planner, layout

    def __call__(self, features: list[dict[str, Any]]) -> dict:
        batch = self.collator(features)
        batch["layout"] = self.planner(batch) if self.layout == "auto" else self.layout
        plan = layout_plan(batch["layout"], batch)
        if plan is not None:
            batch["layout_plan"] = plan
        return batch


def response_positions(loss_mask: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Index tensors that :func:`sequence_logps` would otherwise find on the device with ``nonzero`` (a host
    synchronisation), computed per batch on the host with NumPy by :class:`RewardCollator`.

    Returns ``target_rows``, ``target_cols`` ``(M,)``: the positions whose hidden state predicts a response token
    (``loss_mask[:, 1:]``), row-major; ``owner`` ``(N,)``: the prompt ``b`` of each row.
    """
    rows, cols = np.nonzero(loss_mask[:, 1:].numpy())
    owner = np.nonzero(response_mask.numpy())[0]
    return {name: torch.from_numpy(index.astype(np.int64))
            for name, index in (("target_rows", rows), ("target_cols", cols), ("owner", owner))}


# --------------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# --------------------------------------------------------------------------------------------------------------------


def unwrap_model(model):
    """The module under DistributedDataParallel / DataParallel wrappers (a PEFT model stays a PEFT model)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def has_adapters(model) -> bool:
    """Whether ``model`` (under any DDP wrapper) carries PEFT adapters that can be switched off: then the frozen base
    with adapters disabled is the reference, and only the adapters are saved."""
    return hasattr(unwrap_model(model), "disable_adapter")


def _output_layer(model):
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (not a causal language model?)")
    return head


def _scale_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Final-logit transforms some architectures apply after the output layer (none for Llama/Mistral/Qwen)."""
    config = unwrap_model(model).config
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def output_logits(model, states: torch.Tensor) -> torch.Tensor:
    """The output layer on selected final hidden states ``(M, H) -> (M, V)`` in float32, with the final-logit transforms
    some architectures apply (``logit_scale``, ``final_logit_softcapping``); wrappers (DDP) unwrapped. For raw logits
    (FLR's code variant); log-probs of given tokens come from :func:`head_token_logps`, chunked."""
    return _scale_logits(model, _output_layer(model)(states).float())


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` in float32, without materialising the full log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


HEAD_CHUNK_ELEMENTS = 2**24  # logits per chunk of the chunked head: 64 MiB in fp32 (512 positions at V = 32k)


class _ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(head(states))[targets]`` ``(M,)`` computed ``chunk`` positions at a time.

    Forward keeps no logits: it saves the inputs only. Backward recomputes each chunk's logits under autograd and
    back-propagates that chunk alone, so at most one chunk of ``(chunk, V)`` logits (and their gradient) is alive at
    any moment. ``head`` is any module (an ``nn.Linear``, a LoRA-wrapped one, a tied embedding); its trainable
    parameters are passed through ``apply`` so autograd delivers their gradients.
    """

    @staticmethod
    def forward(ctx, states, targets, head_fn, chunk, *params):
        ctx.head_fn, ctx.chunk = head_fn, chunk
        ctx.save_for_backward(states, targets, *params)
        out = torch.empty(states.shape[0], dtype=torch.float32, device=states.device)  # (M,)
        with torch.no_grad():
            for start in range(0, states.shape[0], chunk):
                stop = start + chunk
                out[start:stop] = _token_logps(head_fn(states[start:stop]), targets[start:stop])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        states, targets, *params = ctx.saved_tensors
        want_states = ctx.needs_input_grad[0]
        want = [p for p, need in zip(params, ctx.needs_input_grad[4:]) if need]
        grad_states = torch.zeros_like(states) if want_states else None
        grad_params = [torch.zeros_like(p) for p in want]
        for start in range(0, states.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            with torch.enable_grad():
                piece = states[start:stop].detach().requires_grad_(want_states)
                logps = _token_logps(ctx.head_fn(piece), targets[start:stop])  # (chunk,)
                inputs = ([piece] if want_states else []) + want
                grads = torch.autograd.grad(logps, inputs, grad_out[start:stop], allow_unused=True)
            if want_states:
                grad_states[start:stop] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_params, grads):
                if g is not None:
                    acc += g
        it = iter(grad_params)
        return (grad_states, None, None, None, *(next(it) if need else None for need in ctx.needs_input_grad[4:]))


def head_token_logps(model, states: torch.Tensor, targets: torch.Tensor, *,
                     chunk: int | None = None) -> torch.Tensor:
    """``log softmax(lm_head(states))[targets]`` in float32 ``(M,)`` from final hidden states ``(M, H)``, chunked.

    Never holds the ``(M, V)`` logits: ``chunk`` positions at a time (default: ``HEAD_CHUNK_ELEMENTS // V``, 64 MiB of
    fp32 logits per chunk), with a backward that recomputes each chunk (:class:`_ChunkedTokenLogps`). Equal to
    applying the output layer to all ``M`` states at once, in values and gradients (up to float rounding).
    """
    head = _output_layer(model)

    def head_fn(h):
        return _scale_logits(model, head(h))

    if chunk is None:
        vocab = getattr(head, "out_features", None) or unwrap_model(model).config.get_text_config().vocab_size
        chunk = max(1, HEAD_CHUNK_ELEMENTS // int(vocab))
    if not torch.is_grad_enabled() or states.shape[0] <= chunk:  # no backward, or one chunk: nothing to recompute
        pieces = [_token_logps(head_fn(states[i:i + chunk]), targets[i:i + chunk])
                  for i in range(0, states.shape[0], chunk)]
        return torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    params = [p for p in head.parameters() if p.requires_grad]
    return _ChunkedTokenLogps.apply(states, targets, head_fn, chunk, *params)


def sequence_logps(model, batch: dict, *, average: bool = False, selective: bool = True,
                   forward: str = "padded") -> torch.Tensor:
    r"""``log pi(y_i | x)`` for every response of a collated batch, as ``(B, K)`` (0 in padded slots).

    Args:
        model: a causal LM, a PEFT-wrapped one, or either inside DistributedDataParallel. The forward goes through
            ``model`` itself (so DDP's gradient bookkeeping and PEFT adapters apply).
        batch: output of :class:`RewardCollator` (tensors on the model's device).
        average: mean over response tokens instead of the sum (length-normalised; the paper uses the sum).
        selective: apply the output layer only to the hidden states that predict response tokens (``M`` of the
            ``N*T`` positions). ``False`` computes the full ``(N, T, V)`` logits as a plain forward does; both give
            the same numbers (up to float rounding) — ``selective`` is faster and uses less memory.
        forward: how the transformer sees the ``N`` sequences (:mod:`nca_kit.packing`): ``"padded"`` as one
            ``(N, T)`` batch; ``"packed"`` end to end in rows without padding, positions restarting per sequence;
            ``"shared_prompt"`` each prompt once, its responses from the prompt's keys/values; ``"tree"`` each prompt
            once in a row followed by its responses, under a tree attention mask (eager/sdpa attention); ``"auto"``
            per batch the cheapest of padded, packed and tree by estimated FLOPs (:func:`nca_kit.packing.choose_layout`).
            Same numbers (up to float rounding) and same gradients; ``selective=False`` exists only for ``"padded"``.

    The last hidden state at position ``t - 1`` predicts token ``t``; response tokens are where ``loss_mask`` is
    ``True``, so the predicting positions are ``loss_mask[:, 1:]``.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (N, T)
    loss_mask = batch["loss_mask"].bool()  # (N, T)
    response_mask = batch["response_mask"].bool()  # (B, K)
    targets_mask = loss_mask[:, 1:]  # (N, T-1): position t predicts token t+1
    require(~loss_mask[:, 0].any(), "loss_mask is True at position 0: a response needs a non-empty prompt before it")
    if forward not in FORWARD_LAYOUTS:
        raise ValueError(f"forward must be one of {FORWARD_LAYOUTS}, got {forward!r}")
    if not selective and forward not in ("padded", "auto"):
        raise ValueError(f"selective=False computes full logits of the padded batch; got forward={forward!r}")
    require(response_mask.sum() == input_ids.shape[0],
            f"response_mask does not count the batch's {input_ids.shape[0]} rows (one True per response row)")
    if selective:
        if "target_rows" in batch:  # found on the host by the collator (response_positions): no sync here
            rows, cols, owner = batch["target_rows"], batch["target_cols"], batch["owner"]  # (M,), (M,), (N,)
        else:
            rows, cols = targets_mask.nonzero(as_tuple=True)  # (M,), (M,)
            owner = response_mask.nonzero(as_tuple=True)[0].to(input_ids.device)  # (N,): prompt of each row
        if forward == "auto":
            planned = batch.get("layout")  # chosen on the host by LayoutCollator
            if planned is None or (planned == "tree" and not tree_supported(model)):
                planned = choose_layout(model, attention_mask, loss_mask, owner)
            forward = planned
        if forward == "padded":
            _, hidden = final_states(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            states = hidden[rows, cols]  # (M, H), after the final norm
        else:
            plan = batch.get("layout_plan")  # made on the host by LayoutCollator, for the layout it planned
            plan = plan if plan is not None and plan["layout"] == forward else None
            if forward == "packed":
                states = packed_states(model, input_ids, attention_mask, rows, cols, plan=plan)  # (M, H)
            elif forward == "tree":
                states = tree_prompt_states(model, input_ids, attention_mask, loss_mask, owner, rows, cols,
                                            plan=plan)  # (M, H)
            else:
                states = shared_prompt_states(model, input_ids, attention_mask, loss_mask, owner, rows, cols,
                                              plan=plan)  # (M, H)
        token_logps = head_token_logps(model, states, input_ids[rows, cols + 1])  # (M,), chunked over positions
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
        all_logps = _token_logps(logits[:, :-1], input_ids[:, 1:])  # (N, T-1)
        rows, cols = targets_mask.nonzero(as_tuple=True)
        token_logps = all_logps[rows, cols]  # (M,)
    n = input_ids.shape[0]
    per_sequence = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device)
    per_sequence = per_sequence.index_add(0, rows, token_logps)  # (N,)
    if average:
        counts = targets_mask.sum(dim=-1).clamp(min=1).to(per_sequence.dtype)  # (N,)
        per_sequence = per_sequence / counts
    out_bk = torch.zeros(response_mask.shape, dtype=per_sequence.dtype, device=per_sequence.device)  # (B, K)
    return out_bk.masked_scatter(response_mask.to(out_bk.device), per_sequence)


@contextlib.contextmanager
def _reference_mode(model):
    """Evaluation mode with LoRA adapters disabled (the frozen base *is* the reference), restored afterwards."""
    inner = unwrap_model(model)
    was_training = inner.training
    inner.eval()
    try:
        if has_adapters(inner):
            with inner.disable_adapter():
                yield
        else:
            yield
    finally:
        inner.train(was_training)


def reference_logps(model, batch: dict, *, reference_model=None, average: bool = False,
                    forward: str = "padded") -> torch.Tensor:
    """``log mu(y_i|x)`` ``(B, K)`` of the reference, without gradient, in eval mode (no dropout).

    The reference is ``reference_model`` when given; otherwise ``model`` with its PEFT adapters disabled (LoRA
    training: the frozen base is the reference). A model without adapters and no ``reference_model`` is used as is,
    which is right only before training starts (how :func:`compute_reference_logps` is meant to be called).
    ``forward`` is the layout of :func:`sequence_logps`.
    """
    with torch.no_grad(), _reference_mode(reference_model if reference_model is not None else model):
        return sequence_logps(reference_model if reference_model is not None else model, batch, average=average,
                              forward=forward)


def _batches(dataset, collator, batch_size: int) -> Iterable[dict]:
    for start in range(0, len(dataset), batch_size):
        yield collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def compute_reference_logps(
    model,
    dataset,
    collator: RewardCollator,
    *,
    batch_size: int = 8,
    reference_model=None,
    average: bool = False,
    column: str = "reference_logps",
    forward: str = "padded",
):
    """Add a ``reference_logps`` column (list of K floats per row) to a tokenized dataset, in one pass.

    Computed once before training, so each training step runs one forward pass (the policy) instead of two. Uses
    :func:`reference_logps` (adapters disabled or ``reference_model``, eval mode, no gradient). Single process; the
    trainer of :mod:`nca_kit.training` does the same through ``Trainer.predict`` so several GPUs share the work.
    """
    device = next(unwrap_model(reference_model if reference_model is not None else model).parameters()).device
    values: list[list[float]] = []
    for batch in _batches(dataset.remove_columns([c for c in (column,) if c in dataset.column_names]),
                          collator, batch_size):
        batch = {key: value.to(device) for key, value in batch.items()}
        ref = reference_logps(model, batch, reference_model=reference_model, average=average,
                              forward=forward)  # (B, K)
        for row, mask in zip(ref.cpu(), batch["response_mask"].cpu()):
            values.append(row[mask].tolist())
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, values)
