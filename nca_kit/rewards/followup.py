r"""Follow-up Likelihood as Reward (FLR; Zhang et al., AAAI 2025) and its *Direct* baseline.

A response is good when the user's natural reply to it is satisfied. FLR asks the language model itself how likely
such replies are. For a prompt ``x`` (chat messages) and a response ``y``, the conversation is continued by one user
turn holding a follow-up utterance ``f`` (through the model's chat template), and ``f`` is scored by its
teacher-forced log-likelihood averaged over its own tokens::

    s(f | x, y) = 1/|f| * sum_t log pi(f_t | x, y, <user-turn header>, f_<t)              (variant "paper")

    r_FLR(x, y) = mean_{f in F+} s(f | x, y)  -  mean_{f in F-} s(f | x, y)

``F+`` are satisfied replies ("That's exactly what I needed."), ``F-`` dissatisfied ones ("That's not what I
asked."). The paper groups them by six helpfulness categories (:data:`CATEGORIES`); the score of one category uses
only its own follow-ups. No annotation and no reward-model training: one causal LM and two lists of sentences.

The baseline *Direct* is the response's own length-normalised likelihood (EOS included, as the kit tokenizes a
response; it equals :func:`nca_kit.logps.sequence_logps` with ``average=True``)::

    r_Direct(x, y) = 1/|y| * log pi(y | x)

**The public code computes something else** (repository ``e0397123/FLR``, ``run_llama3.py``). For each follow-up it
renders the whole conversation with the chat template (no generation prompt), takes ``L = len(tokenizer(f))`` (the
tokenizer's special tokens included), keeps the model's raw output ``logits[0, -L:, :]`` and reduces it with
``logits[0, feedback_ids[0]].mean()``: the first index selects *one* position (the ``L``-th from the end), the second
indexes that position's vocabulary row by the follow-up's token ids. So its score is the **mean raw logit, at a
single position, of the follow-up's tokens taken as a bag of words** — no softmax, no teacher forcing.

Which position that is depends on the template. On the authors' template (Llama-3: ``tokenizer(f)`` adds one
``<|begin_of_text|>``, and the user turn closes with one ``<|eot_id|>``) ``-L`` lands on the follow-up's *first*
token: the state that has read the turn header and the follow-up's first token (and predicts its second). On another
template the same offset lands elsewhere: ChatML (SmolLM2) adds no BOS and closes a turn with two tokens,
``<|im_end|>\n``, so ``-L`` reads the state at the follow-up's *third* token, conditioning the score on two more of
the follow-up's own tokens. Hence three variants:

* ``"paper"`` — the equation above;
* ``"code"`` — the public code's score at the position it reads on its own template: the state at the follow-up's
  first token, found from the chat template (the start of the follow-up's own tokens in its user turn), so it means
  the same thing on every template;
* ``"code_literal"`` — the literal ``logits[-L]`` copy, kept to show what a fixed offset does on another template
  (on a Llama-3-style template it equals ``"code"``).

One forward pass yields all three, so :class:`FLRScores` always holds them all.

**Speed.** Each response is scored under ``2|F|`` continuations (120 with the default follow-ups) that share the
long prefix ``x, y``. :func:`prefix_shared_logps` computes each prefix once instead of running the whole
conversation again per follow-up (``share_prefix=False``, the naive path kept for checks and the benchmark
``bench/bench_flr.py``). By default (eager/sdpa attention) a response's prefix and all its follow-up turns go into one
row under a tree attention mask (:func:`nca_kit.packing.tree_states`): one forward, no padding between the short
turns, no copies of the prefix's keys/values; the alternative (``layout="cache"``, and what flash attention gets)
encodes the prefixes, then runs the follow-ups from their keys/values expanded over the batch
(:func:`nca_kit.packing.encode_prefixes`). All paths give the same numbers up to float rounding.

Entry points: :func:`flr_rewards` / :func:`direct_rewards` (one float per response), :func:`flr_scores` (everything:
per follow-up, per category, both variants) and :func:`score_rows` (the rewards of a canonical ``prompt, responses,
rewards`` dataset by ``"flr"`` or ``"direct"``, for the reward sources of :mod:`nca_kit.rewards.sources`). The
follow-up sentences are in :mod:`nca_kit.rewards.followup_texts`, the metrics in :mod:`nca_kit.rewards.metrics`,
the evaluations on preference pairs and K-response sets in :mod:`nca_kit.rewards.studies`. Scores are cached on
disk (:class:`nca_kit.cache.Cache`) under a hash of the model's weights, the tokenizer's template, the follow-ups
and the texts, in blocks of responses, so an interrupted run resumes and a rerun is instant.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from nca_kit import packing
from nca_kit.cache import Cache
from nca_kit.logps import head_token_logps, output_logits, tokenize_reward_record
from nca_kit.rewards.followup_texts import (
    FollowupTokens,
    check_inputs,
    conversation_prefix,
    flatten_followups,
    followup_tokens,
    load_followups,
)

__all__ = [
    "VARIANTS",
    "shared_header",
    "prefix_shared_logps",
    "FLRScores",
    "flr_scores",
    "flr_rewards",
    "direct_rewards",
    "model_fingerprint",
    "SCORERS",
    "score_rows",
]

#: ``"paper"``: mean teacher-forced token log-likelihood of the follow-up (the paper's text). ``"code"``: mean raw
#: logit of the follow-up's token ids at the state of its first token (what the public ``run_llama3.py`` reads on
#: its Llama-3 template). ``"code_literal"``: the same bag of logits at the literal ``logits[-L]`` offset.
VARIANTS = ("paper", "code", "code_literal")

_VERSION = "flr-v2"  # bump when the scoring changes (it keys the on-disk cache)
_CACHE_BLOCK = 32  # responses per cache entry: an interrupted run loses at most one block


# --------------------------------------------------------------------------------------------------------------------
# Prefix-shared scoring: encode a prefix once, score many continuations from its key/value cache
# --------------------------------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], *, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``(R, T)``; pad id 0 (never attended to, never scored)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(list(row), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


PREFIX_LAYOUTS = ("auto", "tree", "cache")


def _layout(model, layout: str) -> str:
    """``tree`` (:func:`nca_kit.packing.tree_states`) where the attention implementation takes a custom 4D mask
    (eager, sdpa), else ``cache`` (:func:`nca_kit.packing.encode_prefixes` + ``continue_from_prefixes``)."""
    if layout not in PREFIX_LAYOUTS:
        raise ValueError(f"layout must be one of {PREFIX_LAYOUTS}, got {layout!r}")
    if layout == "auto":
        return "tree" if packing.tree_supported(model) else "cache"
    return layout


class _CachedPrefixes:
    """The ``cache`` layout: prefixes encoded once (right-padded), continuations run from their expanded keys/values."""

    def __init__(self, model, prefixes):
        self.model = model
        ids, mask = _pad(prefixes, left=False, device=_device(model))  # (B, P)
        self.encoded = packing.encode_prefixes(model, ids, mask)

    def states(self, continuations, owner):
        ids, mask = _pad(continuations, left=False, device=_device(self.model))  # (N, T)
        hidden = packing.continue_from_prefixes(self.model, self.encoded, owner, ids, mask)  # (N, T, H)
        return torch.cat([self.encoded.last[owner, None], hidden], dim=1), ids, mask.bool()  # (N, T + 1, H)


def _grouped(continuations, owner, n_prefixes):
    groups = [[] for _ in range(n_prefixes)]
    for c, o in zip(continuations, owner.tolist()):
        groups[o].append(c)
    return groups


def _shared_hidden(model, prefixes, continuations, owner, layout):
    """``(states (N, T + 1, H), ids (N, T), mask (N, T))`` of ``N`` continuations, continuation ``n`` following prefix
    ``owner[n]`` (``owner`` sorted, so the rows come back in the continuations' order): ``states[n, t]`` predicts
    continuation token ``t`` (``t = 0``: the prefix's last state). Each prefix is encoded once, in ``layout``
    (``"tree"`` or ``"cache"``, as :func:`_layout` resolves it)."""
    if layout == "tree":
        return packing.tree_states(model, prefixes, _grouped(continuations, owner, len(prefixes)))
    return _CachedPrefixes(model, prefixes).states(continuations, owner)


def _naive_hidden(model, prefixes, continuations, owner):
    """The same as :func:`_shared_hidden` by running every prefix + continuation in full (right-padded)."""
    device = _device(model)
    owner_list = owner.tolist()
    sequences = [list(prefixes[o]) + list(c) for o, c in zip(owner_list, continuations)]
    ids, mask = _pad(sequences, left=False, device=device)  # (N, S)
    hidden = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True,
                   use_cache=False).hidden_states[-1]  # (N, S, H)
    cont_ids, cont_mask = _pad(continuations, left=False, device=device)  # (N, T)
    start = torch.tensor([len(prefixes[o]) - 1 for o in owner_list], device=device)  # predicts continuation token 0
    cols = (start[:, None] + torch.arange(cont_ids.shape[1] + 1, device=device)).clamp(max=ids.shape[1] - 1)
    states = hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1]))  # (N, T + 1, H)
    return states, cont_ids, cont_mask.bool()


def _check_groups(prefixes, continuations):
    if len(prefixes) != len(continuations):
        raise ValueError(f"continuations: {len(continuations)} groups but {len(prefixes)} prefixes (one group each)")
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("prefixes: every prefix needs at least one token")
    flat = [c for group in continuations for c in group]
    if not flat or any(len(c) == 0 for c in flat):
        raise ValueError("continuations: need at least one continuation, each with at least one token")
    owner = torch.tensor([b for b, group in enumerate(continuations) for _ in group], dtype=torch.long)
    return flat, owner


def _hidden(model, prefixes, continuations, share_prefix, layout):
    flat, owner = _check_groups(prefixes, continuations)
    owner = owner.to(_device(model))
    if share_prefix:
        return _shared_hidden(model, prefixes, flat, owner, layout)
    return _naive_hidden(model, prefixes, flat, owner)


def prefix_shared_logps(model, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
                        *, share_prefix: bool = True, layout: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token ``log pi(c_t | prefix, c_<t)`` of many continuations of a few prefixes, each prefix encoded once.

    Args:
        model: a causal LM (Hugging Face, PEFT-wrapped or not). No ``torch.no_grad`` inside: gradients flow when the
            caller wants them (a training forward can share one prompt among its K responses).
        prefixes: ``B`` token-id lists (different lengths allowed).
        continuations: ``continuations[b]`` is the list of token-id lists that continue ``prefixes[b]``; ``N`` in all.
        share_prefix: ``True``: each prefix is computed once, in the way ``layout`` names. Cost ~ ``B*P + N*T``
            tokens. ``False``: the naive way, ``N`` full sequences of ``P + T`` tokens.
        layout: ``"tree"``: one forward, one row per prefix holding it and all its continuations under a tree
            attention mask (:func:`nca_kit.packing.tree_states`); ``"cache"``: one forward over the prefixes, then
            one over the ``N`` right-padded continuations with the prefixes' keys/values expanded over them
            (:func:`nca_kit.packing.encode_prefixes`, :func:`~nca_kit.packing.continue_from_prefixes`);
            ``"auto"``: ``tree`` where the attention implementation takes a custom 4D mask (eager, sdpa), else
            ``cache``.

    Returns:
        ``(logps, mask)``, both ``(N, T)``, rows in the order of ``continuations`` flattened (group by group):
        ``logps[n, t]`` is the log-probability of continuation token ``t``; ``0`` where ``mask`` is ``False``
        (padding). The first token is predicted from the prefix's last position.
    """
    states, ids, mask = _hidden(model, prefixes, continuations, share_prefix, _layout(model, layout))
    rows, cols = mask.nonzero(as_tuple=True)  # (M,), (M,)
    token_logps = head_token_logps(model, states[rows, cols], ids[rows, cols])  # (M,): states[:, t] predicts token t
    logps = torch.zeros(ids.shape, dtype=token_logps.dtype, device=ids.device)  # (N, T)
    logps[rows, cols] = token_logps
    return logps, mask


# --------------------------------------------------------------------------------------------------------------------
# FLR
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FLRScores:
    """Every number FLR computes for ``N`` responses and ``F`` follow-ups.

    ``followups``: the ``F`` ``(category, polarity, text)`` triples, in column order. ``loglik`` ``(N, F)``: mean
    token log-likelihood of each follow-up (variant ``"paper"``). ``logit`` ``(N, F)``: the public code's score at
    the state of the follow-up's first token (variant ``"code"``); ``logit_literal`` ``(N, F)``: the same
    at the literal ``logits[-L]`` offset (variant ``"code_literal"``).
    """

    followups: list[tuple[str, str, str]]
    loglik: np.ndarray
    logit: np.ndarray
    logit_literal: np.ndarray

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(c for c, _, _ in self.followups))

    def per_followup(self, variant: str = "paper") -> np.ndarray:
        """``(N, F)`` follow-up scores of ``variant``."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        return {"paper": self.loglik, "code": self.logit, "code_literal": self.logit_literal}[variant]

    def rewards(self, variant: str = "paper", categories: Sequence[str] | None = None) -> np.ndarray:
        """``(N,)``: mean over the positive follow-ups minus mean over the negative ones (of ``categories``)."""
        scores = self.per_followup(variant)
        if categories is None:
            categories = self.categories
        elif isinstance(categories, str):
            categories = [categories]
        unknown = [c for c in categories if c not in self.categories]
        if unknown or not categories:
            raise ValueError(f"categories: {unknown or '[]'} not among {self.categories}")
        cat = np.array([c in categories for c, _, _ in self.followups])
        pos = cat & np.array([p == "positive" for _, p, _ in self.followups])
        neg = cat & np.array([p == "negative" for _, p, _ in self.followups])
        return scores[:, pos].mean(1) - scores[:, neg].mean(1)

    def category_rewards(self, variant: str = "paper") -> dict[str, np.ndarray]:
        """``{category: (N,)}``, the reward of each category on its own."""
        return {c: self.rewards(variant, [c]) for c in self.categories}


def model_fingerprint(model, tokenizer) -> str:
    """A short hash that changes whenever the weights, the architecture or the chat template change.

    Per parameter: name, shape, float64 sum and sum of squares (fast; no file paths involved), plus the tokenizer's
    vocabulary size and chat template.
    """
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            digest.update(f"{name}{tuple(p.shape)}{x.sum().item():.10e}{(x * x).sum().item():.10e}".encode())
    digest.update(f"{len(tokenizer)}{tokenizer.chat_template}".encode())
    return digest.hexdigest()[:16]


def _texts_digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def _eval_mode(model):
    was_training = model.training
    model.eval()
    return was_training


def shared_header(tokens: list[FollowupTokens]) -> int:
    """Length of the turn header every follow-up starts with (``<|im_start|>user\n`` in ChatML): it joins the prefix,
    so it is encoded once per response. It stops before the first token any score reads."""
    limit = min(min(f.span[0] for f in tokens), min(f.literal_position for f in tokens))
    common = 0
    while common < limit and len({f.ids[common] for f in tokens}) == 1:
        common += 1
    return common


def _flr_block(model, tokenizer, messages, responses, tokens: list[FollowupTokens], *, batch_size, max_length,
               share_prefix, layout="auto", tick=lambda n: None) -> np.ndarray:
    """``(n, F, 3)`` scores of a block of responses: ``[..., 0]`` mean log-likelihood, ``[..., 1]`` code logit,
    ``[..., 2]`` literal-offset code logit.

    Only the tokens a score reads are run: the shared turn header goes into the prefix, and a follow-up turn is cut
    after the last token whose successor is scored (causal attention: later tokens change nothing before them).
    """
    n_f = len(tokens)
    common = shared_header(tokens)
    header = list(tokens[0].ids[:common])
    # inputs of follow-up f: its turn from the header on, up to the last state a score reads (at least one token)
    inputs = [list(f.ids[common:max(f.span[1] - 1, f.code_position, f.literal_position, common + 1)])
              for f in tokens]
    layout = _layout(model, layout) if share_prefix else "naive"
    per_forward = max(1, batch_size // n_f)  # responses per forward when all their follow-ups fit in one batch
    chunk = n_f if layout == "tree" else min(n_f, batch_size)  # follow-ups per forward (tree: one row per response)
    out = np.zeros((len(responses), n_f, 3))
    device = _device(model)
    for lo in range(0, len(responses), per_forward):
        hi = min(lo + per_forward, len(responses))
        prefixes = [conversation_prefix(tokenizer, m, r, max_length) + header
                    for m, r in zip(messages[lo:hi], responses[lo:hi])]
        encoded = _CachedPrefixes(model, prefixes) if layout == "cache" else None
        for f_lo in range(0, n_f, chunk):
            group = range(f_lo, min(f_lo + chunk, n_f))
            owner = torch.arange(hi - lo, device=device).repeat_interleave(len(group))  # (R,)
            rows_f = [f for _ in range(hi - lo) for f in group]  # follow-up of each row
            continuations = [inputs[f] for f in rows_f]
            if layout == "tree":
                states, _, _ = packing.tree_states(model, prefixes, [[inputs[f] for f in group]] * (hi - lo))
            elif layout == "cache":
                states, _, _ = encoded.states(continuations, owner)  # (R, T + 1, H)
            else:
                states, _, _ = _naive_hidden(model, prefixes, continuations, owner)
            # "paper": mean log-likelihood over the follow-up's own tokens; states[:, t - common] predicts token t.
            rows, cols, targets = [], [], []
            for row, f in enumerate(rows_f):
                for t in range(*tokens[f].span):
                    rows.append(row), cols.append(t - common), targets.append(tokens[f].ids[t])
            rows, cols = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            token_logps = head_token_logps(model, states[rows, cols], torch.tensor(targets, device=device))  # (M,)
            lengths = torch.tensor([tokens[f].span[1] - tokens[f].span[0] for f in rows_f], device=device)
            loglik = torch.zeros(len(rows_f), dtype=torch.float64, device=device).index_add(
                0, rows, token_logps.double()) / lengths  # (R,)
            out[lo:hi, group.start:group.stop, 0] = loglik.view(hi - lo, len(group)).cpu().numpy()
            # "code" / "code_literal": raw logits at one position, averaged over the follow-up's token ids (a bag of
            # words); at the state of the follow-up's first token / at the literal logits[-L] offset.
            for slot, name in ((1, "code_position"), (2, "literal_position")):
                at = torch.tensor([getattr(tokens[f], name) - common for f in rows_f], device=device)
                raw = output_logits(model, states[torch.arange(len(rows_f), device=device), at])  # (R, V)
                logit = torch.stack([raw[row, list(tokens[f].code_ids)].double().mean()
                                     for row, f in enumerate(rows_f)])
                out[lo:hi, group.start:group.stop, slot] = logit.view(hi - lo, len(group)).cpu().numpy()
        tick(hi - lo)
    return out


def _blocks(n: int, size: int = _CACHE_BLOCK):
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _cache(cache_dir) -> Cache | None:
    if cache_dir is None or cache_dir is False:
        return None
    return cache_dir if isinstance(cache_dir, Cache) else Cache(cache_dir)


def _progress(total: int, desc: str, enabled: bool):
    from nca_kit.progress import progress

    return progress(total=total, desc=desc, unit="resp", bar=enabled)


def flr_scores(
    model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence[str],
    *,
    followups: str | os.PathLike | Mapping | None = None,
    categories: Sequence[str] | None = None,
    batch_size: int = 64,
    max_length: int = 1024,
    share_prefix: bool = True,
    layout: str = "auto",
    cache_dir: str | os.PathLike | Cache | None = None,
    progress: bool = True,
) -> FLRScores:
    """Score ``N`` responses under every follow-up; both variants, every category (:class:`FLRScores`).

    Args:
        prompts: ``N`` prompts (a string or chat messages each; one per response, repeat a prompt for K responses).
        responses: ``N`` non-empty response strings.
        followups, categories: see :func:`load_followups` (default: the six helpfulness categories).
        batch_size: continuations per forward pass: ``batch_size // F`` responses with all their ``F`` follow-ups (at
            least one response); the ``cache`` layout splits the follow-ups of one response into forwards of
            ``batch_size`` when ``F`` is larger.
        max_length: a conversation prefix (prompt + response) longer than this keeps its last ``max_length`` tokens.
        share_prefix: encode each prefix once (:func:`prefix_shared_logps`); ``False`` is the naive path.
        layout: how a shared prefix is computed (see :func:`prefix_shared_logps`; the scores are the same).
        cache_dir: a folder (or :class:`nca_kit.cache.Cache`) to keep the scores in, block by block, keyed by
            :func:`model_fingerprint`, the follow-ups, ``max_length`` and the texts; ``None``: no disk cache.
        progress: a tqdm bar over responses (else progress lines, :mod:`nca_kit.progress`).
    """
    messages = check_inputs(tokenizer, prompts, responses)
    flat = flatten_followups(load_followups(followups, categories))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = [followup_tokens(tokenizer, text) for _, _, text in flat]
    cache = _cache(cache_dir)
    fingerprint = model_fingerprint(model, tokenizer) if cache is not None else None
    parts = []
    was_training = _eval_mode(model)
    try:
        with torch.no_grad(), _progress(len(responses), "FLR", progress) as bar:
            for lo, hi in _blocks(len(responses)):
                def compute(lo=lo, hi=hi):
                    return _flr_block(model, tokenizer, messages[lo:hi], list(responses[lo:hi]), tokens,
                                      batch_size=batch_size, max_length=max_length, share_prefix=share_prefix,
                                      layout=layout, tick=bar.update)

                if cache is None:
                    parts.append(compute())
                else:
                    settings = {"version": _VERSION, "model": fingerprint, "followups": flat,
                                "max_length": max_length, "texts": _texts_digest(messages[lo:hi], responses[lo:hi])}
                    parts.append(cache.array("flr", settings, compute))
                    if cache.last_hit:
                        bar.update(hi - lo)
    finally:
        model.train(was_training)
    scores = np.concatenate(parts)  # (N, F, 2)
    return FLRScores(followups=flat, loglik=scores[..., 0], logit=scores[..., 1], logit_literal=scores[..., 2])


def flr_rewards(model, tokenizer, prompts: Sequence, responses: Sequence[str], *, followups=None,
                variant: str = "paper", categories: Sequence[str] | None = None, batch_size: int = 64,
                **kwargs) -> np.ndarray:
    """``(N,)`` FLR rewards: mean score of the positive follow-ups minus that of the negative ones.

    ``variant``: ``"paper"`` (mean token log-likelihood), ``"code"`` (the public code's raw-logit score at the state
    of the follow-up's first token) or ``"code_literal"`` (the same at the literal ``-L`` offset); other
    keyword arguments as :func:`flr_scores`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    scores = flr_scores(model, tokenizer, prompts, responses, followups=followups, categories=categories,
                        batch_size=batch_size, **kwargs)
    return scores.rewards(variant)


# --------------------------------------------------------------------------------------------------------------------
# Direct
# --------------------------------------------------------------------------------------------------------------------


def _prompt_groups(messages) -> list[list[int]]:
    """Indices of responses grouped by identical prompt (in order of first appearance)."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(messages):
        groups.setdefault(json.dumps(m, sort_keys=True), []).append(i)
    return list(groups.values())


def _direct_block(model, tokenizer, messages, responses, *, batch_size, max_prompt_length, max_length,
                  share_prefix) -> np.ndarray:
    out = np.zeros(len(responses))
    groups = _prompt_groups(messages)
    start = 0
    while start < len(groups):  # take whole prompt groups until batch_size responses
        take, rows = [], 0
        while start < len(groups) and (not take or rows + len(groups[start]) <= batch_size):
            take.append(groups[start])
            rows += len(groups[start])
            start += 1
        prefixes, continuations = [], []
        for group in take:
            record = {"prompt": messages[group[0]], "responses": [responses[i] for i in group],
                      "rewards": [0.0] * len(group)}
            tok = tokenize_reward_record(record, tokenizer, max_prompt_length=max_prompt_length, max_length=max_length)
            prefixes.append(tok["prompt_input_ids"])
            continuations.append(tok["response_input_ids"])
        logps, mask = prefix_shared_logps(model, prefixes, continuations, share_prefix=share_prefix)  # (R, T)
        mean = (logps.double().sum(-1) / mask.sum(-1).double()).cpu().numpy()  # (R,)
        out[[i for group in take for i in group]] = mean
    return out


def direct_rewards(model, tokenizer, prompts: Sequence, responses: Sequence[str], *, batch_size: int = 16,
                   max_prompt_length: int = 512, max_length: int = 1024, share_prefix: bool = True,
                   cache_dir: str | os.PathLike | Cache | None = None, progress: bool = True) -> np.ndarray:
    """``(N,)`` Direct rewards ``1/|y| log pi(y | x)``: the response's mean token log-probability, EOS included.

    Tokenized exactly as training tokenizes (:func:`nca_kit.logps.tokenize_reward_record`: chat template with the
    generation prompt, response + EOS, the same truncation rule). Responses with the same prompt share its encoding
    (:func:`prefix_shared_logps`). ``cache_dir`` and ``progress`` as in :func:`flr_scores`.
    """
    messages = check_inputs(tokenizer, prompts, responses)
    cache = _cache(cache_dir)
    fingerprint = model_fingerprint(model, tokenizer) if cache is not None else None
    parts = []
    was_training = _eval_mode(model)
    try:
        with torch.no_grad(), _progress(len(responses), "Direct", progress) as bar:
            for lo, hi in _blocks(len(responses)):
                def compute(lo=lo, hi=hi):
                    return _direct_block(model, tokenizer, messages[lo:hi], list(responses[lo:hi]),
                                         batch_size=batch_size, max_prompt_length=max_prompt_length,
                                         max_length=max_length, share_prefix=share_prefix)

                if cache is None:
                    parts.append(compute())
                else:
                    settings = {"version": _VERSION, "model": fingerprint, "max_prompt_length": max_prompt_length,
                                "max_length": max_length, "texts": _texts_digest(messages[lo:hi], responses[lo:hi])}
                    parts.append(cache.array("direct", settings, compute))
                bar.update(hi - lo)
    finally:
        model.train(was_training)
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------------------------------
# Reward datasets
# --------------------------------------------------------------------------------------------------------------------

#: The follow-up scorers by name, each ``(model, tokenizer, prompts, responses, **kwargs) -> (N,)``: what the reward
#: sources ``flr`` and ``direct`` of :mod:`nca_kit.rewards.sources` run.
SCORERS = {"flr": flr_rewards, "direct": direct_rewards}


def score_rows(dataset, scorer: str, model, tokenizer, **kwargs) -> list[list[float]]:
    """The rewards of every response of a canonical reward dataset (``prompt, responses``) by ``scorer`` (a key of
    :data:`SCORERS`), one list per row; :func:`nca_kit.rewards.sources.with_rewards` writes them into the dataset.
    Keyword arguments go to the scorer (``followups``, ``variant``, ``batch_size``, ``cache_dir``, ...)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {tuple(SCORERS)}, got {scorer!r}")
    missing = [c for c in ("prompt", "responses") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset: missing column(s) {missing}; need the canonical reward schema")
    prompts = [p for p, rs in zip(dataset["prompt"], dataset["responses"]) for _ in rs]
    responses = [r for rs in dataset["responses"] for r in rs]
    flat = SCORERS[scorer](model, tokenizer, prompts, responses, **kwargs)
    rows, at = [], 0
    for rs in dataset["responses"]:
        rows.append([float(x) for x in flat[at:at + len(rs)]])
        at += len(rs)
    return rows
