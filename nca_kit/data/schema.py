r"""The two canonical record schemas of nca-kit, their validation, and the report of what a load left out.

Reward dataset (:class:`RewardRecord`, one row per prompt; InfoNCA / NCA, paper Eq. 6 and 11)::

    prompt     list of {"role", "content"} messages, ending with a user (or system) turn
    responses  list[str]    K assistant completions (K may differ between prompts)
    rewards    list[float]  K finite rewards, same order as ``responses``
    id         str          the source row's id, else its row number
    source     str          where the row comes from (the source's own ``source`` field, else the layout name)

Preference dataset (:class:`PreferenceRecord`, one row per pair; DPO and pairwise NCA, Eq. 5 and 12)::

    prompt          messages, as above
    chosen          str     the preferred completion y_w
    rejected        str     the other completion y_l
    score_chosen    float | None   the chosen response's score when the source has one
    score_rejected  float | None
    id, source      str

A plain-text prompt becomes a single user message (:func:`as_messages`). :func:`canonical_kind` tells the two
schemas apart from a dataset's columns; :func:`as_reward_row` reads either one as K scored responses, the form the
tokenizer of :mod:`nca_kit.logps` consumes (a pair is ``[chosen, rejected]`` with rewards ``[1, 0]``).

Invalid items: :data:`SKIP_REASONS` names every reason an item can be left out, :class:`InvalidRecordError` is what
``on_invalid="raise"`` raises, and :class:`LoadReport` counts what ``on_invalid="skip"`` and the conversions dropped.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, Sequence, TypedDict

import datasets

logger = logging.getLogger("nca_kit.data")

ROLES = ("system", "user", "assistant")
OnInvalid = Literal["raise", "skip"]


# --------------------------------------------------------------------------------------------------------------------
# Canonical records
# --------------------------------------------------------------------------------------------------------------------


class Message(TypedDict):
    """One chat turn: ``{"role": "system" | "user" | "assistant", "content": str}``."""

    role: str
    content: str


@dataclass
class RewardRecord:
    """One prompt with K scored responses: the unit of InfoNCA / NCA training (paper Sec. 3-4)."""

    prompt: list[Message]
    responses: list[str]
    rewards: list[float]
    id: str | None = None
    source: str | None = None

    @property
    def k(self) -> int:
        return len(self.responses)

    def problems(self) -> list[str]:
        """Reasons (keys of :data:`SKIP_REASONS`) why this record is not a valid reward record; empty when valid."""
        out = []
        reason = _prompt_problem(self.prompt)
        if reason:
            out.append(reason)
        if len(self.responses) != len(self.rewards):
            out.append("length_mismatch")
        for response in self.responses:
            reason = _response_problem(response)
            if reason:
                out.append(reason)
        for reward in self.rewards:
            value, reason = _parse_reward(reward)
            if reason:
                out.append(reason)
        if _contradicting_repeat(self.responses, self.rewards) is not None:
            out.append("duplicate_response")
        if len(self.responses) < 1:
            out.append("too_few_responses")
        return out

    def to_dict(self) -> dict:
        return {
            "prompt": [dict(m) for m in self.prompt],
            "responses": list(self.responses),
            "rewards": list(self.rewards),
            "id": self.id,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, row: Mapping) -> RewardRecord:
        return cls(
            prompt=as_messages(row["prompt"]),
            responses=list(row["responses"]),
            rewards=list(row["rewards"]),
            id=row.get("id"),
            source=row.get("source"),
        )


@dataclass
class PreferenceRecord:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion: DPO's unit (Eq. 5)."""

    prompt: list[Message]
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    id: str | None = None
    source: str | None = None

    def problems(self) -> list[str]:
        """Reasons (keys of :data:`SKIP_REASONS`) why this record is not a valid pair; empty when valid."""
        out = []
        reason = _prompt_problem(self.prompt)
        if reason:
            out.append(reason)
        for text in (self.chosen, self.rejected):
            reason = _response_problem(text)
            if reason:
                out.append(reason)
        if isinstance(self.chosen, str) and self.chosen == self.rejected:
            out.append("identical_pair")
        for score in (self.score_chosen, self.score_rejected):
            if score is not None:
                value, reason = _parse_reward(score)
                if reason and reason != "missing_reward":
                    out.append(reason)
        return out

    def to_dict(self) -> dict:
        return {
            "prompt": [dict(m) for m in self.prompt],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "score_chosen": self.score_chosen,
            "score_rejected": self.score_rejected,
            "id": self.id,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, row: Mapping) -> PreferenceRecord:
        return cls(
            prompt=as_messages(row["prompt"]),
            chosen=row["chosen"],
            rejected=row["rejected"],
            score_chosen=row.get("score_chosen"),
            score_rejected=row.get("score_rejected"),
            id=row.get("id"),
            source=row.get("source"),
        )


_MESSAGES = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]

#: Column types of a canonical reward dataset.
REWARD_FEATURES = datasets.Features(
    {
        "prompt": _MESSAGES,
        "responses": [datasets.Value("string")],
        "rewards": [datasets.Value("float64")],
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)

#: Column types of a canonical preference dataset.
PREFERENCE_FEATURES = datasets.Features(
    {
        "prompt": _MESSAGES,
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "score_chosen": datasets.Value("float64"),
        "score_rejected": datasets.Value("float64"),
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


def as_messages(prompt: str | Sequence[Mapping]) -> list[Message]:
    """A prompt as a list of messages: a string becomes one user message; message dicts are copied.

    Only ``role`` and ``content`` are kept. Raises ``ValueError`` on anything else.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        out = []
        for m in prompt:
            if "role" not in m or "content" not in m:
                raise ValueError(f"a message needs 'role' and 'content' keys, got keys {sorted(m)}")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise ValueError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")


def records_to_dataset(records: Iterable[RewardRecord | PreferenceRecord]) -> datasets.Dataset:
    """Canonical records -> ``datasets.Dataset`` with :data:`REWARD_FEATURES` or :data:`PREFERENCE_FEATURES`.

    All records must be of one type. An empty iterable gives an empty reward dataset.
    """
    records = list(records)
    kinds = {type(r) for r in records}
    if len(kinds) > 1:
        raise ValueError(f"records mix types {sorted(k.__name__ for k in kinds)}; convert them to one type first")
    if records and isinstance(records[0], PreferenceRecord):
        return _from_rows([r.to_dict() for r in records], PREFERENCE_FEATURES)
    if records and not isinstance(records[0], RewardRecord):
        raise ValueError(f"expected RewardRecord or PreferenceRecord, got {type(records[0]).__name__}")
    return _from_rows([r.to_dict() for r in records], REWARD_FEATURES)


def dataset_to_records(ds: datasets.Dataset) -> list[RewardRecord] | list[PreferenceRecord]:
    """``datasets.Dataset`` in a canonical schema -> list of :class:`RewardRecord` or :class:`PreferenceRecord`."""
    kind = canonical_kind(ds)
    cls = RewardRecord if kind == "reward" else PreferenceRecord
    return [cls.from_dict(row) for row in ds]


def validate_reward_dataset(ds: datasets.Dataset) -> None:
    """Raise ``ValueError`` unless ``ds`` is a canonical reward dataset whose every row is valid."""
    _validate(ds, "reward")


def validate_preference_dataset(ds: datasets.Dataset) -> None:
    """Raise ``ValueError`` unless ``ds`` is a canonical preference dataset whose every row is valid."""
    _validate(ds, "pairwise")


def _validate(ds: datasets.Dataset, kind: str) -> None:
    found = canonical_kind(ds)
    if found != kind:
        raise ValueError(f"expected a canonical {kind} dataset, got a {found} dataset (columns {ds.column_names})")
    cls = RewardRecord if kind == "reward" else PreferenceRecord
    bad = []
    for i, row in enumerate(ds):
        problems = cls.from_dict(row).problems()
        if problems:
            bad.append(f"row {i} (id {row.get('id')!r}): {', '.join(sorted(set(problems)))}")
    if bad:
        more = f" ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{len(bad)} invalid row(s) in {kind} dataset: " + "; ".join(bad[:5]) + more)


def canonical_kind(ds) -> str:
    """``"reward"`` or ``"pairwise"`` from a dataset's columns (or a list of column names); ``ValueError`` naming
    both schemas otherwise."""
    cols = set(ds if isinstance(ds, (list, tuple, set)) else ds.column_names)
    if {"prompt", "responses", "rewards"} <= cols:
        return "reward"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "pairwise"
    raise ValueError(
        f"columns {sorted(cols)} are neither the reward schema (prompt, responses, rewards) nor the pairwise schema "
        "(prompt, chosen, rejected); read other layouts with nca_kit.data.load_reward_dataset / "
        "load_preference_dataset"
    )


def as_reward_row(record: Mapping) -> dict:
    """``{prompt, responses, rewards}`` of a reward or a pairwise row, checked: what tokenization consumes.

    A pairwise row ``{prompt, chosen, rejected}`` becomes ``responses = [chosen, rejected]``, ``rewards = [1.0,
    0.0]``: with ``alpha -> 0`` InfoNCA on it is DPO and NCA is pairwise NCA (paper Sec. 3.2 / 4.2). Raises
    ``ValueError`` naming the problem (a key of :data:`SKIP_REASONS`) for an invalid row.
    """
    if "responses" in record and "rewards" in record:
        row = RewardRecord(as_messages(record["prompt"]), list(record["responses"]), list(record["rewards"]))
    elif "chosen" in record and "rejected" in record:
        row = RewardRecord(as_messages(record["prompt"]), [record["chosen"], record["rejected"]], [1.0, 0.0])
    else:
        raise ValueError(f"record needs 'responses' and 'rewards' (reward schema) or 'chosen' and 'rejected' "
                         f"(pairwise schema); it has {sorted(record)}")
    bad = [type(r).__name__ for r in row.responses if not isinstance(r, str)]
    if bad:
        raise ValueError(f"responses must be strings, got {', '.join(bad)}")
    problems = [p for p in row.problems() if p != "empty_response"]  # an empty completion is still a sequence
    if problems:
        raise ValueError(f"invalid record: {', '.join(sorted(set(problems)))} (prompt {row.prompt!r:.80})")
    return {"prompt": row.prompt, "responses": row.responses, "rewards": [float(r) for r in row.rewards]}


def _from_rows(rows: Iterable[dict], features: datasets.Features) -> datasets.Dataset:
    """Stream rows into an Arrow file and memory-map it: memory stays flat however many rows there are.

    The file goes to ``datasets``' temporary cache folder (deleted when the Python session ends), like the results of
    ``Dataset.map`` on an in-memory dataset; ``save_to_disk`` keeps a dataset for longer.
    """
    from datasets.arrow_writer import ArrowWriter
    from datasets.fingerprint import get_temporary_cache_files_directory

    path = os.path.join(get_temporary_cache_files_directory(), f"nca_kit-{uuid.uuid4().hex}.arrow")
    with ArrowWriter(features=features, path=path) as writer:
        for row in rows:
            writer.write(row)
        writer.finalize()
    return datasets.Dataset.from_file(path)


# --------------------------------------------------------------------------------------------------------------------
# Invalid items: the policy and the report
# --------------------------------------------------------------------------------------------------------------------

#: Why an item was left out. ``on_invalid`` governs the first group; the conversions' drops are never errors.
#: A problem with one response of a reward row drops that response (the row stays while ``min_responses`` remain);
#: any problem with a pair drops the pair.
SKIP_REASONS = {
    # invalid data (raise or skip, per on_invalid)
    "empty_prompt": "the prompt has no message, or only blank text",
    "malformed_conversation": "the messages cannot be split into a prompt and a final assistant completion",
    "inconsistent_prompt": "the K responses of a row were written for different prompts",
    "length_mismatch": "responses and rewards have different lengths",
    "empty_response": "a response is empty or blank",
    "wrong_type": "a value has the wrong type: responses or rewards not a list, a response not a string",
    "duplicate_response": "a response repeats an earlier one of the same prompt with a different reward",
    "missing_reward": "a reward or score is absent, null or 'N/A'",
    "nan_reward": "a reward or score is NaN or infinite",
    "unparseable_reward": "a reward or score is not a number",
    "reward_out_of_range": "a reward or score the loss cannot use exactly: beyond float64's range, or an integer "
                           "beyond 2**53 (not exact in float64, so rewards that differ could tie)",
    "identical_pair": "chosen and rejected are the same text",
    "too_few_responses": "fewer than min_responses valid responses remain for the prompt",
    # conversions (always counted, never raised)
    "all_tied": "every response of the prompt has the same reward, so it yields no pair",
    "tied_pairs": "a response was not paired with another one of equal reward",
}

_CONVERSION_REASONS = ("all_tied", "tied_pairs")


class DataFileError(ValueError):
    """A data file that cannot be read as records; the message names the file, the line and what to do."""


class InvalidRecordError(ValueError):
    """An invalid row under ``on_invalid="raise"``; ``reason`` is a key of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, where: str, detail: str = "", source: str = ""):
        self.reason, self.where, self.detail = reason, where, detail
        if len(detail) > 120:  # a 400-digit reward is named, not printed
            detail = detail[:80] + f"... ({len(detail)} characters)"
        msg = f"{reason} at {where}" + (f" in {source}" if source else "") + (f" ({detail})" if detail else "")
        msg += f": {SKIP_REASONS.get(reason, '')}. Pass on_invalid='skip' to drop and count such items instead."
        super().__init__(msg)


@dataclass
class LoadReport:
    """What a loader or a conversion read, kept and left out, by reason.

    ``skipped`` counts items left out (keys of :data:`SKIP_REASONS`); ``notes`` counts items kept but adjusted or
    worth a look: ``merged_consecutive_turns`` (an HH-RLHF row with consecutive turns of one role, joined with a
    blank line), ``merged_assistant_turns`` (a completion made of several assistant messages, joined likewise),
    ``repeated_response`` (a response of a reward row that repeats an earlier one with the same reward, as K samples
    of a policy may: kept, since both are draws of the data distribution),
    ``tied_scores`` / ``score_contradicts_label`` (:func:`pairs_to_rewards`) and ``fewer_than_k``
    (:func:`subsample_responses`).
    ``examples`` keeps the first few places per reason: the row id (the source's id, else its row number), with
    ``[i]`` appended for response ``i`` of a reward row and ``.chosen`` / ``.rejected`` for one side of a pair.
    """

    source: str = ""
    layout: str = ""
    rows_in: int = 0
    rows_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    max_examples = 5

    def skip(self, reason: str, where: str, n: int = 1) -> None:
        self.skipped[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    def note(self, kind: str, where: str, n: int = 1) -> None:
        self.notes[kind] += n
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    def merge(self, other: LoadReport) -> LoadReport:
        """This report followed by ``other`` (a later step): counts add up, ``rows_out`` is the later step's."""
        out = LoadReport(
            source=self.source or other.source,
            layout=" -> ".join(x for x in (self.layout, other.layout) if x),
            rows_in=self.rows_in,
            rows_out=other.rows_out,
            skipped=self.skipped + other.skipped,
            notes=self.notes + other.notes,
        )
        for rep in (self, other):
            for k, v in rep.examples.items():
                out.examples.setdefault(k, []).extend(v[: self.max_examples - len(out.examples.get(k, []))])
        return out

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "layout": self.layout,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "skipped": dict(sorted(self.skipped.items())),
            "notes": dict(sorted(self.notes.items())),
        }

    def __str__(self) -> str:
        head = f"{self.source or '<data>'} [{self.layout}]: {self.rows_in} rows in -> {self.rows_out} rows out"
        lines = [head]
        for title, counts in (("skipped", self.skipped), ("notes", self.notes)):
            for k, v in sorted(counts.items()):
                ex = ", ".join(self.examples.get(k, []))
                lines.append(f"  {title} {k}: {v}" + (f" (e.g. {ex})" if ex else ""))
        return "\n".join(lines)

    def log(self, log: logging.Logger = logger) -> None:
        """Log the report: WARNING when something was left out, INFO otherwise."""
        invalid = sum(v for k, v in self.skipped.items() if k not in _CONVERSION_REASONS)
        log.log(logging.WARNING if invalid else logging.INFO, "%s", self)


class _Policy:
    """Applies ``on_invalid`` to one load and fills its report."""

    def __init__(self, on_invalid: OnInvalid, report: LoadReport):
        if on_invalid not in ("raise", "skip"):
            raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
        self.on_invalid, self.report = on_invalid, report

    def invalid(self, reason: str, where: str, detail: str = "") -> None:
        if self.on_invalid == "raise":
            raise InvalidRecordError(reason, where, detail, self.report.source)
        self.report.skip(reason, where)


def _prompt_problem(prompt) -> str | None:
    if not isinstance(prompt, list) or not prompt:
        return "empty_prompt"
    for m in prompt:
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "malformed_conversation"
    if not any(m["content"].strip() for m in prompt):
        return "empty_prompt"
    if prompt[-1]["role"] == "assistant":
        return "malformed_conversation"
    return None


def _response_problem(response) -> str | None:
    if not isinstance(response, str):
        return "wrong_type"
    if not response.strip():
        return "empty_response"
    return None


def _contradicting_repeat(responses: Sequence, rewards: Sequence) -> int | None:
    """Index of the first response that repeats an earlier one with a different reward, else None."""
    seen = {}
    for i, (y, r) in enumerate(zip(responses, rewards)):
        if not isinstance(y, str):
            continue
        value = _parse_reward(r)[0]
        if y in seen and seen[y] != value:
            return i
        seen.setdefault(y, value)
    return None


_MISSING_STRINGS = {"", "n/a", "na", "none", "null"}


#: Integers up to this magnitude are exact in float64, the precision rewards keep until the soft labels.
MAX_EXACT_INT_REWARD = 2**53


def _parse_reward(x) -> tuple[float | None, str | None]:
    """``(value, None)`` for a number the loss can use exactly (a finite float64; an integer at most
    :data:`MAX_EXACT_INT_REWARD` in magnitude), else ``(None, reason)``."""
    if x is None:
        return None, "missing_reward"
    if isinstance(x, bool):
        return None, "unparseable_reward"
    if isinstance(x, str):
        text = x.strip().lower()
        if text in _MISSING_STRINGS:
            return None, "missing_reward"
        try:
            x = float(text)
        except ValueError:
            return None, "unparseable_reward"
        if not math.isfinite(x) and "inf" not in text and "nan" not in text:
            return None, "reward_out_of_range"  # a number written out, beyond float64 ("1e400")
    if isinstance(x, numbers.Integral):
        if abs(int(x)) > MAX_EXACT_INT_REWARD:
            return None, "reward_out_of_range"
    try:
        value = float(x)
    except OverflowError:
        return None, "reward_out_of_range"
    except (TypeError, ValueError):
        return None, "unparseable_reward"
    if not math.isfinite(value):
        return None, "nan_reward"
    return value, None


