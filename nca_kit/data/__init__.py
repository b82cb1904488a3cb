r"""Preference and reward data: canonical records, dataset adapters and conversions.

NCA and InfoNCA learn from **reward datasets** ``x -> {(y_i, r_i)}_{i=1..K}`` (paper Eq. 6 and 11); DPO and
pairwise NCA learn from **preference datasets** ``x -> (y_w > y_l)`` (Eq. 5 and 12). Every public dataset has its
own layout; this package turns each one into one of two canonical ``datasets.Dataset`` schemas. Three modules:

* :mod:`nca_kit.data.schema` — the two record schemas (:class:`RewardRecord`, :class:`PreferenceRecord`), their
  ``datasets`` features, validation, :func:`canonical_kind` / :func:`as_reward_row` (what tokenization reads), and
  the invalid-item policy: :data:`SKIP_REASONS`, :class:`InvalidRecordError`, :class:`LoadReport`;
* :mod:`nca_kit.data.loaders` — layout detection (:data:`LAYOUTS`, :func:`detect_layout`) and the adapters:
  :func:`load_reward_dataset`, :func:`load_preference_dataset`, :func:`load_hh_rlhf`, and
  :func:`load_training_dataset`, what the trainer reads;
* :mod:`nca_kit.data.convert` — :func:`rewards_to_pairs`, :func:`pairs_to_rewards`, :func:`subsample_responses`
  (the K ablation) and :func:`summarize`.

**Invalid items are never dropped silently.** ``on_invalid="raise"`` (the default) stops at the first one with an
:class:`InvalidRecordError` naming the row and the reason; ``on_invalid="skip"`` drops it and counts it in a
:class:`LoadReport` (logged through :mod:`logging`, returned with ``return_report=True``). In a reward row an
invalid *response* (empty text, missing or NaN reward) drops that response only; the prompt survives while at least
``min_responses`` responses remain. Ties are kept in reward data and never paired (see :mod:`nca_kit.data.convert`).
:func:`load_training_dataset` applies these checks to every way into training. A file that cannot be read at all
raises :class:`DataFileError`, one line naming the file, the line and what to do.
"""

from nca_kit.data.convert import PAIR_STRATEGIES, pairs_to_rewards, rewards_to_pairs, subsample_responses, summarize
from nca_kit.data.loaders import (
    LAYOUTS,
    ULTRAFEEDBACK_SCORES,
    Layout,
    detect_layout,
    hh_rlhf_local_path,
    load_hh_rlhf,
    load_preference_dataset,
    load_reward_dataset,
    load_training_dataset,
    parse_hh_transcript,
)
from nca_kit.data.schema import (
    PREFERENCE_FEATURES,
    REWARD_FEATURES,
    SKIP_REASONS,
    DataFileError,
    InvalidRecordError,
    LoadReport,
    Message,
    PreferenceRecord,
    RewardRecord,
    as_messages,
    as_reward_row,
    canonical_kind,
    dataset_to_records,
    records_to_dataset,
    validate_preference_dataset,
    validate_reward_dataset,
)

__all__ = [
    "Message",
    "RewardRecord",
    "PreferenceRecord",
    "REWARD_FEATURES",
    "PREFERENCE_FEATURES",
    "Layout",
    "LAYOUTS",
    "SKIP_REASONS",
    "PAIR_STRATEGIES",
    "ULTRAFEEDBACK_SCORES",
    "LoadReport",
    "InvalidRecordError",
    "DataFileError",
    "as_messages",
    "as_reward_row",
    "canonical_kind",
    "records_to_dataset",
    "dataset_to_records",
    "validate_reward_dataset",
    "validate_preference_dataset",
    "detect_layout",
    "load_reward_dataset",
    "load_preference_dataset",
    "load_training_dataset",
    "parse_hh_transcript",
    "hh_rlhf_local_path",
    "load_hh_rlhf",
    "rewards_to_pairs",
    "pairs_to_rewards",
    "subsample_responses",
    "summarize",
]
