r"""Alignment losses of *Noise Contrastive Alignment of Language Models with Explicit Rewards* (Chen et al., 2024).

Every loss here is a pure function of log-probabilities: no model, tokenizer or trainer inside. Shapes use one
letter per axis: ``B`` prompts, ``K`` responses per prompt.

The implicit reward of a response is the scaled log density ratio between policy and reference (paper Eq. 4/9)::

    r_theta(x, y) = beta * [log pi_theta(y|x) - log mu(y|x)]

**Reward datasets** ``x -> {y_i, r_i}_{i=1..K}`` (:func:`reward_loss`):

* InfoNCA (Eq. 6), a K-way classification with soft labels ``softmax(r / alpha)``::

      L = - sum_i softmax(r / alpha)_i * log softmax(r_theta)_i

  Optimum (Theorem 3.2): ``r_theta* = r / alpha + c(x)`` for any ``c(x)``; with ``r_theta = beta log(pi/mu)`` this is
  ``pi* ∝ mu * exp(r / (alpha * beta))`` (the paper states it with beta = 1: ``pi* ∝ mu * exp(r / alpha)``).

* NCA (Eq. 11), K independent binary classifications "optimal vs noise"::

      L = - sum_i [ softmax(r / alpha)_i * log sigmoid(r_theta_i) + (1/K) * log sigmoid(-r_theta_i) ]

  Optimum (Theorem 4.2): the same ``pi*``, but self-normalised: ``r_theta* = r / alpha - log E_mu[exp(r / alpha)]``.
  Because the constant is pinned, NCA controls the *absolute* likelihood of each response, not only relative ones.
  The theorem is a statement about the population objective (K -> infinity, where ``softmax(r/alpha)`` over K
  samples from mu becomes the exact importance weight). At finite K the minimiser of Eq. 11 is
  ``r_theta*(y) = log(K * E[softmax(r/alpha)_i | y_i = y])``, which differs by a bias that shrinks roughly like 1/K
  (notebook 02 measures it); ``r_theta*(y_best) >= 0`` holds at every K.
  Unlike InfoNCA's, NCA's optimum also assumes the K responses of a prompt are drawn from mu (notebook 03 shows
  it missing pi* when each response is fed once instead).

**Preference datasets** ``x -> {y_w > y_l}`` (:func:`preference_loss`): DPO (Eq. 5, equal to InfoNCA with K=2 and
alpha -> 0), pairwise NCA (Eq. 12: ``-log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l)``) and IPO as a reference point.

**Table 2 baselines** that feed all K responses of a reward dataset to DPO through pairs live in
:func:`reward_loss` too, under ``loss_type="dpo_best_vs_rest"`` (DPO x (K-1): the best response against each other
one) and ``loss_type="dpo_all_pairs"`` (DPO x C(K,2): every pair ordered by reward, ties skipped). They are also
callable directly as :func:`dpo_best_vs_rest_loss` and :func:`dpo_all_pairs_loss`.

Every function returns per-prompt losses (the caller takes the mean) together with the *detached* implicit rewards,
which are what every log line and plot needs.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "LossSpec",
    "LOSSES",
    "loss_spec",
    "REWARD_LOSS_TYPES",
    "PREFERENCE_LOSS_TYPES",
    "LOSS_TYPES_FOR",
    "REWARD_LOSSES",
    "PREFERENCE_LOSSES",
    "check_loss_type",
    "device_checks",
    "require",
    "soft_labels",
    "implicit_rewards",
    "reward_loss",
    "preference_loss",
    "infonca_loss",
    "nca_loss",
    "dpo_best_vs_rest_loss",
    "dpo_all_pairs_loss",
    "dpo_pair_loss",
    "nca_pair_loss",
    "ipo_pair_loss",
]


# --------------------------------------------------------------------------------------------------------------------
# Input checks: every message names the offending argument.
# --------------------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


_CHECKS = threading.local()


@contextlib.contextmanager
def device_checks():
    """Run the value checks of the losses on the tensors' device, without a host synchronisation.

    Inside this context the checks that read tensor values (finite inputs, a finite loss, at least one response per
    prompt) become ``torch._assert_async``: on a GPU the step is not held up and a failure surfaces at a later
    synchronisation as a ``RuntimeError`` with the same message (without the counts, which would need the values on
    the host); on the CPU they raise at once. Shape and type checks need no values and stay as they are. The trainer
    runs its loss inside this context; direct calls keep the detailed synchronous messages.
    """
    before = getattr(_CHECKS, "device", False)
    _CHECKS.device = True
    try:
        yield
    finally:
        _CHECKS.device = before


def _on_device() -> bool:
    return getattr(_CHECKS, "device", False)


def require(condition: torch.Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless the boolean tensor ``condition`` holds; inside :func:`device_checks` an
    asynchronous device-side assertion instead (no host synchronisation)."""
    if _on_device():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise error(message)


def _check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    bad = ~torch.isfinite(x.detach())
    if mask is not None:
        bad = bad & mask
    if _on_device():
        torch._assert_async(~bad.any(), f"{name} contains NaN or inf values")
        return
    if bool(bad.any()):
        what = "NaN" if bool(torch.isnan(x.detach())[bad].any()) else "inf"
        raise ValueError(f"{name} contains {what} values (at {int(bad.sum())} position(s))")


def _check_same_shape(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def _scalar(name: str, value) -> float:
    """A Python float from an int/float, a NumPy scalar or a 0-d tensor; anything else is a clear error."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got the bool {value!r}")
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a number, got the string {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)  # int, float, numpy scalars (np.float32(0.1), np.int64(1)), Fraction, Decimal
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None


def _check_beta(beta) -> float:
    value = _scalar("beta", beta)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return value


def _check_alpha(alpha) -> float:
    value = _scalar("alpha", alpha)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"alpha must be a finite number >= 0 (0 means the alpha -> 0 limit), got {alpha!r}")
    return value


def _check_loss_finite(losses: torch.Tensor, beta: float) -> torch.Tensor:
    """Finite inputs must give a finite loss: say why not instead of returning NaN/inf."""
    message = (f"the loss overflowed (non-finite) although its inputs are finite: beta = {beta!r} times the "
               "log-ratio log(pi/mu) exceeds the float range; lower beta or check the log-probs")
    if _on_device():
        torch._assert_async(torch.isfinite(losses.detach()).all(), message)
        return losses
    if not bool(torch.isfinite(losses.detach()).all()):
        raise ValueError(f"the loss overflowed (non-finite) although its inputs are finite: beta = {beta!r} times the "
                         "log-ratio log(pi/mu) exceeds the float range; lower beta or check the log-probs")
    return losses


def check_loss_type(loss_type: str, data_kind: str | None = None) -> str:
    """The lower-cased ``loss_type`` if it exists (and fits ``data_kind``: ``"reward"`` or ``"pairwise"``).

    The one place that says which losses exist and which data each one takes: the toy, :class:`TrainConfig` and the
    trainer all ask here. Raises a one-line ``ValueError`` naming the argument otherwise.
    """
    if data_kind is not None and data_kind not in LOSS_TYPES_FOR:
        raise ValueError(f"data_kind must be one of {', '.join(LOSS_TYPES_FOR)}, got {data_kind!r}")
    every = tuple(dict.fromkeys(REWARD_LOSS_TYPES + PREFERENCE_LOSS_TYPES))
    allowed = every if data_kind is None else LOSS_TYPES_FOR[data_kind]
    if not isinstance(loss_type, str) or loss_type.lower() not in every:
        raise ValueError(f"loss_type must be one of {', '.join(allowed)} (case-insensitive), got {loss_type!r}")
    loss_type = loss_type.lower()
    if data_kind is None:
        return loss_type
    if loss_type not in allowed:
        hint = (" (for DPO on reward data use dpo_best_vs_rest or dpo_all_pairs, or convert to pairs with "
                "nca_kit.data.rewards_to_pairs)" if data_kind == "reward" else
                " (for the K-response baselines use reward data)")
        raise ValueError(f"loss_type {loss_type!r} does not apply to {data_kind} data; use one of "
                         f"{', '.join(allowed)}{hint}")
    return loss_type


def _check_mask(mask, ref: torch.Tensor, ref_name: str = "policy_logps") -> torch.Tensor:
    if ref.dim() >= 1 and ref.shape[-1] == 0:
        raise ValueError(f"{ref_name} has shape {tuple(ref.shape)}: every prompt needs at least one response (K >= 1)")
    if mask is None:
        return torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor of bools, got {type(mask).__name__}")
    if mask.shape != ref.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    mask = mask.to(device=ref.device, dtype=torch.bool)
    empty = ~mask.any(dim=-1)
    if _on_device():
        torch._assert_async(~empty.any(), "mask has rows with no response; every prompt needs at least one")
        return mask
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"mask has rows with no response (rows {rows[:10]}); every prompt needs at least one")
    return mask


def _float(x: torch.Tensor) -> torch.Tensor:
    """Compute losses in at least float32 (bf16 log-probs lose too much precision in differences)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


def soft_labels(rewards: torch.Tensor, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Target distribution over the K responses of each prompt: ``softmax(r / alpha)`` (paper Eq. 6/11).

    Args:
        rewards: ``(B, K)`` explicit rewards.
        alpha: reward temperature. ``alpha = 0`` is the limit ``alpha -> 0``: a one-hot label on the best response,
            with ties sharing the mass evenly.
        mask: optional ``(B, K)`` bool, ``True`` for real responses; padded slots get label 0.

    Returns:
        ``(B, K)`` rows summing to 1 over the real responses.

    With GPT-4 scores on a 0–10 scale and the paper's ``alpha = 0.01``, a one-point gap becomes a factor ``e^100``:
    the labels are one-hot on the best response for all practical purposes.
    """
    rewards = _float(_check_tensor("rewards", rewards))
    alpha = _check_alpha(alpha)
    mask = _check_mask(mask, rewards, "rewards")
    _check_finite("rewards", rewards, mask)
    return _soft_labels(rewards, alpha, mask)


def _soft_labels(rewards: torch.Tensor, alpha: float, mask: torch.Tensor) -> torch.Tensor:
    neg_inf = torch.finfo(rewards.dtype).min
    masked = torch.where(mask, rewards, torch.full_like(rewards, neg_inf))
    if alpha == 0:
        best = masked.max(dim=-1, keepdim=True).values
        is_best = (masked == best) & mask
        labels = is_best.to(rewards.dtype)
        return labels / labels.sum(dim=-1, keepdim=True)
    # Subtract each prompt's best reward before dividing: the differences are <= 0, so a tiny alpha or a huge
    # reward sends them to -inf (label 0) instead of overflowing to inf - inf = NaN.
    best = masked.max(dim=-1, keepdim=True).values  # (B, 1)
    logits = torch.where(mask, (rewards - best) / alpha, torch.full_like(rewards, -math.inf))
    return torch.softmax(logits, dim=-1)  # (B, K)


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """``r_theta = beta * (log pi_theta(y|x) - log mu(y|x))`` elementwise (paper Eq. 4/9), with gradient."""
    return beta * (_float(policy_logps) - _float(reference_logps))


# --------------------------------------------------------------------------------------------------------------------
# Reward datasets: x -> {y_i, r_i}_{1..K}
# --------------------------------------------------------------------------------------------------------------------


def infonca_loss(model_rewards: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""InfoNCA (Eq. 6) on precomputed implicit rewards ``(B, K)`` and soft labels ``(B, K)``; returns ``(B,)``.

    ``L = - Σ_i labels_i · log softmax(r_θ)_i``. Gradient w.r.t. ``r_θ,i``: ``softmax(r_θ)_i − labels_i``, so only
    *relative* rewards move: adding a constant to every ``r_θ,i`` of a prompt changes nothing, and the likelihood of
    the chosen response may fall as long as the others fall faster.
    """
    logits = torch.where(mask, model_rewards, torch.full_like(model_rewards, -math.inf))
    log_probs = torch.log_softmax(logits, dim=-1)  # (B, K)
    log_probs = torch.where(mask, log_probs, torch.zeros_like(log_probs))
    return -(labels * log_probs).sum(dim=-1)  # (B,)


def nca_loss(model_rewards: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""NCA (Eq. 11) on precomputed implicit rewards ``(B, K)`` and soft labels ``(B, K)``; returns ``(B,)``.

    ``L = − Σ_i [ labels_i · log σ(r_θ,i) + (1/K) · log σ(−r_θ,i) ]`` with K each prompt's own number of responses.
    Two forces act on each response: the soft label pushes its likelihood *up* with weight ``labels_i · σ(−r_θ,i)``,
    the ``1/K`` noise term pushes it *down* with weight ``σ(r_θ,i) / K``. At initialisation (``r_θ = 0``) the net
    force is ``(labels_i − 1/K) / 2``: responses better than average go up in absolute terms.
    """
    k = mask.sum(dim=-1, keepdim=True).to(model_rewards.dtype)  # (B, 1)
    per_response = labels * F.logsigmoid(model_rewards) + F.logsigmoid(-model_rewards) / k  # (B, K)
    per_response = torch.where(mask, per_response, torch.zeros_like(per_response))
    return -per_response.sum(dim=-1)  # (B,)


def _best_index(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Index of the highest-reward real response of each prompt (the first one on ties)."""
    masked = torch.where(mask, rewards, torch.full_like(rewards, -math.inf))
    return masked.argmax(dim=-1)  # (B,)


def dpo_best_vs_rest_loss(model_rewards: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""DPO x (K−1) (Table 2 baseline): the best response against each other real response, averaged per prompt.

    ``L = mean_{j ≠ best, r_j < r_best} −log σ(r_θ,best − r_θ,j)``. Responses tied with the best are skipped; a
    prompt whose responses all tie has loss 0 (it carries no preference).
    """
    best = _best_index(rewards, mask)  # (B,)
    best_reward = rewards.gather(-1, best[:, None])  # (B, 1)
    best_model = model_rewards.gather(-1, best[:, None])  # (B, 1)
    valid = mask & (rewards < best_reward)  # (B, K)
    pair_losses = -F.logsigmoid(best_model - model_rewards)  # (B, K)
    pair_losses = torch.where(valid, pair_losses, torch.zeros_like(pair_losses))
    n_pairs = valid.sum(dim=-1).clamp(min=1).to(model_rewards.dtype)
    return pair_losses.sum(dim=-1) / n_pairs  # (B,)


def dpo_all_pairs_loss(model_rewards: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""DPO x C(K,2) (Table 2 baseline): every pair of real responses ordered by reward, averaged per prompt.

    ``L = mean_{i, j: r_i > r_j} −log σ(r_θ,i − r_θ,j)``. Tied pairs are skipped; a prompt with no strict pair has
    loss 0.
    """
    diff = model_rewards[:, :, None] - model_rewards[:, None, :]  # (B, K, K)
    better = rewards[:, :, None] > rewards[:, None, :]  # (B, K, K): i strictly better than j
    valid = better & mask[:, :, None] & mask[:, None, :]
    pair_losses = torch.where(valid, -F.logsigmoid(diff), torch.zeros_like(diff))
    n_pairs = valid.sum(dim=(-1, -2)).clamp(min=1).to(model_rewards.dtype)
    return pair_losses.sum(dim=(-1, -2)) / n_pairs  # (B,)


def reward_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    loss_type: str,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Loss for a reward dataset ``x -> {y_i, r_i}_{i=1..K}``.

    Args:
        policy_logps: ``(B, K)`` sequence log-probabilities ``log pi_theta(y_i|x)`` (with gradient).
        reference_logps: ``(B, K)`` ``log mu(y_i|x)`` of the reference (frozen) model.
        rewards: ``(B, K)`` explicit rewards ``r(x, y_i)``.
        alpha: reward temperature of the soft labels ``softmax(r / alpha)``; ``0`` means the limit alpha -> 0
            (one-hot on the best response, ties shared evenly). Paper default 0.01 (Appendix C).
        beta: scale of the implicit reward ``r_theta = beta * log(pi_theta / mu)``. Paper default 0.01.
        loss_type: ``"infonca"`` (Eq. 6) or ``"nca"`` (Eq. 11), case-insensitive; also the Table 2 baselines
            ``"dpo_best_vs_rest"`` (DPO x (K−1)) and ``"dpo_all_pairs"`` (DPO x C(K,2)), which ignore ``alpha``.
        mask: optional ``(B, K)`` bool, ``True`` for real responses, so prompts with different K share a batch.
            Padded slots contribute nothing (their values are never read), and NCA's 1/K uses each prompt's own K.

    Returns:
        ``(losses, model_rewards)``: per-prompt losses ``(B,)`` and the detached implicit rewards ``(B, K)``
        (0 in padded slots).

    Both InfoNCA and NCA are minimised by ``r_theta* = r/alpha + c(x)``, i.e. ``pi*(y|x) ∝ mu(y|x) exp(r(x,y) / alpha)``
    at beta = 1 (Theorems 3.2 and 4.2). InfoNCA fixes ``r_theta`` only up to the per-prompt constant ``c(x)``; NCA
    fixes it: ``c(x) = −log E_mu e^{r/alpha}`` in the population limit (at finite K, see the module docstring).
    """
    loss_type = check_loss_type(loss_type, "reward")
    policy_logps = _check_tensor("policy_logps", policy_logps)
    reference_logps = _check_tensor("reference_logps", reference_logps)
    rewards = _check_tensor("rewards", rewards)
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must have shape (B, K), got {tuple(policy_logps.shape)}")
    _check_same_shape("reference_logps", reference_logps, "policy_logps", policy_logps)
    _check_same_shape("rewards", rewards, "policy_logps", policy_logps)
    alpha = _check_alpha(alpha)
    beta = _check_beta(beta)
    mask = _check_mask(mask, policy_logps)
    _check_finite("policy_logps", policy_logps, mask)
    _check_finite("reference_logps", reference_logps, mask)
    _check_finite("rewards", rewards, mask)

    # Padded slots may hold anything (even NaN): replace them so no NaN can reach a gradient.
    zeros = torch.zeros((), dtype=torch.float32, device=policy_logps.device)
    policy = torch.where(mask, _float(policy_logps), zeros)
    reference = torch.where(mask, _float(reference_logps), zeros)
    rewards = torch.where(mask, _float(rewards), zeros)

    model_rewards = implicit_rewards(policy, reference, beta)  # (B, K)
    losses = _check_loss_finite(REWARD_LOSSES[loss_type](model_rewards, rewards, mask, alpha), beta)  # (B,)
    detached = torch.where(mask, model_rewards.detach(), torch.zeros_like(model_rewards))
    return losses, detached


# --------------------------------------------------------------------------------------------------------------------
# Preference datasets: x -> {y_w > y_l}
# --------------------------------------------------------------------------------------------------------------------


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Loss for a preference dataset ``x -> {y_w > y_l}``. All inputs ``(B,)``.

    ``loss_type``:

    * ``"dpo"`` (Eq. 5): ``−log σ(r_w − r_l)``. Optimum: any policy with ``r_w − r_l → ∞`` on the data; only the
      margin is constrained, so both likelihoods may fall together.
    * ``"infonca"``: InfoNCA with K = 2 and alpha -> 0, which *is* DPO (Section 3.2): same numbers.
    * ``"nca"`` (Eq. 12, pairwise NCA): ``−log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)``. The chosen response is
      pushed up in absolute terms while both are regularised towards ``r_θ = 0``.
    * ``"ipo"`` (Azar et al., 2023): ``(h − 1/(2β))²`` with ``h = log(π_w/µ_w) − log(π_l/µ_l)``, a bounded-margin
      baseline.

    with ``r_w = β (log π_θ(y_w|x) − log µ(y_w|x))`` and likewise ``r_l``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are detached.
    """
    loss_type = check_loss_type(loss_type, "pairwise")
    names = ("policy_chosen_logps", "reference_chosen_logps", "policy_rejected_logps", "reference_rejected_logps")
    tensors = (policy_chosen_logps, reference_chosen_logps, policy_rejected_logps, reference_rejected_logps)
    for name, t in zip(names, tensors):
        _check_tensor(name, t)
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must have shape (B,), got {tuple(policy_chosen_logps.shape)}")
    for name, t in zip(names[1:], tensors[1:]):
        _check_same_shape(name, t, names[0], policy_chosen_logps)
    beta = _check_beta(beta)
    for name, t in zip(names, tensors):
        _check_finite(name, t)

    chosen = implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta)  # (B,)
    rejected = implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta)  # (B,)
    losses = _check_loss_finite(PREFERENCE_LOSSES[loss_type](chosen, rejected, beta), beta)  # (B,)
    return losses, chosen.detach(), rejected.detach()


def dpo_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Eq. 5) on implicit rewards ``(B,)``: ``−log σ(r_w − r_l)``."""
    return -F.logsigmoid(chosen - rejected)


def nca_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Pairwise NCA (Eq. 12) on implicit rewards ``(B,)``: ``−log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)``."""
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def ipo_pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO on implicit rewards ``(B,)``: ``(h − 1/(2β))²`` with ``h = (r_w − r_l) / β`` the log-ratio margin."""
    h = (chosen - rejected) / beta
    return (h - 1.0 / (2.0 * beta)) ** 2


# --------------------------------------------------------------------------------------------------------------------
# The one loss table. Every loss is declared once, in LOSSES; the dispatch tables, the lists of loss types and the
# run layer's methods (nca_kit.experiment.METHODS) are derived from it. A new loss is one function and one line here.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """One loss: its ``loss_type``, the data it trains on and whether it reads the reward temperature α.

    ``data="reward"``: K scored responses per prompt, ``fn(model_rewards (B, K), rewards (B, K), mask (B, K), alpha)
    -> (B,)``; ``data="pairwise"``: a chosen and a rejected response, ``fn(chosen (B,), rejected (B,), beta) -> (B,)``.
    """

    name: str
    data: str
    fn: Callable
    uses_alpha: bool


def _infonca_on_rewards(model_rewards, rewards, mask, alpha):
    return infonca_loss(model_rewards, _soft_labels(rewards, alpha, mask).to(model_rewards.dtype), mask)


def _nca_on_rewards(model_rewards, rewards, mask, alpha):
    return nca_loss(model_rewards, _soft_labels(rewards, alpha, mask).to(model_rewards.dtype), mask)


def _dpo_best_vs_rest_on_rewards(model_rewards, rewards, mask, alpha):
    return dpo_best_vs_rest_loss(model_rewards, rewards, mask)


def _dpo_all_pairs_on_rewards(model_rewards, rewards, mask, alpha):
    return dpo_all_pairs_loss(model_rewards, rewards, mask)


LOSSES = (
    LossSpec("infonca", "reward", _infonca_on_rewards, uses_alpha=True),  # Eq. 6, soft labels softmax(r / alpha)
    LossSpec("nca", "reward", _nca_on_rewards, uses_alpha=True),  # Eq. 11, the same soft labels
    LossSpec("dpo_best_vs_rest", "reward", _dpo_best_vs_rest_on_rewards, uses_alpha=False),  # DPO x (K - 1)
    LossSpec("dpo_all_pairs", "reward", _dpo_all_pairs_on_rewards, uses_alpha=False),  # DPO x C(K, 2)
    LossSpec("dpo", "pairwise", dpo_pair_loss, uses_alpha=False),  # Eq. 5
    LossSpec("infonca", "pairwise", dpo_pair_loss, uses_alpha=False),  # InfoNCA at K = 2, alpha -> 0: DPO
    LossSpec("nca", "pairwise", nca_pair_loss, uses_alpha=False),  # Eq. 12
    LossSpec("ipo", "pairwise", ipo_pair_loss, uses_alpha=False),  # a reference point
)
REWARD_LOSSES = {spec.name: spec.fn for spec in LOSSES if spec.data == "reward"}
PREFERENCE_LOSSES = {spec.name: spec.fn for spec in LOSSES if spec.data == "pairwise"}
REWARD_LOSS_TYPES = tuple(REWARD_LOSSES)
PREFERENCE_LOSS_TYPES = tuple(PREFERENCE_LOSSES)
# Which loss types each kind of data takes ("preference" is the toy's name for pairwise data).
LOSS_TYPES_FOR = {"reward": REWARD_LOSS_TYPES, "pairwise": PREFERENCE_LOSS_TYPES, "preference": PREFERENCE_LOSS_TYPES}


def loss_spec(loss_type: str, data_kind: str) -> LossSpec:
    """The declaration of ``loss_type`` on ``data_kind`` (``"reward"`` or ``"pairwise"``) data, checked
    (:func:`check_loss_type`)."""
    loss_type = check_loss_type(loss_type, data_kind)
    data = "pairwise" if data_kind == "preference" else data_kind
    return next(spec for spec in LOSSES if spec.name == loss_type and spec.data == data)
