r"""The four-response world of Appendix H: a world small enough to watch where every bit of probability goes.

One prompt, four responses, a reference policy ``mu`` and explicit rewards ``r`` (paper Table 9)::

    response   y_a   y_b   y_c   y_d
    mu         0.40  0.50  0.05  0.05
    r          10    3     7     0

The preference data is the single pair ``y_a > y_b``; DPO never sees ``y_c`` or ``y_d``. Reward data are all four
responses with their rewards, drawn from ``mu`` (:func:`reward_sample`).

This module gives

* :func:`table9`, :func:`table10`: the world, and the three policies of Table 10 (:data:`TABLE10_SCENARIOS`). They
  share the DPO margin ``log(pi_a/mu_a) - log(pi_b/mu_b) = log 2.5 = 0.916`` and hence the DPO loss, but not their
  mean reward; pairwise NCA scores them differently.
* Policies, all equal to ``mu`` at initialisation: :class:`TabularPolicy` (one free logit per response),
  :class:`FeaturePolicy` (logits from a fixed feature map, so moving one response moves the others) and
  :class:`UnnormalisedPolicy` (free log-likelihoods that need not sum to one, the model class of Theorem 4.2).
* :func:`train_toy`: full-batch gradient descent on any loss of :mod:`nca_kit.losses`, recording every response's
  probability step by step.
* :meth:`ToyWorld.optimal_policy` and :meth:`ToyWorld.nca_target`: the targets of Theorems 3.2 and 4.2;
  :func:`stationarity`: how far a policy is from being a fixed point of a loss (zero gradient).

Notation: ``N = 4`` responses of the world, ``M`` independent policies trained side by side (one per feature map),
``K`` responses per prompt in a loss call, ``D`` feature dimension. The implicit reward is
``r_theta = beta * log(pi / mu)`` (paper Eq. 4/9).

What the optima are, as the tests and the notebook ``03_appendix_h_toy`` measure them:

* InfoNCA drives ``r_theta -> r / alpha + c``, so the policy it reaches is ``pi ∝ mu * exp(r / (alpha * beta))``.
  The paper's ``pi* ∝ mu * exp(r / alpha)`` is the case ``beta = 1``.
* NCA drives each ``r_theta`` to ``r / alpha - log E_mu exp(r / alpha)`` (Theorem 4.2) when the model can get
  there. With ``beta = 1`` that is exactly ``log(pi*/mu)``, a normalised policy reaches it, and a free
  (unnormalised) model ends up normalised by itself. With ``beta != 1`` no normalised policy reaches it and NCA
  settles on a constrained compromise near, not at, ``mu * exp(r / (alpha * beta))``.
* NCA's optimum assumes the K responses of a prompt are drawn from ``mu``; fed each response once
  (``sampling="uniform"``) it converges elsewhere, while InfoNCA does not care.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pandas as pd
import torch

from nca_kit.losses import REWARD_LOSSES, check_loss_type, implicit_rewards, preference_loss, reward_loss

__all__ = [
    "ToyWorld",
    "paper_world",
    "make_world",
    "Scenario",
    "TABLE10_SCENARIOS",
    "scenario_policies",
    "table9",
    "table10",
    "reward_sample",
    "population_loss",
    "stationarity",
    "TabularPolicy",
    "FeaturePolicy",
    "UnnormalisedPolicy",
    "random_feature_maps",
    "DECOY_FEATURES",
    "feature_map_study",
    "ToyRun",
    "train_toy",
    "feature_study_bytes",
    "swap_gap",
]

DTYPE = torch.float64  # the toy is tiny: float64 makes convergence checks meaningful down to 1e-8


# --------------------------------------------------------------------------------------------------------------------
# The world (Table 9)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ToyWorld:
    """One prompt with ``N`` responses: reference probabilities ``mu (N,)``, rewards ``rewards (N,)`` (NumPy arrays)
    and one preference pair ``chosen > rejected``.

    The world of every theory lecture: Appendix H's four responses (:func:`paper_world`) and the random worlds of
    lectures 1-2 (:func:`make_world`). The closed forms the paper's theorems name live here, as NumPy arrays:
    ``log Z`` (:meth:`log_partition`), ``pi*`` (:meth:`optimal_policy`) and NCA's optimum (:meth:`nca_target`).
    """

    names: tuple[str, ...]
    mu: np.ndarray
    rewards: np.ndarray
    chosen: int = 0  # index of y_w in the preference pair
    rejected: int = 1  # index of y_l

    def __post_init__(self):
        mu, rewards = np.asarray(self.mu, dtype=float), np.asarray(self.rewards, dtype=float)
        n = len(self.names)
        if mu.shape != (n,) or rewards.shape != (n,):
            raise ValueError(f"names, mu and rewards must have the same length, got {n}, {mu.shape} and "
                             f"{rewards.shape}")
        if (mu <= 0).any() or not math.isclose(mu.sum(), 1.0, abs_tol=1e-9):
            raise ValueError(f"mu must be positive and sum to 1, got {mu.tolist()}")
        if self.chosen == self.rejected or not (0 <= self.chosen < n and 0 <= self.rejected < n):
            raise ValueError(f"chosen and rejected must be two different indices in [0, {n}), got "
                             f"{self.chosen}, {self.rejected}")
        mu.flags.writeable = rewards.flags.writeable = False
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "rewards", rewards)

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def best(self) -> int:
        """Index of the highest-reward response (``y_best``)."""
        return int(np.argmax(self.rewards))

    def mu_tensor(self) -> torch.Tensor:
        return torch.tensor(self.mu, dtype=DTYPE)  # (N,)

    def log_mu(self) -> torch.Tensor:
        return self.mu_tensor().log()  # (N,)

    def reward_tensor(self) -> torch.Tensor:
        return torch.tensor(self.rewards, dtype=DTYPE)  # (N,)

    def log_partition(self, alpha: float) -> float:
        """``log Z = log E_mu[exp(r / alpha)]``, computed without overflow."""
        _check_positive(alpha=alpha)
        scaled = self.rewards / alpha  # (N,)
        top = scaled.max()
        return float(top + np.log(np.sum(self.mu * np.exp(scaled - top))))

    def optimal_policy(self, alpha: float, beta: float = 1.0) -> np.ndarray:
        r"""``pi ∝ mu * exp(r / (alpha * beta))``, shape ``(N,)``: the policy with
        ``beta * log(pi/mu) = r/alpha + c``.

        With ``beta = 1`` this is the paper's ``pi* = mu·exp(r/alpha) / Z`` (Eq. 3; Theorems 3.2 and 4.2), the
        maximiser of ``E_pi[r] - alpha * KL(pi || mu)``.
        """
        _check_positive(alpha=alpha, beta=beta)
        logits = np.log(self.mu) + self.rewards / (alpha * beta)  # (N,)
        weights = np.exp(logits - logits.max())  # (N,) the largest is 1: no overflow
        return weights / weights.sum()

    def nca_target(self, alpha: float) -> np.ndarray:
        r"""NCA's self-normalised optimum (Theorem 4.2), shape ``(N,)``: ``r/alpha − log E_mu[exp(r/alpha)]``,
        which is ``log(pi*/mu)``."""
        return self.rewards / alpha - self.log_partition(alpha)

    def mean_reward(self, pi: torch.Tensor) -> torch.Tensor:
        """``E_pi[r]`` for probabilities ``pi`` of shape ``(..., N)``."""
        return (pi * self.reward_tensor()).sum(-1)

    def dpo_margin(self, pi: torch.Tensor) -> torch.Tensor:
        """``log(pi_w / mu_w) - log(pi_l / mu_l)`` on the preference pair, for ``pi`` of shape ``(..., N)``."""
        log_ratio = pi.log() - self.log_mu()  # (..., N)
        return log_ratio[..., self.chosen] - log_ratio[..., self.rejected]

    def kl_to_reference(self, pi: torch.Tensor) -> torch.Tensor:
        """``KL(pi || mu)`` for ``pi`` of shape ``(..., N)``."""
        return (pi * (pi.log() - self.log_mu())).sum(-1)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def paper_world() -> ToyWorld:
    """Appendix H, Table 9: ``mu = (0.40, 0.50, 0.05, 0.05)``, ``r = (10, 3, 7, 0)``, preference data ``y_a > y_b``."""
    return ToyWorld(names=("y_a", "y_b", "y_c", "y_d"), mu=(0.40, 0.50, 0.05, 0.05), rewards=(10.0, 3.0, 7.0, 0.0))


def make_world(n_responses: int, seed: int, reward_scale: float = 1.0) -> ToyWorld:
    """A random world ``y0..y{N-1}``: ``mu ~ Dirichlet(2, ..., 2)``, rewards uniform in ``[0, reward_scale]``, fixed
    by ``seed`` (the world of lectures 1 and 2)."""
    if n_responses < 2:
        raise ValueError(f"n_responses must be >= 2, got {n_responses}")
    if not reward_scale > 0:
        raise ValueError(f"reward_scale must be > 0, got {reward_scale}")
    rng = np.random.default_rng(seed)
    return ToyWorld(names=tuple(f"y{i}" for i in range(n_responses)), mu=rng.dirichlet(np.full(n_responses, 2.0)),
                    rewards=rng.uniform(0.0, reward_scale, size=n_responses))


def table9(world: ToyWorld) -> pd.DataFrame:
    """Table 9: reference probability and reward of each response, and which responses the preference data shows."""
    role = {world.chosen: "chosen (y_w)", world.rejected: "rejected (y_l)"}
    return pd.DataFrame(
        {
            "mu(y)": list(world.mu),
            "r(y)": list(world.rewards),
            "in preference data": [role.get(i, "unseen") for i in range(world.n)],
        },
        index=pd.Index(world.names, name="response"),
    )


# --------------------------------------------------------------------------------------------------------------------
# The three policies of Table 10
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    r"""A policy built from ``mu`` by rescaling the preference pair and moving the freed mass.

    ``pi_w = scale_w * mu_w`` and ``pi_l = (scale_w / ratio) * mu_l``, so the DPO margin is ``log(ratio)`` whatever
    ``scale_w``. The freed (or borrowed) mass goes to the response ``absorb``; the other unseen responses keep their
    reference probability. With ``absorb=None`` every unseen response keeps ``mu`` and normalisation fixes
    ``scale_w = (mu_w + mu_l) / (mu_w + mu_l / ratio)`` -- no free choice left.
    """

    name: str
    description: str
    ratio: float  # (pi_w / mu_w) / (pi_l / mu_l) = exp(DPO margin)
    scale_w: float | None  # pi_w / mu_w; None: solved from normalisation (needs absorb=None)
    absorb: str | None  # response that takes the remaining mass, or None

    def policy(self, world: ToyWorld) -> torch.Tensor:
        mu = world.mu_tensor()
        w, l = world.chosen, world.rejected
        others = [i for i in range(world.n) if i not in (w, l)]
        if self.absorb is None:
            if self.scale_w is not None:
                raise ValueError(f"{self.name}: with absorb=None normalisation fixes the scale; pass scale_w=None")
            scale = float((mu[w] + mu[l]) / (mu[w] + mu[l] / self.ratio))
        else:
            if self.scale_w is None:
                raise ValueError(f"{self.name}: scale_w is required when a response absorbs the remaining mass")
            scale = self.scale_w
        pi = mu.clone()
        pi[w] = scale * mu[w]
        pi[l] = scale / self.ratio * mu[l]
        if self.absorb is not None:
            k = world.names.index(self.absorb)
            if k not in others:
                raise ValueError(f"{self.name}: absorb must be a response outside the preference pair, "
                                 f"got {self.absorb}")
            pi[k] = 0.0
            pi[k] = 1.0 - pi.sum()
        if bool((pi <= 0).any()) or not math.isclose(float(pi.sum()), 1.0, abs_tol=1e-12):
            raise ValueError(f"{self.name}: not a probability vector: {pi.tolist()}")
        return pi  # (N,)


# Appendix H describes the three outcomes of DPO training; the numbers are rebuilt here from that description.
# All three keep the pair's likelihood ratio at 2.5 (margin log 2.5 = 0.916, the printed value). Scenarios 1 and 2
# halve pi(y_a) (scale 0.5, so pi(y_b) = 0.2 * mu_b) and give all the freed mass to y_d (bad) or y_c (good);
# scenario 3 leaves y_c and y_d at mu, which forces scale 1.5. One scale, 0.5, reproduces both printed mean
# rewards of scenarios 1 and 2 (2.65 and 6.85); scenario 3 has no free parameter and gives 7.25.
TABLE10_SCENARIOS = (
    Scenario("(1)", "y_a and y_b both fall; the mass goes to the bad, unseen y_d", 2.5, 0.5, "y_d"),
    Scenario("(2)", "y_a and y_b both fall; the mass goes to the good, unseen y_c", 2.5, 0.5, "y_c"),
    Scenario("(3)", "y_a rises, y_b falls; the unseen responses keep their reference probability", 2.5, None, None),
)


def scenario_policies(world: ToyWorld, scenarios=TABLE10_SCENARIOS) -> dict[str, torch.Tensor]:
    """``{scenario name: pi (N,)}`` for the Table 10 scenarios."""
    return {s.name: s.policy(world) for s in scenarios}


def table10(world: ToyWorld, *, beta: float = 1.0, alpha: float | None = None, scenarios=TABLE10_SCENARIOS
            ) -> pd.DataFrame:
    """Table 10 computed from the policies: probabilities, DPO margin, ``E_pi[r]``, and the losses at ``beta``.

    Columns ``DPO loss`` and ``NCA loss (pair)`` are the preference losses on ``y_a > y_b`` (:func:`preference_loss`).
    With ``alpha`` given, two more columns hold the population InfoNCA and NCA losses on reward data drawn from
    ``mu`` (:func:`population_loss`), which see all four responses.
    """
    rows = {}
    for s in scenarios:
        pi = s.policy(world)
        row = {f"pi({name})": float(p) for name, p in zip(world.names, pi)}
        row["DPO margin"] = float(world.dpo_margin(pi))
        row["E_pi[r]"] = float(world.mean_reward(pi))
        logp = pi.log()[None, :]  # (1, N)
        for loss_type, column in (("dpo", "DPO loss"), ("nca", "NCA loss (pair)")):
            row[column] = float(_preference_losses(world, logp, loss_type, beta)[0])
        if alpha is not None:
            for loss_type, column in (("infonca", "InfoNCA loss (rewards)"), ("nca", "NCA loss (rewards)")):
                row[column] = float(population_loss(world, pi, loss_type, alpha=alpha, beta=beta))
        rows[s.name] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "scenario"
    return frame


# --------------------------------------------------------------------------------------------------------------------
# Reward data and the losses on it
# --------------------------------------------------------------------------------------------------------------------


def reward_sample(world: ToyWorld, sampling: str = "mu", max_k: int = 10_000) -> torch.Tensor:
    r"""Indices ``(K,)`` of the responses in one reward-data prompt.

    The losses of :mod:`nca_kit.losses` treat the K responses of a prompt as samples from ``mu`` (the paper draws
    them from the reference model). ``sampling="mu"`` returns the smallest K whose counts match ``mu`` exactly
    (K = 20 for Table 9: 8 y_a, 10 y_b, 1 y_c, 1 y_d), so the loss on this one prompt *is* the population loss
    ``E_{y_1..K ~ mu}`` of Eq. 6/11 in the limit, with no sampling noise. ``sampling="uniform"`` lists each response
    once (K = N): the responses are then not drawn from ``mu``, which InfoNCA tolerates and NCA does not.
    """
    if sampling == "uniform":
        return torch.arange(world.n)
    if sampling != "mu":
        raise ValueError(f"sampling must be 'mu' or 'uniform', got {sampling!r}")
    fractions = [Fraction(float(p)).limit_denominator(max_k) for p in world.mu]
    if any(abs(float(f) - p) > 1e-12 for f, p in zip(fractions, world.mu)):
        raise ValueError(f"mu={world.mu.tolist()} has no exact representation with K <= {max_k}; "
                         f"use sampling='uniform'")
    k = math.lcm(*(f.denominator for f in fractions))
    counts = [int(f * k) for f in fractions]
    return torch.repeat_interleave(torch.arange(world.n), torch.tensor(counts))  # (K,)


def _reward_losses(world: ToyWorld, logp: torch.Tensor, loss_type: str, alpha: float, beta: float,
                   index: torch.Tensor) -> torch.Tensor:
    """Per-policy reward-data losses ``(M,)`` for log-probabilities ``logp (M, N)`` on responses ``index (K,)``."""
    m = logp.shape[0]
    policy_logps = logp[:, index]  # (M, K)
    reference_logps = world.log_mu()[index].expand(m, -1)  # (M, K)
    rewards = world.reward_tensor()[index].expand(m, -1)  # (M, K)
    losses, _ = reward_loss(policy_logps, reference_logps, rewards, alpha=alpha, beta=beta, loss_type=loss_type)
    return losses  # (M,)


def _preference_losses(world: ToyWorld, logp: torch.Tensor, loss_type: str, beta: float) -> torch.Tensor:
    """Per-policy preference losses ``(M,)`` on the pair ``chosen > rejected`` for ``logp (M, N)``."""
    m = logp.shape[0]
    log_mu = world.log_mu()
    losses, _, _ = preference_loss(
        logp[:, world.chosen],
        log_mu[world.chosen].expand(m),
        logp[:, world.rejected],
        log_mu[world.rejected].expand(m),
        beta=beta,
        loss_type=loss_type,
    )
    return losses  # (M,)


def population_loss(world: ToyWorld, pi: torch.Tensor, loss_type: str, *, alpha: float, beta: float = 1.0,
                    sampling: str = "mu") -> torch.Tensor:
    """InfoNCA / NCA loss of policy ``pi (N,)`` on the reward data of :func:`reward_sample` (a scalar)."""
    return _reward_losses(world, pi.log()[None, :], loss_type, alpha, beta, reward_sample(world, sampling))[0]


def stationarity(world: ToyWorld, logits, loss_type: str, *, alpha: float, beta: float = 1.0,
                 sampling: str = "mu") -> float:
    r"""``max_y |dL/dlogit_y|`` of the reward-data loss at the tabular policy ``pi = softmax(logits)``, ``logits (N,)``.

    Zero exactly when ``pi`` is a fixed point of gradient descent on the loss (the losses are convex in the
    logits' differences, so a fixed point is a minimiser). Taking logits, e.g. ``log mu + r / (alpha * beta)``,
    keeps policies whose probabilities underflow (tiny ``alpha``) exact. It checks a theorem's optimum without
    any training budget: a claimed optimum must give 0 up to round-off (~1e-15).
    """
    logits = torch.tensor(np.asarray(logits, dtype=float), dtype=DTYPE, requires_grad=True)  # (N,)
    loss = _reward_losses(world, torch.log_softmax(logits, -1)[None, :], check_loss_type(loss_type, "reward"), alpha,
                          beta, reward_sample(world, sampling))[0]
    (grad,) = torch.autograd.grad(loss, logits)
    return float(grad.abs().max())


# --------------------------------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------------------------------


class TabularPolicy(torch.nn.Module):
    """``M`` independent softmax policies with one free logit per response, initialised at the reference ``mu``."""

    def __init__(self, world: ToyWorld, n_policies: int = 1):
        super().__init__()
        self.logits = torch.nn.Parameter(world.log_mu().expand(n_policies, -1).clone())  # (M, N)

    def forward(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)  # (M, N)


class FeaturePolicy(torch.nn.Module):
    r"""Softmax policies whose logits share parameters: ``logits = log mu + features @ theta``, ``theta = 0`` at start.

    ``features`` is ``(N, D)`` (one map) or ``(M, N, D)`` (M maps trained side by side, each with its own
    ``theta``). A gradient step on one response's log-likelihood moves ``theta`` along that response's feature
    vector, and with it every response whose features point the same way -- a caricature of how a language model
    generalises across similar sequences.
    """

    def __init__(self, world: ToyWorld, features):
        super().__init__()
        features = torch.as_tensor(features, dtype=DTYPE)
        if features.dim() == 2:
            features = features[None]
        if features.dim() != 3 or features.shape[1] != world.n:
            raise ValueError(f"features must have shape (N, D) or (M, N, D) with N={world.n}, got "
                             f"{tuple(features.shape)}")
        self.register_buffer("features", features)  # (M, N, D)
        self.register_buffer("log_mu", world.log_mu())  # (N,)
        self.theta = torch.nn.Parameter(torch.zeros(features.shape[0], features.shape[2], dtype=DTYPE))  # (M, D)

    def forward(self) -> torch.Tensor:
        logits = self.log_mu + torch.einsum("mnd,md->mn", self.features, self.theta)  # (M, N)
        return torch.log_softmax(logits, dim=-1)  # (M, N)


class UnnormalisedPolicy(torch.nn.Module):
    r"""A free table of log-likelihoods ``log mu + s`` that is *not* normalised (``s = 0`` at start).

    This is the model class of Theorem 4.2 read literally: ``r_theta = beta * s`` is one free number per response, so
    nothing but the loss decides the constant ``log sum_y pi(y)``. NCA then lands on a model whose implied
    ``mu * exp(r_theta)`` sums to one by itself (self-normalisation); InfoNCA leaves the constant where the
    initialisation put it.
    """

    def __init__(self, world: ToyWorld, n_policies: int = 1):
        super().__init__()
        self.register_buffer("log_mu", world.log_mu())  # (N,)
        self.s = torch.nn.Parameter(torch.zeros(n_policies, world.n, dtype=DTYPE))  # (M, N)

    def forward(self) -> torch.Tensor:
        return self.log_mu + self.s  # (M, N), rows need not sum to one after exp


def random_feature_maps(n_maps: int, n_responses: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``(M, N, D)`` standard normal feature maps, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_maps, n_responses, dim, generator=g, dtype=DTYPE)


# A hand-built map (rows y_a, y_b, y_c, y_d; D = 2) that shows one mechanism by which a preference loss can lower
# the chosen likelihood. Feature 1 is shared by the pair (y_a and y_b are alike); feature 2 is what sets y_a apart
# from y_b -- and the unseen bad response y_d has twice as much of it. DPO moves theta along phi_a - phi_b = (0, 1),
# so it raises y_d faster than y_a. It was built to show the mechanism; how often random maps behave this way is
# measured by :func:`feature_map_study`.
DECOY_FEATURES = ((1.0, 1.0), (1.0, 0.0), (0.0, 0.0), (0.0, 2.0))


def feature_map_study(world: ToyWorld, dims, *, n_maps: int = 200, loss_types=("dpo", "nca"), beta: float = 1.0,
                      steps: int = 300, lr: float = 1.0, seed: int = 0, record_every: int = 10) -> pd.DataFrame:
    """Train the pair ``y_w > y_l`` on ``n_maps`` random feature maps per dimension and count what happens to ``y_w``.

    Every loss sees the same maps (``random_feature_maps(n_maps, N, D, seed)``). One row per ``(D, loss)``:

    * ``frac final pi_w < mu_w``: share of maps whose chosen likelihood ends below its reference value;
    * ``frac ever pi_w < mu_w``: share whose chosen likelihood is below it at some recorded step;
    * ``median final pi_w``, ``median final E_pi[r]``, ``median final margin``;
    * ``frac final pi_bad > 0.5``: share of maps that end with most of the mass on the lowest-reward response.
    """
    worst = int(np.argmin(world.rewards))
    rows = []
    mu_w = float(world.mu[world.chosen])
    for dim in dims:
        features = random_feature_maps(n_maps, world.n, dim, seed)
        for loss_type in loss_types:
            run = train_toy(FeaturePolicy(world, features), world, loss_type=loss_type, data="preference", beta=beta,
                            steps=steps, lr=lr, record_every=record_every)
            final = torch.as_tensor(run.final_probs)  # (M, N)
            lowest = run.history.groupby("policy")[world.names[world.chosen]].min().to_numpy()  # (M,)
            rows.append({
                "D": dim,
                "loss": loss_type,
                "frac final pi_w < mu_w": float((final[:, world.chosen] < mu_w).double().mean()),
                "frac ever pi_w < mu_w": float((lowest < mu_w).mean()),
                "median final pi_w": float(final[:, world.chosen].median()),
                "median final E_pi[r]": float(world.mean_reward(final).median()),
                "median final margin": float(world.dpo_margin(final).median()),
                "frac final pi_bad > 0.5": float((final[:, worst] > 0.5).double().mean()),
            })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def _n_policies(policy: torch.nn.Module) -> int:
    with torch.no_grad():
        return policy().shape[0]


def _fast_loss(world: ToyWorld, loss_type: str, alpha: float, beta: float, index: torch.Tensor | None, m: int):
    """The per-step loss ``logp (M, N) -> (M,)``, with everything that does not depend on the policy computed once.

    Reward data goes through the building blocks of :mod:`nca_kit.losses` (the same functions
    :func:`~nca_kit.losses.reward_loss` calls, without its per-call input checks, which :func:`train_toy` has
    already done once on these fixed inputs); ``tests/test_toy.py`` checks both paths give the same numbers.
    """
    if index is None:
        return lambda logp: _preference_losses(world, logp, loss_type, beta)
    loss_type = check_loss_type(loss_type, "reward")
    reference = world.log_mu()[index].expand(m, -1)  # (M, K)
    rewards = world.reward_tensor()[index].expand(m, -1)  # (M, K)
    mask = torch.ones_like(rewards, dtype=torch.bool)  # (M, K)
    reward_loss(reference, reference, rewards, alpha=alpha, beta=beta, loss_type=loss_type)  # validates once
    loss_fn = REWARD_LOSSES[loss_type]

    def losses_of(logp: torch.Tensor) -> torch.Tensor:
        return loss_fn(implicit_rewards(logp[:, index], reference, beta), rewards, mask, alpha)

    return losses_of


@dataclass
class ToyRun:
    """What :func:`train_toy` records.

    ``history`` has one row per recorded step and policy: ``step``, ``policy`` (0..M-1), ``loss`` and one column of
    probabilities per response (named after the responses). ``final_probs`` and ``final_model_rewards``
    (``beta * log(pi/mu)``) are ``(M, N)`` arrays after the last step. For :class:`UnnormalisedPolicy` the
    "probabilities" are ``exp`` of its free log-likelihoods and need not sum to one.
    """

    history: pd.DataFrame
    final_probs: np.ndarray
    final_model_rewards: np.ndarray
    config: dict = field(default_factory=dict)

    def probs(self, policy: int = 0) -> pd.DataFrame:
        """Probability of each response against the step, for one policy (index ``step``)."""
        frame = self.history[self.history["policy"] == policy]
        return frame.set_index("step").drop(columns=["policy"])


def train_toy(
    policy: torch.nn.Module,
    world: ToyWorld,
    *,
    loss_type: str,
    data: str = "preference",
    alpha: float = 1.0,
    beta: float = 1.0,
    steps: int = 500,
    lr: float = 0.1,
    optimizer: str = "sgd",
    sampling: str = "mu",
    record_every: int = 1,
) -> ToyRun:
    r"""Train ``policy`` (a module returning ``log pi`` of shape ``(M, N)``) by full-batch gradient descent.

    Args:
        data: ``"preference"`` -- the pair ``y_w > y_l`` with :func:`~nca_kit.losses.preference_loss`
            (``loss_type`` in ``dpo``, ``nca``, ``ipo``, ``infonca``); ``"reward"`` -- all responses with their
            rewards, drawn from ``mu`` as in :func:`reward_sample`, with :func:`~nca_kit.losses.reward_loss`
            (``loss_type`` in ``infonca``, ``nca``, ``dpo_best_vs_rest``, ``dpo_all_pairs``).
        alpha, beta: the losses' reward temperature and implicit-reward scale (``alpha`` only for reward data).
        optimizer: ``"sgd"`` (plain gradient descent, the default) or ``"adam"``.
        sampling: how reward data represents ``mu`` (``"mu"`` or ``"uniform"``, see :func:`reward_sample`).
        record_every: record probabilities every this many steps (step 0 and the last step always).

    The M policies are independent: the objective is the *sum* of their losses, so each gets the gradient it would
    get alone. Deterministic: no sampling anywhere.
    """
    if data not in ("preference", "reward"):
        raise ValueError(f"data must be 'preference' or 'reward', got {data!r}")
    loss_type = check_loss_type(loss_type, data)
    index = reward_sample(world, sampling) if data == "reward" else None
    if steps < 0 or record_every < 1:
        raise ValueError(f"need steps >= 0 and record_every >= 1, got steps={steps}, record_every={record_every}")
    params = [p for p in policy.parameters() if p.requires_grad]
    if optimizer == "sgd":
        # Plain gradient descent, theta <- theta - lr * grad: what torch.optim.SGD does without momentum, written out
        # because importing torch.optim pulls in torch._dynamo (seconds on a small CPU) for a one-line update.
        opt = None
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")

    losses_of = _fast_loss(world, loss_type, alpha, beta, index, _n_policies(policy))

    steps_seen, losses_seen, probs_seen = [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred flops per step: extra threads only add synchronisation
    try:
        for step in range(steps + 1):
            logp = policy()  # (M, N)
            losses = losses_of(logp)  # (M,)
            if step % record_every == 0 or step == steps:
                steps_seen.append(step)
                losses_seen.append(losses.detach().numpy().copy())
                probs_seen.append(logp.detach().exp().numpy())
            if step == steps:
                break
            for p in params:
                p.grad = None
            losses.sum().backward()
            if opt is None:
                with torch.no_grad():
                    for p in params:
                        p.sub_(lr * p.grad)
            else:
                opt.step()
        with torch.no_grad():
            final_logp = policy()
    finally:
        torch.set_num_threads(threads)

    m = final_logp.shape[0]
    history = pd.DataFrame(np.concatenate(probs_seen), columns=list(world.names))  # (steps recorded * M, N)
    history.insert(0, "loss", np.concatenate(losses_seen))
    history.insert(0, "policy", np.tile(np.arange(m), len(steps_seen)))
    history.insert(0, "step", np.repeat(np.asarray(steps_seen), m))
    config = dict(loss_type=loss_type, data=data, alpha=alpha, beta=beta, steps=steps, lr=lr, optimizer=optimizer,
                  sampling=sampling, policy=type(policy).__name__)
    return ToyRun(
        history=history,
        final_probs=final_logp.exp().numpy(),
        final_model_rewards=(beta * (final_logp - world.log_mu())).numpy(),
        config=config,
    )


def feature_study_bytes(n_maps: int, dims, steps: int, record_every: int = 10, n_responses: int = 4) -> float:
    """Estimated peak bytes of :func:`feature_map_study`: per dimension and loss, the ``(M, N, D)`` feature maps and
    the recorded history (``steps / record_every + 1`` rows of ``M`` policies, ``N + 3`` float64 columns, held
    twice while it is assembled)."""
    rows = (steps // record_every + 2) * n_maps
    return float(sum(n_maps * n_responses * d * 8 * 4 + rows * (n_responses + 3) * 8 * 3 for d in dims)) * 2


def swap_gap(world: ToyWorld, pi_1: torch.Tensor, pi_2: torch.Tensor, loss_type: str, *, alpha: float,
             beta: float = 1.0) -> float:
    r"""``population_loss(pi_1) - population_loss(pi_2)`` in closed form, for two policies whose implicit rewards on
    the reward data are the same multiset (e.g. Table 10's scenarios (1) and (2): the same freed mass on ``y_d`` or
    on ``y_c``, and ``mu(y_c) = mu(y_d)``).

    Then InfoNCA's log-normaliser and NCA's ``1/K`` terms are equal for both, and what is left is the soft-label
    term: ``-sum_i w_i (s1_i - s2_i)`` (InfoNCA) or ``-sum_i w_i (log σ(s1_i) - log σ(s2_i))`` (NCA) with
    ``w = softmax(r/alpha)`` over the ``K`` responses and ``s = beta·log(pi/mu)``. Only the slots where the two
    policies differ enter, so the result keeps its precision where the two losses, computed separately, agree to
    every digit float64 has (``w`` of order ``exp(-Δr/alpha)``).
    """
    from nca_kit.losses import soft_labels

    loss_type = check_loss_type(loss_type, "reward")
    if loss_type not in ("infonca", "nca"):
        raise ValueError(f"loss_type must be 'infonca' or 'nca', got {loss_type!r}")
    index = reward_sample(world)
    s1 = beta * (pi_1.log() - world.log_mu())[index]  # (K,)
    s2 = beta * (pi_2.log() - world.log_mu())[index]  # (K,)
    if not torch.allclose(s1.sort().values, s2.sort().values, rtol=0, atol=1e-12):
        raise ValueError("the two policies' implicit rewards on the reward data must be the same multiset")
    weights = soft_labels(world.reward_tensor()[index][None, :], alpha)[0]  # (K,)
    differ = (s1 - s2).abs() > 0
    if loss_type == "nca":
        s1, s2 = torch.nn.functional.logsigmoid(s1), torch.nn.functional.logsigmoid(s2)
    return float(-(weights[differ] * (s1[differ] - s2[differ])).sum())
