"""How well does a warm-started tiny ALFWorld agent act, and does it follow hints?

Plays 30 eval-split games (held out from cloning; the small world unless --world full) with the noisy expert (30 % random admissible actions, seed 5), keeps the
first 300 states, and compares the agent's greedy action with the expert's — once on the plain
prompt and once with the rule analyzer's step hint for the expert's very action injected in OPID's
format (the teacher's view when the hint is perfect). Prints accuracy by kind of action.

    python scripts/warmstart_probe.py                      # the tiny agent (kept, cached, or built)
    python scripts/warmstart_probe.py --model FOLDER       # any tiny-style model folder
"""
import argparse
import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import policy  # noqa: E402
import rule_analyzer  # noqa: E402
import skills  # noqa: E402
import warmstart  # noqa: E402
from environments import make_env  # noqa: E402


def held_out_states(games: int = 30, limit: int = 300, seed: int = 5, world: str = "small") -> list[tuple[str, str]]:
    rng = random.Random(seed)
    env = make_env("alfworld", split="eval", think=False, history_length=warmstart.TINY_HISTORY["alfworld"],
                   world=world)
    states = []
    for game in range(games):
        _, info = env.reset(game)
        done = False
        while not done:
            states.append((env.prompt(), env.expert_action()))
            _, _, done, info = env.step(warmstart.respond(env, warmstart.noisy_action(env, info, rng, 0.3)))
    return states[:limit]


def kind(action: str) -> str:
    verb = action.split()[0]
    return "go to" if verb == "go" else ("open/close/look/examine" if verb in ("open", "close", "look", "examine") else "decisive")


def accuracy(model, tokenizer, prompts: list[str], targets: list[str]) -> dict:
    hit, total = collections.Counter(), collections.Counter()
    for start in range(0, len(prompts), 20):
        ids = [policy.chat_prompt_ids(tokenizer, p) for p in prompts[start:start + 20]]
        for target, g in zip(targets[start:start + 20], policy.generate(model, tokenizer, ids, max_new_tokens=24, greedy=True)):
            total[kind(target)] += 1
            hit[kind(target)] += g.text.strip() == warmstart.respond(None, target)
    return {k: f"{hit[k]}/{total[k]}" for k in sorted(total)} | {"all": round(sum(hit.values()) / sum(total.values()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the tiny ALFWorld agent of --world)")
    parser.add_argument("--world", choices=["small", "full"], default="small", help="generated world size")
    args = parser.parse_args()
    model, tokenizer = policy.load_policy(args.model or str(warmstart.tiny_agent_folder("alfworld", world=args.world)))
    states = held_out_states(world=args.world)
    prompts, targets = [p for p, _ in states], [t for _, t in states]
    hinted = [skills.inject_skills(p, None, rule_analyzer.step_hint_for_action(t)) for p, t in states]
    print("plain prompt :", accuracy(model, tokenizer, prompts, targets))
    print("with the hint:", accuracy(model, tokenizer, hinted, targets))


if __name__ == "__main__":
    main()
