r"""Reward sources: one interface, one registry, one way to write rewards into a dataset.

A reward source is a function ``source(dataset, settings) -> dataset``: it takes a canonical reward dataset (rows
``prompt, responses, rewards``; the kit's arithmetic split also holds ``answer`` and ``truncated``) and
:class:`SourceSettings`, and returns the rows it scored with their ``rewards`` column re-scored. Every source writes
its rewards through :func:`with_rewards`. :data:`REWARD_SOURCES` maps the names a run can choose to the sources:

* ``rubric`` — :func:`nca_kit.tasks.score`, the golden reward (every row);
* ``embedding_bt`` / ``embedding_clf`` — a Bradley–Terry / classification head on MiniLM embeddings, fitted on the
  last ``reward_fit_prompts`` prompts;
* ``flr`` / ``direct`` — follow-up likelihood / the answer's own mean log-probability under ``model``;
* ``random`` — uniform on ``[0, 10)``, seeded by ``seed``.

Every source but the rubric scores the first ``reward_prompts`` training prompts (the policy prompts) and returns
only those. Adding a source: one function here (or in its own module under ``nca_kit/rewards/``) and one line in
:data:`REWARD_SOURCES`. Learned scores are cached (:class:`nca_kit.cache.Cache`) under the texts and the source's
settings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["SourceSettings", "REWARD_SOURCES", "FITTED_SOURCES", "with_rewards", "rubric_rewards",
           "embedding_rewards", "followup_rewards", "random_rewards", "arithmetic_reward_dataset"]


@dataclass(frozen=True)
class SourceSettings:
    """What a reward source reads besides the dataset (:meth:`nca_kit.experiment.ExperimentSpec.source_settings`
    builds it from a run's settings)."""

    reward_prompts: int = 100  # the first prompts: the ones a source other than the rubric scores and returns
    reward_fit_prompts: int = 150  # the last prompts: what the embedding heads are fitted on (never scored)
    seed: int = 0  # the random source's draws; the embedding head's initialisation
    model: str = "smollm2-135m-instruct"  # the model flr / direct score with (a nca_kit.models.load_model name)
    device: str = "cpu"  # where that model runs
    cache_dir: str | Path | None = None  # where learned scores are cached (None: nca_kit.cache's default folder)


_SOURCES_VERSION = "sources-v1"  # bump when a source's scoring changes (it keys the cached rewards)


def with_rewards(dataset, rewards, *, keep_as: str | None = None, name: str | None = None):
    """``dataset`` with its ``rewards`` column replaced by ``rewards`` (one list per row, one value per response).

    A reward is a function of (prompt, response): a response that repeats within its prompt gets the mean of its
    values (a random draw each, or the float noise of batched scoring, would otherwise give one text two rewards,
    which the training data checks refuse). ``keep_as``: the column the old rewards move to (``None`` drops them).
    ``name``: write the canonical layout, ``id`` and ``source`` (= ``name``) columns added where missing, and
    validate it (:func:`nca_kit.data.validate_reward_dataset`).
    """
    rewards = list(rewards)
    if len(rewards) != len(dataset) or any(len(r) != len(ys) for r, ys in zip(rewards, dataset["responses"])):
        raise ValueError(f"rewards: {len(rewards)} rows of rewards for {len(dataset)} prompts (one value per "
                         "response)")
    rows = []
    for ys, rs in zip(dataset["responses"], rewards):
        by_text: dict[str, list] = {}
        for y, r in zip(ys, rs):
            by_text.setdefault(y, []).append(r)
        merged = {y: v[0] if len(set(v)) == 1 else sum(float(x) for x in v) / len(v) for y, v in by_text.items()}
        rows.append([merged[y] for y in ys])
    out = dataset
    if "rewards" in out.column_names:
        out = out.rename_column("rewards", keep_as) if keep_as else out.remove_columns("rewards")
    out = out.add_column("rewards", rows)
    if name is not None:
        import datasets

        from nca_kit.data import validate_reward_dataset

        if "id" not in out.column_names:
            out = out.add_column("id", [str(i) for i in range(len(out))])
        if "source" not in out.column_names:
            out = out.add_column("source", [name] * len(out))
        features = out.features.copy()
        features["rewards"] = datasets.Sequence(datasets.Value("float64"))
        out = out.cast(features)
        validate_reward_dataset(out)
    return out


def _cache_settings(dataset, source: str, **extra) -> dict:
    """What a learned source's scores depend on: the texts (prompts and responses) and the source's own settings."""
    from nca_kit.cache import settings_key

    return {"version": _SOURCES_VERSION, "source": source,
            "texts": settings_key([list(dataset["prompt"]), list(dataset["responses"])], length=32),
            "n": len(dataset), **extra}


def rubric_rewards(dataset, settings: SourceSettings | None = None):
    """The deterministic rubric of :func:`nca_kit.tasks.score` (0-10: correctness 6, format 2, brevity 2), for every
    row: re-scored from each response's text, the known answer and whether sampling cut it off. On the committed
    dataset this gives back exactly the stored rewards (tested). It is the golden reward every other source is
    measured against; it reads no settings."""
    from nca_kit.tasks import score

    rows = [[score(y, answer, truncated=cut).total for y, cut in zip(ys, cuts)]
            for ys, answer, cuts in zip(dataset["responses"], dataset["answer"], dataset["truncated"])]
    return with_rewards(dataset, rows)


def embedding_rewards(dataset, settings: SourceSettings, *, source: str = "embedding_bt"):
    """A reward model on frozen all-MiniLM-L6-v2 embeddings (:mod:`nca_kit.rewards.embedding`; ``embedding_bt``:
    Bradley-Terry head, ``embedding_clf``: classification head), fitted on simulated annotations of the *last*
    ``reward_fit_prompts`` prompts: every pair of answers to one prompt with different rubric rewards, labelled by a
    perfect annotator (tau = 0, no flips). It then scores the answers of the first ``reward_prompts`` prompts, the
    ones the policy trains on, which it never saw. The head's initialisation is seeded by ``settings.seed``."""
    from nca_kit.cache import Cache
    from nca_kit.rewards import embedding

    head = embedding.SOURCE_HEADS[source]
    fit = dataset.select(range(len(dataset) - settings.reward_fit_prompts, len(dataset)))
    scored = dataset.select(range(settings.reward_prompts))

    def compute():
        try:
            model = embedding.fit_reward_model(rubric_rewards(fit), head, seed=settings.seed,
                                               embed_kwargs={"cache_dir": settings.cache_dir})
        except ValueError as err:
            raise ValueError(f"reward_source {source} could not be fitted on the last reward_fit_prompts = "
                             f"{settings.reward_fit_prompts} training prompts: {err}") from None
        return embedding.learned_rewards(model, scored)

    key = _cache_settings(scored, source, head=head, seed=settings.seed, embedder=embedding.MINILM,
                          fit_texts=_cache_settings(fit, source)["texts"])
    return with_rewards(scored, Cache(settings.cache_dir).json(f"rewards_{source}", key, compute))


def followup_rewards(dataset, settings: SourceSettings, *, source: str = "flr"):
    """Scores of ``settings.model`` with no training (:mod:`nca_kit.rewards.followup`): ``flr``, the follow-up
    likelihood of the correctness follow-ups (:data:`~nca_kit.rewards.followup_texts.ARITHMETIC_FOLLOWUPS`, 10
    satisfied and 10 dissatisfied replies, the paper's variant), or ``direct``, the answer's own mean token
    log-probability. Scores the answers of the first ``reward_prompts`` prompts. The model is loaded only when the
    scores are not cached yet; the module's own cache keeps them block by block, so an interrupted scoring
    resumes."""
    from nca_kit.cache import Cache
    from nca_kit.models import load_model
    from nca_kit.rewards import followup

    scored = dataset.select(range(settings.reward_prompts))
    extra = {"followups": "arithmetic", "variant": "paper"} if source == "flr" else {}

    def compute():
        model, tokenizer = load_model(settings.model, device=settings.device)
        return followup.score_rows(scored, source, model, tokenizer, cache_dir=settings.cache_dir, progress=False,
                                   **extra)

    key = _cache_settings(scored, source, model=settings.model, **extra)
    return with_rewards(scored, Cache(settings.cache_dir).json(f"rewards_{source}", key, compute))


def random_rewards(dataset, settings: SourceSettings):
    """The control: rewards drawn uniformly from [0, 10) for the answers of the first ``reward_prompts`` prompts,
    seeded by ``settings.seed``. Training on them still trains on the model's own samples, with a preference that
    carries no information."""
    import numpy as np

    scored = dataset.select(range(settings.reward_prompts))
    rng = np.random.default_rng([settings.seed, 0x5EED])
    return with_rewards(scored, [rng.uniform(0, 10, size=len(ys)).tolist() for ys in scored["responses"]])


#: name -> source ``(dataset, settings) -> dataset with its "rewards" column re-scored``.
REWARD_SOURCES: dict[str, Callable] = {
    "rubric": rubric_rewards,  # golden: the rubric itself
    "embedding_bt": functools.partial(embedding_rewards, source="embedding_bt"),  # BT head on MiniLM embeddings
    "embedding_clf": functools.partial(embedding_rewards, source="embedding_clf"),  # classification head
    "flr": functools.partial(followup_rewards, source="flr"),  # follow-up likelihood of the base model
    "direct": functools.partial(followup_rewards, source="direct"),  # the base model's mean token log-probability
    "random": random_rewards,  # control: uniform noise, seeded by the settings' seed
}
#: Sources fitted on annotations (of the last ``reward_fit_prompts`` prompts).
FITTED_SOURCES = ("embedding_bt", "embedding_clf")


def arithmetic_reward_dataset(source: str = "flr", *, model=None, tokenizer=None, variant: str = "paper",
                              followups="arithmetic", n: int | None = None, **kwargs):
    """The kit's arithmetic K = 4 training data (``data/``, :mod:`nca_kit.generate` defaults) re-scored by the
    follow-up scorer ``source`` (``"flr"`` or ``"direct"``, :data:`nca_kit.rewards.followup.SCORERS`).

    One call: loads SmolLM2-135M-Instruct when ``model`` is not given, reads the shipped dataset (no sampling), and
    returns it with the new rewards (:func:`with_rewards`); the rubric rewards stay in ``original_rewards``. ``n``
    keeps the first ``n`` prompts. Default follow-ups: the correctness ones (``"arithmetic"``). Other keyword
    arguments go to the scorer (``batch_size``, ``cache_dir``, ``progress``, ...).
    """
    from nca_kit import generate
    from nca_kit.models import load_smollm2
    from nca_kit.rewards import followup

    if source not in followup.SCORERS:
        raise ValueError(f"source must be one of {tuple(followup.SCORERS)}, got {source!r}")
    repo = Path(__file__).resolve().parents[2]
    train = generate.load_or_generate(generate.GenerationSettings(), search_dirs=(repo / "data",),
                                      verbose=False)["train"]
    if n is not None:
        train = train.select(range(min(n, len(train))))
    if model is None:
        model, tokenizer = load_smollm2()
    extra = {"followups": followups, "variant": variant} if source == "flr" else {}
    rows = followup.score_rows(train, source, model, tokenizer, **extra, **kwargs)
    return with_rewards(train, rows, keep_as="original_rewards")
