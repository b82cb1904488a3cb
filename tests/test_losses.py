"""Mathematical tests of nca_kit.losses: equivalences, limits, invariances, gradients, input checks, extremes."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nca_kit.losses import (
    PREFERENCE_LOSS_TYPES,
    REWARD_LOSS_TYPES,
    preference_loss,
    reward_loss,
    soft_labels,
)

DTYPE = torch.float64


def _rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DTYPE) * scale


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------------------------------
# Reference formulas written out term by term (paper Eq. 6 and Eq. 11), in plain Python floats.
# ---------------------------------------------------------------------------------------------------------------------


def _labels_ref(r: list[float], alpha: float) -> list[float]:
    if alpha == 0:
        best = max(r)
        n = sum(1 for v in r if v == best)
        return [1.0 / n if v == best else 0.0 for v in r]
    m = max(v / alpha for v in r)
    e = [math.exp(v / alpha - m) for v in r]
    return [v / sum(e) for v in e]


def infonca_ref(pol, ref, r, alpha, beta):
    rt = [beta * (p - q) for p, q in zip(pol, ref)]
    lse = math.log(sum(math.exp(v) for v in rt))
    return -sum(w * (v - lse) for w, v in zip(_labels_ref(r, alpha), rt))


def nca_ref(pol, ref, r, alpha, beta):
    rt = [beta * (p - q) for p, q in zip(pol, ref)]
    k = len(r)
    return -sum(w * _logsig(v) + _logsig(-v) / k for w, v in zip(_labels_ref(r, alpha), rt))


# ---------------------------------------------------------------------------------------------------------------------
# Equivalences
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_infonca_k2_alpha0_is_dpo(seed, beta):
    pol, ref = _rand(16, 2, scale=20, seed=seed), _rand(16, 2, scale=20, seed=seed + 100)
    rewards = _rand(16, 2, seed=seed + 200)
    losses, mr = reward_loss(pol, ref, rewards, alpha=0, beta=beta, loss_type="InfoNCA")
    w = rewards.argmax(-1)
    l = 1 - w
    rows = torch.arange(16)
    dpo, cr, rr = preference_loss(
        pol[rows, w], ref[rows, w], pol[rows, l], ref[rows, l], beta=beta, loss_type="dpo"
    )
    torch.testing.assert_close(losses, dpo, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mr[rows, w], cr)
    torch.testing.assert_close(mr[rows, l], rr)
    # the pairwise "infonca" name is DPO itself
    same, _, _ = preference_loss(pol[rows, w], ref[rows, w], pol[rows, l], ref[rows, l], beta=beta, loss_type="infonca")
    torch.testing.assert_close(same, dpo, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_nca_k2_alpha0_is_pairwise_nca(seed, beta):
    pol, ref = _rand(16, 2, scale=20, seed=seed), _rand(16, 2, scale=20, seed=seed + 100)
    rewards = _rand(16, 2, seed=seed + 200)
    losses, _ = reward_loss(pol, ref, rewards, alpha=0, beta=beta, loss_type="nca")
    w = rewards.argmax(-1)
    l = 1 - w
    rows = torch.arange(16)
    pair, _, _ = preference_loss(pol[rows, w], ref[rows, w], pol[rows, l], ref[rows, l], beta=beta, loss_type="NCA")
    torch.testing.assert_close(losses, pair, rtol=1e-12, atol=1e-12)


def test_pairwise_nca_formula():
    """Eq. 12 spelled out: -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l)."""
    pc, rc, pr, rr = (_rand(8, seed=s, scale=5) for s in range(4))
    beta = 0.3
    losses, cw, cl = preference_loss(pc, rc, pr, rr, beta=beta, loss_type="nca")
    for i in range(8):
        rw, rl = beta * float(pc[i] - rc[i]), beta * float(pr[i] - rr[i])
        expected = -_logsig(rw) - 0.5 * _logsig(-rw) - 0.5 * _logsig(-rl)
        assert float(losses[i]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert float(cw[i]) == pytest.approx(rw)
        assert float(cl[i]) == pytest.approx(rl)


def test_ipo_formula():
    pc, rc, pr, rr = (_rand(8, seed=s, scale=5) for s in range(4))
    beta = 0.1
    losses, _, _ = preference_loss(pc, rc, pr, rr, beta=beta, loss_type="ipo")
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(losses, (h - 1 / (2 * beta)) ** 2)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.5, 1.0, 10.0])
@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_reward_losses_match_reference_formulas(alpha, k):
    beta = 0.2
    pol, ref = _rand(6, k, scale=4, seed=k), _rand(6, k, scale=4, seed=k + 1)
    rewards = torch.round(_rand(6, k, scale=3, seed=k + 2))  # rounding creates ties for alpha = 0
    inf, mr = reward_loss(pol, ref, rewards, alpha=alpha, beta=beta, loss_type="infonca")
    nca, _ = reward_loss(pol, ref, rewards, alpha=alpha, beta=beta, loss_type="nca")
    for b in range(6):
        args = (pol[b].tolist(), ref[b].tolist(), rewards[b].tolist(), alpha, beta)
        assert float(inf[b]) == pytest.approx(infonca_ref(*args), rel=1e-10, abs=1e-10)
        assert float(nca[b]) == pytest.approx(nca_ref(*args), rel=1e-10, abs=1e-10)
    torch.testing.assert_close(mr, beta * (pol - ref))


def test_alpha_to_zero_limit_is_continuous():
    pol, ref = _rand(4, 4, seed=1), _rand(4, 4, seed=2)
    rewards = _rand(4, 4, seed=3)
    for loss_type in ("infonca", "nca"):
        limit, _ = reward_loss(pol, ref, rewards, alpha=0, beta=1.0, loss_type=loss_type)
        small, _ = reward_loss(pol, ref, rewards, alpha=1e-4, beta=1.0, loss_type=loss_type)
        torch.testing.assert_close(small, limit, rtol=1e-8, atol=1e-8)


def test_soft_labels_ties_and_one_hot():
    r = torch.tensor([[1.0, 3.0, 3.0, 0.0], [9.0, 8.0, 7.5, 2.0]], dtype=DTYPE)
    lab0 = soft_labels(r, 0)
    torch.testing.assert_close(lab0[0], torch.tensor([0, 0.5, 0.5, 0], dtype=DTYPE))
    # GPT-4-like scores with the paper's alpha = 0.01: one point of difference is a factor e^100.
    lab = soft_labels(r, 0.01)
    assert float(lab[1, 0]) == 1.0 and float(lab[1, 1]) < 1e-40  # e^-100 ≈ 3.7e-44
    assert 0.6 < float(soft_labels(r, 1.0)[1, 0]) < 0.65  # e^9 / (e^9 + e^8 + e^7.5 + e^2) = 0.628


# ---------------------------------------------------------------------------------------------------------------------
# Table 2 baselines
# ---------------------------------------------------------------------------------------------------------------------


def test_dpo_best_vs_rest_and_all_pairs():
    pol, ref = _rand(5, 4, seed=7, scale=3), _rand(5, 4, seed=8, scale=3)
    rewards = torch.tensor(
        [[5, 1, 3, 2], [0, 4, 4, 1], [2, 2, 2, 2], [1, 2, 3, 4], [7, 7, 0, 3]], dtype=DTYPE
    )
    beta = 0.5
    rt = beta * (pol - ref)
    bvr, _ = reward_loss(pol, ref, rewards, alpha=0.3, beta=beta, loss_type="dpo_best_vs_rest")
    allp, _ = reward_loss(pol, ref, rewards, alpha=0.3, beta=beta, loss_type="DPO_ALL_PAIRS")
    for b in range(5):
        r = rewards[b].tolist()
        best = max(range(4), key=lambda i: (r[i], -i))
        terms = [-_logsig(float(rt[b, best] - rt[b, j])) for j in range(4) if r[j] < r[best]]
        assert float(bvr[b]) == pytest.approx(sum(terms) / len(terms) if terms else 0.0, abs=1e-12)
        pairs = [-_logsig(float(rt[b, i] - rt[b, j])) for i in range(4) for j in range(4) if r[i] > r[j]]
        assert float(allp[b]) == pytest.approx(sum(pairs) / len(pairs) if pairs else 0.0, abs=1e-12)
    assert float(bvr[2]) == 0.0 and float(allp[2]) == 0.0  # all tied: no preference


def test_k2_pair_baselines_are_dpo():
    pol, ref = _rand(8, 2, seed=3), _rand(8, 2, seed=4)
    rewards = torch.tensor([[1.0, 0.0]] * 8, dtype=DTYPE)
    dpo, _, _ = preference_loss(pol[:, 0], ref[:, 0], pol[:, 1], ref[:, 1], beta=0.1, loss_type="dpo")
    for lt in ("dpo_best_vs_rest", "dpo_all_pairs"):
        got, _ = reward_loss(pol, ref, rewards, alpha=0, beta=0.1, loss_type=lt)
        torch.testing.assert_close(got, dpo)


# ---------------------------------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------------------------------


def test_shift_of_data_rewards_changes_neither_loss():
    """softmax(r/alpha) is shift invariant, so adding a constant to one prompt's data rewards changes nothing."""
    pol, ref, rewards = _rand(3, 4, seed=1), _rand(3, 4, seed=2), _rand(3, 4, seed=3)
    shifted = rewards.clone()
    shifted[1] += 5.0
    for lt in REWARD_LOSS_TYPES:
        a, _ = reward_loss(pol, ref, rewards, alpha=0.7, beta=0.5, loss_type=lt)
        b, _ = reward_loss(pol, ref, shifted, alpha=0.7, beta=0.5, loss_type=lt)
        torch.testing.assert_close(a, b)


def test_infonca_relative_nca_absolute():
    """Adding a constant to one prompt's implicit rewards (every log pi of that prompt) leaves InfoNCA unchanged but
    changes NCA: InfoNCA only sees relative likelihoods, NCA sees absolute ones."""
    pol, ref, rewards = _rand(3, 4, seed=1), _rand(3, 4, seed=2), _rand(3, 4, seed=3)
    moved = pol.clone()
    moved[1] += 2.0
    inf_a, _ = reward_loss(pol, ref, rewards, alpha=0.5, beta=1.0, loss_type="infonca")
    inf_b, _ = reward_loss(moved, ref, rewards, alpha=0.5, beta=1.0, loss_type="infonca")
    torch.testing.assert_close(inf_a, inf_b)
    nca_a, _ = reward_loss(pol, ref, rewards, alpha=0.5, beta=1.0, loss_type="nca")
    nca_b, _ = reward_loss(moved, ref, rewards, alpha=0.5, beta=1.0, loss_type="nca")
    torch.testing.assert_close(nca_a[[0, 2]], nca_b[[0, 2]])
    assert abs(float(nca_a[1] - nca_b[1])) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 6])
def test_nca_gradient_sign_at_initialisation(k):
    """At pi = mu the negative NCA gradient on response i is beta*(w_i - 1/K)/2: it has the sign of w_i - 1/K."""
    ref = _rand(10, k, seed=k, scale=10)
    pol = ref.clone().requires_grad_(True)
    rewards = _rand(10, k, seed=k + 1, scale=2)
    alpha, beta = 0.8, 0.1
    losses, _ = reward_loss(pol, ref, rewards, alpha=alpha, beta=beta, loss_type="nca")
    losses.sum().backward()
    w = soft_labels(rewards, alpha)
    force = -pol.grad
    torch.testing.assert_close(force, beta * (w - 1 / k) / 2)
    nonzero = (w - 1 / k).abs() > 1e-9
    assert torch.equal(torch.sign(force)[nonzero], torch.sign(w - 1 / k)[nonzero])


@pytest.mark.parametrize("k", [2, 4])
def test_nca_gradient_is_half_infonca_at_initialisation(k):
    """At pi = mu, grad NCA = grad InfoNCA / 2 for every response: a scale-invariant optimiser (Adam) moves both alike
    until the implicit rewards grow; away from pi = mu the two differ."""
    ref = _rand(6, k, seed=3 * k, scale=5)
    rewards = _rand(6, k, seed=3 * k + 1, scale=3)
    grads = {}
    for loss_type in ("infonca", "nca"):
        pol = ref.clone().requires_grad_(True)
        losses, _ = reward_loss(pol, ref, rewards, alpha=0.7, beta=0.2, loss_type=loss_type)
        losses.sum().backward()
        grads[loss_type] = pol.grad
    torch.testing.assert_close(grads["nca"], grads["infonca"] / 2)
    moved = {}
    for loss_type in ("infonca", "nca"):
        pol = (ref + 3 * _rand(6, k, seed=99)).requires_grad_(True)
        losses, _ = reward_loss(pol, ref, rewards, alpha=0.7, beta=0.2, loss_type=loss_type)
        losses.sum().backward()
        moved[loss_type] = pol.grad
    assert not torch.allclose(moved["nca"], moved["infonca"] / 2, atol=1e-4)


@pytest.mark.parametrize("loss_type", ["infonca", "nca"])
def test_autograd_matches_hand_derived_gradient(loss_type):
    """dL/dr_theta: InfoNCA softmax(r_theta) - w; NCA -w*σ(-r_theta) + σ(r_theta)/K; times beta w.r.t. log pi."""
    k, beta, alpha = 5, 0.3, 0.6
    ref = _rand(7, k, seed=11, scale=3)
    pol = _rand(7, k, seed=12, scale=3).requires_grad_(True)
    rewards = _rand(7, k, seed=13, scale=2)
    mask = torch.ones(7, k, dtype=torch.bool)
    mask[2, 3:] = False
    mask[5, 1] = False
    losses, _ = reward_loss(pol, ref, rewards, alpha=alpha, beta=beta, loss_type=loss_type, mask=mask)
    losses.sum().backward()
    with torch.no_grad():
        rt = beta * (pol - ref)
        w = soft_labels(rewards, alpha, mask)
        if loss_type == "infonca":
            p = torch.softmax(rt.masked_fill(~mask, -math.inf), -1)
            g = p - w
        else:
            kk = mask.sum(-1, keepdim=True).to(DTYPE)
            g = -w * torch.sigmoid(-rt) + torch.sigmoid(rt) / kk
        g = torch.where(mask, beta * g, torch.zeros_like(g))
    torch.testing.assert_close(pol.grad, g)


def test_dpo_gradient_matches_hand_derived():
    pc = _rand(6, seed=1).requires_grad_(True)
    pr = _rand(6, seed=2).requires_grad_(True)
    rc, rr = _rand(6, seed=3), _rand(6, seed=4)
    beta = 0.4
    losses, cw, cl = preference_loss(pc, rc, pr, rr, beta=beta, loss_type="dpo")
    losses.sum().backward()
    s = torch.sigmoid(-(cw - cl))
    torch.testing.assert_close(pc.grad, -beta * s)
    torch.testing.assert_close(pr.grad, beta * s)


# ---------------------------------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def _batches(draw):
    b = draw(st.integers(1, 5))
    k = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 10_000))
    alpha = draw(st.sampled_from([0.0, 0.01, 0.1, 1.0, 5.0]))
    beta = draw(st.sampled_from([0.01, 0.1, 1.0, 3.0]))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, k, generator=g) < 0.7
    mask[:, 0] = True
    return b, k, seed, alpha, beta, mask


@settings(max_examples=60, deadline=None)
@given(_batches(), st.sampled_from(REWARD_LOSS_TYPES))
def test_masked_batch_equals_each_prompt_alone(batch, loss_type):
    """A padded batch gives each prompt the loss it has alone with its own K; padded values are never read."""
    b, k, seed, alpha, beta, mask = batch
    pol, ref = _rand(b, k, seed=seed, scale=5), _rand(b, k, seed=seed + 1, scale=5)
    rewards = torch.round(_rand(b, k, seed=seed + 2, scale=3))
    poisoned = pol.masked_fill(~mask, float("nan"))
    losses, mr = reward_loss(poisoned, ref, rewards, alpha=alpha, beta=beta, loss_type=loss_type, mask=mask)
    assert torch.isfinite(losses).all()
    assert torch.all(mr[~mask] == 0)
    for i in range(b):
        m = mask[i]
        alone, _ = reward_loss(
            pol[i, m][None], ref[i, m][None], rewards[i, m][None], alpha=alpha, beta=beta, loss_type=loss_type
        )
        torch.testing.assert_close(losses[i : i + 1], alone)


@settings(max_examples=60, deadline=None)
@given(_batches())
def test_soft_labels_are_distributions(batch):
    b, k, seed, alpha, _, mask = batch
    lab = soft_labels(_rand(b, k, seed=seed, scale=4), alpha, mask)
    assert torch.all(lab[~mask] == 0)
    torch.testing.assert_close(lab.sum(-1), torch.ones(b, dtype=DTYPE))
    assert torch.all(lab >= 0)


@settings(max_examples=40, deadline=None)
@given(_batches())
def test_losses_are_nonnegative_and_nca_bounded_below(batch):
    b, k, seed, alpha, beta, mask = batch
    pol, ref = _rand(b, k, seed=seed, scale=5), _rand(b, k, seed=seed + 1, scale=5)
    rewards = _rand(b, k, seed=seed + 2, scale=3)
    for lt in REWARD_LOSS_TYPES:
        losses, _ = reward_loss(pol, ref, rewards, alpha=alpha, beta=beta, loss_type=lt, mask=mask)
        assert torch.all(losses >= -1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Extremes and dtypes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", REWARD_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_at_extremes(loss_type, dtype):
    pol = torch.tensor([[-1e4, 0.0, -5e3, -1.0], [0.0, -1e4, -1e4, 0.0]], dtype=dtype, requires_grad=True)
    ref = torch.tensor([[0.0, -1e4, -1.0, -1e4], [-1e4, 0.0, 0.0, -1e4]], dtype=dtype)
    rewards = torch.tensor([[1e2, -1e2, 0.0, 50.0], [1.0, 0.0, 1.0, -1.0]], dtype=dtype)
    for alpha in (0.0, 0.01, 1.0):  # |r / alpha| up to 1e4
        for beta in (0.01, 1.0):
            losses, mr = reward_loss(pol, ref, rewards, alpha=alpha, beta=beta, loss_type=loss_type)
            (grad,) = torch.autograd.grad(losses.sum(), pol)
            assert torch.isfinite(losses).all() and torch.isfinite(grad).all() and torch.isfinite(mr).all()


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
def test_preference_finite_at_extremes(loss_type):
    pc = torch.tensor([-1e4, 0.0, -1e4], requires_grad=True)
    rc = torch.tensor([0.0, -1e4, -1e4])
    pr = torch.tensor([0.0, -1e4, -1e4], requires_grad=True)
    rr = torch.tensor([-1e4, 0.0, 0.0])
    losses, _, _ = preference_loss(pc, rc, pr, rr, beta=1.0, loss_type=loss_type)
    grads = torch.autograd.grad(losses.sum(), (pc, pr))
    assert torch.isfinite(losses).all() and all(torch.isfinite(g).all() for g in grads)


def test_bf16_inputs_are_computed_in_float32():
    pol = torch.randn(2, 3).to(torch.bfloat16)
    losses, mr = reward_loss(pol, torch.zeros_like(pol), torch.randn(2, 3), alpha=0.1, beta=0.1, loss_type="nca")
    assert losses.dtype == torch.float32 and mr.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one-line ValueErrors naming the argument
# ---------------------------------------------------------------------------------------------------------------------


def _good():
    return torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(reference_logps=torch.zeros(2, 4)), r"^reference_logps has shape \(2, 4\)"),
        (lambda a: a.update(rewards=torch.zeros(3, 3)), r"^rewards has shape \(3, 3\)"),
        (lambda a: a.update(policy_logps=torch.zeros(6)), r"^policy_logps must have shape \(B, K\)"),
        (lambda a: a.update(rewards=torch.tensor([[1.0, float("nan"), 0], [0, 0, 0]])), r"^rewards contains NaN"),
        (lambda a: a.update(policy_logps=torch.tensor([[1.0, float("inf"), 0], [0, 0, 0]])), r"^policy_logps contains inf"),
        (lambda a: a.update(reference_logps=torch.full((2, 3), float("-inf"))), r"^reference_logps contains inf"),
        (lambda a: a.update(alpha=-0.1), r"^alpha must be"),
        (lambda a: a.update(alpha=float("nan")), r"^alpha must be"),
        (lambda a: a.update(beta=0.0), r"^beta must be"),
        (lambda a: a.update(beta=-1.0), r"^beta must be"),
        (lambda a: a.update(loss_type="kto"), r"^loss_type must be one of"),
        (lambda a: a.update(mask=torch.tensor([[True, False, False], [False, False, False]])), r"^mask has rows with no response"),
        (lambda a: a.update(mask=torch.ones(2, 2, dtype=torch.bool)), r"^mask has shape \(2, 2\)"),
        (lambda a: a.update(rewards=[[1, 2, 3], [4, 5, 6]]), r"^rewards must be a torch.Tensor"),
        (lambda a: a.update(policy_logps=torch.zeros(2, 3, dtype=torch.long)), r"^policy_logps must be a floating-point"),
    ],
)
def test_reward_loss_bad_input(change, match):
    pol, ref, rew = _good()
    kwargs = dict(policy_logps=pol, reference_logps=ref, rewards=rew, alpha=0.1, beta=0.1, loss_type="nca", mask=None)
    change(kwargs)
    with pytest.raises(ValueError, match=match) as err:
        reward_loss(
            kwargs.pop("policy_logps"), kwargs.pop("reference_logps"), kwargs.pop("rewards"), **kwargs
        )
    assert "\n" not in str(err.value)


def test_nan_in_padded_slot_is_allowed_but_not_in_real_slot():
    pol = torch.tensor([[0.0, float("nan")]])
    mask = torch.tensor([[True, False]])
    losses, _ = reward_loss(pol, torch.zeros(1, 2), torch.zeros(1, 2), alpha=0, beta=1, loss_type="infonca", mask=mask)
    assert torch.isfinite(losses).all()
    with pytest.raises(ValueError, match="^policy_logps contains NaN"):
        reward_loss(pol, torch.zeros(1, 2), torch.zeros(1, 2), alpha=0, beta=1, loss_type="infonca")


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (1, torch.zeros(4), r"^reference_chosen_logps has shape \(4,\)"),
        (3, torch.tensor([0.0, float("nan"), 0.0]), r"^reference_rejected_logps contains NaN"),
        (0, torch.zeros(3, 1), r"^policy_chosen_logps must have shape \(B,\)"),
    ],
)
def test_preference_loss_bad_input(index, value, match):
    args = [torch.zeros(3) for _ in range(4)]
    args[index] = value
    with pytest.raises(ValueError, match=match):
        preference_loss(*args, beta=0.1, loss_type="dpo")


def test_preference_loss_bad_type_and_beta():
    args = [torch.zeros(3) for _ in range(4)]
    with pytest.raises(ValueError, match="^loss_type must be one of dpo, infonca, nca, ipo"):
        preference_loss(*args, beta=0.1, loss_type="simpo")
    with pytest.raises(ValueError, match="^beta must be"):
        preference_loss(*args, beta=0, loss_type="dpo")


def test_loss_type_is_case_insensitive():
    pol, ref, rew = _rand(2, 3, seed=1), _rand(2, 3, seed=2), _rand(2, 3, seed=3)
    a, _ = reward_loss(pol, ref, rew, alpha=0.1, beta=0.1, loss_type="NCA")
    b, _ = reward_loss(pol, ref, rew, alpha=0.1, beta=0.1, loss_type="nca")
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------------------
# Finite inputs give a finite loss or a clear error; numbers of any numeric type; one loss dispatch
# --------------------------------------------------------------------------------------------------------------------


def test_empty_k_without_mask_is_an_error():
    empty = torch.zeros(3, 0)
    with pytest.raises(ValueError, match="K >= 1"):
        reward_loss(empty, empty, empty, alpha=0.1, beta=0.1, loss_type="nca")


@pytest.mark.parametrize("loss_type", ["infonca", "nca"])
@pytest.mark.parametrize("alpha, reward", [(1e-40, 1.0), (0.01, 1e37), (1e-30, 1e30)])
def test_tiny_alpha_or_huge_reward_stays_finite(loss_type, alpha, reward):
    logps = torch.tensor([[-3.0, -4.0, -5.0]], requires_grad=True)
    rewards = torch.tensor([[reward, -reward, 0.0]])
    losses, _ = reward_loss(logps, logps.detach() + 0.1, rewards, alpha=alpha, beta=0.1, loss_type=loss_type)
    assert torch.isfinite(losses).all()
    losses.sum().backward()
    assert torch.isfinite(logps.grad).all()
    labels = soft_labels(rewards, alpha)
    assert torch.allclose(labels, torch.tensor([[1.0, 0.0, 0.0]]))


def test_overflowing_beta_is_a_clear_error():
    logps = torch.tensor([[-3.0, -40.0]])
    with pytest.raises(ValueError, match="overflowed"):
        reward_loss(logps, torch.zeros_like(logps), torch.tensor([[1.0, 0.0]]), alpha=0.1, beta=1e38,
                    loss_type="nca")


@pytest.mark.parametrize("make", [np.float32, np.float64, lambda x: torch.tensor(x), lambda x: torch.tensor(x).double()])
def test_numpy_and_tensor_scalars_are_numbers(make):
    logps = torch.tensor([[-3.0, -4.0]])
    ref = torch.tensor([[-3.5, -3.5]])
    rewards = torch.tensor([[1.0, 0.0]])
    want, _ = reward_loss(logps, ref, rewards, alpha=0.5, beta=0.1, loss_type="nca")
    got, _ = reward_loss(logps, ref, rewards, alpha=make(0.5), beta=make(0.1), loss_type="nca")
    assert torch.allclose(want, got)
    pair, _, _ = preference_loss(logps[:, 0], ref[:, 0], logps[:, 1], ref[:, 1], beta=make(0.1), loss_type="ipo")
    assert torch.isfinite(pair).all()


@pytest.mark.parametrize("bad, match", [(torch.tensor([0.1, 0.2]), "0-d tensor"), ("0.1", "must be a number"),
                                        (True, "bool"), (np.float64("nan"), "finite")])
def test_bad_alpha_messages(bad, match):
    x = torch.tensor([[-1.0, -2.0]])
    with pytest.raises(ValueError, match=match):
        reward_loss(x, x, x, alpha=bad, beta=0.1, loss_type="nca")


def test_check_loss_type_is_the_one_dispatch():
    from nca_kit.losses import LOSS_TYPES_FOR, PREFERENCE_LOSSES, REWARD_LOSSES, check_loss_type

    assert set(REWARD_LOSSES) == set(LOSS_TYPES_FOR["reward"])
    assert set(PREFERENCE_LOSSES) == set(LOSS_TYPES_FOR["pairwise"])
    assert check_loss_type("NCA", "reward") == "nca"
    with pytest.raises(ValueError, match="dpo_best_vs_rest"):
        check_loss_type("dpo", "reward")
    with pytest.raises(ValueError, match="does not apply to pairwise"):
        check_loss_type("dpo_all_pairs", "pairwise")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        check_loss_type("kto")
    with pytest.raises(ValueError, match="data_kind"):
        check_loss_type("nca", "sft")


@pytest.mark.parametrize("loss_type", REWARD_LOSS_TYPES)
def test_uses_alpha_is_what_a_reward_loss_reads(loss_type):
    """The table's ``uses_alpha`` (which the run layer's α sweep reads) matches the loss: a loss that reads α changes
    with α on rewards with distinct gaps; one that does not gives the same value at any α."""
    from nca_kit.losses import loss_spec

    torch.manual_seed(0)
    policy, reference = torch.randn(3, 4), torch.randn(3, 4)
    rewards = torch.tensor([[0.0, 1.0, 2.5, 3.0], [1.0, 0.2, 0.5, 2.0], [3.0, 2.0, 0.0, 1.0]])
    low, _ = reward_loss(policy, reference, rewards, alpha=0.5, beta=1.0, loss_type=loss_type)
    high, _ = reward_loss(policy, reference, rewards, alpha=5.0, beta=1.0, loss_type=loss_type)
    assert loss_spec(loss_type, "reward").uses_alpha == (not torch.allclose(low, high))


def test_methods_and_the_alpha_sweep_are_derived_from_the_loss_table():
    from nca_kit.experiment import METHODS, PAIR_METHODS
    from nca_kit.losses import LOSSES
    from nca_kit.robustness import ALPHA_FREE_METHODS, uses_alpha

    assert all(loss in LOSSES for loss in METHODS.values())
    assert set(PAIR_METHODS) == {"dpo", "pair_nca"}
    assert set(ALPHA_FREE_METHODS) == {"dpo", "pair_nca", "dpo_x3", "dpo_all_pairs"}
    assert uses_alpha("nca") and uses_alpha("infonca") and not uses_alpha("pair_nca")
    assert not any(spec.uses_alpha for spec in LOSSES if spec.data == "pairwise")
