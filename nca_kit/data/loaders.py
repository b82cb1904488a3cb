r"""Dataset layouts and their adapters: every supported public layout read into a canonical schema.

**Layouts** (:data:`LAYOUTS`, detected from the columns by :func:`detect_layout`): raw ``openbmb/UltraFeedback``,
the NCA authors' ``A0..A{K-1}`` reward layout, ``HuggingFaceH4/ultrafeedback_binarized``,
``openbmb/UltraInteract_pair``, TRL's preference format with explicit or implicit prompt, ``Anthropic/hh-rlhf``
transcripts, and the canonical schemas themselves. :func:`load_reward_dataset` and :func:`load_preference_dataset`
read any of them from a hub id (through ``datasets.load_dataset``), a local ``.jsonl`` / ``.json`` / ``.parquet``
file (``.gz`` allowed), a ``save_to_disk`` folder, or an in-memory ``Dataset`` / list of dicts.
:func:`load_training_dataset` is what the trainer reads: a local canonical file, or any layout through the loaders.

Adding a layout: a :class:`Layout` entry in :data:`LAYOUTS` (and its place in ``_DETECTION_ORDER``) and a row reader
in ``_REWARD_READERS`` or ``_PAIR_READERS`` that yields canonical dicts through ``_build_reward`` / ``_build_pair``.
"""

from __future__ import annotations

import codecs
import gzip
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import datasets

from nca_kit.data.convert import pairs_to_rewards, rewards_to_pairs
from nca_kit.data.schema import (
    PREFERENCE_FEATURES,
    REWARD_FEATURES,
    DataFileError,
    LoadReport,
    Message,
    OnInvalid,
    _from_rows,
    _parse_reward,
    _Policy,
    _prompt_problem,
    _response_problem,
    as_messages,
    canonical_kind,
)

# --------------------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A dataset layout this module can read: its native kind, required columns and the hub dataset it mirrors."""

    name: str
    kind: Literal["reward", "pairwise"]
    required: tuple[str, ...]
    hub_id: str | None
    description: str


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("canonical_reward", "reward", ("prompt", "responses", "rewards"), None,
               "nca-kit reward records (prompt, responses[K], rewards[K])"),
        Layout("ultrafeedback", "reward", ("instruction", "completions"), "openbmb/UltraFeedback",
               "raw UltraFeedback: completions[].response with overall_score / fine-grained_score / annotations"),
        Layout("nca_reward", "reward", ("prompt", "A0", "score_A0", "A1", "score_A1"), "ChenDRAG/ultrafeedback_reward",
               "NCA authors' layout: A0..A{K-1} = [user, assistant] message lists, scores score_A0..score_A{K-1}"),
        Layout("ultrafeedback_binarized", "pairwise", ("prompt", "chosen", "rejected", "score_chosen",
               "score_rejected"), "HuggingFaceH4/ultrafeedback_binarized",
               "chosen/rejected = [user, assistant] message lists with their scores"),
        Layout("ultrainteract_pair", "pairwise", ("trajectory", "chosen", "rejected"), "openbmb/UltraInteract_pair",
               "trajectory = [{from, value}] turns, chosen/rejected = strings"),
        Layout("trl_explicit", "pairwise", ("prompt", "chosen", "rejected"), None,
               "TRL preference format with explicit prompt (strings or message lists); also canonical pairs"),
        Layout("hh_rlhf", "pairwise", ("chosen", "rejected"), "Anthropic/hh-rlhf",
               "chosen/rejected = '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts"),
        Layout("trl_implicit", "pairwise", ("chosen", "rejected"), None,
               "TRL preference format with implicit prompt: full conversations (or texts) sharing a prefix"),
    )
}

# Most specific first; hh_rlhf and trl_implicit share their columns and are told apart by the values.
_DETECTION_ORDER = ("ultrafeedback", "nca_reward", "canonical_reward", "ultrainteract_pair",
                    "ultrafeedback_binarized", "trl_explicit", "hh_rlhf", "trl_implicit")


def _layouts_help() -> str:
    return "; ".join(f"{lay.name} ({', '.join(lay.required)})" for lay in LAYOUTS.values())


def detect_layout(columns: Sequence[str], first_row: Mapping | None = None) -> str:
    """Name of the layout (a key of :data:`LAYOUTS`) whose required columns are all present.

    ``first_row`` tells ``hh_rlhf`` (Human/Assistant transcripts) from ``trl_implicit``, which share their columns.
    Raises ``ValueError`` listing the columns found and the layouts accepted when nothing matches.
    """
    cols = set(columns)
    for name in _DETECTION_ORDER:
        if set(LAYOUTS[name].required) <= cols:
            if name == "hh_rlhf" and not (first_row is not None and _looks_like_hh(first_row.get("chosen"))):
                continue
            return name
    raise ValueError(
        f"cannot detect the dataset layout from its columns {sorted(cols)}. Accepted layouts (required columns): "
        f"{_layouts_help()}. Rename the columns or pass layout=... explicitly."
    )


def _looks_like_hh(value) -> bool:
    return isinstance(value, str) and value.lstrip(" \n").startswith("Human:")


def _check_layout(layout: str, columns: Sequence[str], first_row: Mapping | None) -> str:
    if layout == "auto":
        return detect_layout(columns, first_row)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; accepted layouts (required columns): {_layouts_help()}")
    missing = [c for c in LAYOUTS[layout].required if c not in set(columns)]
    if missing:
        raise ValueError(f"layout {layout!r} needs columns {missing} that are missing; columns found: "
                         f"{sorted(columns)}")
    return layout


# --------------------------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _read_rows(source, split: str, name: str | None, data_dir: str | None):
    """``(columns, first_row, rows, label)`` from a Dataset, DatasetDict, list of dicts, local file or hub id.

    ``rows`` is an iterator over every row (``first_row`` included): files are read one record at a time, so memory
    does not grow with the file. The columns of a file are those of its first record.
    """
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"split {split!r} not in the DatasetDict (splits: {list(source)})")
        source = source[split]
    if isinstance(source, datasets.Dataset):
        return list(source.column_names), (source[0] if len(source) else None), iter(source), "<Dataset>"
    if isinstance(source, (list, tuple)):
        for i, row in enumerate(source):
            if not isinstance(row, Mapping):
                raise ValueError(f"rows[{i}] is a {type(row).__name__}; every row must be a dict (one record)")
        columns = list(dict.fromkeys(k for row in source for k in row))
        return columns, (source[0] if source else None), iter(source), "<rows>"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"cannot read data from a {type(source).__name__}")
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return _read_rows(loaded, split, name, data_dir)[:3] + (str(source),)
        rows = _read_file(path)
        first = next(rows, None)
        if first is None:
            raise DataFileError(f"{path}: the file holds no records")
        return list(first), first, itertools.chain([first], rows), str(source)
    if isinstance(source, str) and _HUB_ID.fullmatch(source):
        ds = datasets.load_dataset(source, name=name, data_dir=data_dir, split=split)
        return list(ds.column_names), (ds[0] if len(ds) else None), iter(ds), f"{source}[{split}]"
    raise FileNotFoundError(f"{source!r} is neither an existing file or folder nor a hub id of the form owner/name")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _read_file(path: Path) -> Iterator[dict]:
    """The records of a local file, one at a time; :class:`DataFileError` (file, line, what to do) on bad input.

    JSON Lines and Parquet are streamed; a JSON array (a file whose first character is ``[``) is parsed whole.
    A UTF-8 byte order mark at the start of the file is skipped.
    """
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    base = suffixes[:-1] if suffixes and suffixes[-1] == ".gz" else suffixes
    if not base or base[-1] not in (".jsonl", ".json"):
        raise ValueError(f"unsupported file type {''.join(suffixes)!r} for {path}; use .jsonl, .json or .parquet")
    opener = gzip.open if suffixes[-1] == ".gz" else open
    line_no, n_records = 0, 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                text = _decode_line(raw, path, line_no)
                if not text.strip():
                    continue
                if not n_records and text.lstrip().startswith("["):  # one JSON array, not JSON Lines
                    rest = b"".join(f)
                    yield from _records_of_array(text + _decode_line(rest, path, line_no + 1), path, line_no)
                    return
                n_records += 1
                yield _parse_record(text, path, line_no)
    except EOFError:
        raise DataFileError(f"{path}: the gzip stream ends early, after line {line_no} (a truncated file or "
                            "download); copy or compress the file again") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataFileError(f"{path}, line {line_no + 1}: not valid gzip data ({err}); check the file, or drop the "
                            ".gz suffix if it is not compressed") from None


def _decode_line(raw: bytes, path: Path, line_no: int) -> str:
    if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = line_no + raw[: err.start].count(b"\n")
        raise DataFileError(f"{path}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8 (the file is in another "
                            "encoding, e.g. latin-1); convert it to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _parse_record(text: str, path: Path, line_no: int) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}, line {line_no}, column {err.colno}: invalid JSON ({err.msg}); fix or remove "
                            "that line (JSON Lines: one complete object per line)") from None
    _check_record(record, text, path, line_no)
    return record


def _records_of_array(text: str, path: Path, first_line: int) -> Iterator[dict]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFileError(f"{path}, line {first_line + err.lineno - 1}, column {err.colno}: invalid JSON "
                            f"({err.msg}); fix the file") from None
    for record in records:
        _check_record(record, None, path, first_line)
        yield record


def _check_record(record, text: str | None, path: Path, line_no: int) -> None:
    if not isinstance(record, dict):
        raise DataFileError(f"{path}, line {line_no}: a record must be a JSON object, got a "
                            f"{type(record).__name__}; write one object {{...}} per line")
    if text is None or _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise DataFileError(f"{path}, line {line_no}: the escape \\u{ord(err.object[err.start]):04x} is half of "
                                "a UTF-16 surrogate pair, not text; fix or remove that escape") from None


# --------------------------------------------------------------------------------------------------------------------
# Conversation helpers
# --------------------------------------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_TURN_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def parse_hh_transcript(text: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[{"role": "user", "content": "a"}, {"role": "assistant", ...}]``.

    Turns are cut at every ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` and their text is stripped. A ``Human:`` that
    does not follow a blank line stays inside the turn's text. Consecutive turns of one role (a reply that itself
    contains ``"\\n\\nAssistant:"``) are joined with a blank line, so roles alternate as chat templates expect.
    Raises ``ValueError`` if text precedes the first turn.
    """
    return _parse_hh(text)[0]


def _parse_hh(text: str) -> tuple[list[Message], int]:
    """Messages of an HH transcript and the number of turns merged into their predecessor."""
    if not isinstance(text, str):
        raise ValueError(f"an HH-RLHF transcript must be a string, got {type(text).__name__}")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"text before the first Human/Assistant turn: {parts[0][:60]!r}")
    messages, merged = [], 0
    for i in range(1, len(parts), 2):
        role, content = _HH_ROLES[parts[i]], parts[i + 1].strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
            merged += 1
        else:
            messages.append({"role": role, "content": content})
    return messages, merged


def _split_shared_prefix(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], list, list]:
    """Longest common message prefix, cut back so that it ends with a non-assistant turn, and the two tails."""
    n = 0
    while n < min(len(chosen), len(rejected)) and _same_message(chosen[n], rejected[n]):
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    return [dict(m) for m in chosen[:n]], chosen[n:], rejected[n:]


def _same_message(a: Mapping, b: Mapping) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def _assistant_text(tail: Sequence[Mapping]) -> str | None:
    """The text of a completion made of assistant turns (joined by a blank line), or None if it is not one."""
    if not tail or any(m.get("role") != "assistant" or not isinstance(m.get("content"), str) for m in tail):
        return None
    return "\n\n".join(m["content"] for m in tail)


def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in x)


def _completion_text(prompt: list[Message], completion) -> tuple[str | None, int]:
    """A completion (string, or messages with or without the prompt in front) as text; also its number of turns."""
    if isinstance(completion, str):
        return completion, 1
    if not _is_messages(completion):
        return None, 0
    completion = list(completion)
    if len(completion) > len(prompt) and all(_same_message(a, b) for a, b in zip(prompt, completion)):
        completion = completion[len(prompt):]
    return _assistant_text(completion), len(completion)


def _common_text_prefix(a: str, b: str) -> int:
    """Length of the common prefix of two texts, cut back to a word boundary and before the whitespace there.

    ``"The sky is blue."`` / ``"The sky is black."`` -> 10: prompt ``"The sky is"``, completions ``" blue."`` and
    ``" black."`` (as TRL's ``extract_prompt`` leaves the space with the completion).
    """
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if n < min(len(a), len(b)):
        while n > 0 and not a[n - 1].isspace() and not a[n].isspace():
            n -= 1
    while n > 0 and a[n - 1].isspace():
        n -= 1
    return n


# --------------------------------------------------------------------------------------------------------------------
# Row builders (apply the policy, produce canonical dicts)
# --------------------------------------------------------------------------------------------------------------------


def _build_reward(prompt, responses: Sequence, rewards: Sequence, where: str, source: str, policy: _Policy,
                  min_responses: int) -> dict | None:
    reason = _prompt_problem(prompt)
    if reason:
        policy.invalid(reason, where)
        return None
    kept_y, kept_r, seen = [], [], {}
    for i, (y, r) in enumerate(zip(responses, rewards)):
        reason = _response_problem(y)
        if reason:
            policy.invalid(reason, f"{where}[{i}]", f"got {type(y).__name__}" if reason == "wrong_type" else "")
            continue
        value, reason = _parse_reward(r)
        if reason:
            policy.invalid(reason, f"{where}[{i}]", f"reward {r!r}")
            continue
        if y in seen:
            j = seen[y]
            if kept_r[j] != value:
                policy.invalid("duplicate_response", f"{where}[{i}]", f"reward {value} vs {kept_r[j]} for the same text")
                continue
            policy.report.note("repeated_response", f"{where}[{i}]")
        seen.setdefault(y, len(kept_y))
        kept_y.append(y)
        kept_r.append(value)
    if len(kept_y) < min_responses:
        policy.invalid("too_few_responses", where, f"{len(kept_y)} valid response(s), min_responses={min_responses}")
        return None
    return {"prompt": prompt, "responses": kept_y, "rewards": kept_r, "id": where, "source": source}


def _build_pair(prompt, chosen, rejected, score_chosen, score_rejected, where: str, source: str, policy: _Policy,
                require_scores: bool) -> dict | None:
    reason = _prompt_problem(prompt)
    if reason:
        policy.invalid(reason, where)
        return None
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        reason = _response_problem(text)
        if reason:
            policy.invalid(reason, f"{where}.{name}", f"got {type(text).__name__}" if reason == "wrong_type" else "")
            return None
    if chosen == rejected:
        policy.invalid("identical_pair", where)
        return None
    scores = []
    for name, s in (("score_chosen", score_chosen), ("score_rejected", score_rejected)):
        value, reason = _parse_reward(s)
        if reason == "missing_reward" and not require_scores:
            value = None
        elif reason:
            policy.invalid(reason, f"{where}.{name}", f"score {s!r}")
            return None
        scores.append(value)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": scores[0],
            "score_rejected": scores[1], "id": where, "source": source}


def _row_id(row: Mapping, index: int, *keys: str) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return str(index)


# ----- reward layouts ------------------------------------------------------------------------------------------------

#: Scores of a raw UltraFeedback completion: the critique's ``overall_score`` (1-10), the mean of the four aspect
#: ratings ``fine-grained_score`` (1-5), or one aspect's GPT-4 rating (1-5, "N/A" counts as missing).
ULTRAFEEDBACK_SCORES = ("overall_score", "fine-grained_score", "helpfulness", "honesty", "instruction_following",
                        "truthfulness")


def _ultrafeedback_score(completion: Mapping, score: str | Callable[[Mapping], Any]):
    if callable(score):
        return score(completion)
    if score in ("overall_score", "fine-grained_score"):
        return completion.get(score)
    aspect = (completion.get("annotations") or {}).get(score) or {}
    return aspect.get("Rating") if isinstance(aspect, Mapping) else None


def _reward_rows_ultrafeedback(rows, policy, report, *, score, min_responses, **_) -> Iterable[dict]:
    if not callable(score) and score not in ULTRAFEEDBACK_SCORES:
        raise ValueError(f"score must be one of {ULTRAFEEDBACK_SCORES} or a callable, got {score!r}")
    for index, row in enumerate(rows):
        where = _row_id(row, index, "id", "prompt_id")
        instruction = row.get("instruction")
        prompt = as_messages(instruction) if isinstance(instruction, str) else []
        completions = row.get("completions") or []
        if not isinstance(completions, list) or not all(isinstance(c, Mapping) for c in completions):
            policy.invalid("wrong_type", where, "completions must be a list of objects")
            yield None
            continue
        responses = [c.get("response") for c in completions]
        rewards = [_ultrafeedback_score(c, score) for c in completions]
        yield _build_reward(prompt, responses, rewards, where, row.get("source") or "openbmb/UltraFeedback", policy,
                            min_responses)


def _reward_rows_nca(rows, policy, report, *, min_responses, **_) -> Iterable[dict]:
    for index, row in enumerate(rows):
        where = _row_id(row, index, "id", "prompt_id")
        k = 0
        while f"A{k}" in row or f"score_A{k}" in row:
            k += 1
        yield _nca_row(row, k, where, policy, min_responses)


def _nca_row(row: Mapping, k: int, where: str, policy: _Policy, min_responses: int):
    prompts, responses, rewards = [], [], []
    for i in range(k):
        answer, score = row.get(f"A{i}"), row.get(f"score_A{i}")
        if answer is None and score is None:
            continue  # this row has fewer than k responses
        if isinstance(answer, str):  # the completion alone
            responses.append(answer)
        elif _is_messages(answer) and answer and answer[-1].get("role") == "assistant":
            prompts.append(as_messages(answer[:-1]))
            responses.append(answer[-1].get("content"))
        else:
            policy.invalid("malformed_conversation", f"{where}[{i}]", f"A{i} does not end with an assistant turn")
            return None
        rewards.append(score)
    prompts = [p for p in prompts if p]
    if any(p != prompts[0] for p in prompts[1:]):
        policy.invalid("inconsistent_prompt", where)
        return None
    if prompts:
        prompt = prompts[0]
    elif isinstance(row.get("prompt"), (str, list)):
        prompt = as_messages(row["prompt"])
    else:
        prompt = []
    return _build_reward(prompt, responses, rewards, where, row.get("source") or "nca_reward", policy,
                         min_responses)


def _reward_rows_canonical(rows, policy, report, *, min_responses, **_) -> Iterable[dict]:
    for index, row in enumerate(rows):
        where = _row_id(row, index, "id")
        try:
            prompt = as_messages(row.get("prompt"))
        except ValueError:
            prompt = []
        responses, rewards = row.get("responses"), row.get("rewards")
        wrong = [f"{name} is {type(v).__name__}" for name, v in (("responses", responses), ("rewards", rewards))
                 if not isinstance(v, (list, tuple))]
        if wrong:
            policy.invalid("wrong_type", where, ", ".join(wrong) + "; lists expected")
            yield None
            continue
        if len(responses) != len(rewards):
            policy.invalid("length_mismatch", where, f"{len(responses)} responses, {len(rewards)} rewards")
            yield None
            continue
        yield _build_reward(prompt, responses, rewards, where, row.get("source") or "canonical_reward", policy,
                            min_responses)


# ----- pairwise layouts ----------------------------------------------------------------------------------------------


def _pair_rows_explicit(rows, policy, report, *, layout, require_scores, **_) -> Iterable[dict]:
    """``trl_explicit`` and ``ultrafeedback_binarized``: prompt column + completions as text or messages."""
    for index, row in enumerate(rows):
        where = _row_id(row, index, "id", "prompt_id")
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if _is_messages(chosen) and _is_messages(rejected) and len(chosen) > 1 and len(rejected) > 1:
            # Full conversations (ultrafeedback_binarized): the prompt is their shared prefix.
            prompt, tail_c, tail_r = _split_shared_prefix(list(chosen), list(rejected))
            if not prompt and isinstance(row.get("prompt"), (str, list)):
                prompt = as_messages(row["prompt"])
            tails = (tail_c, tail_r)
        else:
            prompt_value = row.get("prompt")
            prompt = as_messages(prompt_value) if isinstance(prompt_value, (str, list)) else []
            tails = (chosen, rejected)
        texts = []
        for name, tail in zip(("chosen", "rejected"), tails):
            if not isinstance(tail, (str, list, tuple)):
                policy.invalid("wrong_type", f"{where}.{name}", f"got {type(tail).__name__}, not text or messages")
                break
            text, n_turns = _completion_text(prompt, tail)
            if text is None:
                policy.invalid("malformed_conversation", f"{where}.{name}", "not assistant turn(s) after the prompt")
                break
            if n_turns > 1:
                report.note("merged_assistant_turns", f"{where}.{name}")
            texts.append(text)
        if len(texts) < 2:
            yield None
            continue
        yield _build_pair(prompt, texts[0], texts[1], row.get("score_chosen"), row.get("score_rejected"), where,
                          row.get("source") or layout, policy, require_scores)


def _pair_rows_implicit(rows, policy, report, *, layout, require_scores, **_) -> Iterable[dict]:
    """``trl_implicit`` and ``hh_rlhf``: the prompt is the shared prefix of two full conversations."""
    for index, row in enumerate(rows):
        where = _row_id(row, index, "id", "prompt_id")
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if layout == "hh_rlhf" or (isinstance(chosen, str) and _looks_like_hh(chosen)):
            try:
                (chosen, merged_c), (rejected, merged_r) = _parse_hh(chosen), _parse_hh(rejected)
            except ValueError as e:
                policy.invalid("malformed_conversation", where, str(e))
                yield None
                continue
            if merged_c or merged_r:
                report.note("merged_consecutive_turns", where)
        if isinstance(chosen, str) and isinstance(rejected, str):
            n = _common_text_prefix(chosen, rejected)
            prompt = as_messages(chosen[:n]) if chosen[:n].strip() else []
            texts = [chosen[n:], rejected[n:]]
        elif _is_messages(chosen) and _is_messages(rejected):
            prompt, tail_c, tail_r = _split_shared_prefix(list(chosen), list(rejected))
            texts = []
            for name, tail in (("chosen", tail_c), ("rejected", tail_r)):
                text = _assistant_text(tail)
                if text is None and tail:
                    policy.invalid("malformed_conversation", f"{where}.{name}",
                                   f"after the shared prompt come {[m.get('role') for m in tail]} turns")
                    break
                if len(tail) > 1:
                    report.note("merged_assistant_turns", f"{where}.{name}")
                texts.append(text or "")
            if len(texts) < 2:
                yield None
                continue
        else:
            policy.invalid("malformed_conversation", where, "chosen/rejected are neither texts nor message lists")
            yield None
            continue
        source = "Anthropic/hh-rlhf" if layout == "hh_rlhf" else (row.get("source") or layout)
        yield _build_pair(prompt, texts[0], texts[1], row.get("score_chosen"), row.get("score_rejected"), where,
                          source, policy, require_scores)


def _pair_rows_ultrainteract(rows, policy, report, *, require_scores, **_) -> Iterable[dict]:
    for index, row in enumerate(rows):
        where = _row_id(row, index, "id")
        turns = row.get("trajectory") or []
        roles = [_TURN_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, Mapping) else None for t in turns]
        if None in roles or not all(isinstance(t.get("value"), str) for t in turns):
            policy.invalid("malformed_conversation", where, "trajectory turns need from in user/assistant and a value")
            yield None
            continue
        prompt = [{"role": role, "content": t["value"]} for role, t in zip(roles, turns)]
        source = row.get("dataset") or "openbmb/UltraInteract_pair"
        yield _build_pair(prompt, row.get("chosen"), row.get("rejected"), None, None, where, source, policy,
                          require_scores)


_REWARD_READERS = {
    "ultrafeedback": _reward_rows_ultrafeedback,
    "nca_reward": _reward_rows_nca,
    "canonical_reward": _reward_rows_canonical,
}
_PAIR_READERS = {
    "ultrafeedback_binarized": _pair_rows_explicit,
    "trl_explicit": _pair_rows_explicit,
    "trl_implicit": _pair_rows_implicit,
    "hh_rlhf": _pair_rows_implicit,
    "ultrainteract_pair": _pair_rows_ultrainteract,
}


def _check_min_responses(min_responses) -> None:
    if isinstance(min_responses, bool) or not isinstance(min_responses, int) or min_responses < 1:
        raise ValueError(f"min_responses must be an integer >= 1, got {min_responses!r}")


def _counted(records: Iterable[dict | None], report: LoadReport) -> Iterator[dict]:
    """The valid records, counting every row read in ``report.rows_in``."""
    for rec in records:
        report.rows_in += 1
        if rec is not None:
            yield rec


def _load_rewards(columns, rows, label, layout, *, score, on_invalid, min_responses, pair_rewards):
    """Rows of a known layout -> (canonical reward dataset, report); nothing logged."""
    if LAYOUTS[layout].kind == "pairwise":
        has_scores = {"score_chosen", "score_rejected"} <= set(columns)
        use = pair_rewards if pair_rewards != "auto" else ("scores" if has_scores else "binary")
        pairs, report = _load_pairs(columns, rows, label, layout, on_invalid=on_invalid,
                                    require_scores=use == "scores")
        ds, conv = pairs_to_rewards(pairs, rewards=use, return_report=True)
        return ds, report.merge(conv)
    _check_min_responses(min_responses)
    report = LoadReport(source=label, layout=layout)
    policy = _Policy(on_invalid, report)
    records = _REWARD_READERS[layout](rows, policy, report, score=score, min_responses=min_responses)
    ds = _from_rows(_counted(records, report), REWARD_FEATURES)
    report.rows_out = len(ds)
    return ds, report


def _load_pairs(columns, rows, label, layout, *, on_invalid, require_scores=False, score="overall_score",
                min_responses=2, strategy="zephyr", seed=0):
    """Rows of a known layout -> (canonical preference dataset, report); nothing logged."""
    if LAYOUTS[layout].kind == "reward":
        rewards, report = _load_rewards(columns, rows, label, layout, score=score, on_invalid=on_invalid,
                                        min_responses=min_responses, pair_rewards="auto")
        ds, conv = rewards_to_pairs(rewards, strategy, seed=seed, return_report=True)
        return ds, report.merge(conv)
    report = LoadReport(source=label, layout=layout)
    policy = _Policy(on_invalid, report)
    records = _PAIR_READERS[layout](rows, policy, report, layout=layout, require_scores=require_scores)
    ds = _from_rows(_counted(records, report), PREFERENCE_FEATURES)
    report.rows_out = len(ds)
    return ds, report


def _finish(ds: datasets.Dataset, report: LoadReport, return_report: bool):
    report.log()
    return (ds, report) if return_report else ds


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------


def load_reward_dataset(
    source,
    *,
    layout: str = "auto",
    split: str = "train",
    score: str | Callable[[Mapping], Any] = "overall_score",
    on_invalid: OnInvalid = "raise",
    min_responses: int = 2,
    pair_rewards: Literal["auto", "scores", "binary"] = "auto",
    name: str | None = None,
    data_dir: str | None = None,
    return_report: bool = False,
):
    """Load any supported layout as a canonical reward dataset (one row per prompt, K scored responses).

    Args:
        source: hub id (e.g. ``"openbmb/UltraFeedback"``, read with ``datasets.load_dataset``), local ``.jsonl`` /
            ``.json`` / ``.parquet`` file (optionally ``.gz``) or ``save_to_disk`` folder, ``Dataset``,
            ``DatasetDict`` or list of dicts. Files are read one record at a time (memory stays flat); a line that
            cannot be read raises :class:`~nca_kit.data.DataFileError` naming the file and the line.
        layout: a key of :data:`LAYOUTS`, or ``"auto"`` to detect it from the columns (:func:`detect_layout`).
        split: split to read from a hub id or a ``DatasetDict`` (UltraFeedback: ``"train"``; the NCA authors' data
            and ultrafeedback_binarized: ``"train_prefs"`` / ``"test_prefs"``).
        score: raw UltraFeedback only: which score is the reward, one of :data:`ULTRAFEEDBACK_SCORES` or a
            callable ``completion_dict -> number``. A completion without that score is invalid (``missing_reward``).
        on_invalid: ``"raise"`` stops at the first invalid item; ``"skip"`` drops and counts it.
        min_responses: a prompt with fewer valid responses is invalid (``too_few_responses``). K = 1 teaches nothing
            to a contrastive loss, hence the default 2.
        pair_rewards: for pairwise layouts, how to make K = 2 rewards (see :func:`pairs_to_rewards`). ``"auto"``
            uses the scores when the layout has score columns (a missing score is then invalid), else ``(1, 0)``.
        name, data_dir: passed to ``datasets.load_dataset`` for hub ids.
        return_report: also return the :class:`LoadReport` (it is logged either way).

    Returns:
        A ``Dataset`` with :data:`REWARD_FEATURES` (backed by an Arrow file on disk), or ``(dataset, report)``.
    """
    columns, first, rows, label = _read_rows(source, split, name, data_dir)
    layout = _check_layout(layout, columns, first)
    ds, report = _load_rewards(columns, rows, label, layout, score=score, on_invalid=on_invalid,
                               min_responses=min_responses, pair_rewards=pair_rewards)
    return _finish(ds, report, return_report)


def load_preference_dataset(
    source,
    *,
    layout: str = "auto",
    split: str = "train",
    score: str | Callable[[Mapping], Any] = "overall_score",
    strategy: str = "zephyr",
    seed: int = 0,
    on_invalid: OnInvalid = "raise",
    min_responses: int = 2,
    name: str | None = None,
    data_dir: str | None = None,
    return_report: bool = False,
):
    """Load any supported layout as a canonical preference dataset (one row per chosen/rejected pair).

    Pairwise layouts are read directly; reward layouts are read as in :func:`load_reward_dataset` (``score``,
    ``min_responses``) and turned into pairs by :func:`rewards_to_pairs` (``strategy``, ``seed``). The other
    arguments are those of :func:`load_reward_dataset`. Scores are optional here: a pair without them keeps
    ``score_chosen = score_rejected = None``.

    Returns:
        A ``Dataset`` with :data:`PREFERENCE_FEATURES`, or ``(dataset, report)`` with ``return_report=True``.
    """
    columns, first, rows, label = _read_rows(source, split, name, data_dir)
    layout = _check_layout(layout, columns, first)
    ds, report = _load_pairs(columns, rows, label, layout, on_invalid=on_invalid, score=score,
                             min_responses=min_responses, strategy=strategy, seed=seed)
    return _finish(ds, report, return_report)


# ----- HH-RLHF ------------------------------------------------------------------------------------------------------

HH_RLHF_ENV = "NCA_KIT_HH_RLHF"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def hh_rlhf_local_path(split: str = "test", data_dir: str = "harmless-base") -> Path | None:
    """The local HH-RLHF file to use, or None: ``$NCA_KIT_HH_RLHF`` if set, else
    ``<repo>/../shared/data/hh-rlhf/{data_dir}-{split}.jsonl.gz`` if it exists."""
    env = os.environ.get(HH_RLHF_ENV)
    if env:
        return Path(env).expanduser()
    candidate = _REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / f"{data_dir}-{split}.jsonl.gz"
    return candidate if candidate.exists() else None


def load_hh_rlhf(
    path: str | os.PathLike | None = None,
    split: str = "test",
    data_dir: str = "harmless-base",
    *,
    on_invalid: OnInvalid = "raise",
    return_report: bool = False,
):
    """Anthropic HH-RLHF as a canonical preference dataset.

    Each row holds two transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` that share every turn but the last
    assistant reply. Both are parsed into messages (:func:`parse_hh_transcript`); their longest common prefix, cut
    back to end with a user turn, is the prompt; what follows is the chosen / rejected completion. A few transcripts
    hold consecutive turns of one role (a reply that itself contains ``"\\n\\nAssistant:"``): they are joined with a
    blank line and counted in ``report.notes["merged_consecutive_turns"]``. Some rows have an empty chosen reply
    (4 of the 2,312 rows of harmless-base test): ``on_invalid`` applies, so pass ``on_invalid="skip"`` to keep the
    other rows.

    Reads ``path`` when given, else :func:`hh_rlhf_local_path`, else
    ``datasets.load_dataset("Anthropic/hh-rlhf", data_dir=data_dir, split=split)``.
    """
    if path is None:
        path = hh_rlhf_local_path(split, data_dir)
    if path is not None:
        if not Path(path).expanduser().exists():
            raise FileNotFoundError(f"HH-RLHF file not found: {path}")
        source = str(path)
        hub_kwargs = {}
    else:
        source = "Anthropic/hh-rlhf"
        hub_kwargs = {"data_dir": data_dir, "split": split}
    return load_preference_dataset(source, layout="hh_rlhf", on_invalid=on_invalid, return_report=return_report,
                                   **hub_kwargs)



# ----- what the trainer reads ----------------------------------------------------------------------------------------

from nca_kit.config import DATA_KINDS  # noqa: E402  (one definition, shared with TrainConfig)


def load_training_dataset(source, *, layout: str | None = None, split: str = "train", data_kind: str = "auto",
                          max_samples: int | None = None, on_invalid: OnInvalid = "raise",
                          min_responses: int = 2) -> tuple[datasets.Dataset, str]:
    """``(dataset, kind)``: a validated training set in a canonical schema and ``"reward"`` or ``"pairwise"``.

    Every row is checked before anything trains (the rules of :func:`load_reward_dataset`): an invalid one raises
    :class:`~nca_kit.data.InvalidRecordError` naming its id under ``on_invalid="raise"``, or is dropped and counted
    (the report is logged) under ``"skip"``. Without ``layout``, ``source`` is an in-memory ``Dataset`` or a local
    ``.jsonl`` / ``.json`` / ``.parquet`` file (``.gz`` allowed) in the canonical reward (``prompt, responses,
    rewards``) or pairwise (``prompt, chosen, rejected``) schema. With a layout (a key of :data:`LAYOUTS`, or
    ``"auto"``), the data goes through :func:`load_reward_dataset` / :func:`load_preference_dataset` (hub ids,
    UltraFeedback, UltraInteract, HH-RLHF, ...). ``data_kind="auto"`` keeps the data's own kind; ``max_samples``
    keeps the first N valid prompts. Raises ``ValueError`` when no valid row is left.
    """
    if data_kind not in DATA_KINDS:
        raise ValueError(f"data_kind must be one of {DATA_KINDS}, got {data_kind!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
        raise ValueError(f"max_train_samples must be >= 1 (or None for all rows), got {max_samples!r}")
    if layout:
        if layout not in LAYOUTS and layout != "auto":
            raise ValueError(f"unknown dataset_layout {layout!r}; known: {', '.join(LAYOUTS)}")
        kind = data_kind
        if kind == "auto":
            kind = LAYOUTS[layout].kind if layout in LAYOUTS else "reward"
    else:
        if isinstance(source, (str, os.PathLike)) and not os.path.exists(source):
            raise FileNotFoundError(f"dataset file {str(source)!r} does not exist")
        found = canonical_kind(_read_rows(source, split, None, None)[0])
        kind = found if data_kind == "auto" else data_kind
        if kind != found:
            raise ValueError(f"data_kind={data_kind!r} but {source} holds {found} data")
        layout = "canonical_reward" if kind == "reward" else "trl_explicit"
    load = load_reward_dataset if kind == "reward" else load_preference_dataset
    dataset, report = load(source, layout=layout, split=split, on_invalid=on_invalid, min_responses=min_responses,
                           return_report=True)
    if len(dataset) == 0:
        raise ValueError(f"no valid training rows in {report.source}: {report.rows_in} read, skipped "
                         f"{dict(report.skipped)}")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, kind
