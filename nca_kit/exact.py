r"""The theory of lectures 1 and 2 checked exactly on a small world (``notebooks/01_dpo_to_infonca``, ``02_nca``).

The world is a :class:`nca_kit.toy.ToyWorld` (one prompt, ``N`` responses, reference policy ``mu``, explicit rewards
``r``; lectures 1-2 draw one with :func:`nca_kit.toy.make_world`). Everything the lectures claim about it is
checked two ways:

* **by simulation**: :func:`simulate_infonce` draws the data-generating process of Proposition 3.1 (one response from
  ``pi* ∝ mu·exp(r/alpha)``, ``K − 1`` from ``mu``, shuffled) and :func:`simulate_nce` the one of Proposition 4.1
  (one response from ``pi*`` or from ``mu`` with equal odds); :func:`chi_square` tests the empirical posteriors
  against the propositions' formulas.
* **exactly**: the world is small enough to enumerate every ordered K-tuple of responses, so
  :func:`expected_reward_loss` and :func:`expected_preference_loss` are the population losses (no sampling noise),
  computed with the project's own :func:`nca_kit.losses.reward_loss` / :func:`nca_kit.losses.preference_loss`.
  :func:`minimise` finds their minimisers (damped Newton) and :func:`table1` turns the results into the paper's Table 1.

The learnable object is the implicit reward ``r_theta(y)``, one free number per response (``beta = 1`` and
``log mu`` folded in). That is the function class of Theorems 3.2 and 4.2, and it mirrors a language model, whose
K sampled responses are a vanishing part of sequence space: the model can lower the likelihood of all of them at
once. Shapes: ``N`` responses of the world, ``K`` responses per loss call, ``T`` enumerated tuples, ``M`` draws.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from nca_kit.losses import preference_loss, reward_loss
from nca_kit.toy import ToyWorld

__all__ = [
    "InfoNCESimulation",
    "simulate_infonce",
    "NCESimulation",
    "simulate_nce",
    "chi_square",
    "expected_reward_loss",
    "expected_preference_loss",
    "nca_population_loss",
    "nca_finite_k_minimiser",
    "minimise",
    "table1",
    "tuples_bytes",
    "compositions_bytes",
    "simulation_bytes",
    "check_size",
]

DTYPE = torch.float64  # exact enumeration: float64 makes 1e-8 convergence checks meaningful


# --------------------------------------------------------------------------------------------------------------------
# Memory the exact computations need (the lectures refuse settings above nca_kit.notebook_params.MEMORY_LIMIT_BYTES)
# --------------------------------------------------------------------------------------------------------------------


def tuples_bytes(n: int, k: int) -> float:
    """Estimated peak bytes of :func:`expected_reward_loss` minimised by :func:`minimise` on all ``N^K`` tuples.

    Per tuple: the Python tuple from ``itertools.product`` and its index row (~ 64 + 16 K bytes), and ~ 60 float64
    tensors of shape ``(T, K)`` kept by autograd for the exact Hessian. Measured: N = 5, K = 8 (390 625 tuples)
    peaks at 1.29 GB above the interpreter, i.e. ~ 415 bytes per tuple and slot; the estimate, ``512 K + 256`` per
    tuple, stays above it.
    """
    return float(n) ** k * (512 * k + 256)


def compositions_bytes(n: int, k: int) -> float:
    """Estimated peak bytes of :func:`nca_finite_k_minimiser`: ``C(K + N − 2, N − 1)`` multinomial outcomes, each
    a Python tuple, N int64 counts, N Python floats (``lgamma``) and N float64 shares (~ 128 N + 256 bytes)."""
    return float(math.comb(k + n - 2, n - 1)) * (128 * n + 256)


def simulation_bytes(n_draws: int, k: int) -> float:
    """Estimated peak bytes of :func:`simulate_infonce` (``k`` responses per draw) or :func:`simulate_nce`
    (``k = 1``): ~ 4 int64 / float64 arrays of shape ``(M, K)`` and ~ 8 of shape ``(M,)``."""
    return float(n_draws) * (32 * k + 64)


def check_size(name: str, need_bytes: float, what: str, limit: int | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` when ``need_bytes`` is above ``limit`` (default
    :data:`nca_kit.notebook_params.MEMORY_LIMIT_BYTES`)."""
    from nca_kit.notebook_params import MEMORY_LIMIT_BYTES, check_memory

    check_memory(name, need_bytes, what, MEMORY_LIMIT_BYTES if limit is None else limit)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------------------------------
# Simulations of Propositions 3.1 and 4.1
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class InfoNCESimulation:
    """Draws of Proposition 3.1, grouped by the ordered tuple of responses that was observed."""

    tuples: np.ndarray  # (T, K) response indices
    counts: np.ndarray  # (T,) how often each tuple was observed
    hits: np.ndarray  # (T, K) how often the pi*-response sat in slot i of that tuple
    posterior: np.ndarray  # (T, K) Proposition 3.1: softmax(r[tuple] / alpha)

    @property
    def empirical(self) -> np.ndarray:
        """Empirical posterior ``P(nu = i | tuple)``, ``(T, K)``."""
        return self.hits / self.counts[:, None]


def simulate_infonce(world: ToyWorld, k: int, n_draws: int, alpha: float, rng: np.random.Generator):
    """Proposition 3.1: the optimal response's index ``nu`` given ``K`` shuffled responses.

    Each draw puts one response from ``pi*`` in a uniformly random slot ``nu`` and fills the other ``K − 1`` slots
    from ``mu``. Bayes' rule gives ``P(nu = i | y_1..K) = softmax(r(y_i) / alpha)``: the reward is exactly the logit
    of a K-way classifier, which is what InfoNCA (Eq. 6) trains.
    """
    if world.n ** k >= 2**63:
        raise ValueError(f"k must be smaller: the {world.n}^{k} ordered tuples do not fit the int64 codes that "
                         f"group the draws")
    nu = rng.integers(k, size=n_draws)  # (M,)
    optimal = rng.choice(world.n, size=n_draws, p=world.optimal_policy(alpha))  # (M,)
    responses = rng.choice(world.n, size=(n_draws, k), p=world.mu)  # (M, K)
    responses[np.arange(n_draws), nu] = optimal
    codes = responses @ (world.n ** np.arange(k))  # (M,) one integer per ordered tuple
    unique, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(unique))  # (T,)
    hits = np.bincount(inverse * k + nu, minlength=len(unique) * k).reshape(len(unique), k)  # (T, K)
    tuples = responses[first]  # (T, K)
    return InfoNCESimulation(tuples, counts, hits, _softmax(world.rewards[tuples] / alpha))


@dataclass
class NCESimulation:
    """Draws of Proposition 4.1, grouped by response."""

    counts: np.ndarray  # (N,) how often each response was observed
    hits: np.ndarray  # (N,) how often it came from pi*
    posterior: np.ndarray  # (N,) Proposition 4.1: sigmoid(r / alpha − log Z)

    @property
    def empirical(self) -> np.ndarray:
        """Empirical posterior ``P(from pi* | y)``, ``(N,)``; NaN for responses never drawn."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits / self.counts


def simulate_nce(world: ToyWorld, n_draws: int, alpha: float, rng: np.random.Generator) -> NCESimulation:
    """Proposition 4.1: was ``y`` drawn from ``pi*`` or from ``mu`` (equal prior odds)?

    ``P(pi* | y) = pi*(y) / (pi*(y) + mu(y)) = sigmoid(r(y)/alpha − log Z)``: a *binary* classifier whose logit is the
    reward minus the log-normaliser. NCA (Eq. 11) trains ``r_theta`` as that logit, so it must learn the normaliser
    too: the absolute value of ``r_theta``, not only differences.
    """
    from_optimal = rng.random(n_draws) < 0.5  # (M,)
    y = np.where(from_optimal,
                 rng.choice(world.n, size=n_draws, p=world.optimal_policy(alpha)),
                 rng.choice(world.n, size=n_draws, p=world.mu))  # (M,)
    counts = np.bincount(y, minlength=world.n)
    hits = np.bincount(y[from_optimal], minlength=world.n)
    posterior = 1.0 / (1.0 + np.exp(-world.nca_target(alpha)))
    return NCESimulation(counts, hits, posterior)


def chi_square(hits: np.ndarray, counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0):
    """Pearson goodness-of-fit of observed outcomes against predicted probabilities.

    ``hits (G, C)`` are outcome counts of ``counts (G,)`` trials per group with predicted ``probs (G, C)``; a 1-D
    ``hits``/``probs`` means binary outcomes (``C = 2``: hit or miss). The chi-square approximation needs an
    expected count of at least ``min_expected`` per cell, so within each group the cells below it are pooled into
    one (and that one into the smallest other cell if it is still below); a group left with fewer than two cells
    says nothing and is dropped. Each group adds (its cells − 1) degrees of freedom.

    Returns ``(statistic, degrees_of_freedom, p_value)``.
    """
    hits, counts, probs = np.asarray(hits, float), np.asarray(counts, float), np.asarray(probs, float)
    if hits.ndim == 1:
        hits, probs = np.stack([hits, counts - hits], -1), np.stack([probs, 1.0 - probs], -1)
    expected = counts[:, None] * probs  # (G, C)
    stat, dof = 0.0, 0
    for observed, predicted in zip(hits, expected):  # (C,), (C,) per group
        small = predicted < min_expected
        if small.any():
            observed = np.append(observed[~small], observed[small].sum())
            predicted = np.append(predicted[~small], predicted[small].sum())
            if predicted[-1] < min_expected and len(predicted) > 1:
                j = int(np.argmin(predicted[:-1]))
                observed[j], predicted[j] = observed[j] + observed[-1], predicted[j] + predicted[-1]
                observed, predicted = observed[:-1], predicted[:-1]
        if len(predicted) < 2:
            continue
        stat += float(((observed - predicted) ** 2 / predicted).sum())
        dof += len(predicted) - 1
    if dof == 0:
        raise ValueError("no group has two cells with enough expected counts; draw more samples")
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=DTYPE), torch.tensor(stat / 2, dtype=DTYPE)))
    return stat, dof, p_value


# --------------------------------------------------------------------------------------------------------------------
# Exact population losses
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _tuple_index(n: int, k: int) -> torch.Tensor:
    check_size("k", tuples_bytes(n, k), f"enumerating all {n}^{k} ordered tuples of responses")
    return torch.tensor(list(itertools.product(range(n), repeat=k)), dtype=torch.long)  # (T, K)


def _tuples(world: ToyWorld, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``N^K`` ordered K-tuples of responses ``(T, K)`` and their probabilities under ``mu^K`` ``(T,)``."""
    idx = _tuple_index(world.n, k)  # (T, K)
    weights = torch.tensor(world.mu, dtype=DTYPE)[idx].prod(dim=-1)  # (T,)
    return idx, weights


def expected_reward_loss(world: ToyWorld, r_theta: torch.Tensor, *, k: int, alpha: float,
                         loss_type: str) -> torch.Tensor:
    """Population loss ``E_{y_1..K ~ mu}[L(r_theta(y_1..K); r(y_1..K))]`` of a reward-dataset loss, exactly.

    ``r_theta (N,)`` holds the implicit reward of every response; ``loss_type`` is any of
    :data:`nca_kit.losses.REWARD_LOSS_TYPES`. Returns a scalar with gradient.
    """
    idx, weights = _tuples(world, k)
    rewards = torch.tensor(world.rewards, dtype=DTYPE)[idx]  # (T, K)
    policy = r_theta[idx]  # (T, K)
    losses, _ = reward_loss(policy, torch.zeros_like(policy), rewards, alpha=alpha, beta=1.0, loss_type=loss_type)
    return (weights * losses).sum()


def expected_preference_loss(world: ToyWorld, r_theta: torch.Tensor, *, alpha: float,
                             loss_type: str) -> torch.Tensor:
    """Population loss of a preference loss on pairs ``y_1, y_2 ~ mu`` labelled by Bradley–Terry (Eq. 1).

    The label is ``y_1 ≻ y_2`` with probability ``sigmoid((r_1 − r_2)/alpha)`` (``alpha = 0``: the higher reward
    wins, ties are a coin flip). ``loss_type`` is any of :data:`nca_kit.losses.PREFERENCE_LOSS_TYPES`.
    For ``"dpo"`` this is also the reward-model loss of Eq. 2 with ``r_theta`` as the reward model.
    """
    idx, weights = _tuples(world, 2)
    rewards = torch.tensor(world.rewards, dtype=DTYPE)[idx]  # (T, 2)
    diff = rewards[:, 0] - rewards[:, 1]  # (T,)
    p_first = torch.sigmoid(diff / alpha) if alpha > 0 else (torch.sign(diff) + 1) / 2  # (T,)
    first, second = r_theta[idx[:, 0]], r_theta[idx[:, 1]]  # (T,), (T,)
    zeros = torch.zeros_like(first)
    first_wins, _, _ = preference_loss(first, zeros, second, zeros, beta=1.0, loss_type=loss_type)
    second_wins, _, _ = preference_loss(second, zeros, first, zeros, beta=1.0, loss_type=loss_type)
    return (weights * (p_first * first_wins + (1 - p_first) * second_wins)).sum()


def nca_population_loss(world: ToyWorld, r_theta: torch.Tensor, *, alpha: float) -> torch.Tensor:
    r"""NCA's population objective with the exact normaliser (the one Theorem 4.2 is about)::

        L = − E_mu[ exp(r/alpha) / Z · log sigmoid(r_theta) + log sigmoid(−r_theta) ],  Z = E_mu[exp(r/alpha)]

    i.e. binary cross-entropy of Proposition 4.1's classifier: ``E_pi*[−log σ(r_θ)] + E_mu[−log σ(−r_θ)]``.
    Its minimiser is exactly ``r/alpha − log Z``. Eq. 11 estimates ``exp(r/alpha)/Z`` from the K responses of each
    prompt (``K · softmax(r/alpha)``), which is why its minimiser at finite K is :func:`nca_finite_k_minimiser`.
    """
    mu = torch.tensor(world.mu, dtype=DTYPE)
    ratio = torch.tensor(world.optimal_policy(alpha), dtype=DTYPE) / mu  # (N,) exp(r/alpha) / Z
    return -(mu * (ratio * torch.nn.functional.logsigmoid(r_theta)
                   + torch.nn.functional.logsigmoid(-r_theta))).sum()


def _compositions(total: int, parts: int) -> np.ndarray:
    """Every way to write ``total`` as an ordered sum of ``parts`` non-negative integers, ``(C, parts)``.

    Stars and bars: choose the positions of ``parts − 1`` bars among ``total + parts − 1`` slots.
    """
    if parts == 1:
        return np.array([[total]])
    bars = np.array(list(itertools.combinations(range(total + parts - 1), parts - 1)), dtype=np.int64)  # (C, parts-1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), total + parts - 1)], axis=1)
    return np.diff(edges, axis=1) - 1  # (C, parts)


def nca_finite_k_minimiser(world: ToyWorld, k: int, alpha: float) -> np.ndarray:
    r"""Exact minimiser of the population NCA loss (Eq. 11) at a finite ``K``, shape ``(N,)``.

    Per response, Eq. 11 weighs ``log σ(r_θ(y))`` by ``a(y) = K·mu(y)·E[softmax weight of y among K]`` and
    ``log σ(−r_θ(y))`` by ``b(y) = mu(y)``, so ``r_θ*(y) = log(a/b) = log(K · E[e^{r_y/α} / (e^{r_y/α} + S)])`` with
    ``S`` the sum of ``e^{r/α}`` over ``K − 1`` draws from ``mu`` (enumerated exactly as a multinomial). As
    ``K → ∞`` this tends to Theorem 4.2's ``r/α − log E_mu e^{r/α}``. For the best response the softmax weight is
    at least ``1/K`` in every tuple, so ``r_θ*(y_best) >= 0`` at every K.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    check_size("k", compositions_bytes(world.n, k), f"the C({k + world.n - 2}, {world.n - 1}) outcomes of {k - 1} "
               f"draws over {world.n} responses")
    shift = world.rewards.max() / alpha
    e = np.exp(world.rewards / alpha - shift)  # (N,) in (0, 1]
    counts = _compositions(k - 1, world.n)  # (C, N) how many of the K-1 other draws hit each response
    log_pmf = (math.lgamma(k) - np.vectorize(math.lgamma)(counts + 1).sum(-1)
               + (counts * np.log(world.mu)).sum(-1))  # (C,) multinomial
    others = counts @ e  # (C,) S, scaled by exp(-shift)
    share = e[:, None] / (e[:, None] + others[None, :])  # (N, C)
    return np.log(k * (share * np.exp(log_pmf)[None, :]).sum(-1))


def minimise(objective, init, max_iter: int = 100, tol: float = 1e-14) -> tuple[np.ndarray, float]:
    """Minimise ``objective(r_theta (N,)) -> scalar`` from ``init`` by damped Newton; returns ``(r_theta*, loss)``.

    The objectives here are convex in ``r_theta`` and ``N`` is tiny, so Newton's method with the exact Hessian
    (autograd) and a backtracking line search reaches a gradient below ``tol`` in a few steps; it stops early when
    no step lowers the loss any more (float64 round-off). The step is the minimum-norm one (pseudo-inverse), so on a
    flat direction — InfoNCA and DPO cannot see a common shift of ``r_theta`` — it never moves: the sum of
    ``r_theta`` stays where ``init`` put it, which is how two runs reach different minimisers of the same loss, as
    any gradient method would.

    Responses the loss barely sees (a logit of ±30 or more, where σ saturates in float64) are not pinned down to
    many digits in ``r_theta``; compare such minimisers on the probability scale (``table1``'s ``posterior gap``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # N x N Hessians: extra threads only add synchronisation (10x slower on a busy CPU)
    try:
        return _newton(objective, torch.tensor(np.asarray(init, dtype=float), dtype=DTYPE), max_iter, tol)
    finally:
        torch.set_num_threads(threads)


def _newton(objective, theta: torch.Tensor, max_iter: int, tol: float) -> tuple[np.ndarray, float]:
    for _ in range(max_iter):
        x = theta.clone().requires_grad_(True)
        loss = objective(x)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)  # (N,)
        if float(grad.detach().abs().max()) < tol:
            break
        hessian = torch.stack([torch.autograd.grad(g, x, retain_graph=True)[0] for g in grad])  # (N, N)
        step = torch.linalg.pinv(hessian.detach(), hermitian=True, rtol=1e-14) @ grad.detach()  # (N,)
        slope, t = float(grad.detach() @ step), 1.0
        with torch.no_grad():
            while t > 1e-12 and float(objective(theta - t * step)) > float(loss) - 1e-4 * t * slope:
                t /= 2
        if t <= 1e-12:  # no step lowers the loss: converged to round-off
            break
        theta = theta - t * step
    with torch.no_grad():
        return theta.numpy().copy(), float(objective(theta))


# --------------------------------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------------------------------


def table1(world: ToyWorld, *, k: int, alpha: float, inits: dict[str, np.ndarray]) -> pd.DataFrame:
    """The paper's Table 1 (DPO/InfoNCA vs NCA), every number measured by minimising the loss on ``world``.

    For each loss, :func:`minimise` runs from every initial ``r_theta`` in ``inits`` (name -> ``(N,)``). Columns:

    * ``stated optimum``: what the paper states (Theorems 3.2 and 4.2); ``gap to stated``: ``max_y |r_θ* − stated|``,
      after the best constant for the "+ C(x)" rows.
    * ``gap to finite-K``: the same against the exact minimiser at this K (for NCA: :func:`nca_finite_k_minimiser`).
    * ``posterior gap``: the same comparison on the scale the cross-entropy losses see, probabilities: the largest
      difference of ``σ(r_θ(y) − r_θ(y'))`` over pairs (relative rows) or of ``σ(r_θ(y))`` (absolute rows). It
      stays at round-off for every ``alpha``; the gaps in nats of responses whose logit saturates σ (tiny ``alpha``)
      need not.
    * ``loss spread``: largest difference of the minimum loss across inits (all runs reach the same minimum);
      ``optima spread``: largest difference between the minimisers they reached (0: the minimiser is unique).
    * ``Δloss(r_θ*+1)``: how much the loss changes when every ``r_θ`` shifts by 1: ``0`` means the loss sees only
      relative likelihoods, ``> 0`` absolute ones (the ``target`` column is derived from it).
    * ``min r_θ*(y_best)``: the smallest value over inits; ``guaranteed ≥ 0``: whether every run ended ``>= 0``
      *and* no minimiser lies below: the minimiser shifted so that ``r_θ(y_best) = −1`` must raise the loss.

    The minimisers themselves are in ``table.attrs["optima"]`` (loss -> init name -> ``r_theta* (N,)``).
    """
    scaled = world.rewards / alpha
    rows = [
        ("DPO (Eq. 5)", "pairs", "−log σ(r_w − r_l)", "r/α + C(x)",
         lambda r: expected_preference_loss(world, r, alpha=alpha, loss_type="dpo"), scaled, True),
        ("InfoNCA (Eq. 6)", f"K={k} rewards", "−Σ softmax(r/α)_i log softmax(r_θ)_i", "r/α + C(x)",
         lambda r: expected_reward_loss(world, r, k=k, alpha=alpha, loss_type="infonca"), scaled, True),
        ("NCA (Eq. 12)", "pairs", "−log σ(r_w) − ½log σ(−r_w) − ½log σ(−r_l)", "r/α − log E_μ e^{r/α}",
         lambda r: expected_preference_loss(world, r, alpha=alpha, loss_type="nca"),
         nca_finite_k_minimiser(world, 2, alpha), False),
        ("NCA (Eq. 11)", f"K={k} rewards", "−Σ softmax(r/α)_i log σ(r_θ,i) + (1/K) log σ(−r_θ,i)",
         "r/α − log E_μ e^{r/α}", lambda r: expected_reward_loss(world, r, k=k, alpha=alpha, loss_type="nca"),
         nca_finite_k_minimiser(world, k, alpha), False),
    ]

    def gap(r, target, free_constant):
        d = r - target
        return float(np.abs(d - d.mean()).max() if free_constant else np.abs(d).max())

    def posterior_gap(r, target, free_constant):
        if free_constant:  # pairwise Bradley-Terry probabilities
            r, target = r[:, None] - r[None, :], target[:, None] - target[None, :]  # (N, N)
        sigmoid = lambda z: 0.5 * (1 + np.tanh(z / 2))  # noqa: E731 -- no overflow warning for |z| > 709
        return float(np.abs(sigmoid(r) - sigmoid(target)).max())

    records, optima_by_loss = [], {}
    for name, data, loss, stated, objective, finite_k, free_constant in rows:
        stated_values = scaled if free_constant else world.nca_target(alpha)
        runs = [minimise(objective, init) for init in inits.values()]
        optima = [r for r, _ in runs]
        optima_by_loss[name] = dict(zip(inits, optima))
        minima = [v for _, v in runs]
        r0 = optima[0]
        with torch.no_grad():
            shifted = float(objective(torch.tensor(r0 + 1.0, dtype=DTYPE)))
            below = float(objective(torch.tensor(r0 - r0[world.best] - 1.0, dtype=DTYPE)))  # r_θ(y_best) = −1
        delta = shifted - minima[0]
        best = [r[world.best] for r in optima]
        records.append({
            "loss": name,
            "data": data,
            "formula": loss,
            "stated optimum": stated,
            "gap to stated": max(gap(r, stated_values, free_constant) for r in optima),
            "gap to finite-K": max(gap(r, finite_k, free_constant) for r in optima),
            "posterior gap": max(posterior_gap(r, finite_k, free_constant) for r in optima),
            "min loss": min(minima),
            "loss spread": max(minima) - min(minima),
            "optima spread": max(float(np.abs(a - b).max()) for a in optima for b in optima),
            "Δloss(r_θ*+1)": delta,
            "target": "relative" if abs(delta) < 1e-9 else "absolute",
            "min r_θ*(y_best)": min(best),
            "guaranteed ≥ 0": bool(min(best) >= -1e-9 and below - minima[0] > 1e-9),
        })
    table = pd.DataFrame.from_records(records).set_index("loss")
    table.attrs["optima"] = optima_by_loss  # loss -> init name -> r_theta* (N,)
    return table
