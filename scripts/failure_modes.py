"""Where does the tiny ALFWorld agent lose held-out games?

Plays the held-out games once each at the evaluation temperature (T = 0.4) with the kept tiny agent
(or a trained run's checkpoint) and prints, for won and lost episodes apart: episodes, mean
steps, how many ran into the step limit, the share of steps the engine answered with "Nothing
happens." (a no-op: the command named an object or place the room does not offer), the share of
steps that were not in that step's admissible list, the share that repeated the previous action,
the share spent on the cloning demonstrator's habit (`warmstart.HABIT_ACTION`, "inventory"), the
share of malformed responses (invalid by format: the "unclosed" habit's `<action>…` without its
closing tag, among others), and the no-op commands by verb. docs/experiments.md reports what it printed.

    python scripts/failure_modes.py                        # the kept tiny agent, seed 0
    python scripts/failure_modes.py --run runs/NAME        # a trained run's checkpoint
    python scripts/failure_modes.py --model FOLDER         # another tiny agent build (warmstart.py)
"""
import argparse
import ast
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import policy  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
import warmstart  # noqa: E402
from alfworld_env import NOTHING_HAPPENS  # noqa: E402
from environments import make_env  # noqa: E402


def admissible_in(prompt_text: str) -> list[str]:
    """The admissible list the prompt showed (the line "Admissible actions: [...]"), or []."""
    for line in prompt_text.splitlines():
        if line.startswith("Admissible actions: "):
            return ast.literal_eval(line[len("Admissible actions: "):])
    return []


def step_stats(trajs, max_steps: int) -> dict[str, dict]:
    """Per outcome ("won", "lost"): episode and step counts and the shares printed below."""
    out = {}
    for label, won in (("won", True), ("lost", False)):
        group = [t for t in trajs if t.won == won]
        steps = noops = outside = repeats = habits = malformed = at_limit = 0
        verbs = collections.Counter()
        for t in group:
            at_limit += len(t.samples) >= max_steps
            for k, s in enumerate(t.samples):
                steps += 1
                outside += s.action not in admissible_in(s.prompt_text)
                repeats += k > 0 and s.action == t.samples[k - 1].action
                habits += s.action == warmstart.HABIT_ACTION
                malformed += not s.valid
                # the answer to step k is the observation step k + 1 was taken on
                if k + 1 < len(t.samples) and t.samples[k + 1].observation.startswith(NOTHING_HAPPENS):
                    noops += 1
                    verbs[s.action.split(" ")[0] if s.action else "(none)"] += 1
        n = max(1, steps)
        out[label] = {"episodes": len(group), "mean_steps": steps / max(1, len(group)), "at_step_limit": at_limit,
                      "noop_share": noops / n, "not_admissible_share": outside / n, "repeat_share": repeats / n,
                      "habit_share": habits / n, "malformed_share": malformed / n,
                      "noop_verbs": dict(verbs.most_common())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run", help="a train.py run folder (its checkpoint/model); default: the kept tiny agent")
    which.add_argument("--model", help="a tiny agent folder (a warmstart.py build); default: the kept tiny agent")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the evaluation")
    parser.add_argument("--temperature", type=float, default=0.4, help="sampling temperature")
    args = parser.parse_args()
    cfg = train.Config(env="alfworld")
    train.resolve_defaults(cfg)
    if args.run:
        model, tokenizer = policy.load_policy(str(Path(args.run) / "checkpoint" / "model"), device="cpu")
    elif args.model:
        model, tokenizer = policy.load_policy(args.model, device="cpu")
    else:
        model, tokenizer = train.load_model(cfg, torch.device("cpu"))
    model.eval()
    kwargs = train.env_kwargs(cfg)
    make = lambda: make_env("alfworld", split="eval", **kwargs)  # noqa: E731
    num_games = make().num_tasks()
    summary, trajs = rollout.evaluate_policy(model, tokenizer, make, num_games, episodes=num_games,
                                             max_new_tokens=cfg.max_new_tokens, temperature=args.temperature,
                                             seed=args.seed)
    print(f"{num_games} held-out games, T = {args.temperature}, seed {args.seed}: "
          f"success {summary['success_rate']:.3f}, step limit {cfg.max_steps}")
    for label, s in step_stats(trajs, cfg.max_steps).items():
        print(f"{label:5s} episodes {s['episodes']:3d}  mean steps {s['mean_steps']:5.1f}  at the step limit "
              f"{s['at_step_limit']:3d}  no-op steps {s['noop_share']:.3f}  not admissible {s['not_admissible_share']:.3f}"
              f"  same as the previous action {s['repeat_share']:.3f}  habit {s['habit_share']:.3f}  malformed {s['malformed_share']:.3f}  no-ops by verb {s['noop_verbs']}")


if __name__ == "__main__":
    main()
