"""Evaluate a policy on an environment split: success rate overall and per task type.

    python eval.py --env alfworld --policy expert --split eval --episodes 60 --out results/expert.json

A policy is a function `policy(prompts, envs) -> responses`: it gets the current prompt of every
running environment copy (and the copies themselves, which the expert and random baselines read)
and returns one raw response text per copy, exactly what a language model would produce. The
trainer's model policy plugs in the same way (`model_policy` below is the place for it).
"""
from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Callable

from envs import make_env

Policy = Callable[[list[str], list], list[str]]


def expert_policy(think: bool) -> Policy:
    """The environment's expert (ALFWorld: alfworld's hand-coded expert), wrapped in tags."""
    def act(prompts, envs):
        out = []
        for env in envs:
            action = env.expert_action() or "look"
            out.append(("<think>The expert knows.</think>" if think else "") + f"<action>{action}</action>")
        return out
    return act


def random_policy(think: bool, seed: int = 0) -> Policy:
    """Uniform over the admissible actions of each copy (a seeded baseline)."""
    rng = random.Random(seed)

    def act(prompts, envs):
        out = []
        for env in envs:
            action = rng.choice(env.admissible_actions())
            out.append(("<think>Any will do.</think>" if think else "") + f"<action>{action}</action>")
        return out
    return act


def run_episodes(env_name: str, policy: Policy, split: str, episodes: int, batch: int = 8,
                 env_kwargs: dict | None = None) -> list[dict]:
    """Roll out `episodes` episodes, `batch` copies in lock-step, cycling over the split's tasks."""
    kwargs = dict(split=split, **(env_kwargs or {}))
    copies = [make_env(env_name, **kwargs) for _ in range(min(batch, episodes))]
    n_tasks = copies[0].num_tasks()
    records = []
    for start in range(0, episodes, len(copies)):
        running = copies[: min(len(copies), episodes - start)]
        tasks = [(start + i) % n_tasks for i in range(len(running))]
        stats = []
        for env, task in zip(running, tasks):
            _, info = env.reset(task)
            stats.append({"task_index": task, "task": info["task"], "task_type": info["task_type"],
                          "won": False, "steps": 0, "invalid": 0, "reward": 0.0})
        active = list(range(len(running)))
        while active:
            responses = policy([running[i].prompt() for i in active], [running[i] for i in active])
            still = []
            for i, response in zip(active, responses):
                _, reward, done, info = running[i].step(response)
                s = stats[i]
                s["steps"] += 1
                s["invalid"] += int(not info["action_valid"])
                s["reward"] += reward
                s["won"] = bool(info["won"])
                if not done:
                    still.append(i)
            active = still
        records += stats
    return records


def summarize(records: list[dict]) -> dict:
    by_type = defaultdict(list)
    for r in records:
        by_type[r["task_type"]].append(r["won"])
    total_steps = sum(r["steps"] for r in records)
    return {
        "episodes": len(records),
        "success_rate": sum(r["won"] for r in records) / max(1, len(records)),
        "per_task_type": {t: sum(w) / len(w) for t, w in sorted(by_type.items())},
        "episodes_per_task_type": {t: len(w) for t, w in sorted(by_type.items())},
        "mean_steps": total_steps / max(1, len(records)),
        "invalid_rate": sum(r["invalid"] for r in records) / max(1, total_steps),
    }


def print_table(summary: dict, title: str) -> None:
    print(f"{title}: success {summary['success_rate']:.3f} over {summary['episodes']} episodes, "
          f"mean steps {summary['mean_steps']:.1f}, invalid rate {summary['invalid_rate']:.3f}")
    print(f"  {'task type':<26}{'episodes':>9}{'success':>9}")
    for t, rate in summary["per_task_type"].items():
        print(f"  {t:<26}{summary['episodes_per_task_type'][t]:>9}{rate:>9.3f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="alfworld", choices=["alfworld", "webshop", "search"])
    parser.add_argument("--policy", default="expert", choices=["expert", "random"],
                        help="expert: the environment's oracle; random: uniform admissible actions")
    parser.add_argument("--split", default="eval", help="task split (train | eval)")
    parser.add_argument("--episodes", type=int, default=60, help="episodes, cycling over the tasks")
    parser.add_argument("--batch", type=int, default=8, help="environment copies stepped together")
    parser.add_argument("--max-steps", type=int, default=None, help="episode length (env default)")
    parser.add_argument("--n-games", type=int, default=None, help="generated split size (default)")
    parser.add_argument("--no-think", action="store_true", help="template without <think>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    parser.add_argument("--out", default=None, help="write the summary and episodes as JSON here")
    args = parser.parse_args(argv)

    think = not args.no_think
    env_kwargs = {"think": think}
    if args.max_steps:
        env_kwargs["max_steps"] = args.max_steps
    if args.n_games:
        env_kwargs["n_games"] = args.n_games
    policy = expert_policy(think) if args.policy == "expert" else random_policy(think, args.seed)
    records = run_episodes(args.env, policy, args.split, args.episodes, args.batch, env_kwargs)
    summary = summarize(records)
    print_table(summary, f"{args.env} / {args.split} / {args.policy}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**summary, "args": vars(args), "records": records}, indent=1))
    return summary


if __name__ == "__main__":
    main()
