r"""How well a reward orders responses: the one set of metrics every reward source, study and run record uses.

A reward source is judged against a golden reward ``r`` (the rubric, or a human label: 1 for the chosen response of
a pair, 0 for the rejected one). All inputs are flat: ``scores`` ``(N,)`` from the source, ``rewards`` ``(N,)``
golden, ``groups`` ``(N,)`` the prompt each response answers. Only the **order** of a prompt's responses matters to
ranking, Best-of-K and the soft labels ``softmax(r / α)`` at small ``α``, so the metrics are about order:

* :func:`pair_wins` — the outcome of every within-prompt pair with different golden rewards: 1 if ``scores`` order it
  like ``r``, 1/2 on a score tie, 0 otherwise. :func:`pairwise_accuracy` is their mean, :func:`accuracy_interval`
  adds a Wilson 95 % interval (:func:`nca_kit.stats.wilson`), :func:`accuracy_difference` compares two scorers on
  the same pairs with a paired bootstrap (:func:`nca_kit.stats.paired_bootstrap`). A preference pair is a prompt
  with two responses (:func:`chosen_rejected`), so accuracy against a human label is the same function.
* :func:`order_consistency` — the same over *all* pairs of responses, any prompts (Sun, Shen & Ton, ICLR 2025).
* :func:`spearman` — Spearman's ρ over all responses and its mean over prompts.
* :func:`best_of_k` — the golden reward of the response ``scores`` rank first, beside a random and the oracle pick.

:func:`evaluate` gives them all at once (a study's row, a run's ``reward_quality``); :func:`ranking_metrics` is the
same for ``(B, K)`` arrays in the layout of the follow-up-likelihood tables.
"""

from __future__ import annotations

import numpy as np

from nca_kit import stats

__all__ = [
    "pair_wins",
    "pairwise_accuracy",
    "accuracy_interval",
    "accuracy_difference",
    "chosen_rejected",
    "order_consistency",
    "spearman",
    "best_of_k",
    "evaluate",
    "ranking_metrics",
    "METRIC_NAMES",
]

#: What each key of :func:`evaluate` measures, for tables and figure titles.
METRIC_NAMES = {
    "accuracy": "held-out pairwise accuracy",
    "order_consistency": "order consistency (all pairs)",
    "spearman": "Spearman rho (all responses)",
    "spearman_per_prompt": "Spearman rho (mean per prompt)",
    "bon_picked": "Best-of-N: golden reward of the pick",
    "bon_gain": "Best-of-N gain (0 random, 1 oracle)",
}


def _flat(scores, rewards, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores, rewards, groups = (np.asarray(scores, dtype=np.float64), np.asarray(rewards, dtype=np.float64),
                               np.asarray(groups))
    if not (scores.shape == rewards.shape == groups.shape) or scores.ndim != 1:
        raise ValueError(f"scores, rewards and groups must be 1-D of one shape, got {scores.shape}, {rewards.shape}, "
                         f"{groups.shape}")
    return scores, rewards, groups


def within_pairs(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """All ``(i, j)``, ``i < j``, of one prompt with different golden rewards: ``(P, 2)``."""
    rewards, groups = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    pairs = []
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        i, j = np.triu_indices(len(members), k=1)
        pairs.append(np.stack([members[i], members[j]], 1))
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    return pairs[rewards[pairs[:, 0]] != rewards[pairs[:, 1]]]


def _outcomes(s_i, s_j, r_i, r_j) -> np.ndarray:
    """1 where the scores order a pair like the golden rewards, 1/2 on a score tie, 0 otherwise."""
    ds, dr = s_i - s_j, r_i - r_j
    return (np.sign(ds) == np.sign(dr)) + 0.5 * (ds == 0)


def pair_wins(scores, rewards, groups, *, pair_mask=None) -> np.ndarray:
    """``(P,)`` outcome of every within-prompt pair with different golden rewards (1, 1/2 on a score tie, 0).

    ``pair_mask(r_i, r_j) -> bool array`` keeps only some pairs (e.g. those that differ in correctness).
    """
    scores, rewards, groups = _flat(scores, rewards, groups)
    pairs = within_pairs(rewards, groups)
    if pair_mask is not None:
        pairs = pairs[np.asarray(pair_mask(rewards[pairs[:, 0]], rewards[pairs[:, 1]]), dtype=bool)]
    i, j = pairs[:, 0], pairs[:, 1]
    return _outcomes(scores[i], scores[j], rewards[i], rewards[j])


def pairwise_accuracy(scores, rewards, groups, *, pair_mask=None) -> float:
    """Share of within-prompt pairs with different golden rewards that ``scores`` order like the golden reward (a
    tie in ``scores`` counts 1/2); NaN without such pairs. On pairs labelled by people (golden 1 / 0) this is
    accuracy against the label. ``pair_mask`` as in :func:`pair_wins`."""
    wins = pair_wins(scores, rewards, groups, pair_mask=pair_mask)
    return float(wins.sum() / len(wins)) if len(wins) else float("nan")


def accuracy_interval(wins) -> dict:
    """The mean of pair outcomes (:func:`pair_wins`) with its Wilson 95 % interval (:func:`nca_kit.stats.wilson`).

    Returns ``{"accuracy", "low", "high", "n", "ties"}``.
    """
    wins = np.asarray(wins, dtype=np.float64)
    if wins.ndim != 1 or not len(wins):
        raise ValueError(f"wins must be a non-empty 1-D array of pair outcomes, got shape {wins.shape}")
    interval = stats.wilson(float(wins.sum()), len(wins))
    return {"accuracy": interval["p"], "low": interval["low"], "high": interval["high"], "n": len(wins),
            "ties": int((wins == 0.5).sum())}


def accuracy_difference(wins_a, wins_b, *, n_boot: int = 4000, seed: int = 0) -> dict:
    """Accuracy of scorer A minus that of scorer B on the *same* pairs (their :func:`pair_wins`), with a paired
    bootstrap 95 % interval (:func:`nca_kit.stats.paired_bootstrap`: pairs resampled together, so the interval
    reflects how much the two scorers' per-pair outcomes co-vary). Returns ``{"difference", "low", "high", "n"}``."""
    return stats.paired_bootstrap(wins_a, wins_b, n_boot=n_boot, seed=seed)


def chosen_rejected(chosen, rejected) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` preference pairs as ``(scores (2n,), rewards (2n,), groups (2n,))``: chosen at even rows with golden
    reward 1, rejected at odd rows with 0, one group per pair."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 1 or not len(chosen):
        raise ValueError(f"chosen and rejected must be equal-length 1-D, got {chosen.shape} and {rejected.shape}")
    scores = np.stack([chosen, rejected], 1).reshape(-1)  # (2n,)
    return scores, np.tile([1.0, 0.0], len(chosen)), np.repeat(np.arange(len(chosen)), 2)


def order_consistency(scores, rewards, chunk: int = 1024) -> float:
    """The order consistency of Sun, Shen & Ton: the share of *all* pairs of responses (any prompts) with different
    golden rewards that ``scores`` order the same way (a score tie counts 1/2). A reward ``h(r)`` for any increasing
    ``h`` scores 1.0; it is what ranking and Best-of-N need, and what the classification objective targets."""
    scores, rewards = np.asarray(scores, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    hits, count = 0.0, 0
    for start in range(0, len(scores), chunk):
        s_i, r_i = scores[start:start + chunk, None], rewards[start:start + chunk, None]
        keep = r_i != rewards[None, :]
        outcomes = _outcomes(s_i, scores[None, :], r_i, rewards[None, :])[keep]
        hits, count = hits + float(outcomes.sum()), count + int(keep.sum())
    return hits / count if count else float("nan")


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def spearman(scores, rewards, groups=None) -> dict:
    """Spearman's ρ (average ranks on ties): ``overall`` over all responses (NaN when ``scores`` is constant) and,
    with ``groups``, ``per_prompt``: its mean over the ``n_prompts`` prompts whose golden rewards and scores are
    not constant (ρ is undefined there; NaN when there is none)."""
    scores, rewards = np.asarray(scores, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    out = {"overall": _rho(scores, rewards) if np.ptp(scores) > 0 else float("nan")}
    if groups is not None:
        groups = np.asarray(groups)
        per = [_rho(scores[m], rewards[m]) for m in (groups == g for g in np.unique(groups))
               if np.ptp(rewards[m]) > 0 and np.ptp(scores[m]) > 0]
        out.update(per_prompt=float(np.mean(per)) if per else float("nan"), n_prompts=len(per))
    return out


def best_of_k(scores, rewards, groups) -> dict[str, float]:
    """Best-of-K by ``scores``: per prompt the response with the highest score (the first on ties), and the mean
    golden reward of the picks (``picked``), next to a uniformly random pick (``random``, the prompt's mean golden
    reward) and the oracle pick (``oracle``). ``gain`` = (picked - random) / (oracle - random): 0 no better than
    chance, 1 as good as the oracle (NaN when every prompt's rewards tie)."""
    scores, rewards, groups = _flat(scores, rewards, groups)
    picked, rand, oracle = [], [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        picked.append(rewards[idx[np.argmax(scores[idx])]])
        rand.append(rewards[idx].mean())
        oracle.append(rewards[idx].max())
    out = {"picked": float(np.mean(picked)), "random": float(np.mean(rand)), "oracle": float(np.mean(oracle))}
    span = out["oracle"] - out["random"]
    out["gain"] = (out["picked"] - out["random"]) / span if span > 0 else float("nan")
    return out


def evaluate(scores, rewards, groups) -> dict[str, float]:
    """All metrics of ``scores`` (N,) against golden ``rewards`` (N,) on prompts ``groups`` (N,): ``accuracy``
    (within-prompt pairs), ``order_consistency`` (all pairs), ``spearman`` (overall), ``spearman_per_prompt`` and
    Best-of-K as ``bon_picked``, ``bon_random``, ``bon_oracle``, ``bon_gain``."""
    scores, rewards, groups = _flat(scores, rewards, groups)
    rho = spearman(scores, rewards, groups)
    bon = best_of_k(scores, rewards, groups)
    return {"accuracy": pairwise_accuracy(scores, rewards, groups),
            "order_consistency": order_consistency(scores, rewards), "spearman": rho["overall"],
            "spearman_per_prompt": rho["per_prompt"], "bon_picked": bon["picked"], "bon_random": bon["random"],
            "bon_oracle": bon["oracle"], "bon_gain": bon["gain"]}


def ranking_metrics(scores, golden) -> dict:
    """How well ``scores`` rank the K responses of each prompt against ``golden`` rewards (both ``(B, K)``), in the
    layout of the follow-up-likelihood tables:

    * ``spearman``: the mean per-prompt Spearman ρ over prompts where neither row is constant (``n_spearman``);
    * ``pair_accuracy``: within-prompt pairwise accuracy with its Wilson interval (``pair_low``, ``pair_high``,
      ``n_pairs``; absent when no prompt has two different golden rewards);
    * ``best_of_k``: mean golden reward of the response with the highest score (first on ties), beside ``oracle``
      and ``random``.
    """
    scores, golden = np.asarray(scores, dtype=np.float64), np.asarray(golden, dtype=np.float64)
    if scores.shape != golden.shape or scores.ndim != 2:
        raise ValueError(f"scores and golden must both be (B, K), got {scores.shape} and {golden.shape}")
    groups = np.repeat(np.arange(len(scores)), scores.shape[1])  # (B*K,)
    s, g = scores.reshape(-1), golden.reshape(-1)
    rho = spearman(s, g, groups)
    bon = best_of_k(s, g, groups)
    out = {"spearman": rho["per_prompt"], "n_spearman": rho["n_prompts"], "best_of_k": bon["picked"],
           "oracle": bon["oracle"], "random": bon["random"]}
    wins = pair_wins(s, g, groups)
    if len(wins):
        interval = accuracy_interval(wins)
        out.update(pair_accuracy=interval["accuracy"], pair_low=interval["low"], pair_high=interval["high"],
                   n_pairs=interval["n"])
    return out
