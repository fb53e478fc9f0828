"""The math of OPID and its baselines, as small pure functions over tensors.

Every formula of docs/method.md §2, §3, §7, §8 and §10 (the paper: arXiv 2606.26790) is one
function here, named after the quantity it computes. Shapes: S = step-samples (one per (prompt,
response) of an environment step), L = padded response length; `mask` is 1.0 on real response
tokens, 0.0 on padding.

Worked example (also checked in tests/test_opid.py). One group (uid 0) of two trajectories:
trajectory a won in 2 steps (reward 10), trajectory b failed in 1 step whose action was invalid.
The invalid-action penalty (0.1) lands on b's step alone, so the group's step-samples carry scores
S = [10, 10, -0.1]: a counts once per step ("cross-step" statistics), μ = 6.633…, σ (unbiased,
torch.std) = 5.831…, and the outcome advantage is [0.577, 0.577, -1.155], broadcast to every
response token of each step. If a step skill raises the old policy's log-prob of a's second-step
tokens from [-2.0, -0.5] to [-1.0, -0.5], then Δ = [1.0, 0.0] and, with w_step = 0.001, those
tokens get A = [0.578, 0.577].
"""
from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# §2 Scores and returns
# ---------------------------------------------------------------------------------------------


def discounted_returns(rewards: list[float], gamma: float = 0.95) -> list[float]:
    """docs/method.md §2 (arXiv 2606.26790).

    G_t = Σ_{u≥t} γ^(u−t) r_u for one trajectory's per-step rewards."""
    returns, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def step_scores(episode_reward: float, step_valid: list[bool], invalid_penalty: float,
                scope: str = "step") -> list[float]:
    """docs/method.md §2–§3 (arXiv 2606.26790): the score S_i of each step-sample of one trajectory.

    scope "step" (default, the authors' `apply_invalid_action_penalty`): S_i = R_τ − coef·[step i
    invalid] — the penalty lands on the invalid step's own sample, the other steps keep R_τ.
    scope "trajectory" (ablation): every step gets R_τ − coef·(number of invalid steps).
    step_valid: one flag per step, in order; coef = 0.1 ALFWorld/WebShop, 0.01 search.
    """
    if scope == "step":
        return [episode_reward - invalid_penalty * (not valid) for valid in step_valid]
    if scope == "trajectory":
        return [trajectory_score(episode_reward, sum(not v for v in step_valid), invalid_penalty)] * len(step_valid)
    raise ValueError(f"unknown penalty scope {scope!r}: use 'step' or 'trajectory'")


def trajectory_score(episode_reward: float, num_invalid_steps: int, invalid_penalty: float) -> float:
    """docs/method.md §2 (ablation "trajectory"): S_τ = R_τ − coef·(number of invalid steps)."""
    return episode_reward - invalid_penalty * num_invalid_steps


def step_returns(rewards: list[float], step_valid: list[bool], gamma: float, invalid_penalty: float) -> list[float]:
    """docs/method.md §2, §10 (arXiv 2606.26790): GiGPO's step return of each step of one trajectory.

    G_t = Σ_{u≥t} γ^(u−t) r_u over the environment rewards, then − coef·[step t invalid]: as in the
    authors' code, the penalty is taken off the invalid step's own return after discounting, so it
    does not leak into the returns of earlier steps.
    """
    returns = discounted_returns(rewards, gamma)
    return [g - invalid_penalty * (not valid) for g, valid in zip(returns, step_valid)]


# ---------------------------------------------------------------------------------------------
# §3 Outcome advantage (GRPO) and GiGPO's step advantage (§10)
# ---------------------------------------------------------------------------------------------


def _group_normalise(values: torch.Tensor, group_ids: torch.Tensor, mode: str, eps: float,
                     lone_sample_mean: str) -> torch.Tensor:
    """Subtract the group mean (and divide by the unbiased group std, torch.std's default) per sample.

    A group whose values are all equal (σ = 0) gets 0 — never NaN. A group of one sample is
    normalised with μ = 0, σ = 1 when `lone_sample_mean` is "zero" (the authors' episode
    advantage: A = S/(1 + ε), or S with mean_norm) and with μ = its own value (A = 0) when it is
    "own" (the authors' GiGPO step groups).
    """
    if mode not in ("mean_std_norm", "mean_norm"):
        raise ValueError(f"unknown advantage mode {mode!r}: use 'mean_std_norm' or 'mean_norm'")
    values = values.to(torch.float64)  # exact statistics; callers cast to their dtype
    out = torch.zeros_like(values)
    for g in torch.unique(group_ids):
        members = group_ids == g
        group = values[members]
        if group.numel() == 1:
            if lone_sample_mean == "zero":
                out[members] = group / (1.0 + eps) if mode == "mean_std_norm" else group
            continue
        centred = group - group.mean()
        std = group.std(unbiased=True)  # the anchor code's torch.std
        if std < 1e-12:
            continue  # all equal: no signal (centred is exactly 0 anyway, also for mean_norm)
        out[members] = centred / (std + eps) if mode == "mean_std_norm" else centred
    return out.to(torch.float32)


def outcome_advantage(scores: torch.Tensor, group_ids: torch.Tensor, mode: str = "mean_std_norm",
                      eps: float = 1e-6) -> torch.Tensor:
    """docs/method.md §3 (arXiv 2606.26790).

    A_ep(i) = (S_i − μ_g)/(σ_g + ε) ("mean_std_norm") or S_i − μ_g ("mean_norm").

    scores [S]: the score S_i of each step-sample (opid.step_scores), so μ_g, σ_g are taken over
    all step-samples of group g — the "cross-step" convention; σ is the unbiased std, ε = 1e-6.
    A group of one sample is normalised with μ = 0, σ = 1, as in the authors' code (arXiv
    2606.26790): A = S/(1 + ε) or S. group_ids [S]: the task-group id (uid). Returns [S].
    """
    return _group_normalise(scores, group_ids, mode, eps, lone_sample_mean="zero")


def gigpo_step_advantage(step_returns: torch.Tensor, group_ids: torch.Tensor, anchor_ids: torch.Tensor,
                         mode: str = "mean_std_norm", eps: float = 1e-6) -> torch.Tensor:
    """docs/method.md §10 (arXiv 2606.26790).

    GiGPO: normalise the discounted return G_t within groups of identical observations.

    anchor_ids [S]: an integer id of the step's raw observation text; samples are grouped by
    (task group, anchor). Returns A_step [S]; the caller adds ω·A_step to A_ep.
    """
    key = torch.stack([group_ids.to(torch.long), anchor_ids.to(torch.long)], dim=1)
    _, state_ids = torch.unique(key, dim=0, return_inverse=True)
    return _group_normalise(step_returns, state_ids, mode, eps, lone_sample_mean="own")  # a lone state: 0


# ---------------------------------------------------------------------------------------------
# §7 Self-distillation signal Δ and §8 the combined advantage
# ---------------------------------------------------------------------------------------------


def skill_delta(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                normalize: bool = False, clip: float | None = None, eps: float = 1e-6) -> torch.Tensor:
    """docs/method.md §7 (arXiv 2606.26790).

    Δ(i, ℓ) = log π_old(y_ℓ | ĥ_i, y_<ℓ) − log π_old(y_ℓ | h_i, y_<ℓ), no gradient.

    teacher_logprobs, old_logprobs, mask: [S, L]; `mask` marks the response tokens of the samples
    routed to ONE skill kind (the trainer calls this once per kind). Optional (off by default, as
    in the paper's runs), as in the authors' code (arXiv 2606.26790): `normalize` centres Δ over
    the masked tokens and divides by their population std only when that std > ε; `clip` then
    clamps it to ±clip. Positions outside `mask` are 0.
    """
    delta = (teacher_logprobs - old_logprobs).detach() * mask
    if normalize and mask.sum() > 0:
        real = delta[mask.bool()]
        std = real.std(unbiased=False)
        centred = delta - real.mean()
        delta = (centred / (std + eps) if std > eps else centred) * mask
    if clip is not None:
        delta = delta.clamp(-clip, clip)
    return delta


def combined_advantage(outcome_adv: torch.Tensor, mask: torch.Tensor,
                       delta_episode: torch.Tensor | None = None, routed_episode: torch.Tensor | None = None,
                       delta_step: torch.Tensor | None = None, routed_step: torch.Tensor | None = None,
                       w_episode: float = 0.001, w_step: float = 0.001) -> torch.Tensor:
    """docs/method.md §8 (arXiv 2606.26790).

    A(i,ℓ) = A_ep(i) + w_ep·1[i→episode]·Δ_ep(i,ℓ) + w_step·1[i→step]·Δ_step(i,ℓ).

    outcome_adv [S] (broadcast to tokens); mask, delta_* [S, L]; routed_* [S] booleans saying
    which skill each sample was routed to (§5). Returns [S, L], zero on padding.
    """
    adv = outcome_adv[:, None].to(mask.dtype) * mask
    if delta_episode is not None:
        adv = adv + w_episode * routed_episode[:, None].to(mask.dtype) * delta_episode * mask
    if delta_step is not None:
        adv = adv + w_step * routed_step[:, None].to(mask.dtype) * delta_step * mask
    return adv


# ---------------------------------------------------------------------------------------------
# §8 The PPO loss: clipped surrogate, k3 KL to the reference, entropy bonus; token-mean
# ---------------------------------------------------------------------------------------------


def token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """docs/method.md §8 (arXiv 2606.26790): Σ values·mask / number of response tokens ("token-mean").

    With gradient accumulation pass `num_tokens` = tokens of the whole mini-batch, so that the
    micro-batch losses add up to the mini-batch token-mean.
    """
    denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=values.dtype)
    return (values * mask).sum() / denom.clamp(min=1.0)


def ppo_clip_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip_eps: float = 0.2, dual_clip: float | None = None,
                  num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """docs/method.md §8 (arXiv 2606.26790).

    L_pg = −min(ratio·A, clip(ratio, 1−ε, 1+ε)·A), ratio = exp(log π_θ − log π_old).

    With `dual_clip` = c (e.g. 3), tokens with A < 0 are additionally capped at −c·A (the loss
    of a negative-advantage token cannot grow without bound as the ratio explodes).
    All tensors [S, L]. Returns (token-mean loss, {"clipfrac", "approx_kl"} as detached 0-dim
    tensors on the loss's device: reading them as numbers is left to the caller, once per step).
    """
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -dual_clip * advantages), per_token)
    loss = token_mean(per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {"clipfrac": token_mean((clipped > unclipped).float(), mask),
                 "approx_kl": token_mean(-log_ratio, mask)}
    return loss, stats


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """docs/method.md §8 (arXiv 2606.26790).

    k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1, clamped to ±clamp. [S, L]."""
    diff = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(diff) - diff - 1.0).clamp(-clamp, clamp)


# ---------------------------------------------------------------------------------------------
# §10 Baselines that share the machinery
# ---------------------------------------------------------------------------------------------


def skill_sd_loss(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                  mask: torch.Tensor, num_tokens: float | None = None, clamp: float = 10.0,
                  max_weight: float = 2.0) -> torch.Tensor:
    """docs/method.md §10 (arXiv 2606.26790).

    Skill-SD (and OPSD, with a privileged teacher): token-mean(ρ·k3) on sampled tokens.

    ℓ = log π_θ − sg(log π_T), k3 = exp(−ℓ) − 1 + ℓ (an importance-weighted reverse KL to the
    teacher), ρ = exp(log π_θ − sg(log π_old)). ℓ is clamped to ±clamp, ρ to [0, max_weight].
    The caller multiplies by λ (0.001) and adds it to the PPO loss.
    """
    ell = (logprobs - teacher_logprobs.detach()).clamp(-clamp, clamp)
    k3 = torch.exp(-ell) - 1.0 + ell
    rho = torch.exp((logprobs - old_logprobs.detach()).clamp(-clamp, clamp)).clamp(max=max_weight)
    return token_mean(rho * k3, mask, num_tokens)


def rlsd_lambda(iteration: int, start: float = 0.5, decay_iterations: int = 100) -> float:
    """docs/method.md §10 (arXiv 2606.26790).

    RLSD: λ decays linearly from `start` to 0 over `decay_iterations` updates."""
    return max(0.0, start * (1.0 - iteration / decay_iterations))


def rlsd_advantage(outcome_adv: torch.Tensor, teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor,
                   mask: torch.Tensor, lam: float, low: float = 0.8, high: float = 1.2) -> torch.Tensor:
    """docs/method.md §10 (arXiv 2606.26790).

    RLSD: Â = A·((1−λ) + λ·clip(exp(sign(A)·(log π_T − log π_S)), low, high)). [S, L]."""
    sign = torch.sign(outcome_adv)[:, None]
    weight = torch.exp((sign * (teacher_logprobs - student_logprobs)).clamp(-20.0, 20.0)).clamp(low, high)
    return outcome_adv[:, None] * ((1.0 - lam) + lam * weight) * mask
