r"""Simulated annotators (Sun, Shen & Ton, ICLR 2025): pairwise labels drawn from a golden reward ``r``, with noise.

    P(y_i > y_j) = sigmoid((r_i - r_j) / tau)        tau -> 0: a perfect annotator

followed, separately, by a symmetric label flip with rate ``flip``. A label then disagrees with the golden order with
probability ``(1 - flip) * (1 - p) + flip * p``, ``p = sigmoid(|r_i - r_j| / tau)`` (:func:`expected_error_rate`).
Pairs are drawn within a prompt or across prompts (the paper's cross-prompt annotation). Also here: a synthetic
world whose golden reward is linear in the embedding (:func:`synthetic_world`) and the split of prompts into
training and held-out ones (:func:`split_by_prompt`).

Shapes: ``N`` responses, ``M`` annotations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nca_kit.rewards.metrics import within_pairs

__all__ = ["Annotations", "annotate", "expected_error_rate", "check_rewards", "synthetic_world", "split_by_prompt"]


def check_rewards(rewards: np.ndarray, groups: np.ndarray) -> None:
    """One-line ``ValueError`` unless ``rewards`` and ``groups`` are 1-D of one length, the rewards finite and every
    prompt has at least two responses."""
    if rewards.shape != groups.shape or rewards.ndim != 1:
        raise ValueError(f"rewards and groups must be 1-D of one length, got shapes {rewards.shape} and {groups.shape}")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        raise ValueError(f"rewards: golden reward {rewards[bad[0]]} at response {bad[0]} is not finite")
    counts = np.bincount(groups) if groups.size else np.zeros(0, dtype=int)
    single = np.flatnonzero(counts == 1)
    if single.size:
        raise ValueError(f"groups: prompt {single[0]} has only one response; a reward model compares >= 2")


def synthetic_world(n_prompts: int = 300, k: int = 4, dim: int = 16, seed: int = 0):
    """A world whose golden reward is linear in the embedding: ``e ~ N(0, I_D)``, ``r = e . w`` with ``|w| = 1``.

    Returns ``(embeddings (N, D) float32, rewards (N,), groups (N,))`` with ``N = n_prompts * k``. Every head should
    recover the golden order here from noiseless annotations; the notebook and the tests check that it does.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(dim)
    w /= np.linalg.norm(w)
    emb = rng.standard_normal((n_prompts * k, dim)).astype(np.float32)  # (N, D)
    return emb, emb.astype(np.float64) @ w, np.repeat(np.arange(n_prompts), k)


def split_by_prompt(groups: np.ndarray, held_out: float = 1 / 3, seed: int = 0) -> np.ndarray:
    """Boolean mask (N,) of the *training* responses: a random ``1 - held_out`` share of the prompts, all of their
    responses (no prompt is on both sides)."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    prompts = np.unique(groups)
    rng = np.random.default_rng(seed)
    n_train = max(1, min(len(prompts) - 1, round(len(prompts) * (1 - held_out))))
    train = rng.permutation(prompts)[:n_train]
    return np.isin(groups, train)


@dataclass
class Annotations:
    """M pairwise annotations over a table of N responses."""

    first: np.ndarray  # (M,) int response index
    second: np.ndarray  # (M,) int response index
    label: np.ndarray  # (M,) float 1.0 when the annotator preferred `first`, else 0.0
    correct: np.ndarray  # (M,) bool: the label agrees with the golden order

    def __len__(self) -> int:
        return len(self.label)

    @property
    def error_rate(self) -> float:
        """The realised share of labels that contradict the golden order."""
        return float(1.0 - self.correct.mean())

    def take(self, idx: np.ndarray) -> Annotations:
        return Annotations(self.first[idx], self.second[idx], self.label[idx], self.correct[idx])


def _check_noise(tau: float, flip: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0 (0 is a perfect annotator), got {tau!r}")
    if not (isinstance(flip, (int, float)) and 0.0 <= flip <= 0.5):
        raise ValueError(f"flip must be a rate in [0, 0.5], got {flip!r}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _p_first(delta: np.ndarray, tau: float) -> np.ndarray:
    """P(first > second) = sigmoid(delta / tau); the step function (1/2 at a tie) when tau = 0."""
    if tau == 0:
        return np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5))
    return _sigmoid(delta / tau)


def expected_error_rate(delta: np.ndarray, tau: float = 0.0, flip: float = 0.0) -> np.ndarray:
    """P(label contradicts the golden order) for golden gaps ``delta = r_i - r_j != 0``:
    ``(1 - flip) * (1 - p) + flip * p`` with ``p = sigmoid(|delta| / tau)``."""
    _check_noise(tau, flip)
    p = _p_first(np.abs(np.asarray(delta, dtype=np.float64)), tau)
    return (1 - flip) * (1 - p) + flip * p


def _cross_pairs(rewards: np.ndarray, groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` pairs of responses to *different* prompts with different golden rewards, uniformly at random: (n, 2)."""
    out, have = [], 0
    for _ in range(1000):
        cand = rng.integers(0, len(rewards), size=(2 * (n - have) + 16, 2))
        keep = (groups[cand[:, 0]] != groups[cand[:, 1]]) & (rewards[cand[:, 0]] != rewards[cand[:, 1]])
        out.append(cand[keep][: n - have])
        have += len(out[-1])
        if have == n:
            return np.concatenate(out)
    raise ValueError("cross_prompt: could not draw pairs with different golden rewards across prompts")


def annotate(
    rewards: np.ndarray,
    groups: np.ndarray,
    n: int | None = None,
    *,
    tau: float = 0.0,
    flip: float = 0.0,
    cross_prompt: bool = False,
    seed: int = 0,
) -> Annotations:
    """Simulated annotations of response pairs by an annotator who knows the golden ``rewards`` (N,).

    Pairs never tie in the golden reward (a tie carries no order to learn). Within a prompt (``cross_prompt=False``)
    ``n=None`` annotates every such pair once; an integer ``n`` draws ``n`` pairs uniformly with replacement, each
    draw annotated afresh. Across prompts (``cross_prompt=True``, the paper's cross-prompt annotation) ``n`` pairs of
    responses to different prompts are drawn (``n`` is then required). The order inside a pair is random. Each label
    is ``1[first preferred] ~ Bernoulli(sigmoid((r_first - r_second) / tau))``, then flipped with probability
    ``flip``.
    """
    _check_noise(tau, flip)
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    check_rewards(rewards, groups)
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"n must be a positive int (the annotation budget) or None, got {n!r}")
    rng = np.random.default_rng(seed)
    if cross_prompt:
        if n is None:
            raise ValueError("n: cross-prompt annotation needs an annotation budget n")
        pairs = _cross_pairs(rewards, groups, int(n), rng)
    else:
        pairs = within_pairs(rewards, groups)
        if not len(pairs):
            raise ValueError("rewards: no prompt has two responses with different golden rewards")
        if n is not None:
            pairs = pairs[rng.integers(0, len(pairs), size=int(n))]
    swap = rng.random(len(pairs)) < 0.5
    pairs = np.where(swap[:, None], pairs[:, ::-1], pairs)  # (M, 2)
    delta = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]  # (M,)
    label = rng.random(len(pairs)) < _p_first(delta, tau)
    label ^= rng.random(len(pairs)) < flip
    return Annotations(pairs[:, 0], pairs[:, 1], label.astype(np.float64), label == (delta > 0))


