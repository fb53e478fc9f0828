"""Micro-benchmarks, one function per benchmark, one argparse subcommand each.

    python bench.py env --env alfworld --batch 16 --steps 200
"""
from __future__ import annotations

import argparse
import random
import time

from envs import make_env


def bench_env(env_name: str, batch: int, steps: int, split: str = "train", seed: int = 0) -> dict:
    """Environment steps per second: `batch` copies stepped in lock-step with uniformly random
    admissible actions (resets excluded from the timing, counted separately)."""
    rng = random.Random(seed)
    copies = [make_env(env_name, split=split, think=False) for _ in range(batch)]
    n_tasks = copies[0].num_tasks()
    reset_time, reset_count, next_task = 0.0, 0, 0

    def reset(env):
        nonlocal reset_time, reset_count, next_task
        t = time.perf_counter()
        env.reset((next_task // 4) % n_tasks)   # groups of 4 copies share a task, like training
        next_task += 1
        reset_time += time.perf_counter() - t
        reset_count += 1

    for env in copies:
        reset(env)
    done_steps, step_time = 0, 0.0
    while done_steps < steps:
        for env in copies:
            action = rng.choice(env.admissible_actions())
            t = time.perf_counter()
            _, _, done, _ = env.step(f"<action>{action}</action>")
            step_time += time.perf_counter() - t
            done_steps += 1
            if done:
                reset(env)
    return {"env": env_name, "batch": batch, "steps": done_steps, "steps_per_s": done_steps / step_time,
            "resets": reset_count, "seconds_per_reset": reset_time / max(1, reset_count)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="environment steps per second with random admissible actions")
    p_env.add_argument("--env", default="alfworld", choices=["alfworld", "webshop", "search"])
    p_env.add_argument("--batch", type=int, default=16, help="copies stepped together")
    p_env.add_argument("--steps", type=int, default=200, help="environment steps in total")
    p_env.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    if args.command == "env":
        r = bench_env(args.env, args.batch, args.steps, args.split)
        print(f"{r['env']}: {r['steps_per_s']:.1f} env steps/s over {r['steps']} random steps "
              f"({r['batch']} copies); {r['resets']} resets, {r['seconds_per_reset']:.2f} s each")


if __name__ == "__main__":
    main()
