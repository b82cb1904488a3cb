"""Tests of nca_kit.toy: Table 10 of Appendix H, the optima of InfoNCA/NCA with reward data, and the dynamics of the
preference losses with and without shared parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nca_kit import toy
from nca_kit.losses import preference_loss, reward_loss
from nca_kit.toy import (
    DECOY_FEATURES,
    TABLE10_SCENARIOS,
    FeaturePolicy,
    Scenario,
    TabularPolicy,
    ToyWorld,
    UnnormalisedPolicy,
    feature_map_study,
    paper_world,
    reward_sample,
    scenario_policies,
    table9,
    table10,
    train_toy,
)

# Numbers as printed in Appendix H, Table 10 of the paper (margin to 3 decimals, mean rewards to 2).
PAPER_MARGIN = 0.916
PAPER_MEAN_REWARDS = {"(1)": 2.65, "(2)": 6.85, "(3)": 7.25}

ALPHA = 5.0  # pi* = (0.717, 0.221, 0.049, 0.012): every response keeps visible mass, so errors are easy to read
LR = 3.0  # plain GD on the tabular logits: converges for alpha = 5 (lr = 10 oscillates, measured)
STEPS = 400


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return paper_world()


# ---------------------------------------------------------------------------------------------------------------------
# Tables 9 and 10
# ---------------------------------------------------------------------------------------------------------------------


def test_table9_is_the_world(world):
    t9 = table9(world)
    assert list(t9.index) == ["y_a", "y_b", "y_c", "y_d"]
    assert t9["mu(y)"].sum() == pytest.approx(1.0)
    assert list(t9["in preference data"]) == ["chosen (y_w)", "rejected (y_l)", "unseen", "unseen"]


def test_table10_reproduces_printed_margin_and_mean_rewards(world):
    t10 = table10(world)
    for name, row in t10.iterrows():
        assert round(row["DPO margin"], 3) == PAPER_MARGIN, name
        assert round(row["E_pi[r]"], 2) == PAPER_MEAN_REWARDS[name], name
    probs = t10[[f"pi({n})" for n in world.names]].to_numpy()
    assert np.all(probs > 0) and np.allclose(probs.sum(1), 1.0)


def test_table10_scenarios_match_their_description(world):
    pis = scenario_policies(world)
    mu = world.mu_tensor()
    a, b, c, d = range(4)
    for name in ("(1)", "(2)"):
        assert pis[name][a] < mu[a] and pis[name][b] < mu[b], name  # both likelihoods of the pair fall
    assert pis["(1)"][d] > mu[d] and pis["(1)"][c] == mu[c]  # the mass goes to the bad y_d
    assert pis["(2)"][c] > mu[c] and pis["(2)"][d] == mu[d]  # ... or to the good y_c
    assert pis["(3)"][a] > mu[a] and pis["(3)"][b] < mu[b]  # y_a rises
    assert torch.equal(pis["(3)"][2:], mu[2:])


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_dpo_loss_identical_across_scenarios(world, beta):
    dpo = table10(world, beta=beta)["DPO loss"].to_numpy()
    assert np.ptp(dpo) < 1e-12
    assert dpo[0] == pytest.approx(math.log1p(math.exp(-beta * math.log(2.5))), rel=1e-12)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_pairwise_nca_loss_lowest_for_scenario_3(world, beta):
    nca = table10(world, beta=beta)["NCA loss (pair)"]
    assert nca.idxmin() == "(3)"
    assert nca["(3)"] < nca["(1)"] - 1e-6
    # Pairwise NCA sees only y_a and y_b: scenarios (1) and (2) differ only on unseen responses and tie.
    assert nca["(1)"] == pytest.approx(nca["(2)"], abs=1e-12)


def test_pairwise_nca_gap_is_second_order_in_beta(world):
    # To first order in beta, the pairwise NCA loss is 2 log 2 - margin * beta / 4: the same for all three policies.
    gaps = {beta: float(table10(world, beta=beta)["NCA loss (pair)"].pipe(lambda s: s["(1)"] - s["(3)"]))
            for beta in (0.01, 0.02)}
    assert gaps[0.02] / gaps[0.01] == pytest.approx(4.0, rel=0.02)


def test_reward_data_losses_separate_scenarios_1_and_2(world):
    t10 = table10(world, alpha=ALPHA)
    for column in ("InfoNCA loss (rewards)", "NCA loss (rewards)"):
        assert t10[column]["(3)"] < t10[column]["(2)"] < t10[column]["(1)"], column


def test_scenario_rejects_impossible_policies(world):
    with pytest.raises(ValueError, match="not a probability"):
        Scenario("x", "too much mass", ratio=2.5, scale_w=2.5, absorb="y_d").policy(world)
    with pytest.raises(ValueError, match="outside the preference pair"):
        Scenario("x", "absorbed by y_b", ratio=2.5, scale_w=0.5, absorb="y_b").policy(world)


# ---------------------------------------------------------------------------------------------------------------------
# Reward data and the training loop
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_sample_represents_mu_exactly(world):
    index = reward_sample(world, "mu")
    counts = torch.bincount(index, minlength=4)
    assert counts.tolist() == [8, 10, 1, 1]
    assert torch.equal(reward_sample(world, "uniform"), torch.arange(4))
    odd = ToyWorld(names=("a", "b", "c"), mu=(1 / math.pi, 1 / math.e, 1 - 1 / math.pi - 1 / math.e), rewards=(0, 1, 2))
    with pytest.raises(ValueError, match="exact representation"):
        reward_sample(odd, "mu")


@pytest.mark.parametrize("loss_type", ["infonca", "nca", "dpo_best_vs_rest", "dpo_all_pairs"])
def test_training_loss_is_reward_loss(world, loss_type):
    policy = TabularPolicy(world)
    with torch.no_grad():
        policy.logits.add_(torch.tensor([0.3, -0.2, 0.5, -1.0], dtype=policy.logits.dtype))
        logp = policy()[0]
    run = train_toy(policy, world, loss_type=loss_type, data="reward", alpha=2.0, beta=0.7, steps=0)
    index = reward_sample(world)
    expected, _ = reward_loss(logp[index][None], world.log_mu()[index][None], world.reward_tensor()[index][None],
                              alpha=2.0, beta=0.7, loss_type=loss_type)
    assert run.history["loss"].iloc[0] == pytest.approx(float(expected[0]), rel=1e-12)


@pytest.mark.parametrize("loss_type", ["dpo", "nca", "ipo"])
def test_training_loss_is_preference_loss(world, loss_type):
    logp = torch.log(torch.tensor([0.3, 0.2, 0.4, 0.1], dtype=torch.float64))
    policy = TabularPolicy(world)
    with torch.no_grad():
        policy.logits.copy_(logp[None])
    run = train_toy(policy, world, loss_type=loss_type, data="preference", beta=0.5, steps=0)
    log_mu = world.log_mu()
    expected, _, _ = preference_loss(logp[:1], log_mu[:1], logp[1:2], log_mu[1:2], beta=0.5, loss_type=loss_type)
    assert run.history["loss"].iloc[0] == pytest.approx(float(expected[0]), rel=1e-12)


def test_train_toy_rejects_mismatched_loss(world):
    with pytest.raises(ValueError, match="preference data"):
        train_toy(TabularPolicy(world), world, loss_type="dpo_all_pairs", data="preference", steps=1)
    with pytest.raises(ValueError, match="reward data"):
        train_toy(TabularPolicy(world), world, loss_type="ipo", data="reward", steps=1)
    with pytest.raises(ValueError, match="optimizer"):
        train_toy(TabularPolicy(world), world, loss_type="dpo", optimizer="lbfgs", steps=1)


def test_adam_runs_and_lowers_the_loss(world):
    run = train_toy(TabularPolicy(world), world, loss_type="nca", data="reward", alpha=ALPHA, steps=50, lr=0.05,
                    optimizer="adam")
    assert run.history["loss"].iloc[-1] < run.history["loss"].iloc[0]


# ---------------------------------------------------------------------------------------------------------------------
# Reward data: Theorems 3.2 and 4.2 (tabular policy, responses drawn from mu)
# ---------------------------------------------------------------------------------------------------------------------
# Tolerance: plain GD on these smooth losses converges linearly; after STEPS steps the measured error is ~1e-9, so
# 1e-6 leaves three orders of margin while any other fixed point (the ones below differ by > 1e-2) would fail.


@pytest.mark.parametrize("loss_type", ["infonca", "nca"])
def test_reward_data_converges_to_pi_star(world, loss_type):
    run = train_toy(TabularPolicy(world), world, loss_type=loss_type, data="reward", alpha=ALPHA, steps=STEPS, lr=LR)
    pi_star = world.optimal_policy(ALPHA)
    np.testing.assert_allclose(run.final_probs[0], pi_star, atol=1e-6)
    assert np.all(np.diff(run.history["loss"].to_numpy()) < 1e-12)  # descent at every step (up to rounding)


def test_nca_reaches_its_absolute_optimum(world):
    run = train_toy(TabularPolicy(world), world, loss_type="nca", data="reward", alpha=ALPHA, steps=STEPS, lr=LR)
    np.testing.assert_allclose(run.final_model_rewards[0], world.nca_target(ALPHA), atol=1e-6)


def test_unnormalised_model_nca_self_normalises_infonca_does_not(world):
    mu = world.mu_tensor().numpy()
    nca = train_toy(UnnormalisedPolicy(world), world, loss_type="nca", data="reward", alpha=ALPHA, steps=STEPS, lr=LR)
    r_nca = nca.final_model_rewards[0]
    np.testing.assert_allclose(r_nca, world.nca_target(ALPHA), atol=1e-4)
    assert (mu * np.exp(r_nca)).sum() == pytest.approx(1.0, abs=1e-4)  # the implied policy sums to one by itself

    info = train_toy(UnnormalisedPolicy(world), world, loss_type="infonca", data="reward", alpha=ALPHA, steps=STEPS,
                     lr=LR)
    r_info = info.final_model_rewards[0]
    shift = r_info - world.reward_tensor().numpy() / ALPHA
    assert np.ptp(shift) < 1e-6  # r_theta = r / alpha + c: right up to a constant ...
    # ... and c is left where GD started it: InfoNCA's gradients over the K responses sum to zero, so
    # sum_y r_theta(y) stays at its initial 0 (c = -mean(r) / alpha), and nothing pins E_mu[exp(r_theta)] to 1.
    assert r_info.sum() == pytest.approx(0.0, abs=1e-9)
    assert abs((mu * np.exp(r_info)).sum() - 1.0) > 0.1  # not normalised


# The loss curvature in the logits scales as beta^2, so lr = LR / beta^2 keeps GD as well conditioned as at beta = 1.


def test_beta_rescales_the_infonca_target(world):
    for beta in (0.5, 2.0):
        run = train_toy(TabularPolicy(world), world, loss_type="infonca", data="reward", alpha=ALPHA, beta=beta,
                        steps=STEPS, lr=LR / beta**2)
        np.testing.assert_allclose(run.final_probs[0], world.optimal_policy(ALPHA, beta), atol=1e-5)


def test_nca_with_beta_below_one_misses_both_targets(world):
    run = train_toy(TabularPolicy(world), world, loss_type="nca", data="reward", alpha=ALPHA, beta=0.5,
                    steps=2 * STEPS, lr=LR / 0.5**2)
    final = run.final_probs[0]
    late = run.history[list(world.names)].to_numpy()[-50:]
    assert np.ptp(late, axis=0).max() < 1e-8  # converged ...
    assert np.abs(final - world.optimal_policy(ALPHA, 0.5)).max() > 0.02  # ... but not to mu e^{r/(a b)}
    assert np.abs(final - world.optimal_policy(ALPHA)).max() > 0.1  # nor to mu e^{r/a}


def test_nca_needs_responses_drawn_from_mu(world):
    pi_star = world.optimal_policy(ALPHA)
    info = train_toy(TabularPolicy(world), world, loss_type="infonca", data="reward", alpha=ALPHA, steps=STEPS,
                     lr=LR, sampling="uniform")
    nca = train_toy(TabularPolicy(world), world, loss_type="nca", data="reward", alpha=ALPHA, steps=STEPS, lr=LR,
                    sampling="uniform")
    np.testing.assert_allclose(info.final_probs[0], pi_star, atol=1e-6)
    assert np.abs(nca.final_probs[0] - pi_star).max() > 0.01


# ---------------------------------------------------------------------------------------------------------------------
# Preference data: tabular vs shared parameters
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["dpo", "nca"])
def test_tabular_preference_training_never_lowers_the_chosen_likelihood(world, loss_type):
    run = train_toy(TabularPolicy(world), world, loss_type=loss_type, steps=STEPS, lr=LR).probs()
    mu_a = world.mu[0]
    assert run["y_a"].min() == pytest.approx(mu_a) and run["y_a"].iloc[-1] > 0.8
    assert run["y_b"].iloc[-1] < 0.01
    np.testing.assert_allclose(run["y_c"], run["y_d"], rtol=1e-12)  # unseen responses only feel the normaliser
    if loss_type == "dpo":
        assert run["y_a"].is_monotonic_increasing and run["y_b"].is_monotonic_decreasing  # optimum: pi_a -> 1
    else:
        # Pairwise NCA's optimum is r_a = log 2, i.e. pi_a = 2 mu_a = 0.8 (and pi_b -> 0): it overshoots, then
        # comes back down.
        assert run["y_a"].max() > 0.9 and run["y_a"].iloc[-1] < run["y_a"].max() - 0.01


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_tabular_ipo_settles_at_its_target_margin(world, beta):
    # IPO's optimum is the finite margin 1 / (2 beta) (in log-ratio units), so pi(y_a) stops well short of 1.
    run = train_toy(TabularPolicy(world), world, loss_type="ipo", beta=beta, steps=200, lr=0.1)
    final = torch.tensor(run.final_probs[0])
    assert float(world.dpo_margin(final)) == pytest.approx(1 / (2 * beta), abs=1e-9)
    assert world.mu[0] < float(final[0]) < 0.7


def test_tabular_dpo_moves_only_the_pair_logits(world):
    policy = TabularPolicy(world)
    train_toy(policy, world, loss_type="dpo", steps=50, lr=LR)
    moved = (policy.logits.detach() - world.log_mu())[0]
    assert float(moved[0]) == pytest.approx(-float(moved[1]), abs=1e-12) and moved[0] > 0
    assert torch.equal(moved[2:], torch.zeros(2, dtype=moved.dtype))


def test_shared_parameters_dpo_lowers_the_chosen_likelihood_nca_does_not(world):
    dpo = train_toy(FeaturePolicy(world, DECOY_FEATURES), world, loss_type="dpo", steps=STEPS, lr=1.0).probs()
    nca = train_toy(FeaturePolicy(world, DECOY_FEATURES), world, loss_type="nca", steps=STEPS, lr=1.0).probs()
    mu_a = world.mu[0]
    # DPO: y_a first rises a little, then the decoy y_d takes nearly all the mass (scenario (1) of Table 10).
    assert dpo["y_a"].max() > mu_a and dpo["y_a"].iloc[-1] < 0.1 and dpo["y_d"].iloc[-1] > 0.9
    assert world.dpo_margin(torch.tensor(dpo.iloc[-1][list(world.names)].to_numpy())) > 5  # while the margin grows
    # NCA on the same map: y_a rises throughout; y_d still ends above its reference probability.
    assert dpo["y_a"].iloc[-1] < mu_a < nca["y_a"].min() + 1e-12 and nca["y_a"].iloc[-1] > 0.7
    assert nca["y_d"].iloc[-1] > world.mu[3]


def test_random_feature_maps_statistics(world):
    study = feature_map_study(world, [1, 2], n_maps=200, steps=200).set_index(["D", "loss"])
    lowered = study["frac final pi_w < mu_w"]
    # With shared parameters DPO ends with a lower chosen likelihood in about a third of random maps ...
    assert lowered[(1, "dpo")] > 0.25 and lowered[(2, "dpo")] > 0.25
    # ... NCA far less often, but not never: with one shared parameter it lowers y_w too in a fifth of the maps.
    assert lowered[(2, "nca")] < 0.1 and lowered[(2, "nca")] < lowered[(2, "dpo")]
    assert 0.1 < lowered[(1, "nca")] < lowered[(1, "dpo")]
    # Collapse onto the worst response happens only under DPO.
    assert study["frac final pi_bad > 0.5"][(2, "dpo")] > 0.1 and study["frac final pi_bad > 0.5"][(2, "nca")] == 0


# ---------------------------------------------------------------------------------------------------------------------
# The world's closed forms and the fixed-point check
# ---------------------------------------------------------------------------------------------------------------------


def test_world_closed_forms_agree(world):
    for alpha in (0.01, 1.0, 5.0):
        pi_star = world.optimal_policy(alpha)
        assert np.isfinite(pi_star).all() and pi_star.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(world.mu * np.exp(world.nca_target(alpha)), pi_star, atol=1e-12)
    assert world.log_partition(5.0) == pytest.approx(np.log(np.sum(world.mu * np.exp(world.rewards / 5.0))))
    assert np.isfinite(world.log_partition(1e-3))  # r / alpha = 10^4: no overflow
    assert world.best == 0
    with pytest.raises(ValueError, match="alpha must be > 0"):
        world.optimal_policy(0.0)


def test_make_world_is_reproducible_and_checked():
    a, b = toy.make_world(5, 3, reward_scale=2.0), toy.make_world(5, 3, reward_scale=2.0)
    assert a.names == ("y0", "y1", "y2", "y3", "y4") and np.array_equal(a.mu, b.mu)
    assert (0 <= a.rewards).all() and (a.rewards <= 2.0).all()
    with pytest.raises(ValueError, match="n_responses"):
        toy.make_world(1, 0)


@pytest.mark.parametrize("alpha, beta", [(0.1, 1.0), (5.0, 1.0), (5.0, 0.5), (2.0, 2.0)])
def test_stationarity_is_zero_exactly_at_the_theorems_optimum(world, alpha, beta):
    logits = np.log(world.mu) + world.rewards / (alpha * beta)
    assert toy.stationarity(world, logits, "infonca", alpha=alpha, beta=beta) < 1e-12
    assert toy.stationarity(world, np.log(world.mu), "infonca", alpha=alpha, beta=beta) > 1e-3  # mu is not
    nca = toy.stationarity(world, logits, "nca", alpha=alpha, beta=beta)
    assert nca < 1e-12 if beta == 1.0 else nca > 1e-6  # NCA's optimum is mu e^{r/alpha} only at beta = 1
    assert toy.stationarity(world, np.log(world.mu) + world.rewards / alpha, "nca", alpha=alpha,
                            sampling="uniform") > 1e-6 or alpha < 1
