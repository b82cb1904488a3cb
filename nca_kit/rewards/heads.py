r"""Reward heads on frozen embeddings (Sun, Shen & Ton, ICLR 2025): fitted on pairwise annotations
(:mod:`nca_kit.rewards.annotate`), with early stopping on a held-out tenth of them. With ``f`` the head's score of an
embedding ``e``:

* Bradley–Terry (``bt_mlp``): ``L = -log sigmoid(f(e_w) - f(e_l))``, a siamese network on each pair;
* classification (``clf_mlp``): every annotated response is an example, labelled 1 if it won its comparison:
  ``L = -[z log sigmoid(f(e)) + (1 - z) log(1 - sigmoid(f(e)))]``. ``f`` is then the log-odds that a response wins,
  which orders responses like ``r`` whenever winning is more likely for better responses: the paper's *order
  consistency*, all a reward model needs for ranking and Best-of-N;
* the same two with LightGBM (``bt_lgbm`` on embedding differences ``e_i - e_j`` with both orderings, ``clf_lgbm``
  pointwise).

The MLPs follow the paper's recipe: layers 1024 -> 512 -> 1 with ReLU, Adam at lr 1e-3, at most 30 epochs,
patience 3 (:class:`MLPSettings`). Every head has ``fit(embeddings (N, D), annotations) -> self`` and
``score(embeddings (N, D)) -> (N,)``; :func:`make_head` builds one by name (:data:`HEADS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nca_kit.rewards.annotate import Annotations

__all__ = ["HEADS", "bt_loss", "clf_loss", "MLPSettings", "MLPHead", "LGBMHead", "make_head"]

#: Head name -> (model family, objective).
HEADS = {
    "bt_mlp": ("mlp", "bt"),
    "clf_mlp": ("mlp", "clf"),
    "bt_lgbm": ("lgbm", "bt"),
    "clf_lgbm": ("lgbm", "clf"),
}


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
