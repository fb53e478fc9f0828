"""Evaluate a policy on an environment split, and compare training runs.

    python eval.py --env alfworld --policy expert --split eval --episodes 60 --out results/expert.json
    python eval.py --run runs/<name>                       # a trained run: its config.json + checkpoint
    python eval.py --run runs/<name> --greedy --seeds 0 1 2 --out res.json --md res.md
    python eval.py --checkpoint FOLDER --env search --no-think --history-length 4 --max-new-tokens 24
    python eval.py --model tiny --env webshop             # an untrained model (tiny | smollm2 | hub id | folder)
    python eval.py --compare runs/opid-s0 runs/opid-s1 runs/grpo-s0 --labels opid opid grpo --plot curves.png

Evaluation (docs/method.md §9 "validation", §11): `--temperature 0.4` sampling by default (the paper's
validation setting) or `--greedy`; each of `--seeds` runs the full episode set and the table
shows mean ± std over seeds (sample std, n−1). Metrics: overall success rate, success per
ALFWorld task type, WebShop mean score and success, QA exact match per data source (the
environments put the data source in `task_type`) and its average over sources.

With `--run`, the environment is built from the run's config.json exactly as training built it
(`train.resolve_defaults` + `train.env_kwargs`), so `--env`, `--max-steps`, ... are ignored. With
`--checkpoint` or `--model` the same two functions fill the flags' gaps (for `tiny`: history
length from `warmstart.TINY_HISTORY`, no <think>, `warmstart.TINY_MAX_NEW_TOKENS` new tokens (24, on
WebShop 48); otherwise <think> and 512 — pass `--no-think --max-new-tokens 24` for a checkpoint of
a tiny run).

Comparison reads each run's metrics.jsonl ("kind": "train" / "eval" lines), groups runs by
`--labels` (default: the folder name) and prints final metrics as mean ± std per label, eval
success at every evaluated budget, and sample efficiency: the environment steps each label needs
to reach the `--reference` label's (GRPO's) final mean eval success, also as a fraction of the
reference's own; with `--plot` it draws eval success vs environment steps and vs updates
(shaded band: ± 1 standard error over seeds). It also prints each run's change from its first
evaluation (± paired by game where the run recorded its episodes), each label's final success minus
the reference's, paired by seed, and the Δ statistics of the runs that computed Δ.

A baseline policy is a function `policy(prompts, envs) -> responses`: it gets the current prompt
of every running copy (and the copies themselves, which the expert and random baselines read) and
returns one raw response text per copy, exactly what a language model would produce.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from environments import make_env

Policy = Callable[[list[str], list], list[str]]
ENVS = ("alfworld", "webshop", "search")


# ---------------------------------------------------------------------------------------------
# Baseline policies (no model)
# ---------------------------------------------------------------------------------------------


def tagged(action: str, think: bool, thought: str) -> str:
    """Wrap a bare action in the env's tags (search QA's oracle already answers in tagged form)."""
    body = action if action.lstrip().startswith("<") else f"<action>{action}</action>"
    return (f"<think>{thought}</think>" if think else "") + body


def expert_policy(think: bool) -> Policy:
    """The environment's expert (ALFWorld: alfworld's hand-coded expert), wrapped in tags."""
    def act(prompts, envs):
        return [tagged(env.expert_action() or "look", think, "The expert knows.") for env in envs]
    return act


def random_policy(think: bool, seed: int = 0) -> Policy:
    """Uniform over the admissible actions of each copy (a seeded baseline); search QA, which has
    no admissible list, gets a search for a random word of the question."""
    rng = random.Random(seed)

    def act(prompts, envs):
        out = []
        for env in envs:
            choices = env.admissible_actions() if hasattr(env, "admissible_actions") else None
            if choices:
                action = rng.choice(choices)
            else:
                words = [w for w in env.task.split() if len(w) > 3] or ["unknown"]
                action = f"<search>{rng.choice(words)}</search>"
            out.append(tagged(action, think, "Any will do."))
        return out
    return act


def run_episodes(env_name: str, policy: Policy, split: str, episodes: int, batch: int = 8,
                 env_kwargs: dict | None = None) -> list[dict]:
    """Roll out `episodes` episodes, `batch` copies in lock-step, cycling over the split's tasks."""
    kwargs = dict(split=split, **(env_kwargs or {}))
    copies = [make_env(env_name, **kwargs) for _ in range(min(batch, episodes))]
    n_tasks = copies[0].num_tasks()
    records = []
    bar = tqdm(total=episodes, desc=f"{env_name} {split}", unit="episode", leave=False,
               disable=None)  # None: no bar when stderr is not a terminal (a log file gets whole lines only)
    for start in range(0, episodes, len(copies)):
        running = copies[: min(len(copies), episodes - start)]
        tasks = [(start + i) % n_tasks for i in range(len(running))]
        stats = []
        for env, task in zip(running, tasks):
            _, info = env.reset(task)
            stats.append({"task_index": task, "task": info["task"], "task_type": info["task_type"],
                          "won": False, "score": 0.0, "steps": 0, "invalid": 0, "reward": 0.0})
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
                s["score"] = float(info.get("score", float(s["won"])))
                if not done:
                    still.append(i)
            bar.update(len(active) - len(still))
            active = still
        records += stats
    bar.close()
    return records


# ---------------------------------------------------------------------------------------------
# Metrics: one summary per seed, then mean ± std over seeds
# ---------------------------------------------------------------------------------------------


def trajectory_records(trajs) -> list[dict]:
    """rollout.Trajectory objects → the same per-episode records the baselines produce."""
    return [{"task_index": t.task_index, "task": t.task, "task_type": t.task_type, "won": bool(t.won),
             "score": float(t.score), "steps": len(t.samples), "invalid": t.num_invalid,
             "reward": float(t.episode_reward)} for t in trajs]


def summarize(records: list[dict], env_name: str = "") -> dict:
    """Overall and per-task-type success / score of a list of episode records (same numbers as
    rollout.summarize for trajectories). For search QA the score is exact match and task_type the
    data source: `per_data_source` holds EM per source, `em_average` their unweighted mean (§11)."""
    by_type = defaultdict(list)
    for r in records:
        by_type[r["task_type"]].append(r)
    n, total_steps = max(1, len(records)), sum(r["steps"] for r in records)
    summary = {
        "episodes": len(records),
        "success_rate": sum(r["won"] for r in records) / n,
        "mean_score": sum(r.get("score", float(r["won"])) for r in records) / n,
        "mean_return": sum(r["reward"] for r in records) / n,
        "per_task_type": {t: sum(r["won"] for r in rs) / len(rs) for t, rs in sorted(by_type.items())},
        "per_task_type_score": {t: sum(r.get("score", float(r["won"])) for r in rs) / len(rs)
                                for t, rs in sorted(by_type.items())},
        "episodes_per_task_type": {t: len(rs) for t, rs in sorted(by_type.items())},
        "mean_steps": total_steps / n,
        "invalid_rate": sum(r["invalid"] for r in records) / max(1, total_steps),
    }
    if env_name == "search":
        summary["per_data_source"] = dict(summary["per_task_type_score"])
        sources = list(summary["per_data_source"].values())
        summary["em_average"] = sum(sources) / max(1, len(sources))
    return summary


def flatten(summary: dict) -> dict[str, float]:
    """{"per_task_type": {"a": 1.0}} → {"per_task_type/a": 1.0}: one number per key."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{k}": float(v) for k, v in value.items()})
        elif isinstance(value, (int, float)):
            flat[key] = float(value)
    return flat


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n−1; 0 for a single value)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_change(first: list[list[int]], last: list[list[int]]) -> tuple[float, float] | None:
    """Change in success between two evaluations of the same games, and its standard error with
    the game as the unit: d_t = wins_last(t) − wins_first(t) per game t over E episodes in all,
    change = Σ d_t / E, s.e. = sqrt(T · Σ (d_t − d̄)² / (T − 1)) / E over the T games. A game's
    difficulty is shared by both evaluations, so this error is smaller than treating them as
    independent. None when the two did not play the same games the same number of times."""
    def per_game(pairs):
        wins, plays = defaultdict(int), defaultdict(int)
        for task, won in pairs:
            wins[task] += won
            plays[task] += 1
        return wins, plays
    (w0, n0), (w1, n1) = per_game(first), per_game(last)
    if n0 != n1 or len(n0) < 2:
        return None
    diffs = [w1[t] - w0[t] for t in n0]
    games, episodes = len(diffs), sum(n0.values())
    mean = sum(diffs) / games
    spread = (games * sum((d - mean) ** 2 for d in diffs) / (games - 1)) ** 0.5 / episodes
    return sum(diffs) / episodes, spread


def aggregate(summaries: list[dict]) -> dict[str, dict]:
    """Per flattened key: mean, std, n and the values over the seeds (keys missing in a seed are
    averaged over the seeds that have them)."""
    flats = [flatten(s) for s in summaries]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    out = {}
    for key in keys:
        values = [f[key] for f in flats if key in f]
        mean, std = mean_std(values)
        out[key] = {"mean": mean, "std": std, "n": len(values), "values": values}
    return out


def fmt(mean: float | None, std: float = 0.0, n: int = 1, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def eval_table(agg: dict[str, dict], env_name: str, seeds: list[int], title: str) -> str:
    """Markdown: one row per metric, mean ± std over seeds, then one column per seed."""
    rows = [("success rate", "success_rate"), ("mean score", "mean_score"), ("mean return", "mean_return"),
            ("invalid-action rate", "invalid_rate"), ("mean steps", "mean_steps")]
    if env_name == "search":
        rows.append(("EM average over sources", "em_average"))
        rows += [(f"EM {k.split('/', 1)[1]}", k) for k in agg if k.startswith("per_data_source/")]
    else:
        rows += [(f"success {k.split('/', 1)[1]}", k) for k in agg if k.startswith("per_task_type/")]
        if env_name == "webshop":
            rows += [(f"score {k.split('/', 1)[1]}", k) for k in agg if k.startswith("per_task_type_score/")]
    head = "| metric | mean ± std |" + "".join(f" seed {s} |" for s in seeds)
    lines = [f"**{title}**", "", head, "|---|---|" + "---|" * len(seeds)]
    for name, key in rows:
        if key in agg:
            a = agg[key]
            lines.append(f"| {name} | {fmt(a['mean'], a['std'], a['n'])} |"
                         + "".join(f" {v:.3f} |" for v in a["values"]))
    n_eps = agg.get("episodes", {}).get("mean", 0)
    lines += ["", f"{int(n_eps)} episodes per seed, {len(seeds)} seed(s)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Models: a trained run, a checkpoint folder, or an untrained model
# ---------------------------------------------------------------------------------------------


def run_config(run_dir: Path):
    """train.Config of a run folder (fields a newer/older train.py does not know are dropped)."""
    import train
    if not run_dir.is_dir():
        raise SystemExit(f"--run {run_dir}: no such folder")
    config_file = run_dir / "config.json"
    if not config_file.exists():
        raise SystemExit(f"--run {run_dir}: no config.json there (is it a train.py run folder?)")
    saved = json.loads(config_file.read_text())
    known = {f.name for f in dataclasses.fields(train.Config)}
    dropped = sorted(set(saved) - known)
    if dropped:
        print(f"[eval] ignoring unknown config fields {dropped}", file=sys.stderr)
    return train.resolve_defaults(train.Config(**{k: v for k, v in saved.items() if k in known}))


def flag_config(args):
    """train.Config from the flags, gaps filled the way training fills them."""
    import train
    cfg = train.Config(env=args.env, model=args.model or str(args.checkpoint), think=args.think,
                       history_length=args.history_length, max_steps=args.max_steps,
                       max_new_tokens=args.max_new_tokens, alfworld_games=args.n_games or 0,
                       alfworld_world=args.world)
    return train.resolve_defaults(cfg)


def load_model_for_eval(args):
    """(model, tokenizer, train.Config, source description) for --run / --checkpoint / --model."""
    import torch
    import transformers

    import policy
    import train
    if not sys.stderr.isatty():  # a pipe or a log file gets whole lines: no loading bar
        transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.run:
        run_dir = Path(args.run)
        cfg = run_config(run_dir)
        ignored = [f for f in ("env", "max_steps", "history_length", "think", "max_new_tokens", "n_games")
                   if getattr(args, f) is not None]
        if ignored:
            print(f"[eval] --run uses the run's own settings; ignoring {ignored}", file=sys.stderr)
        folder = run_dir / "checkpoint" / "model"
        if not folder.is_dir():
            raise SystemExit(f"--run {run_dir}: no checkpoint/model folder (train.py writes it every "
                             "--save-every iterations and at the end)")
        model, tokenizer = policy.load_policy(str(folder), device=device)
        source = {"kind": "run", "path": str(run_dir), "checkpoint": str(folder)}
    elif args.checkpoint:
        folder = Path(args.checkpoint)
        if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
            raise SystemExit(f"--checkpoint {folder}: no model there (config.json or adapter_config.json)")
        cfg = flag_config(args)
        model, tokenizer = policy.load_policy(str(folder), device=device)
        source = {"kind": "checkpoint", "path": str(folder)}
    else:
        cfg = flag_config(args)
        model, tokenizer = train.load_model(cfg, torch.device(device))
        source = {"kind": "model", "path": cfg.model}
    model.eval()
    return model, tokenizer, cfg, source


def evaluate_model(args) -> tuple[dict, str, list[dict], dict]:
    """Returns (settings, env name, per-seed summaries, per-seed records) for a model policy."""
    import rollout
    import train
    model, tokenizer, cfg, source = load_model_for_eval(args)
    kwargs = train.env_kwargs(cfg)
    make = lambda: make_env(cfg.env, split=args.split, **kwargs)
    num_tasks = make().num_tasks()
    summaries, records = [], {}
    for seed in args.seeds:
        _, trajs = rollout.evaluate_policy(
            model, tokenizer, make, num_tasks, episodes=args.episodes, max_new_tokens=cfg.max_new_tokens,
            temperature=args.temperature, greedy=args.greedy, seed=seed, batch_size=args.batch or 64,
            desc=f"seed {seed}")
        records[str(seed)] = trajectory_records(trajs)
        summaries.append(summarize(records[str(seed)], cfg.env))
    settings = {"source": source, "env": cfg.env, "split": args.split, "episodes": args.episodes,
                "decoding": "greedy" if args.greedy else f"T={args.temperature}", "seeds": args.seeds,
                "env_kwargs": kwargs, "max_new_tokens": cfg.max_new_tokens, "config": dataclasses.asdict(cfg)}
    return settings, cfg.env, summaries, records


def evaluate_baseline(args) -> tuple[dict, str, list[dict], dict]:
    """The expert / random baselines (no model, no torch)."""
    env_name = args.env or "alfworld"
    think = True if args.think is None else args.think
    kwargs = {"think": think}
    for key in ("max_steps", "history_length", "n_games"):
        if getattr(args, key):
            kwargs[key] = getattr(args, key)
    if env_name == "alfworld":
        kwargs["world"] = args.world
    summaries, records = [], {}
    for seed in args.seeds:
        policy = expert_policy(think) if args.policy == "expert" else random_policy(think, seed)
        records[str(seed)] = run_episodes(env_name, policy, args.split, args.episodes, args.batch or 8, kwargs)
        summaries.append(summarize(records[str(seed)], env_name))
    settings = {"source": {"kind": "policy", "path": args.policy}, "env": env_name, "split": args.split,
                "episodes": args.episodes, "seeds": args.seeds, "env_kwargs": kwargs}
    return settings, env_name, summaries, records


# ---------------------------------------------------------------------------------------------
# Comparing runs: metrics.jsonl → final metrics table and learning curves
# ---------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """The JSON lines of a run's metrics.jsonl; broken lines (a run killed mid-write) are skipped
    with one warning per file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"--compare {run_dir}: no metrics.jsonl there")
    records, broken = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            broken += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            broken += 1
    if broken:
        print(f"[eval] warning: skipped {broken} broken line(s) in {path}", file=sys.stderr)
    return records


def final_metrics(records: list[dict]) -> dict:
    """Last eval / train success, env steps, updates and total wall time of one run."""
    evals = sorted((r for r in records if r.get("kind") == "eval"), key=lambda r: r.get("updates", 0))
    trains = sorted((r for r in records if r.get("kind") == "train"), key=lambda r: r.get("updates", 0))
    times = [r["time/iteration_s"] for r in trains if "time/iteration_s" in r]
    return {
        "final_eval_success": evals[-1].get("eval/success_rate") if evals else None,
        "final_eval_score": evals[-1].get("eval/mean_score") if evals else None,
        "final_train_success": trains[-1].get("success_rate") if trains else None,
        "env_steps": max((r.get("env_steps", 0) for r in records), default=None),
        "updates": max((r.get("updates", 0) for r in records), default=None),
        "wall_time_s": sum(times) if times else None,
    }


DELTA_KEYS = (("mean abs Δ", "delta/mean_abs"), ("Δ on won", "delta/mean_won"), ("Δ on lost", "delta/mean_lost"),
              ("Δ on format tokens", "delta/mean_format_tokens"), ("Δ on content tokens", "delta/mean_content_tokens"))


def delta_stats(records: list[dict]) -> dict[str, float]:
    """Per-token Δ of one run (train.py's delta/* metrics, docs/method.md §7), averaged over its
    iterations; "Δ on won" only over iterations that won something (the metric is 0 otherwise)."""
    trains = [r for r in records if r.get("kind") == "train" and "delta/mean_abs" in r]
    out = {}
    for _, key in DELTA_KEYS:
        rows = [r for r in trains if key in r and (key != "delta/mean_won" or r.get("success_rate", 0) > 0)]
        if rows:
            out[key] = sum(r[key] for r in rows) / len(rows)
    return out


def run_seed(run_dir: Path) -> int | None:
    """The run's --seed from its config.json, else from a folder name ending in -s<seed>."""
    try:
        return int(json.loads((Path(run_dir) / "config.json").read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError):
        match = re.search(r"-s(\d+)$", Path(run_dir).name)
        return int(match.group(1)) if match else None


def eval_curve(records: list[dict]) -> list[tuple[int, int, float]]:
    """(updates, env_steps, eval success) of every eval line, in update order."""
    return sorted((r.get("updates", 0), r.get("env_steps", 0), r["eval/success_rate"])
                  for r in records if r.get("kind") == "eval" and "eval/success_rate" in r)


def group_curve(curves: list[list[tuple[int, int, float]]]) -> list[dict]:
    """Runs of one label aligned by update count: per update count, mean env steps and mean ± std
    success over the runs that evaluated there."""
    by_update = defaultdict(list)
    for curve in curves:
        for updates, env_steps, success in curve:
            by_update[updates].append((env_steps, success))
    points = []
    for updates in sorted(by_update):
        steps, success = zip(*by_update[updates])
        mean, std = mean_std(list(success))
        points.append({"updates": updates, "env_steps": sum(steps) / len(steps), "mean": mean, "std": std,
                       "n": len(success)})
    return points


def compare_runs(run_dirs: list[str], labels: list[str] | None = None) -> dict:
    """{label: {"runs": [...], "final": {metric: {"mean","std","n"}}, "curve": [...]}} in first-seen
    label order."""
    if labels and len(labels) != len(run_dirs):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(run_dirs)} runs")
    labels = labels or [Path(r).name for r in run_dirs]
    groups: dict[str, dict] = {}
    for run_dir, label in zip(run_dirs, labels):
        records = read_metrics(Path(run_dir))
        g = groups.setdefault(label, {"runs": [], "finals": [], "curves": [], "splits": set(), "seeds": [],
                                      "deltas": [], "changes": []})
        g["runs"].append(str(run_dir))
        g["seeds"].append(run_seed(Path(run_dir)))
        g["deltas"].append(delta_stats(records))
        # runs from before train.py --eval-split always evaluated on the eval split
        g["splits"].update(r.get("split", "eval") for r in records if r.get("kind") == "eval")
        g["finals"].append(final_metrics(records))
        g["curves"].append(eval_curve(records))
        g["changes"].append(start_change(records))
    out = {}
    for label, g in groups.items():
        final = {}
        for key in g["finals"][0]:
            values = [f[key] for f in g["finals"] if f[key] is not None]
            mean, std = mean_std(values)
            final[key] = {"mean": mean if values else None, "std": std, "n": len(values), "values": values}
        out[label] = {"runs": g["runs"], "final": final, "curve": group_curve(g["curves"]),
                      "eval_splits": sorted(g["splits"]), "seeds": g["seeds"], "deltas": g["deltas"],
                      "final_by_run": [f["final_eval_success"] for f in g["finals"]], "changes": g["changes"]}
    return out


def start_change(records: list[dict]) -> dict | None:
    """Last minus first evaluation of one run: {"change", "se"}, se paired by game when both
    evaluations recorded their episodes (`paired_change`), else None; None without two evaluations."""
    evals = sorted((r for r in records if r.get("kind") == "eval" and "eval/success_rate" in r),
                   key=lambda r: r.get("updates", 0))
    if len(evals) < 2:
        return None
    first, last = evals[0], evals[-1]
    paired = paired_change(first.get("eval/episode_wins", []), last.get("eval/episode_wins", []))
    return {"change": last["eval/success_rate"] - first["eval/success_rate"], "se": paired[1] if paired else None}


def mean_se_cell(mean: float, se: float, n: int) -> str:
    """'+mean ± s.e.' over n seeds; one seed has no standard error to show."""
    return f"{mean:+.3f} ± {se:.3f}" if n > 1 else f"{mean:+.3f} (one seed)"


def change_table(groups: dict) -> str:
    """Per label: each seed's change from its first evaluation (± paired by game where recorded),
    and the mean change ± the standard error over seeds (sample std / √n)."""
    rows = []
    for label, g in groups.items():
        pairs = [(seed, c) for seed, c in zip(g["seeds"], g["changes"]) if c is not None]
        if not pairs:
            continue
        per_seed = ", ".join(f"s{seed}: {c['change']:+.3f}" + (f" ± {c['se']:.3f}" if c["se"] is not None else "")
                             for seed, c in pairs)
        mean, std = mean_std([c["change"] for _, c in pairs])
        rows.append(f"| {label} | {per_seed} | {mean_se_cell(mean, std / math.sqrt(len(pairs)), len(pairs))} |")
    if not rows:
        return ""
    return "\n".join(["Eval success at the last evaluation minus the first, per run (± paired by game, where the "
                      "runs recorded their episodes) and mean ± s.e. over seeds:", "",
                      "| run | per seed | mean ± s.e. |", "|---|---|---|"] + rows)


def split_note(groups: dict) -> str:
    """A line saying which split the evaluations played, unless every run used the eval split;
    runs evaluated on different splits are flagged as not comparable."""
    splits = {s for g in groups.values() for s in g["eval_splits"]}
    if splits <= {"eval"}:
        return ""
    note = "Evaluation split: " + ", ".join(f"{label} on {'+'.join(g['eval_splits'])}" for label, g in groups.items())
    if len(splits) > 1:
        note += " — different splits, so these success rates are not comparable."
    else:
        note += " (the games trained on: this measures fitting them, not generalisation)."
    return note


def compare_table(groups: dict) -> str:
    columns = [("final eval success", "final_eval_success", 3), ("final eval score", "final_eval_score", 3),
               ("final train success", "final_train_success", 3), ("env steps", "env_steps", 0),
               ("updates", "updates", 0), ("wall time (s)", "wall_time_s", 0)]
    lines = ["| run | n |" + "".join(f" {name} |" for name, _, _ in columns),
             "|---|---|" + "---|" * len(columns)]
    for label, g in groups.items():
        cells = [fmt(g["final"][k]["mean"], g["final"][k]["std"], g["final"][k]["n"], d) for _, k, d in columns]
        lines.append(f"| {label} | {len(g['runs'])} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def budget_table(groups: dict) -> str:
    """Eval success (mean ± std over a label's seeds) at every evaluated update count: one column
    per budget, headed by the update count and the mean environment steps spent to get there."""
    budgets = sorted({p["updates"] for g in groups.values() for p in g["curve"]})
    steps = {u: [p["env_steps"] for g in groups.values() for p in g["curve"] if p["updates"] == u] for u in budgets}
    lines = ["| run |" + "".join(f" {u} updates ({sum(steps[u]) / len(steps[u]):,.0f} env steps) |" for u in budgets),
             "|---|" + "---|" * len(budgets)]
    for label, g in groups.items():
        at = {p["updates"]: p for p in g["curve"]}
        cells = [fmt(at[u]["mean"], at[u]["std"], at[u]["n"]) if u in at else "–" for u in budgets]
        lines.append(f"| {label} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def steps_to_reach(curve: list[dict], target: float) -> float | None:
    """Mean environment steps at the first evaluation whose mean success is ≥ `target` (None: never)."""
    return next((p["env_steps"] for p in curve if p["mean"] >= target - 1e-9), None)


def efficiency(groups: dict, reference: str) -> dict:
    """Sample efficiency against `reference` (GRPO): the steps each label needs to reach the
    reference's final mean eval success, and that as a fraction of the reference's own steps.
    The fraction is None when the reference never rose above its first evaluation (0 steps)."""
    if reference not in groups:
        raise SystemExit(f"--reference {reference!r} is not one of the labels {list(groups)}")
    curve = groups[reference]["curve"]
    if not curve:
        return {"reference": reference, "target": None, "steps": {}, "fraction": {}}
    target = curve[-1]["mean"]
    ref_steps = steps_to_reach(curve, target)
    steps = {label: steps_to_reach(g["curve"], target) for label, g in groups.items()}
    fraction = {label: (s / ref_steps if s is not None and ref_steps else None) for label, s in steps.items()}
    return {"reference": reference, "target": target, "steps": steps, "fraction": fraction}


def efficiency_table(eff: dict) -> str:
    if eff["target"] is None:
        return ""
    lines = [f"Environment steps to reach {eff['reference']}'s final mean eval success ({eff['target']:.3f}):", "",
             f"| run | env steps | × {eff['reference']}'s |", "|---|---|---|"]
    for label, s in eff["steps"].items():
        f = eff["fraction"][label]
        lines.append(f"| {label} | {'not reached' if s is None else f'{s:,.0f}'} | {'–' if f is None else f'{f:.2f}'} |")
    if eff["steps"].get(eff["reference"]) == 0:
        lines += ["", f"{eff['reference']} never rose above its first evaluation, so there is no budget to compare."]
    return "\n".join(lines)


def paired_differences(groups: dict, reference: str) -> dict[str, dict]:
    """Final eval success of each label minus the reference's, seed by seed (seeds both ran):
    {label: {"seeds", "differences", "mean", "se"}}; se = sample std / √n (0 for one seed)."""
    ref = {seed: v for seed, v in zip(groups[reference]["seeds"], groups[reference]["final_by_run"])
           if seed is not None and v is not None}
    out = {}
    for label, g in groups.items():
        if label == reference:
            continue
        pairs = sorted((seed, v - ref[seed]) for seed, v in zip(g["seeds"], g["final_by_run"])
                       if seed in ref and v is not None)
        if pairs:
            mean, std = mean_std([d for _, d in pairs])
            out[label] = {"seeds": [s for s, _ in pairs], "differences": [d for _, d in pairs],
                          "mean": mean, "se": std / math.sqrt(len(pairs))}
    return out


def paired_table(paired: dict, reference: str) -> str:
    if not paired:
        return ""
    lines = [f"Final eval success minus {reference}'s, paired by seed (mean ± standard error):", "",
             "| run | per seed | mean ± s.e. |", "|---|---|---|"]
    for label, p in paired.items():
        per_seed = ", ".join(f"s{seed}: {d:+.3f}" for seed, d in zip(p["seeds"], p["differences"]))
        lines.append(f"| {label} | {per_seed} | {mean_se_cell(p['mean'], p['se'], len(p['differences']))} |")
    return "\n".join(lines)


def delta_table(groups: dict) -> str:
    """Δ statistics of the labels that computed Δ: mean ± std over their runs of each run's mean."""
    rows = []
    for label, g in groups.items():
        cells = []
        for _, key in DELTA_KEYS:
            values = [d[key] for d in g["deltas"] if key in d]
            cells.append(fmt(*mean_std(values), len(values), 4) if values else "–")
        if any(c != "–" for c in cells):
            rows.append(f"| {label} |" + "".join(f" {c} |" for c in cells))
    if not rows:
        return ""
    head = ["Per-token Δ = log π_old(token | skill) − log π_old(token), mean over iterations (mean ± std over runs):", "",
            "| run |" + "".join(f" {name} |" for name, _ in DELTA_KEYS), "|---|" + "---|" * len(DELTA_KEYS)]
    return "\n".join(head + rows)


def plot_curves(groups: dict, path: str) -> bool:
    """Eval success vs env steps (left) and vs updates (right), one line per label, ± 1 s.e. band.
    Returns False (with a message) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("[eval] matplotlib is not installed: no plot, table only (pip install matplotlib)", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, g in groups.items():
        pts = g["curve"]
        if not pts:
            continue
        mean = [p["mean"] for p in pts]
        se = [p["std"] / math.sqrt(p["n"]) for p in pts]  # band: ± one standard error over seeds
        low = [p["mean"] - e for p, e in zip(pts, se)]
        high = [p["mean"] + e for p, e in zip(pts, se)]
        for ax, xkey in zip(axes, ("env_steps", "updates")):
            x = [p[xkey] for p in pts]
            line, = ax.plot(x, mean, marker="o", label=f"{label} (n={len(g['runs'])})")
            if len(g["runs"]) > 1:
                ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())
    axes[0].set_xlabel("environment steps")
    axes[1].set_xlabel("updates (iterations)")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylabel("eval success rate (band: ± 1 s.e. over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def default_plot_path(args) -> str:
    """--compare without --plot: curves.png in the folder of --out (or --md), else in the first run's."""
    beside = args.out or args.md
    folder = Path(beside).parent if beside else Path(args.compare[0])
    return str(folder / "curves.png")


def write_text(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to evaluate (default: --policy on --env)")
    what.add_argument("--run", default=None, help="a train.py run folder: its config.json and checkpoint/model")
    what.add_argument("--checkpoint", default=None, help="a model folder written by policy.save_policy")
    what.add_argument("--model", default=None, help="an untrained model: tiny | smollm2 | hub id | folder")
    what.add_argument("--policy", default="expert", choices=["expert", "random"],
                      help="baseline without a model: expert (the env's oracle) or random admissible actions")
    what.add_argument("--compare", nargs="+", default=None, metavar="RUN", help="compare these run folders")
    what.add_argument("--labels", nargs="+", default=None, help="--compare: one label per run (same label = seeds)")
    what.add_argument("--plot", default=None,
                      help="--compare: learning-curve PNG (default: curves.png beside --out / --md, else in the first run)")
    what.add_argument("--reference", default=None,
                      help="--compare: label the sample efficiency is measured against (default grpo, else the first)")
    env = parser.add_argument_group("environment (ignored with --run)")
    env.add_argument("--env", default=None, choices=ENVS, help="environment (default alfworld)")
    env.add_argument("--split", default="eval", help="task split (train | eval)")
    env.add_argument("--episodes", type=int, default=60, help="episodes per seed, cycling over the tasks")
    env.add_argument("--batch", type=int, default=None, help="copies stepped together (8 baselines, 64 models)")
    env.add_argument("--max-steps", type=int, default=None, help="episode length (env default)")
    env.add_argument("--history-length", type=int, default=None, help="H (env default; tiny: TINY_HISTORY)")
    env.add_argument("--n-games", "--alfworld-games", dest="n_games", type=int, default=None,
                     help="generated ALFWorld split size (default 240 train / 60 eval)")
    env.add_argument("--world", "--alfworld-world", dest="world", default="small", choices=["small", "full"],
                     help="generated ALFWorld world size (worlds.WORLDS; default small)")
    env.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                     help="template with <think> (default: on, off for --model tiny)")
    dec = parser.add_argument_group("decoding and seeds")
    dec.add_argument("--temperature", type=float, default=0.4, help="sampling temperature (paper: 0.4)")
    dec.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    dec.add_argument("--max-new-tokens", type=int, default=None, help="tokens per response (tiny 24, WebShop 48; else 512)")
    dec.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds; mean ± std over them")
    dec.add_argument("--seed", type=int, default=0, help="single seed (when --seeds is not given)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, help="write all numbers (per seed and aggregated) as JSON here")
    out.add_argument("--md", default=None, help="write the Markdown table here too")
    args = parser.parse_args(argv)

    if args.compare:
        groups = compare_runs(args.compare, args.labels)
        reference = args.reference or ("grpo" if "grpo" in groups else next(iter(groups)))
        eff = efficiency(groups, reference)
        budgets = "Eval success at each budget (mean ± std over seeds):\n\n" + budget_table(groups)
        paired = paired_differences(groups, reference)
        parts = (split_note(groups), compare_table(groups), budgets, change_table(groups), efficiency_table(eff),
                 paired_table(paired, reference), delta_table(groups))
        table = "\n\n".join(part for part in parts if part)
        print(table)
        write_text(args.md, table + "\n")
        plot_path = args.plot or default_plot_path(args)
        plotted = plot_curves(groups, plot_path)
        if plotted:
            print(f"[eval] plot: {plot_path}", file=sys.stderr)  # stdout stays the Markdown table
        result = {"groups": groups, "efficiency": eff, "paired": paired, "plot": plot_path if plotted else None}
        write_text(args.out, json.dumps(result, indent=1))
        return result

    if sum(bool(x) for x in (args.run, args.checkpoint, args.model)) > 1:
        raise SystemExit("give at most one of --run, --checkpoint, --model")
    args.seeds = args.seeds if args.seeds is not None else [args.seed]
    if args.run or args.checkpoint or args.model:
        if args.env is None and not args.run:
            args.env = "alfworld"
        settings, env_name, summaries, records = evaluate_model(args)
    else:
        settings, env_name, summaries, records = evaluate_baseline(args)
    agg = aggregate(summaries)
    source = settings["source"]
    decoding = settings.get("decoding", "")
    title = f"{env_name} / {args.split} / {source['kind']} {source['path']}" + (f" / {decoding}" if decoding else "")
    table = eval_table(agg, env_name, args.seeds, title)
    print(table)
    write_text(args.md, table + "\n")
    result = {"settings": settings, "per_seed": {str(s): summ for s, summ in zip(args.seeds, summaries)},
              "aggregate": agg, "args": vars(args), "records": records}
    write_text(args.out, json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
