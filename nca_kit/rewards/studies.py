"""The reward-source studies of notebooks 10 and 11: how well a source orders responses, measured with
:mod:`nca_kit.rewards.metrics`.

* Embedding reward models: :func:`run_study` fits every head (:mod:`nca_kit.rewards.heads`) at every annotation
  noise level (:mod:`nca_kit.rewards.annotate`) with every seed and measures it on held-out prompts;
  :func:`study_table` prints a metric as "mean ± std over seeds".
* Follow-up likelihood: :func:`evaluate_pairs` scores preference pairs (:func:`hh_pairs`: HH-RLHF harmless-base) with
  FLR and Direct (:class:`PairEvaluation`: accuracy per scorer and category, FLR minus Direct, variant
  disagreement); :func:`evaluate_k_responses` holds them against the golden rewards of a K-response dataset.

Figures of these studies are in :mod:`nca_kit.plots` (``plot_study``, ``plot_pair_accuracy``,
``plot_score_distributions``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from nca_kit.rewards import metrics
from nca_kit.rewards.annotate import annotate, split_by_prompt
from nca_kit.rewards.followup import VARIANTS, FLRScores, direct_rewards, flr_scores
from nca_kit.rewards.heads import HEADS, make_head

__all__ = ["run_study", "study_table", "hh_pairs", "PairEvaluation", "evaluate_pairs", "evaluate_k_responses"]


# --------------------------------------------------------------------------------------------------------------------
# Embedding reward models: heads x noise levels x seeds
# --------------------------------------------------------------------------------------------------------------------


def run_study(
    embeddings: np.ndarray,
    rewards: np.ndarray,
    groups: np.ndarray,
    *,
    heads: Sequence[str] = tuple(HEADS),
    noise_levels: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4),
    noise: str = "flip",
    seeds: Sequence[int] = (0, 1, 2),
    n_annotations: int | None = None,
    cross_prompt: bool = False,
    held_out: float = 1 / 3,
    progress: bool = False,
    head_settings: Mapping | None = None,
    workers: int = 1,
):
    """Fit every head at every noise level with every seed; metrics on held-out prompts. Returns a DataFrame.

    For seed ``s`` the prompts are split (:func:`split_by_prompt`), annotations drawn on the training prompts
    (:func:`annotate`, ``noise`` = ``"flip"`` (label-flip rate) or ``"tau"`` (annotator temperature)), each head
    fitted and scored on the held-out responses (:func:`nca_kit.rewards.metrics.evaluate`). One row per (head, noise
    level, seed), with the realised annotation error rate in ``label_error``.

    ``workers > 1`` fits in that many processes (joblib). Every fit is seeded by its own job and single-threaded, so
    the frame is the same for any ``workers`` (``tests/test_rewards_embedding.py`` checks it); on two cores two
    workers take about half the time.
    """
    import pandas as pd

    from nca_kit.progress import progress as progress_lines

    if noise not in ("flip", "tau"):
        raise ValueError(f"noise must be 'flip' or 'tau', got {noise!r}")
    for head in heads:
        if head not in HEADS:
            raise ValueError(f"heads: unknown head {head!r}; choose from {', '.join(HEADS)}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    rewards, groups = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    jobs = [(s, level, head) for s in seeds for level in noise_levels for head in heads]
    common = dict(embeddings=embeddings, rewards=rewards, groups=groups, noise=noise, n_annotations=n_annotations,
                  cross_prompt=cross_prompt, held_out=held_out, head_settings=dict(head_settings or {}))
    if int(workers) == 1 or len(jobs) < 2:
        rows = (_study_job(*job, **common) for job in jobs)
    else:
        from joblib import Parallel, delayed

        rows = Parallel(n_jobs=min(int(workers), len(jobs)), return_as="generator")(
            delayed(_study_job)(*job, **common) for job in jobs)
    return pd.DataFrame(list(progress_lines(rows, total=len(jobs), bar=progress, desc="reward-model study")))


def _study_job(seed, level, head, *, embeddings, rewards, groups, noise, n_annotations, cross_prompt, held_out,
               head_settings) -> dict:
    """One (seed, noise level, head) cell of :func:`run_study`: split, annotate, fit, score."""
    train = split_by_prompt(groups, held_out, seed)
    idx_train, idx_test = np.flatnonzero(train), np.flatnonzero(~train)
    noise_kw = {"flip": level} if noise == "flip" else {"tau": level}
    ann = annotate(rewards[idx_train], groups[idx_train], n_annotations, cross_prompt=cross_prompt, seed=seed,
                   **noise_kw)
    fitted = make_head(head, seed=seed, **head_settings.get(head, {}))
    fitted.fit(embeddings[idx_train], ann)
    scores = metrics.evaluate(fitted.score(embeddings[idx_test]), rewards[idx_test], groups[idx_test])
    return {"head": head, "noise": level, "seed": seed, "n_annotations": len(ann), "label_error": ann.error_rate,
            **scores}


def study_table(df, metric: str = "accuracy"):
    """``metric`` of a :func:`run_study` frame as "mean ± std over seeds", one row per head, one column per level."""
    stats = df.groupby(["head", "noise"], sort=False)[metric].agg(["mean", "std"])
    cells = stats.apply(lambda r: f"{r['mean']:.3f} ± {0.0 if r['std'] != r['std'] else r['std']:.3f}", axis=1)
    return cells.unstack("noise")


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


def _pair_wins(rewards: np.ndarray) -> np.ndarray:
    """Pair outcomes (:func:`nca_kit.rewards.metrics.pair_wins`) of ``(2n,)`` rewards, chosen at even rows."""
    return metrics.pair_wins(*metrics.chosen_rejected(rewards[0::2], rewards[1::2]))


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

        rows = [{"scorer": s, "category": c, **metrics.accuracy_interval(_pair_wins(r))}
                for (s, c), r in self.scorers().items()]
        return pd.DataFrame(rows)

    def versus_direct(self, variant: str = "paper", category: str = "all") -> dict:
        """FLR accuracy minus Direct accuracy on these pairs, with its paired bootstrap interval."""
        flr = self.scorers()[(f"FLR ({variant})", category)]
        return metrics.accuracy_difference(_pair_wins(flr), _pair_wins(self.direct))

    def disagreement(self) -> dict:
        """How much the two variants differ on the all-category reward: share of pairs they order differently, and
        the Spearman correlation of their rewards over responses (and of their chosen-minus-rejected margins)."""
        paper, code = self.flr.rewards("paper"), self.flr.rewards("code")
        margin_paper, margin_code = paper[0::2] - paper[1::2], code[0::2] - code[1::2]
        return {"pairs_ordered_differently": float(np.mean(np.sign(margin_paper) != np.sign(margin_code))),
                "spearman_rewards": metrics.spearman(paper, code)["overall"],
                "spearman_margins": metrics.spearman(margin_paper, margin_code)["overall"],
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
    :func:`nca_kit.rewards.metrics.ranking_metrics` (per-prompt Spearman, pairwise accuracy on pairs with different
    golden rewards, Best-of-K golden reward) and, with ``correct_threshold``, ``correct_pair_accuracy``: the same accuracy on pairs of one
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
        row = {"scorer": scorer, "category": category, **metrics.ranking_metrics(s, gold)}
        if correct_threshold is not None:
            correct = metrics.ranking_metrics(s, (gold >= correct_threshold).astype(float))
            row.update(correct_pair_accuracy=correct.get("pair_accuracy", float("nan")),
                       correct_pair_low=correct.get("pair_low", float("nan")),
                       correct_pair_high=correct.get("pair_high", float("nan")),
                       n_correct_pairs=correct.get("n_pairs", 0))
        rows.append(row)
    return pd.DataFrame(rows), scores


