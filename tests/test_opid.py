"""Hand-computed checks of every formula in opid.py (docs/method.md §2, §3, §7, §8, §10)."""
import math

import pytest
import torch

import opid


def close(actual, expected, atol=1e-4):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float32),
                          torch.as_tensor(expected, dtype=torch.float32), atol=atol), (actual, expected)


def test_discounted_returns_and_score():
    assert opid.discounted_returns([0.0, 0.0, 10.0], 0.95) == pytest.approx([9.025, 9.5, 10.0])
    assert opid.discounted_returns([1.0, 1.0], 0.5) == pytest.approx([1.5, 1.0])
    assert opid.discounted_returns([], 0.95) == []
    assert opid.trajectory_score(10.0, 2, 0.1) == pytest.approx(9.8)
    assert opid.trajectory_score(0.0, 3, 0.01) == pytest.approx(-0.03)


def test_step_scores_penalise_the_invalid_step_only_by_default():
    assert opid.step_scores(10.0, [True, False, True], 0.1) == pytest.approx([10.0, 9.9, 10.0])
    assert opid.step_scores(0.0, [False, False], 0.01) == pytest.approx([-0.01, -0.01])
    # the ablation spreads the trajectory's total penalty over every step
    assert opid.step_scores(10.0, [True, False, False], 0.1, "trajectory") == pytest.approx([9.8, 9.8, 9.8])
    assert opid.step_scores(1.0, [], 0.1) == []
    with pytest.raises(ValueError, match="unknown penalty scope"):
        opid.step_scores(1.0, [True], 0.1, "episode")


def test_invalid_penalty_worked_example_per_step_vs_trajectory_wide():
    # Two failed 10-step trajectories of one group; trajectory b has one invalid step (its 4th).
    valid_a, valid_b = [True] * 10, [True] * 3 + [False] + [True] * 6
    groups = torch.zeros(20, dtype=torch.long)
    # Per step (default): 19 samples at 0, one at -0.1. μ = -0.005; deviations -0.095 and +0.005;
    # unbiased σ = sqrt((0.095² + 19·0.005²)/19) = sqrt(0.0005) = 0.022361 (population σ would be
    # 0.021794 and give -4.359/+0.229); ε = 1e-6: -0.095/0.022362 = -4.2484, 0.005/0.022362 = 0.2236.
    scores = torch.tensor(opid.step_scores(0.0, valid_a, 0.1) + opid.step_scores(0.0, valid_b, 0.1))
    adv = opid.outcome_advantage(scores, groups, "mean_std_norm", eps=1e-6)
    close(adv[13], -4.2484)
    close(torch.cat([adv[:13], adv[14:]]), [0.22360] * 19)
    # Trajectory-wide (ablation): 10 samples at 0, 10 at -0.1. μ = -0.05, deviations ±0.05,
    # unbiased σ = sqrt(20·0.0025/19) = 0.051299: ±0.97468 on every step of each trajectory.
    scores = torch.tensor(opid.step_scores(0.0, valid_a, 0.1, "trajectory")
                          + opid.step_scores(0.0, valid_b, 0.1, "trajectory"))
    adv = opid.outcome_advantage(scores, groups, "mean_std_norm", eps=1e-6)
    close(adv, [0.97468] * 10 + [-0.97468] * 10)


def test_step_returns_take_the_penalty_off_the_invalid_step_after_discounting():
    # rewards [0, 0, 10], step 1 invalid: G = [9.025, 9.5, 10] then -0.1 on step 1 only
    assert opid.step_returns([0.0, 0.0, 10.0], [True, False, True], 0.95, 0.1) == pytest.approx([9.025, 9.4, 10.0])
    assert opid.step_returns([0.0, 0.0], [False, True], 0.95, 0.1) == pytest.approx([-0.1, 0.0])


def test_outcome_advantage_worked_example_mean_std_norm():
    # Module docstring: trajectory a (won, 2 steps, scores 10), b (failed, 1 invalid step, -0.1).
    scores = torch.tensor(opid.step_scores(10.0, [True, True], 0.1) + opid.step_scores(0.0, [False], 0.1))
    groups = torch.tensor([0, 0, 0])
    # μ = 6.6333, deviations 3.3667, 3.3667, -6.7333, unbiased σ = sqrt(68.0067/2) = 5.8315
    close(opid.outcome_advantage(scores, groups, "mean_std_norm"), [0.57735, 0.57735, -1.15470])
    close(opid.outcome_advantage(scores, groups, "mean_norm"), [3.36667, 3.36667, -6.73333])


def test_outcome_advantage_cross_step_weighting():
    # A 3-step trajectory (score 1) counts three times: μ = 0.75, not the per-trajectory 0.5.
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0])
    groups = torch.zeros(4, dtype=torch.long)
    close(opid.outcome_advantage(scores, groups, "mean_norm"), [0.25, 0.25, 0.25, -0.75])
    # unbiased σ = sqrt((3·0.0625 + 0.5625)/3) = 0.5
    close(opid.outcome_advantage(scores, groups, "mean_std_norm"), [0.5, 0.5, 0.5, -1.5])


def test_outcome_advantage_degenerate_groups_are_zero_not_nan():
    scores = torch.tensor([5.0, 0.0, 0.0, 0.0, 3.0, 1.0])
    groups = torch.tensor([7, 8, 8, 8, 9, 9])  # group of one; all-equal group; a normal pair
    adv = opid.outcome_advantage(scores, groups, "mean_std_norm")
    assert not torch.isnan(adv).any()
    close(adv[:4], [0.0, 0.0, 0.0, 0.0])
    close(adv[4:], [0.70711, -0.70711])  # mean 2, σ = sqrt(2)
    close(opid.outcome_advantage(scores, groups, "mean_norm"), [0, 0, 0, 0, 1.0, -1.0])
    with pytest.raises(ValueError, match="unknown advantage mode"):
        opid.outcome_advantage(scores, groups, "per_token")


def test_gigpo_step_advantage_groups_identical_states_within_task_group():
    returns = torch.tensor([1.0, 3.0, 5.0, 7.0, 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1])
    anchors = torch.tensor([0, 0, 1, 2, 0])  # anchor 0 in group 1 is a different state group
    close(opid.gigpo_step_advantage(returns, groups, anchors), [-0.70711, 0.70711, 0.0, 0.0, 0.0])
    close(opid.gigpo_step_advantage(returns, groups, anchors, "mean_norm"), [-1.0, 1.0, 0.0, 0.0, 0.0])


def test_skill_delta_is_teacher_minus_old_and_masked():
    teacher = torch.tensor([[-1.0, -0.5, 0.0], [-3.0, -1.0, -9.0]])
    old = torch.tensor([[-2.0, -0.5, -3.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    close(opid.skill_delta(teacher, old, mask), [[1.0, 0.0, 0.0], [-2.0, 1.0, -8.0]])
    close(opid.skill_delta(teacher, old, mask, clip=1.5), [[1.0, 0.0, 0.0], [-1.5, 1.0, -1.5]])
    # normalised over the 5 real tokens [1, 0, -2, 1, -8]: mean -1.6, std 3.7815
    normalised = opid.skill_delta(teacher, old, mask, normalize=True)
    close(normalised[0], [(1 + 1.6) / 3.78153, (0 + 1.6) / 3.78153, 0.0])
    teacher_with_grad = teacher.clone().requires_grad_(True)
    assert not opid.skill_delta(teacher_with_grad, old, mask).requires_grad  # stop-gradient


def test_combined_advantage_by_hand():
    outcome = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    delta_ep = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 0.0], [70.0, 0.0, 0.0]])
    delta_step = torch.tensor([[100.0, 200.0, 300.0], [400.0, 500.0, 0.0], [700.0, 0.0, 0.0]])
    routed_ep = torch.tensor([True, False, True])
    routed_step = torch.tensor([False, True, True])  # sample 2: "additive" routing, both terms
    adv = opid.combined_advantage(outcome, mask, delta_ep, routed_ep, delta_step, routed_step,
                                  w_episode=0.01, w_step=0.001)
    close(adv, [[0.6, 0.7, 0.8], [-0.6, -0.5, 0.0], [2.0 + 0.7 + 0.7, 0.0, 0.0]])
    # GRPO: no Δ terms, the outcome advantage broadcast over the response tokens only
    close(opid.combined_advantage(outcome, mask), [[0.5, 0.5, 0.5], [-1.0, -1.0, 0.0], [2.0, 0.0, 0.0]])


def test_worked_example_of_module_docstring():
    adv_ep = opid.outcome_advantage(torch.tensor([10.0, 10.0, -0.1]), torch.zeros(3, dtype=torch.long))
    mask = torch.ones(3, 2)
    delta = opid.skill_delta(torch.tensor([[0.0, 0.0], [-1.0, -0.5], [0.0, 0.0]]),
                             torch.tensor([[0.0, 0.0], [-2.0, -0.5], [0.0, 0.0]]), mask)
    adv = opid.combined_advantage(adv_ep, mask, delta_step=delta, routed_step=torch.tensor([False, True, False]),
                                  w_step=0.001)
    close(adv[1], [0.57835, 0.57735])


def test_token_mean_and_accumulation_denominator():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(opid.token_mean(values, mask), 7.0 / 3.0)
    # two micro-batches of one row each, normalised by the mini-batch's 3 tokens, add up to the mean
    parts = [opid.token_mean(values[i:i + 1], mask[i:i + 1], num_tokens=3) for i in range(2)]
    close(parts[0] + parts[1], 7.0 / 3.0)


@pytest.mark.parametrize("advantage, ratio, expected", [
    (1.0, 1.1, -1.1),    # inside the clip range: the plain surrogate
    (1.0, 1.5, -1.2),    # A > 0, ratio above 1+ε: clipped
    (1.0, 0.5, -0.5),    # A > 0, ratio below 1−ε: the unclipped (pessimistic) term
    (-1.0, 1.5, 1.5),    # A < 0, ratio above 1+ε: unclipped
    (-1.0, 0.5, 0.8),    # A < 0, ratio below 1−ε: clipped
    (-2.0, 1.0, 2.0),
])
def test_ppo_clip_loss_single_token(advantage, ratio, expected):
    old = torch.tensor([[-1.0]])
    logprobs = old + math.log(ratio)
    loss, _ = opid.ppo_clip_loss(logprobs, old, torch.tensor([[advantage]]), torch.ones(1, 1))
    close(loss, expected)


def test_ppo_clip_loss_gradient_vanishes_when_clipped_and_dual_clip_caps():
    old = torch.tensor([[-1.0]])
    logprobs = (old + math.log(1.5)).requires_grad_(True)
    loss, stats = opid.ppo_clip_loss(logprobs, old, torch.tensor([[1.0]]), torch.ones(1, 1))
    loss.backward()
    assert logprobs.grad.abs().item() == 0.0 and stats["clipfrac"] == 1.0
    # dual clip c = 3: A = -1 at ratio 5 would cost 5, capped to 3
    big = old + math.log(5.0)
    close(opid.ppo_clip_loss(big, old, torch.tensor([[-1.0]]), torch.ones(1, 1))[0], 5.0)
    close(opid.ppo_clip_loss(big, old, torch.tensor([[-1.0]]), torch.ones(1, 1), dual_clip=3.0)[0], 3.0)


def test_ppo_clip_loss_token_mean_over_mask():
    old = torch.zeros(2, 2)
    logprobs = torch.zeros(2, 2)  # ratio 1 everywhere: loss = -A per token
    advantages = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    close(opid.ppo_clip_loss(logprobs, old, advantages, mask)[0], -2.0)


def test_k3_kl_by_hand_and_clamp():
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0, -30.0]])
    # diff = ref - logp = [-1, 1, 0, -30]: e^-1 + 1 - 1, e^1 - 1 - 1, 0, clamp(e^-20 + 20 - 1) = 10
    close(opid.k3_kl(logprobs, ref), [[math.exp(-1), math.e - 2.0, 0.0, 10.0]])


def test_skill_sd_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[-2.0, -1.0]])
    old = torch.tensor([[-1.0, -1.0]])  # ρ = 1
    mask = torch.tensor([[1.0, 1.0]])
    loss = opid.skill_sd_loss(logprobs, teacher, old, mask)
    # token 0: ℓ = 1, k3 = e^-1 - 1 + 1; token 1: ℓ = 0, k3 = 0
    close(loss, math.exp(-1) / 2)
    loss.backward()
    # d/dℓ [ρ·k3] with ρ = e^(logp-old): ρ'·k3 + ρ·(1 - e^-ℓ) = e^-1 + (1 - e^-1) = 1 → /2 tokens
    close(logprobs.grad, [[0.5, 0.0]])


def test_rlsd_advantage_and_lambda_schedule():
    outcome = torch.tensor([1.0, -1.0, 1.0])
    student = torch.zeros(3, 1)
    teacher = torch.tensor([[0.1], [0.1], [0.5]])
    mask = torch.ones(3, 1)
    adv = opid.rlsd_advantage(outcome, teacher, student, mask, lam=0.5)
    close(adv, [[0.5 + 0.5 * math.exp(0.1)], [-(0.5 + 0.5 * math.exp(-0.1))], [0.5 + 0.5 * 1.2]])
    assert opid.rlsd_lambda(0) == 0.5 and opid.rlsd_lambda(50) == pytest.approx(0.25)
    assert opid.rlsd_lambda(100) == 0.0 and opid.rlsd_lambda(150) == 0.0
