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
per follow-up, per category, both variants), :func:`rescore_reward_dataset` and :func:`arithmetic_reward_dataset`
(a canonical ``prompt, responses, rewards`` dataset scored by ``"flr"`` or ``"direct"``), and the metrics
:func:`pairwise_accuracy` and :func:`ranking_metrics`. Scores are cached on disk (:class:`nca_kit.cache.Cache`) under
a hash of the model's weights, the tokenizer's template, the follow-ups and the texts, in blocks of responses, so an
interrupted run resumes and a rerun is instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from nca_kit.cache import Cache
from nca_kit.data import as_messages as normalize_prompt
from nca_kit.logps import tokenize_reward_record
from nca_kit import packing

__all__ = [
    "CATEGORIES",
    "VARIANTS",
    "HELPFULNESS_FOLLOWUPS",
    "ARITHMETIC_FOLLOWUPS",
    "load_followups",
    "prefix_shared_logps",
    "FLRScores",
    "flr_scores",
    "flr_rewards",
    "direct_rewards",
    "model_fingerprint",
    "rescore_reward_dataset",
    "arithmetic_reward_dataset",
    "pairwise_accuracy",
    "ranking_metrics",
    "accuracy_difference",
    "hh_pairs",
    "PairEvaluation",
    "evaluate_pairs",
    "evaluate_k_responses",
    "plot_pair_accuracy",
    "plot_score_distributions",
]

#: The paper's six helpfulness categories of follow-ups.
CATEGORIES = ("understanding", "relevance", "correctness", "engagingness", "informativeness", "instruction_following")

#: ``"paper"``: mean teacher-forced token log-likelihood of the follow-up (the paper's text). ``"code"``: mean raw
#: logit of the follow-up's token ids at the state of its first token (what the public ``run_llama3.py`` reads on
#: its Llama-3 template). ``"code_literal"``: the same bag of logits at the literal ``logits[-L]`` offset.
VARIANTS = ("paper", "code", "code_literal")

POLARITIES = ("positive", "negative")

_VERSION = "flr-v2"  # bump when the scoring changes (it keys the on-disk cache)
_CACHE_BLOCK = 32  # responses per cache entry: an interrupted run loses at most one block

# The kit's own follow-ups (about ten per category and polarity), written as a user would reply.
HELPFULNESS_FOLLOWUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "understanding": {
        "positive": (
            "You understood exactly what I meant.", "Yes, that's exactly what I was asking about.",
            "You got my question right.", "Great, you understood what I needed.",
            "That's precisely what I had in mind.", "You really understood my situation.",
            "Thanks, you understood the question perfectly.", "Yes, you caught what I was getting at.",
            "Exactly, that's the point of my question.", "You read my request correctly."),
        "negative": (
            "You misunderstood my question.", "That's not what I asked.", "I think you got my question wrong.",
            "No, you missed what I meant.", "That's not what I was asking about at all.",
            "You didn't understand my request.", "I meant something else entirely.", "You've misread my question.",
            "That's not what I had in mind.", "Did you even read my question?"),
    },
    "relevance": {
        "positive": (
            "That's right on topic, thanks.", "Thanks, that's relevant to what I asked.",
            "That addresses my question directly.", "Good, you stayed on the subject.",
            "That's exactly the information I was looking for.", "Thanks, that's to the point.",
            "That's very relevant, thank you.", "You answered the question I asked.", "That's what I needed to know.",
            "Perfect, that's the topic I care about."),
        "negative": (
            "That's off topic.", "That has nothing to do with my question.", "Why are you talking about that?",
            "That's irrelevant to what I asked.", "You went off on a tangent.", "Please stick to my question.",
            "That doesn't address what I asked.", "I didn't ask about that.", "That's beside the point.",
            "You changed the subject."),
    },
    "correctness": {
        "positive": (
            "That's correct, thank you.", "Yes, that's right.", "That's accurate.",
            "Thanks, that information is correct.", "You got it right.", "I checked, and that's true.",
            "Right, that matches what I know.", "That's a correct answer.", "Great, that's exactly right.",
            "Yes, those facts are accurate."),
        "negative": (
            "That's wrong.", "That's not correct.", "That's inaccurate.", "I'm pretty sure that's false.",
            "You got that wrong.", "That information is incorrect.", "No, that's not true.", "That's a mistake.",
            "I checked, and that's wrong.", "Your answer contains errors."),
    },
    "engagingness": {
        "positive": (
            "That's really interesting!", "I enjoyed reading that.", "Wow, tell me more!",
            "That's fascinating, thanks.", "What a fun answer!", "I love how you put that.",
            "That was a pleasure to read.", "You made that really engaging.", "Ha, that's great!",
            "That's a delightful answer."),
        "negative": (
            "That's boring.", "That was dull to read.", "You sound like a robot.", "That's a pretty bland answer.",
            "I lost interest halfway through.", "That was tedious.", "Meh, that's not very interesting.",
            "That answer is lifeless.", "You could be less monotonous.", "That's uninspiring."),
    },
    "informativeness": {
        "positive": (
            "That's very informative, thanks.", "I learned a lot from that.", "Thanks for the detailed explanation.",
            "That's really helpful information.", "That's a thorough answer.",
            "Thanks, that gives me everything I need.", "Great, that covers it well.", "That's useful, thank you.",
            "Thanks for all the details.", "That's a comprehensive answer."),
        "negative": (
            "That's not helpful.", "That doesn't tell me anything.", "That's too vague.",
            "I didn't learn anything from that.", "That answer lacks substance.", "You left out the important parts.",
            "That's not very useful.", "That's too shallow.", "That doesn't give me enough information.",
            "Can you be more specific? That told me nothing."),
    },
    "instruction_following": {
        "positive": (
            "You followed my instructions perfectly.", "That's exactly the format I asked for.",
            "Thanks for doing what I asked.", "Great, you did it just as I requested.",
            "You respected all my requirements.", "Perfect, that follows my instructions.",
            "That's just what I asked you to do.", "You stuck to my request.", "Thanks for following the instructions.",
            "That meets all my constraints."),
        "negative": (
            "You didn't follow my instructions.", "That's not the format I asked for.",
            "I asked you to do something different.", "You ignored my request.", "Please do what I asked.",
            "That doesn't follow my instructions.", "You left out what I specifically asked for.",
            "That's not what I told you to do.", "You didn't respect my constraints.",
            "I gave you clear instructions and you ignored them."),
    },
}

#: Correctness-only follow-ups for the kit's arithmetic task (:mod:`nca_kit.tasks`): is the number right?
ARITHMETIC_FOLLOWUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "correctness": {
        "positive": (
            "That's the right answer.", "Correct, thank you.", "Yes, that number is right.", "Right, that's correct.",
            "You got the right number.", "That's correct.", "Yes, that's right.", "The math checks out.",
            "Exactly right.", "Thanks, that's the correct answer."),
        "negative": (
            "That's the wrong answer.", "No, that's incorrect.", "That number is wrong.", "Your math is wrong.",
            "That's not right.", "You made a calculation error.", "No, that's wrong.", "The math doesn't add up.",
            "That's not correct.", "Please check your arithmetic, that's wrong."),
    },
}

_NAMED_SETS = {"helpfulness": HELPFULNESS_FOLLOWUPS, "arithmetic": ARITHMETIC_FOLLOWUPS}


# --------------------------------------------------------------------------------------------------------------------
# Follow-ups
# --------------------------------------------------------------------------------------------------------------------


def load_followups(followups: str | os.PathLike | Mapping | None = None,
                   categories: Sequence[str] | None = None) -> dict[str, dict[str, tuple[str, ...]]]:
    """Follow-ups as ``{category: {"positive": (...), "negative": (...)}}``, checked.

    ``followups``: ``None`` or ``"helpfulness"`` (the six categories, :data:`HELPFULNESS_FOLLOWUPS`),
    ``"arithmetic"`` (:data:`ARITHMETIC_FOLLOWUPS`), a mapping of that shape, or the path of a JSON file holding one.
    ``categories`` keeps only those categories, in that order.
    """
    if followups is None or (isinstance(followups, str) and followups in _NAMED_SETS):
        source: Any = _NAMED_SETS[followups or "helpfulness"]
    elif isinstance(followups, Mapping):
        source = followups
    elif isinstance(followups, (str, os.PathLike)):
        path = Path(followups).expanduser()
        if not path.exists():
            raise ValueError(f"followups: {str(followups)!r} is neither {' nor '.join(map(repr, _NAMED_SETS))} "
                             "nor an existing JSON file")
        source = json.loads(path.read_text())
    else:
        raise ValueError(f"followups must be a set name, a mapping or a JSON path, got {type(followups).__name__}")
    if not isinstance(source, Mapping) or not source:
        raise ValueError("followups must map category -> {'positive': [...], 'negative': [...]}; got an empty set")
    if categories is not None:
        if isinstance(categories, str):
            categories = [categories]
        unknown = [c for c in categories if c not in source]
        if unknown or not categories:
            raise ValueError(f"categories: {unknown or '[]'} not among the follow-up categories {list(source)}")
        source = {c: source[c] for c in categories}
    out = {}
    for category, lists in source.items():
        if not isinstance(lists, Mapping) or set(lists) != set(POLARITIES):
            raise ValueError(f"followups: category {category!r} needs exactly the keys 'positive' and 'negative'")
        out[category] = {}
        for polarity in POLARITIES:
            texts = lists[polarity]
            if isinstance(texts, str) or not texts:
                raise ValueError(f"followups: category {category!r} has no {polarity} follow-ups (give a list)")
            if not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"followups: category {category!r} holds an empty {polarity} follow-up")
            out[category][polarity] = tuple(texts)
    return out


def _flatten(followups: Mapping) -> list[tuple[str, str, str]]:
    """``(category, polarity, text)`` in a fixed order: category by category, positives first."""
    return [(c, p, t) for c, lists in followups.items() for p in POLARITIES for t in lists[p]]


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


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Output layer on selected final hidden states ``(M, H) -> (M, V)``, float32, with the final-logit transforms
    some architectures apply (``logit_scale``, ``final_logit_softcapping``; none for Llama/Mistral/Qwen)."""
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config
    if isinstance(getattr(config, "logit_scale", None), (int, float)):
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
    return logits


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
    logits = _logits(model, states[rows, cols])  # (M, V): states[:, t] predicts token t
    token_logps = logits.gather(-1, ids[rows, cols, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (M,)
    logps = torch.zeros(ids.shape, dtype=token_logps.dtype, device=ids.device)  # (N, T)
    logps[rows, cols] = token_logps
    return logps, mask


# --------------------------------------------------------------------------------------------------------------------
# Conversations and their tokens
# --------------------------------------------------------------------------------------------------------------------


def _check_inputs(tokenizer, prompts, responses) -> list[list[dict]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer has no chat template; set tokenizer.chat_template (e.g. "
                         "nca_kit.models.CHATML_TEMPLATE for ChatML models) or pass a chat model's tokenizer")
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ValueError("prompts and responses must be lists (one entry per response), not a single string")
    if len(prompts) != len(responses):
        raise ValueError(f"responses: {len(responses)} given but prompts has {len(prompts)} (one prompt per response)")
    if not responses:
        raise ValueError("responses: nothing to score (empty list)")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"responses[{i}] is empty; drop empty responses before scoring")
    return [normalize_prompt(p) for p in prompts]


def _template(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class _FollowupTokens:
    """One follow-up turn as the continuation of ``prompt + response``: its ids, which of them are the follow-up's
    own tokens (``span``), and the pieces the public code reads (``code_position``, ``literal_position``,
    ``code_ids``)."""

    ids: tuple[int, ...]
    span: tuple[int, int]
    code_position: int  # t: variant "code" reads the state that predicts token t = span[0] + 1 (the state at the
    #                     follow-up's first token, what the public code reads on Llama-3's template)
    code_ids: tuple[int, ...]
    literal_position: int  # t of the literal logits[-L] offset (variant "code_literal"; t <= len(ids))


def _followup_tokens(tokenizer, text: str) -> _FollowupTokens:
    """Tokens of the user turn ``text`` appended to a conversation, found through the chat template.

    The turn's text is what the template adds after a closed assistant turn; two probe conversations must give the
    same addition (the turn does not depend on earlier content), else the template cannot be scored this way.
    """
    turns = []
    for probe in (("Hi.", "Hello."), ("What is 2 + 2?", "4")):
        messages = [{"role": "user", "content": probe[0]}, {"role": "assistant", "content": probe[1]}]
        before = _template(tokenizer, messages)
        after = _template(tokenizer, messages + [{"role": "user", "content": text}])
        if not after.startswith(before):
            raise ValueError("the chat template rewrites earlier turns when a user turn is added; FLR needs a "
                             "template whose conversations only grow (set tokenizer.chat_template)")
        turns.append(after[len(before):])
    if turns[0] != turns[1]:
        raise ValueError("the chat template renders a user turn differently depending on earlier turns; "
                         "FLR needs a template whose new turn does not (set tokenizer.chat_template)")
    turn = turns[0]
    start = turn.rfind(text.strip())
    if start < 0:
        raise ValueError(f"the chat template does not reproduce the follow-up {text!r} inside its user turn")
    end = start + len(text.strip())
    encoded = tokenizer(turn, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start and b > a]
    if not inside:
        raise ValueError(f"follow-up {text!r} has no tokens of its own inside the chat template's user turn")
    # Public code, literally: the conversation ends with `ids`; it reads the output at position len(full) - L of the
    # full sequence, the state that predicts the token after it, i.e. continuation token len(ids) - L + 1. On its
    # Llama-3 template (BOS in L, one closing <|eot_id|>) that is the state at the follow-up's first token; variant
    # "code" reads that state on every template.
    code_ids = list(tokenizer(text)["input_ids"])
    literal_position = len(ids) - len(code_ids) + 1
    if not 0 <= literal_position <= len(ids):
        raise ValueError(f"follow-up {text!r}: the public code's position falls outside its user turn")
    return _FollowupTokens(tuple(ids), (inside[0], inside[-1] + 1), inside[0] + 1, tuple(code_ids), literal_position)


def _truncate_left(ids: list[int], max_length: int) -> list[int]:
    return ids[-max_length:]


def _conversation_prefix(tokenizer, messages, response: str, max_length: int) -> list[int]:
    """Tokens of ``messages + [assistant response]`` (closed turn), keeping the last ``max_length``."""
    text = _template(tokenizer, list(messages) + [{"role": "assistant", "content": response}])
    return _truncate_left(_encode(tokenizer, text), max_length)


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


def _shared_header(tokens: list[_FollowupTokens]) -> int:
    """Length of the turn header every follow-up starts with (``<|im_start|>user\n`` in ChatML): it joins the prefix,
    so it is encoded once per response. It stops before the first token any score reads."""
    limit = min(min(f.span[0] for f in tokens), min(f.literal_position for f in tokens))
    common = 0
    while common < limit and len({f.ids[common] for f in tokens}) == 1:
        common += 1
    return common


def _flr_block(model, tokenizer, messages, responses, tokens: list[_FollowupTokens], *, batch_size, max_length,
               share_prefix, layout="auto", tick=lambda n: None) -> np.ndarray:
    """``(n, F, 3)`` scores of a block of responses: ``[..., 0]`` mean log-likelihood, ``[..., 1]`` code logit,
    ``[..., 2]`` literal-offset code logit.

    Only the tokens a score reads are run: the shared turn header goes into the prefix, and a follow-up turn is cut
    after the last token whose successor is scored (causal attention: later tokens change nothing before them).
    """
    n_f = len(tokens)
    common = _shared_header(tokens)
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
        prefixes = [_conversation_prefix(tokenizer, m, r, max_length) + header
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
            logits = _logits(model, states[rows, cols])  # (M, V)
            token_logps = logits.gather(-1, torch.tensor(targets, device=device)[:, None]).squeeze(-1) - \
                torch.logsumexp(logits, -1)  # (M,)
            lengths = torch.tensor([tokens[f].span[1] - tokens[f].span[0] for f in rows_f], device=device)
            loglik = torch.zeros(len(rows_f), dtype=torch.float64, device=device).index_add(
                0, rows, token_logps.double()) / lengths  # (R,)
            out[lo:hi, group.start:group.stop, 0] = loglik.view(hi - lo, len(group)).cpu().numpy()
            # "code" / "code_literal": raw logits at one position, averaged over the follow-up's token ids (a bag of
            # words); at the state of the follow-up's first token / at the literal logits[-L] offset.
            for slot, name in ((1, "code_position"), (2, "literal_position")):
                at = torch.tensor([getattr(tokens[f], name) - common for f in rows_f], device=device)
                raw = _logits(model, states[torch.arange(len(rows_f), device=device), at])  # (R, V)
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
    messages = _check_inputs(tokenizer, prompts, responses)
    flat = _flatten(load_followups(followups, categories))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens = [_followup_tokens(tokenizer, text) for _, _, text in flat]
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
    messages = _check_inputs(tokenizer, prompts, responses)
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

SOURCES = ("flr", "direct")


def rescore_reward_dataset(dataset, source: str, model, tokenizer, *, followups=None, variant: str = "paper",
                           categories: Sequence[str] | None = None, keep_as: str | None = "original_rewards",
                           **kwargs):
    """A canonical reward dataset (``prompt, responses, rewards``) whose ``rewards`` are re-scored by ``source``.

    ``source``: ``"flr"`` (:func:`flr_rewards` with ``followups``, ``variant``, ``categories``) or ``"direct"``
    (:func:`direct_rewards`). The old rewards move to the column ``keep_as`` (``None`` drops them); every other
    column is kept. Other keyword arguments go to the scorer (``batch_size``, ``cache_dir``, ``progress``, ...).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    missing = [c for c in ("prompt", "responses", "rewards") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset: missing column(s) {missing}; need the canonical reward schema")
    prompts = [p for p, rs in zip(dataset["prompt"], dataset["responses"]) for _ in rs]
    responses = [r for rs in dataset["responses"] for r in rs]
    if source == "flr":
        flat = flr_rewards(model, tokenizer, prompts, responses, followups=followups, variant=variant,
                           categories=categories, **kwargs)
    else:
        flat = direct_rewards(model, tokenizer, prompts, responses, **kwargs)
    rewards, at = [], 0
    for rs in dataset["responses"]:
        rewards.append([float(x) for x in flat[at:at + len(rs)]])
        at += len(rs)
    if keep_as is not None:
        dataset = dataset.rename_column("rewards", keep_as)
    else:
        dataset = dataset.remove_columns("rewards")
    return dataset.add_column("rewards", rewards)


def arithmetic_reward_dataset(source: str = "flr", *, model=None, tokenizer=None, variant: str = "paper",
                              followups="arithmetic", n: int | None = None, **kwargs):
    """The kit's arithmetic K = 4 training data (``data/``, :mod:`nca_kit.generate` defaults) re-scored by ``source``.

    One call: loads SmolLM2-135M-Instruct when ``model`` is not given, reads the shipped dataset (no sampling), and
    returns :func:`rescore_reward_dataset`'s result; the rubric rewards stay in ``original_rewards``. ``n`` keeps the
    first ``n`` prompts. Default follow-ups: :data:`ARITHMETIC_FOLLOWUPS` (correctness only).
    """
    from nca_kit import generate
    from nca_kit.models import load_smollm2

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    repo = Path(__file__).resolve().parents[2]
    train = generate.load_or_generate(generate.GenerationSettings(), search_dirs=(repo / "data",),
                                      verbose=False)["train"]
    if n is not None:
        train = train.select(range(min(n, len(train))))
    if model is None:
        model, tokenizer = load_smollm2()
    extra = {"followups": followups, "variant": variant} if source == "flr" else {}
    return rescore_reward_dataset(train, source, model, tokenizer, **extra, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return min(centre - half, p), max(centre + half, p)  # min/max: float rounding at p = 0 or 1


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """Share of pairs where the chosen response scores higher (a tie counts 1/2), with a Wilson 95 % interval.

    Returns ``{"accuracy", "low", "high", "n", "ties"}``.
    """
    chosen, rejected = np.asarray(chosen, float), np.asarray(rejected, float)
    if chosen.shape != rejected.shape or chosen.ndim != 1 or not len(chosen):
        raise ValueError(f"chosen and rejected must be equal-length 1-D, got {chosen.shape} and {rejected.shape}")
    ties = int((chosen == rejected).sum())
    p = float(((chosen > rejected).sum() + 0.5 * ties) / len(chosen))
    low, high = _wilson(p, len(chosen))
    return {"accuracy": p, "low": low, "high": high, "n": len(chosen), "ties": ties}


def accuracy_difference(a_chosen, a_rejected, b_chosen, b_rejected, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """Pairwise accuracy of scorer A minus that of scorer B on the *same* pairs, with a paired bootstrap 95 % interval
    (pairs resampled together, so the interval reflects how much the two scorers' per-pair outcomes co-vary)."""
    wins = []
    for chosen, rejected in ((a_chosen, a_rejected), (b_chosen, b_rejected)):
        chosen, rejected = np.asarray(chosen, float), np.asarray(rejected, float)
        wins.append((chosen > rejected) + 0.5 * (chosen == rejected))  # (n,)
    if wins[0].shape != wins[1].shape:
        raise ValueError(f"b_chosen: {wins[1].shape[0]} pairs but scorer A has {wins[0].shape[0]}")
    delta = wins[0] - wins[1]  # (n,)
    draws = np.random.default_rng(seed).integers(0, len(delta), size=(n_boot, len(delta)))
    boot = delta[draws].mean(1)  # (n_boot,)
    return {"difference": float(delta.mean()), "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975)), "n": len(delta)}


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):  # average ranks of ties
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def ranking_metrics(scores: Sequence[Sequence[float]], golden: Sequence[Sequence[float]]) -> dict:
    """How well ``scores`` rank the K responses of each prompt against ``golden`` rewards (both ``(B, K)``).

    * ``spearman``: mean per-prompt Spearman correlation over prompts where neither row is constant (``n_spearman``);
    * ``pair_accuracy``: share of within-prompt pairs with different golden rewards that ``scores`` order the same
      way (a score tie counts 1/2), with its Wilson interval (``pair_low``, ``pair_high``, ``n_pairs``);
    * ``best_of_k``: mean golden reward of the response with the highest score (first on ties), beside ``oracle``
      (the best golden reward) and ``random`` (the mean golden reward).
    """
    scores, golden = np.asarray(scores, float), np.asarray(golden, float)
    if scores.shape != golden.shape or scores.ndim != 2:
        raise ValueError(f"scores and golden must both be (B, K), got {scores.shape} and {golden.shape}")
    rhos = []
    wins = []
    for s, g in zip(scores, golden):
        if np.ptp(s) > 0 and np.ptp(g) > 0:
            rhos.append(np.corrcoef(_ranks(s), _ranks(g))[0, 1])
        for i in range(len(s)):
            for j in range(len(s)):
                if g[i] > g[j]:
                    wins.append(1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
    best = golden[np.arange(len(golden)), scores.argmax(1)]
    out = {"spearman": float(np.mean(rhos)) if rhos else float("nan"), "n_spearman": len(rhos),
           "best_of_k": float(best.mean()), "oracle": float(golden.max(1).mean()), "random": float(golden.mean())}
    if wins:
        low, high = _wilson(float(np.mean(wins)), len(wins))
        out.update(pair_accuracy=float(np.mean(wins)), pair_low=low, pair_high=high, n_pairs=len(wins))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Evaluations: preference pairs and K scored responses
# --------------------------------------------------------------------------------------------------------------------


def hh_pairs(n: int | None = None, *, seed: int = 0, path: str | os.PathLike | None = None):
    """HH-RLHF harmless-base test pairs (:func:`nca_kit.data.load_hh_rlhf`; the 4 of 2,312 rows with an empty reply
    are skipped), in one order shuffled with ``seed``, cut to the first ``n``: a larger ``n`` keeps the pairs of a
    smaller one first (and their cached scores)."""
    from nca_kit.data import load_hh_rlhf

    data_logger = logging.getLogger("nca_kit.data")  # its load report names the file: keep it out of outputs
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        ds = load_hh_rlhf(path, on_invalid="skip")
    finally:
        data_logger.setLevel(level)
    ds = ds.shuffle(seed=seed)  # always: n only cuts the one seeded order, so any n keeps the pairs of a smaller one
    return ds if n is None else ds.select(range(min(n, len(ds))))


@dataclass
class PairEvaluation:
    """FLR and Direct on ``n`` preference pairs: ``flr`` scores ``2n`` responses (chosen at even rows, rejected at odd
    rows), ``direct`` ``(2n,)``; :meth:`table` gives pairwise accuracies, :meth:`disagreement` compares variants."""

    flr: FLRScores
    direct: np.ndarray

    @property
    def n(self) -> int:
        return len(self.direct) // 2

    def scorers(self) -> dict[tuple[str, str], np.ndarray]:
        """``{(scorer, category): (2n,) rewards}``: Direct, then FLR of each variant, all categories then each
        (when there are several)."""
        out = {("Direct", "-"): self.direct}
        for variant in VARIANTS:
            out[(f"FLR ({variant})", "all")] = self.flr.rewards(variant)
            if len(self.flr.categories) > 1:  # with one category, "all" is that category
                for category, rewards in self.flr.category_rewards(variant).items():
                    out[(f"FLR ({variant})", category)] = rewards
        return out

    def table(self):
        """A ``pandas.DataFrame``: one row per scorer and category, with ``accuracy``, ``low``, ``high``, ``n``."""
        import pandas as pd

        rows = [{"scorer": s, "category": c, **pairwise_accuracy(r[0::2], r[1::2])}
                for (s, c), r in self.scorers().items()]
        return pd.DataFrame(rows)

    def versus_direct(self, variant: str = "paper", category: str = "all") -> dict:
        """FLR accuracy minus Direct accuracy on these pairs, with its paired bootstrap interval."""
        flr = self.scorers()[(f"FLR ({variant})", category)]
        return accuracy_difference(flr[0::2], flr[1::2], self.direct[0::2], self.direct[1::2])

    def disagreement(self) -> dict:
        """How much the two variants differ on the all-category reward: share of pairs they order differently, and
        the Spearman correlation of their rewards over responses (and of their chosen-minus-rejected margins)."""
        paper, code = self.flr.rewards("paper"), self.flr.rewards("code")
        margin_paper, margin_code = paper[0::2] - paper[1::2], code[0::2] - code[1::2]
        return {"pairs_ordered_differently": float(np.mean(np.sign(margin_paper) != np.sign(margin_code))),
                "spearman_rewards": float(np.corrcoef(_ranks(paper), _ranks(code))[0, 1]),
                "spearman_margins": float(np.corrcoef(_ranks(margin_paper), _ranks(margin_code))[0, 1]),
                "n_pairs": self.n}


def evaluate_pairs(model, tokenizer, prompts: Sequence, chosen: Sequence[str], rejected: Sequence[str], *,
                   followups=None, categories: Sequence[str] | None = None, **kwargs) -> PairEvaluation:
    """Score every pair's chosen and rejected response with FLR (both variants, every category) and Direct.

    Keyword arguments go to :func:`flr_scores` and :func:`direct_rewards` (``cache_dir``, ``progress``, ...).
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(f"chosen / rejected: {len(chosen)} / {len(rejected)} given for {len(prompts)} prompts")
    both_prompts = [p for p in prompts for _ in range(2)]
    both = [t for pair in zip(chosen, rejected) for t in pair]
    batch_size = kwargs.pop("batch_size", 64)  # FLR's continuations per forward; Direct keeps its own default
    scores = flr_scores(model, tokenizer, both_prompts, both, followups=followups, categories=categories,
                        batch_size=batch_size, **kwargs)
    direct = direct_rewards(model, tokenizer, both_prompts, both, **kwargs)
    return PairEvaluation(scores, direct)


def evaluate_k_responses(model, tokenizer, dataset, *, followups="arithmetic", golden: str = "rewards",
                         correct_threshold: float | None = None, **kwargs):
    """FLR (each variant and category) and Direct against the golden rewards of a K-response dataset.

    Returns ``(table, scores)``: a ``pandas.DataFrame`` with one row per scorer and category holding
    :func:`ranking_metrics` (per-prompt Spearman, pairwise accuracy on pairs with different golden rewards, Best-of-K
    golden reward) and, with ``correct_threshold``, ``correct_pair_accuracy``: the same accuracy on pairs of one
    correct (golden >= threshold) and one wrong response; ``scores`` maps ``(scorer, category)`` to ``(B, K)``.
    """
    import pandas as pd

    ks = {len(r) for r in dataset["responses"]}
    if len(ks) != 1:
        raise ValueError(f"dataset: every row needs the same number of responses, got {sorted(ks)}")
    k = ks.pop()
    prompts = [p for p in dataset["prompt"] for _ in range(k)]
    responses = [r for rs in dataset["responses"] for r in rs]
    gold = np.asarray(dataset[golden], float)  # (B, K)
    batch_size = kwargs.pop("batch_size", 64)  # FLR's continuations per forward; Direct keeps its own default
    evaluation = PairEvaluation(flr_scores(model, tokenizer, prompts, responses, followups=followups,
                                           batch_size=batch_size, **kwargs),
                                direct_rewards(model, tokenizer, prompts, responses, **kwargs))
    scores = {key: value.reshape(-1, k) for key, value in evaluation.scorers().items()}
    rows = []
    for (scorer, category), s in scores.items():
        row = {"scorer": scorer, "category": category, **ranking_metrics(s, gold)}
        if correct_threshold is not None:
            correct = ranking_metrics(s, (gold >= correct_threshold).astype(float))
            row.update(correct_pair_accuracy=correct.get("pair_accuracy", float("nan")),
                       correct_pair_low=correct.get("pair_low", float("nan")),
                       correct_pair_high=correct.get("pair_high", float("nan")),
                       n_correct_pairs=correct.get("n_pairs", 0))
        rows.append(row)
    return pd.DataFrame(rows), scores


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------


def plot_pair_accuracy(table, ax=None, title: str = "Pairwise accuracy"):
    """Bars of accuracy (with 95 % intervals) by category, one colour per FLR variant, Direct as a dashed line with its
    interval as a grey band, chance as a grey line; every mark is in the legend."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.8))
    flr_rows = table[table.scorer.str.startswith("FLR")]
    categories = list(dict.fromkeys(flr_rows.category))
    variants = list(dict.fromkeys(flr_rows.scorer))
    width = 0.8 / len(variants)
    x = np.arange(len(categories))
    for i, variant in enumerate(variants):
        rows = flr_rows[flr_rows.scorer == variant].set_index("category").loc[categories]
        err = np.vstack([rows.accuracy - rows.low, rows.high - rows.accuracy])
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, rows.accuracy, width, yerr=err, capsize=2, label=variant)
    direct = table[table.scorer == "Direct"].iloc[0]
    ax.axhline(direct.accuracy, color="k", ls="--", lw=1, label=f"Direct ({direct.accuracy:.3f})")
    ax.axhspan(direct.low, direct.high, color="k", alpha=0.08, label="Direct's 95 % interval")
    ax.axhline(0.5, color="grey", lw=0.8, label="chance (0.5)")
    ax.set_xticks(x, [c.replace("_", "\n") for c in categories], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (n = {int(direct.n)} pairs, 95 % Wilson intervals)")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def plot_score_distributions(evaluation: PairEvaluation, variant: str = "paper", axes=None):
    """Histograms of chosen vs rejected rewards: FLR (``variant``, all categories) and Direct, and their margins."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (name, r) in zip(axes, [(f"FLR ({variant})", evaluation.flr.rewards(variant)),
                                    ("Direct", evaluation.direct)]):
        bins = np.histogram_bin_edges(r, bins=30)
        ax.hist(r[0::2], bins=bins, alpha=0.6, label="chosen")
        ax.hist(r[1::2], bins=bins, alpha=0.6, label="rejected")
        ax.set_title(f"{name} reward")
        ax.legend(fontsize=8)
    for name, r in [(f"FLR ({variant})", evaluation.flr.rewards(variant)), ("Direct", evaluation.direct)]:
        margin = r[0::2] - r[1::2]
        axes[2].hist(margin / (np.std(margin) or 1.0), bins=30, alpha=0.5, label=name)
    axes[2].axvline(0, color="k", lw=0.8)
    axes[2].set_title("chosen - rejected (standardised)")
    axes[2].legend(fontsize=8)
    return axes
