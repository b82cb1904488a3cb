r"""Conversions between the canonical schemas, the K ablation's subsampling, and summary statistics.

**Ties.** A reward dataset keeps ties as they are: InfoNCA / NCA turn rewards into soft labels
``softmax(r / alpha)``, which simply share the weight between tied responses. Pairs are different, since a pair
asserts a preference: conversions to pairs never pair two responses of equal reward, and a prompt whose responses
all tie yields no pair at all. Both are counted in the report (``tied_pairs`` and ``all_tied``). Where a rule needs
"the best" response and several tie for the maximum, the first of them (lowest index) is used.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Literal, Sequence

import datasets
import numpy as np

from nca_kit.data.schema import PREFERENCE_FEATURES, REWARD_FEATURES, LoadReport, _from_rows, canonical_kind

# --------------------------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------------------------

#: How :func:`rewards_to_pairs` turns K scored responses into pairs.
PAIR_STRATEGIES = ("zephyr", "best_vs_rest", "all_pairs")


def _best_index(rewards: Sequence[float]) -> int:
    return int(np.argmax(rewards))  # first of the maxima


def rewards_to_pairs(ds: datasets.Dataset, strategy: str = "zephyr", *, seed: int = 0, return_report: bool = False):
    """Reward dataset -> preference dataset.

    Strategies (``b`` = the best response, the first one when several share the maximum reward):

    * ``"zephyr"``: one pair per prompt, ``b`` against one response drawn uniformly among those with a strictly
      lower reward (how ``HuggingFaceH4/ultrafeedback_binarized`` was built). The draw uses
      ``numpy.random.default_rng([seed, row_index])``, so it is deterministic per seed and per row.
    * ``"best_vs_rest"``: ``b`` against each response with a strictly lower reward: K - 1 pairs when ``b`` is a
      strict best (the DPO x (K-1) baseline of Table 2).
    * ``"all_pairs"``: every ordered pair ``(i, j)`` with ``r_i > r_j``: C(K, 2) pairs when no two rewards tie.

    Equal rewards never form a pair: ``report.skipped["tied_pairs"]`` counts the responses tied with ``b`` (left out
    of the rejected candidates) for ``"zephyr"`` / ``"best_vs_rest"``, and every unordered tied pair for
    ``"all_pairs"``. A prompt whose responses all tie yields nothing and is counted in ``report.skipped["all_tied"]``.
    Pair ids are ``"{id}:{i}>{j}"`` with response indices; scores are the two rewards.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"strategy must be one of {PAIR_STRATEGIES}, got {strategy!r}")
    if canonical_kind(ds) != "reward":
        raise ValueError(f"rewards_to_pairs needs a reward dataset, got columns {ds.column_names}")
    report = LoadReport(source="<reward dataset>", layout=f"pairs:{strategy}")
    ds_out = _from_rows(_pairs_of(ds, strategy, seed, report), PREFERENCE_FEATURES)
    report.rows_out = len(ds_out)
    return (ds_out, report) if return_report else ds_out


def _pairs_of(ds, strategy: str, seed: int, report: LoadReport):
    for index, row in enumerate(ds):
        report.rows_in += 1
        rewards, responses = row["rewards"], row["responses"]
        if len(rewards) != len(responses):
            raise ValueError(f"row {index}: {len(responses)} responses but {len(rewards)} rewards")
        rid = row.get("id") or str(index)
        if len(set(rewards)) <= 1:
            report.skip("all_tied", rid)
            continue
        b = _best_index(rewards)
        if strategy == "all_pairs":
            ij = [(i, j) for i in range(len(rewards)) for j in range(len(rewards)) if rewards[i] > rewards[j]]
            ties = sum(rewards[i] == rewards[j] for i in range(len(rewards)) for j in range(i + 1, len(rewards)))
        else:
            lower = [j for j in range(len(rewards)) if rewards[j] < rewards[b]]
            ties = sum(rewards[j] == rewards[b] for j in range(len(rewards)) if j != b)
            if strategy == "zephyr":  # `lower` is not empty: the rewards do not all tie
                lower = [lower[int(np.random.default_rng([seed, index]).integers(len(lower)))]]
            ij = [(b, j) for j in lower]
        if ties:
            report.skip("tied_pairs", rid, ties)
        for i, j in ij:
            yield {"prompt": row["prompt"], "chosen": responses[i], "rejected": responses[j],
                   "score_chosen": rewards[i], "score_rejected": rewards[j], "id": f"{rid}:{i}>{j}",
                   "source": row.get("source")}


def pairs_to_rewards(ds: datasets.Dataset, *, rewards: Literal["auto", "scores", "binary"] = "auto",
                     return_report: bool = False):
    """Preference dataset -> reward dataset with K = 2 (``responses = [chosen, rejected]``).

    ``rewards="scores"`` uses ``[score_chosen, score_rejected]`` (every row must have both; a missing score is a
    ``ValueError``); ``"binary"`` uses ``[1.0, 0.0]``, the preference label itself; ``"auto"`` uses the scores if
    every row has both, else the binary labels (mixing the two scales within one dataset is never done).
    A pair whose scores tie keeps them: InfoNCA's soft labels are then 1/2 each, i.e. no preference.
    """
    if canonical_kind(ds) != "pairwise":
        raise ValueError(f"pairs_to_rewards needs a preference dataset, got columns {ds.column_names}")
    if rewards not in ("auto", "scores", "binary"):
        raise ValueError(f"rewards must be 'auto', 'scores' or 'binary', got {rewards!r}")
    has_cols = {"score_chosen", "score_rejected"} <= set(ds.column_names)
    if rewards != "binary":
        scored = has_cols and all(c is not None and s is not None
                                  for batch in ds.select_columns(["score_chosen", "score_rejected"]).iter(1024)
                                  for c, s in zip(batch["score_chosen"], batch["score_rejected"]))
        if rewards == "scores" and not scored:
            raise ValueError("rewards='scores' but some rows have no score_chosen / score_rejected; "
                             "use rewards='binary' for (1, 0) labels")
        rewards = "scores" if scored else "binary"
    report = LoadReport(source="<preference dataset>", layout=f"rewards:{rewards}")

    def rows():
        for index, row in enumerate(ds):
            report.rows_in += 1
            r = [row["score_chosen"], row["score_rejected"]] if rewards == "scores" else [1.0, 0.0]
            if r[0] == r[1]:
                report.note("tied_scores", row.get("id") or str(index))
            elif r[0] < r[1]:
                report.note("score_contradicts_label", row.get("id") or str(index))
            yield {"prompt": row["prompt"], "responses": [row["chosen"], row["rejected"]], "rewards": r,
                   "id": row.get("id") or str(index), "source": row.get("source")}

    ds_out = _from_rows(rows(), REWARD_FEATURES)
    report.rows_out = len(ds_out)
    return (ds_out, report) if return_report else ds_out


def subsample_responses(ds: datasets.Dataset, k: int, *, seed: int = 0, return_report: bool = False):
    """The K ablation of the paper's Fig. 4: keep ``k`` responses per prompt, the best one always among them.

    Each prompt keeps its best response (the first maximum) and ``k - 1`` of the others drawn without replacement
    with ``numpy.random.default_rng([seed, row_index])``; kept responses stay in their original order. Prompts with
    ``k`` or fewer responses are kept whole (``report.notes["fewer_than_k"]`` counts those with fewer).
    """
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    if canonical_kind(ds) != "reward":
        raise ValueError(f"subsample_responses needs a reward dataset, got columns {ds.column_names}")
    report = LoadReport(source="<reward dataset>", layout=f"subsample:k={k}")

    def rows():
        for index, row in enumerate(ds):
            report.rows_in += 1
            rewards = row["rewards"]
            if len(rewards) < k:
                report.note("fewer_than_k", row.get("id") or str(index))
            if len(rewards) <= k:
                yield dict(row)
                continue
            b = _best_index(rewards)
            others = [j for j in range(len(rewards)) if j != b]
            picked = np.random.default_rng([seed, index]).choice(others, size=k - 1, replace=False)
            keep = sorted([b, *(int(j) for j in picked)])
            yield {**row, "responses": [row["responses"][j] for j in keep], "rewards": [rewards[j] for j in keep]}

    ds_out = _from_rows(rows(), REWARD_FEATURES)
    report.rows_out = len(ds_out)
    return (ds_out, report) if return_report else ds_out


# --------------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------------


def summarize(ds: datasets.Dataset) -> dict:
    """Small statistics of a canonical dataset, for notebooks (``pandas.Series(summarize(ds))`` prints nicely).

    Reward dataset: ``n_prompts``, ``n_responses``, ``k_counts`` ({K: prompts}), ``reward_mean`` / ``reward_std``
    (over all responses), ``reward_min`` / ``reward_max``, ``frac_strict_best`` (prompts whose maximum reward is
    held by one response), ``frac_all_tied`` and ``best_gap_mean`` (best minus second-best reward, averaged).
    Preference dataset: ``n_pairs``, ``n_prompts`` (distinct prompts), ``frac_scored``, ``score_gap_mean``
    (chosen minus rejected, over scored pairs), ``frac_identical`` and mean completion lengths in characters.
    """
    kind = canonical_kind(ds)
    turns = [len(p) for p in ds["prompt"]]
    if kind == "reward":
        rewards = [list(r) for r in ds["rewards"]]
        flat = np.array([x for r in rewards for x in r], dtype=float)
        ks = Counter(len(r) for r in rewards)
        strict = [len(r) > 0 and sum(x == max(r) for x in r) == 1 for r in rewards]
        gaps = [sorted(r)[-1] - sorted(r)[-2] for r in rewards if len(r) >= 2]
        return {
            "kind": "reward",
            "n_prompts": len(rewards),
            "n_responses": int(flat.size),
            "k_counts": dict(sorted(ks.items())),
            "reward_mean": float(flat.mean()) if flat.size else float("nan"),
            "reward_std": float(flat.std()) if flat.size else float("nan"),
            "reward_min": float(flat.min()) if flat.size else float("nan"),
            "reward_max": float(flat.max()) if flat.size else float("nan"),
            "frac_strict_best": float(np.mean(strict)) if strict else float("nan"),
            "frac_all_tied": float(np.mean([len(set(r)) <= 1 for r in rewards])) if rewards else float("nan"),
            "best_gap_mean": float(np.mean(gaps)) if gaps else float("nan"),
            "prompt_turns_mean": float(np.mean(turns)) if turns else float("nan"),
        }
    chosen, rejected = ds["chosen"], ds["rejected"]
    sc = ds["score_chosen"] if "score_chosen" in ds.column_names else [None] * len(ds)
    sr = ds["score_rejected"] if "score_rejected" in ds.column_names else [None] * len(ds)
    gaps = [c - r for c, r in zip(sc, sr) if c is not None and r is not None]
    prompts = {json.dumps(p, sort_keys=True) for p in ds["prompt"]}
    return {
        "kind": "pairwise",
        "n_pairs": len(ds),
        "n_prompts": len(prompts),
        "frac_scored": len(gaps) / len(ds) if len(ds) else float("nan"),
        "score_gap_mean": float(np.mean(gaps)) if gaps else float("nan"),
        "frac_identical": float(np.mean([c == r for c, r in zip(chosen, rejected)])) if len(ds) else float("nan"),
        "chosen_chars_mean": float(np.mean([len(c) for c in chosen])) if len(ds) else float("nan"),
        "rejected_chars_mean": float(np.mean([len(r) for r in rejected])) if len(ds) else float("nan"),
        "prompt_turns_mean": float(np.mean(turns)) if turns else float("nan"),
    }
