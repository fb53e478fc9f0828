"""Batched multi-turn rollouts (docs/method.md §2): B task groups × N copies stepping in lock-step.

At every step the prompts of all still-running copies go through ONE batched `generate` call
(left padding, KV cache); finished copies drop out. Each (prompt, response) becomes a `Sample`
that keeps the token ids exactly as generated — masks and log-probs are never rebuilt by
re-tokenising decoded text.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

import policy


@dataclass
class Sample:
    """One environment step: the prompt the policy saw and the response it sampled."""
    uid: int                    # task-group id: all N rollouts of one task share it
    traj_uid: int               # trajectory id, unique in the batch
    step: int                   # step index t inside the trajectory
    prompt_text: str            # user message text (before the chat template)
    prompt_ids: list[int]       # chat-templated prompt token ids fed to generate
    response_ids: list[int]     # sampled token ids, as generated (EOS included when produced)
    old_logprobs: list[float]   # log π_old of each response token, saved at generation
    response_text: str
    action: str                 # parsed action ("" when the response was invalid)
    valid: bool
    invalid_reason: str
    observation: str            # raw observation the action was taken on (GiGPO anchor)
    reward: float
    privileged: str             # ground truth for the OPSD teacher (expert plan, goal, answer)


@dataclass
class Trajectory:
    """One finished episode of one environment copy."""
    uid: int
    traj_uid: int
    task_index: int
    task: str
    task_type: str
    env_name: str
    samples: list[Sample] = field(default_factory=list)
    won: bool = False
    episode_reward: float = 0.0
    score: float = 0.0          # raw environment score (WebShop attribute score, QA EM, ALFWorld won)

    @property
    def num_invalid(self) -> int:
        return sum(not s.valid for s in self.samples)


PromptHook = Callable[[int, str], str]  # (copy index, prompt text) -> prompt text actually shown


def collect_rollouts(model, tokenizer, envs: list, task_indices: list[int], uids: list[int], *,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     greedy: bool = False, seed: int | None = None,
                     prompt_hook: PromptHook | None = None, progress: Callable[[int, int], None] | None = None,
                     synced: bool = False) -> tuple[list[Trajectory], dict]:
    """Run one episode in every env copy, all copies stepping together.

    envs[i] plays task task_indices[i] in group uids[i]. `prompt_hook` may rewrite the prompt the
    student sees (Skill-GRPO puts skills there). Returns the trajectories (in copy order) and
    timing/throughput stats.

    `synced` (sharded weights, FSDP, where every forward pass is a collective): the processes
    step together until all of them are done — a process whose episodes are over (or that has
    none) keeps calling `generate` on a one-token dummy prompt, and each `generate` runs with
    `synced=True`, so all processes make the same number of forward calls.
    """
    start = time.perf_counter()
    trajs = []
    for i, (env, task_index, uid) in enumerate(zip(envs, task_indices, uids)):
        _, info = env.reset(task_index)
        trajs.append(Trajectory(uid=uid, traj_uid=i, task_index=task_index, task=env.task,
                                task_type=info.get("task_type", ""), env_name=env.name))
    active = list(range(len(envs)))
    stats = {"generate_s": 0.0, "env_s": 0.0, "generated_tokens": 0, "max_prompt_tokens": 0}
    step = 0
    while not (everyone_finished(model, not active) if synced else not active):
        if not active:  # FSDP: this process is done, another is not; its forwards need ours
            policy.generate(model, tokenizer, [[tokenizer.pad_token_id]], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, greedy=greedy, synced=True)
            continue
        prompt_texts = [envs[i].prompt() for i in active]
        if prompt_hook is not None:
            prompt_texts = [prompt_hook(i, text) for i, text in zip(active, prompt_texts)]
        prompt_ids = [policy.chat_prompt_ids(tokenizer, text) for text in prompt_texts]
        t0 = time.perf_counter()
        generations = policy.generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, greedy=greedy,
                                      seed=None if seed is None else seed + step, synced=synced)
        t1 = time.perf_counter()
        still_active = []
        for i, text, ids, gen in zip(active, prompt_texts, prompt_ids, generations):
            _, reward, done, info = envs[i].step(gen.text)
            trajs[i].samples.append(Sample(
                uid=uids[i], traj_uid=i, step=step, prompt_text=text, prompt_ids=ids,
                response_ids=list(gen.response_ids), old_logprobs=list(gen.logprobs),
                response_text=gen.text, action=info.get("action", ""), valid=bool(info["action_valid"]),
                invalid_reason=info.get("invalid_reason", ""), observation=info.get("anchor_obs", ""),
                reward=float(reward), privileged=str(info.get("privileged") or "")))
            trajs[i].episode_reward += float(reward)
            if done:
                trajs[i].won = bool(info.get("won", False))
                trajs[i].score = float(info.get("score", float(trajs[i].won)))
            else:
                still_active.append(i)
        stats["generate_s"] += t1 - t0
        stats["env_s"] += time.perf_counter() - t1
        stats["generated_tokens"] += sum(len(g.response_ids) for g in generations)
        stats["max_prompt_tokens"] = max([stats["max_prompt_tokens"]] + [len(p) for p in prompt_ids])
        active = still_active
        step += 1
        if progress is not None:
            progress(step, len(active))
    stats["rollout_s"] = time.perf_counter() - start
    stats["env_steps"] = sum(len(t.samples) for t in trajs)
    return trajs, stats


def everyone_finished(model, finished_here: bool) -> bool:
    """Whether every process is finished (an all-reduce: every process must call it together)."""
    flag = torch.tensor([0.0 if finished_here else 1.0], device=policy.model_device(model))
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def summarize(trajs: list[Trajectory]) -> dict:
    """Success rate, mean episode reward, mean raw score, invalid-action rate, mean length."""
    steps = [s for t in trajs for s in t.samples]
    n = max(len(trajs), 1)
    per_type: dict[str, list[bool]] = {}
    for t in trajs:
        per_type.setdefault(t.task_type, []).append(t.won)
    return {
        "success_rate": sum(t.won for t in trajs) / n,
        "mean_return": sum(t.episode_reward for t in trajs) / n,
        "mean_score": sum(t.score for t in trajs) / n,
        "invalid_rate": sum(not s.valid for s in steps) / max(len(steps), 1),
        "mean_steps": len(steps) / n,
        "per_task_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
        # one [task, won] per episode: two evaluations of the same games can then be compared game by game
        "episode_wins": sorted([t.task_index, int(t.won)] for t in trajs),
    }


def progress_bar(total: int, desc: str, unit: str) -> tqdm:
    """A tqdm bar on a terminal; none when stderr is a pipe or a file (`python train.py 2>&1 | tee log`
    then gets whole lines only: the callers log one line per evaluation and per iteration)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def evaluate_policy(model, tokenizer, make_env: Callable[[], object], num_tasks: int, *, episodes: int,
                    max_new_tokens: int, temperature: float = 0.4, greedy: bool = False, seed: int = 0,
                    batch_size: int = 64, desc: str = "eval") -> tuple[dict, list[Trajectory]]:
    """Play `episodes` episodes on tasks 0..num_tasks-1 (cycling), `batch_size` copies at a time.

    The paper validates with T = 0.4 sampling; `greedy=True` gives the deterministic variant.
    A progress bar counts finished episodes (terminal only, see `progress_bar`).
    """
    rng = random.Random(seed)
    order = [k % num_tasks for k in range(episodes)]
    envs = [make_env() for _ in range(min(batch_size, episodes))]
    trajs: list[Trajectory] = []
    with progress_bar(episodes, desc, "episode") as bar:
        for start in range(0, episodes, batch_size):
            tasks = order[start:start + batch_size]

            def finished(step: int, num_active: int) -> None:
                bar.update(start + len(tasks) - num_active - bar.n)
            batch, _ = collect_rollouts(model, tokenizer, envs[:len(tasks)], tasks, list(range(len(tasks))),
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        greedy=greedy, seed=rng.randrange(2**31), progress=finished)
            trajs.extend(batch)
    return summarize(trajs), trajs
