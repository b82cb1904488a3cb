"""The follow-ups of Follow-up Likelihood as Reward (:mod:`nca_kit.rewards.followup`): what a user replies to a good
answer (``positive``) and to a bad one (``negative``), by helpfulness category.

:data:`HELPFULNESS_FOLLOWUPS` holds the paper's six categories (:data:`CATEGORIES`), about ten sentences per category
and polarity written as a user would reply; :data:`ARITHMETIC_FOLLOWUPS` the correctness replies of the kit's
arithmetic task. :func:`load_followups` reads a named set, a mapping or a JSON file and checks it.

A follow-up is scored as one more user turn of the conversation: :func:`followup_tokens` finds, through the chat
template, the tokens of that turn and which of them are the follow-up's own; :func:`conversation_prefix` gives the
tokens of the conversation it continues.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from nca_kit.data import as_messages as normalize_prompt

__all__ = ["CATEGORIES", "POLARITIES", "HELPFULNESS_FOLLOWUPS", "ARITHMETIC_FOLLOWUPS", "load_followups",
           "flatten_followups",
           "followup_tokens", "conversation_prefix", "check_inputs", "FollowupTokens"]

#: The paper's six helpfulness categories of follow-ups.
CATEGORIES = ("understanding", "relevance", "correctness", "engagingness", "informativeness", "instruction_following")

POLARITIES = ("positive", "negative")

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


def flatten_followups(followups: Mapping) -> list[tuple[str, str, str]]:
    """``(category, polarity, text)`` in a fixed order: category by category, positives first."""
    return [(c, p, t) for c, lists in followups.items() for p in POLARITIES for t in lists[p]]


# --------------------------------------------------------------------------------------------------------------------
# Conversations and their tokens
# --------------------------------------------------------------------------------------------------------------------


def check_inputs(tokenizer, prompts, responses) -> list[list[dict]]:
    """The prompts as chat messages, after one-line ``ValueError`` checks of what a scorer is given."""
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
class FollowupTokens:
    """One follow-up turn as the continuation of ``prompt + response``: its ids, which of them are the follow-up's
    own tokens (``span``), and the pieces the public code reads (``code_position``, ``literal_position``,
    ``code_ids``)."""

    ids: tuple[int, ...]
    span: tuple[int, int]
    code_position: int  # t: variant "code" reads the state that predicts token t = span[0] + 1 (the state at the
    #                     follow-up's first token, what the public code reads on Llama-3's template)
    code_ids: tuple[int, ...]
    literal_position: int  # t of the literal logits[-L] offset (variant "code_literal"; t <= len(ids))


def followup_tokens(tokenizer, text: str) -> FollowupTokens:
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
    return FollowupTokens(tuple(ids), (inside[0], inside[-1] + 1), inside[0] + 1, tuple(code_ids), literal_position)


def _truncate_left(ids: list[int], max_length: int) -> list[int]:
    return ids[-max_length:]


def conversation_prefix(tokenizer, messages, response: str, max_length: int) -> list[int]:
    """Tokens of ``messages + [assistant response]`` (closed turn), keeping the last ``max_length``."""
    text = _template(tokenizer, list(messages) + [{"role": "assistant", "content": response}])
    return _truncate_left(_encode(tokenizer, text), max_length)

