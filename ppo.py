"""The PPO update of the real-model path (docs/method.md §7–§8; arXiv 2606.26790): compute
precision, one micro-batch plan shared by every pass over a batch and by every process, the
recomputed no-grad old pass, and the clipped-PPO loss loop with gradient accumulation.

    plan = update_plan(samples, cfg, accelerator, rng)      # same shape on every process
    old = score_samples(model, samples, groups, cfg, accelerator)
    stats = update(model, optimizer, accelerator, samples, plan, advantages, old, ref, ..., mask, cfg)

Why one plan: bf16 results depend on which rows share a micro-batch (padding widths change the
kernels' shapes). Scoring log π_old, the teacher and the update on the same micro-batches makes
the first PPO ratio exactly 1 and Δ of a skill that changes nothing exactly 0, in any precision.
Why the same shape on every process: under data parallelism every backward of the last
micro-batch is an all-reduce, so every process must run the same number of them.
`cfg` is a `train.Config`.
"""
from __future__ import annotations

import contextlib
import math
import random

import torch
from accelerate.utils import DistributedType

import opid
import policy
import rollout


# ---------------------------------------------------------------------------------------------
# Compute precision
# ---------------------------------------------------------------------------------------------


def mixed_precision(cfg) -> str:
    """--mixed-precision resolved: "bf16" or "no" (auto: bf16 on a GPU, fp32 on the CPU); the value
    itself is checked once, with every flag, by train.resolve_defaults."""
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return cfg.mixed_precision


def compute_autocast(cfg, device: torch.device):
    """The context of every forward pass (rollout, old, reference, teacher, update): bf16 autocast
    when --mixed-precision resolves to bf16, else nothing. Done here rather than by accelerate's
    mixed precision, which would widen every output to fp32 — a whole fp32 [tokens × vocabulary]
    logits tensor per micro-batch; bf16 logits are widened slice by slice instead
    (`policy.forward_response_logprobs`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision(cfg) == "bf16")


# ---------------------------------------------------------------------------------------------
# The micro-batch plan and the no-grad passes
# ---------------------------------------------------------------------------------------------


def micro_batches(rows: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """`rows` sorted by sequence length (ties: by index) and cut into micro-batches of `size`:
    little padding per micro-batch, and one deterministic grouping every pass can share."""
    ordered = sorted(rows, key=lambda i: (lengths[i], i))
    return [ordered[k:k + size] for k in range(0, len(ordered), size)]


def update_plan(samples: list[rollout.Sample], cfg, accelerator, rng: random.Random) -> list[dict]:
    """The optimizer steps of one PPO update on this process's samples, identical in shape on every rank.

    Steps per epoch = ⌈global samples / mini_batch_size⌉; each rank splits its own (shuffled)
    samples into that many parts, and each part into length-sorted micro-batches. Ranks hold
    different numbers of samples (episode lengths vary), so every step is padded with empty
    micro-batches up to the largest count of any rank: all ranks then run the same number of
    forward/backward passes and optimizer steps, and their collectives pair up. Each step also
    carries the GLOBAL number of response tokens of its part (the token-mean's denominator).
    Returns [{"rows": sample indices, "micro_batches": [[...], ..., []], "tokens": float}].
    """
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    device = accelerator.device
    total = int(accelerator.gather(torch.tensor([len(samples)], device=device)).sum())
    steps = max(1, math.ceil(total / cfg.mini_batch_size))
    plan = []
    for _ in range(cfg.ppo_epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        parts = [order[k * len(order) // steps:(k + 1) * len(order) // steps] for k in range(steps)]
        micro = [micro_batches(part, lengths, cfg.micro_batch_size) for part in parts]
        local = torch.tensor([[len(m) for m in micro], [sum(len(samples[i].response_ids) for i in part)
                                                         for part in parts]], device=device)
        everyone = accelerator.gather(local[None]).reshape(-1, 2, steps)  # [ranks, 2, steps]
        most_micro, tokens = everyone[:, 0].max(dim=0).values, everyone[:, 1].sum(dim=0)
        for k in range(steps):
            padding = [[] for _ in range(int(most_micro[k]) - len(micro[k]))]
            plan.append({"rows": parts[k], "micro_batches": micro[k] + padding, "tokens": float(tokens[k])})
    return plan


def lockstep(accelerator) -> bool:
    """Sharded weights (FSDP): every forward pass all-gathers parameters, so every process must
    make the same forward calls in the same order — rollouts, no-grad passes and evaluation too."""
    return accelerator.distributed_type == DistributedType.FSDP


def pad_groups(groups: list[list[int]], accelerator) -> list[list[int]]:
    """Under `lockstep`, `groups` followed by empty groups up to the largest count of any process
    (each empty group is a one-token forward, `policy.response_logprobs(run_empty=True)`)."""
    if not lockstep(accelerator):
        return groups
    most = int(accelerator.gather(torch.tensor([len(groups)], device=accelerator.device)).max())
    return groups + [[] for _ in range(most - len(groups))]


def score_samples(model, samples: list[rollout.Sample], groups: list[list[int]], cfg,
                  accelerator) -> torch.Tensor:
    """No-grad log-probs [S, longest response] (CPU, fp32; 0 on padding) of each sample's own
    response under its own prompt, in `groups` micro-batches, in the run's compute precision."""
    with torch.no_grad(), compute_autocast(cfg, accelerator.device):
        logprobs, _, _ = policy.response_logprobs(model, [s.prompt_ids for s in samples],
                                                  [s.response_ids for s in samples], temperature=cfg.temperature,
                                                  groups=groups, chunk_tokens=cfg.logprob_chunk_size,
                                                  run_empty=lockstep(accelerator))
    return logprobs.float().cpu()


def generate_mismatch(old: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, clip_eps: float) -> dict:
    """How far generate-time log-probs are from the recomputed log π_old (shown, never trained on):
    the mean |old − generate| per token, and the share of tokens whose first PPO ratio
    exp(old − generate) would already lie outside [1−ε, 1+ε] had the update used them."""
    tokens = mask.sum().clamp(min=1.0)
    outside = (torch.exp(old - generated) - 1.0).abs() > clip_eps
    return {"old/mean_abs_diff_generate": float(((old - generated).abs() * mask).sum() / tokens),
            "old/share_outside_clip_generate": float((outside.float() * mask).sum() / tokens)}


# ---------------------------------------------------------------------------------------------
# The update (§8)
# ---------------------------------------------------------------------------------------------


def update(model, optimizer, accelerator, samples, plan: list[dict], advantages, old, ref, distill_teacher,
           distill_rows, mask, cfg) -> dict[str, torch.Tensor]:
    """docs/method.md §8 (arXiv 2606.26790).

    clipped PPO on token-level advantages, + β·k3 KL − c_ent·H (+ λ·Skill-SD/OPSD term).

    One optimizer step per `plan` entry (see `update_plan`), accumulated over its micro-batches
    with gradient all-reduce only on the last one (`no_sync`). The loss is the token-mean over the
    step's GLOBAL response-token count N: each rank sums its tokens' losses and divides by N/ranks,
    so that DDP's gradient average equals the gradient of Σ(all ranks' tokens)/N. An empty
    (padding) micro-batch runs a one-token forward/backward with weight 0. The CPU tensors
    (`advantages`, `old`, `ref`, `mask`, distillation terms, [S, L]) are moved to the device the
    log-probs come back on. Log-probs are taken at the rollout temperature, as `old` was.
    Returns the step-averaged statistics as 0-dim tensors on the model's device, averaged over ranks.
    """
    model.train()
    world = accelerator.num_processes
    names = ("loss", "pg_loss", "kl", "entropy", "clipfrac", "grad_norm")
    totals, skipped = None, 0
    for step in plan:
        num_tokens = step["tokens"] / world
        optimizer.zero_grad(set_to_none=True)
        for j, idx in enumerate(step["micro_batches"]):
            last = j == len(step["micro_batches"]) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                if idx:
                    prompts, responses = [samples[i].prompt_ids for i in idx], [samples[i].response_ids for i in idx]
                else:  # padding: this rank has no samples left in this step
                    prompts, responses = [[0]], [[0]]
                with compute_autocast(cfg, accelerator.device):
                    logp, _, entropy = policy.response_logprobs(
                        model, prompts, responses, temperature=cfg.temperature, with_entropy=True, requires_grad=True,
                        groups=[list(range(len(prompts)))], chunk_tokens=cfg.logprob_chunk_size)
                if totals is None:
                    totals = {k: torch.zeros((), device=logp.device) for k in names}
                if not idx:
                    accelerator.backward((logp.sum() + entropy.sum()) * 0.0)
                    continue
                width, device = logp.shape[1], logp.device
                rows = torch.tensor(idx)
                m, a, o = (t[rows, :width].to(device) for t in (mask, advantages, old))
                pg_loss, _ = opid.ppo_clip_loss(logp, o, a, m, cfg.clip_eps, cfg.dual_clip or None, num_tokens)
                loss = pg_loss
                if ref is not None:
                    kl = opid.token_mean(opid.k3_kl(logp, ref[rows, :width].to(device)), m, num_tokens)
                    loss = loss + cfg.kl_coef * kl
                    totals["kl"] += kl.detach()
                ent = opid.token_mean(entropy, m, num_tokens)  # logged always, in the loss when c_ent > 0
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * ent
                totals["entropy"] += ent.detach()
                if distill_teacher is not None:
                    distilled = distill_rows[rows].float()[:, None].to(device)
                    loss = loss + cfg.distill_coef * opid.skill_sd_loss(
                        logp, distill_teacher[rows, :width].to(device), o, m * distilled, num_tokens)
                accelerator.backward(loss)
                totals["loss"] += loss.detach()
                totals["pg_loss"] += pg_loss.detach()
                totals["clipfrac"] += clipped_tokens(logp.detach(), o, a, m, cfg.clip_eps) / num_tokens
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP returns it as a (replicated) DTensor
            grad_norm = grad_norm.full_tensor()
        if step_if_finite(optimizer, grad_norm):  # the norm is of the all-reduced gradient: every rank agrees
            totals["grad_norm"] += torch.as_tensor(grad_norm, device=totals["grad_norm"].device).detach()
        else:
            skipped += 1
    model.eval()
    means = torch.stack([totals[k] for k in names]) / max(len(plan), 1)
    means[names.index("grad_norm")] = totals["grad_norm"] / max(len(plan) - skipped, 1)  # over the steps taken
    stats = dict(zip(names, accelerator.reduce(means, reduction="mean")))
    return {**stats, "update/skipped_nonfinite": torch.tensor(float(skipped), device=means.device)}


def step_if_finite(optimizer, grad_norm) -> bool:
    """Apply the optimizer step only when the clipped gradient's norm is finite; otherwise drop the
    gradient (as verl's actor does: one NaN/inf would poison Adam's moments). Returns whether it stepped."""
    norm = torch.as_tensor(grad_norm)
    if norm.device.type != "meta" and not torch.isfinite(norm).item():  # meta: no value to read (tests)
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def clipped_tokens(logprobs, old_logprobs, advantages, mask, clip_eps: float) -> torch.Tensor:
    """How many tokens' PPO term is clipped (the clipped branch of §8's min is the active one)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) > -advantages * ratio
    return (clipped.float() * mask).sum()
