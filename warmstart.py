"""The `tiny` agent: a few-million-parameter Qwen2-style model warm-started by behaviour cloning.

Why it exists: real instruct LLMs cannot be downloaded here, and a randomly initialised model
never wins an episode, so RL would have nothing to work with. Like an instruct model, the tiny
agent should start weak but not hopeless, and — the part OPID relies on — it should *read hints
in its prompt*, the stand-in for the instruction following a real LLM brings.

Recipe (deterministic, cached under cache_dir("models", "tiny-<env>-v<N>")):
1. Play the train split with a noisy expert (the expert's action, or with probability
   `noise` a random admissible one); every step's target is the EXPERT's action at that state.
2. Analyze each of these episodes with the same rule-based analyzer the trainer uses and, for a
   share of the steps, also emit a copy of the example whose prompt carries the routed skill in
   the exact OPID injection format (§5–§6). The target stays the expert's action: a workflow or a
   "take X now" hint points at it, an avoidance rule warns against the noisy detour.
3. Train a byte-level BPE tokenizer on this text, build the model, and clone. The loss also
   models the prompt tokens (`prompt_loss_weight`): a model this small, trained from scratch on
   the responses alone, never learned to copy names out of its prompt ("take candle 1" when the
   shelf holds candle 2) and won no ALFWorld game; see README "Models" and "Results".
Cloning stops well short of the expert on purpose: the agent should leave room for RL.
"""
from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import policy
import skills
from environments import make_env
from envs import cache_dir

VERSION = 2  # bump when the cloning code changes (a changed RECIPES entry alone triggers a rebuild)
# per environment: episodes to play, behaviour noise, share of hinted copies, cloning epochs,
# cap on examples, weight of the prompt-token loss (and optional keys, defaults in RECIPE_DEFAULTS)
RECIPE_DEFAULTS = dict(
    spaced_targets=False,  # a space inside the answer tags (see `respond`)
    expert_version=1,      # bumped when an environment's expert (the cloning target) changes
)
RECIPES = {
    "alfworld": dict(episodes=120, noise=0.3, hint_share=0.5, epochs=6, max_examples=4000, prompt_loss_weight=1.0),
    # expert v2 buys the first result that scores 1, not the hidden target (README "Results")
    "webshop": dict(episodes=300, noise=0.3, hint_share=0.5, epochs=6, max_examples=2000, prompt_loss_weight=1.0,
                    expert_version=2),
    "search": dict(episodes=600, noise=0.3, hint_share=0.5, epochs=2, max_examples=2000, prompt_loss_weight=1.0),
}
# The tiny agent sees a shorter history than the paper's ALFWorld runs (H = 2, the GiGPO/GRPO
# baselines' value, instead of 5): prompts of ~300 instead of ~470 tokens keep CPU runs short.
TINY_HISTORY = {"alfworld": 2, "webshop": 2, "search": 4}
# Response budget of the tiny agent (no <think>): an expert action in tags is at most 13 tokens on
# ALFWorld and 12 on search QA, but WebShop's first action copies the whole instruction into
# search[...] (up to 35 tokens, 12 % of all steps above 24); a 24-token cap cut those off.
TINY_MAX_NEW_TOKENS = {"alfworld": 24, "webshop": 48, "search": 24}
MODEL_SIZE = dict(hidden_size=128, num_layers=2)


def respond(env, action: str, spaced: bool = False) -> str:
    """The response text a tag-following agent without <think> writes for `action`.

    `spaced` puts a space inside the tags (`<search> Rilbrir Bemstund born </search>`). A byte-level
    BPE token carries its leading space, so "Rilbrir" right after ">" and " Rilbrir" in the question
    are different tokens; an agent cloned on unspaced targets must emit a token it has only seen for
    the training set's names, and on new questions it writes a memorised first name instead.
    """
    tagged = action if action.lstrip().startswith("<") else f"<action>{action}</action>"  # QA's oracle tags itself
    if spaced:
        tagged = re.sub(r"<(\w+)>\s*(.*?)\s*</\1>", r"<\1> \2 </\1>", tagged, flags=re.DOTALL)
    return tagged


def noisy_action(env, info: dict, rng: random.Random, noise: float) -> str:
    expert = env.expert_action()
    if rng.random() >= noise:
        return expert
    choices = [a for a in (info.get("admissible_actions") or []) if "<" not in a and a != expert]
    if env.name == "search":
        words = [w for w in env.task.split() if len(w) > 3]
        return f"<search>{rng.choice(words) if words else 'unknown'}</search>"
    return rng.choice(choices) if choices else expert


def demonstrations(env_name: str, episodes: int, noise: float, hint_share: float, seed: int = 0,
                   spaced_targets: bool = False) -> list[tuple[str, str]]:
    """(prompt text, response text) pairs from noisy-expert play, with hinted copies (see module doc)."""
    rng = random.Random(seed)
    env = make_env(env_name, split="train", think=False, history_length=TINY_HISTORY[env_name])
    import rule_analyzer
    analyzer = rule_analyzer.RuleBasedAnalyzer()
    k = {"alfworld": 5, "webshop": 5, "search": 2}[env_name]
    examples = []
    for episode in range(episodes):
        _, info = env.reset(episode % env.num_tasks())
        steps, records, done = [], [], False
        while not done:
            prompt, target = env.prompt(), respond(env, env.expert_action(), spaced_targets)
            taken = respond(env, noisy_action(env, info, rng, noise), spaced_targets)
            observation = info.get("anchor_obs", "")
            _, reward, done, info = env.step(taken)
            records.append((prompt, target))
            steps.append((info.get("anchor_obs", observation), taken, info.get("action", ""), bool(info["action_valid"]),
                          float(reward)))
        examples.extend(records)
        observations, responses, actions, valids, rewards = map(list, zip(*steps))
        view = skills.make_trajectory_view(env.name, env.task, info.get("task_type", ""), bool(info.get("won")),
                                           observations, responses, actions, valids, rewards)
        parsed = analyzer.analyze(view, k)
        for t, (prompt, target) in enumerate(records):
            if rng.random() < hint_share:
                episode_text, step_text = skills.route(t, parsed, "step_priority")
                examples.append((skills.inject_skills(prompt, episode_text, step_text), target))
    return examples


def cached_agent_is_current(folder: Path, env_name: str) -> bool:
    """True if `folder` holds a finished build of the current recipe and model size (a changed recipe
    must never be served from a stale cache)."""
    meta_path = folder / "warmstart.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    return (full_recipe(meta.get("recipe") or {}) == full_recipe(RECIPES[env_name])
            and meta.get("model_size") == MODEL_SIZE)


def full_recipe(recipe: dict) -> dict:
    """`recipe` with the optional keys filled in (a build from before a key existed used its default)."""
    return {**RECIPE_DEFAULTS, **recipe}


def tiny_agent_folder(env_name: str, rebuild: bool = False) -> Path:
    """Folder of the warm-started tiny agent for `env_name`; built (minutes) on first use."""
    folder = cache_dir("models") / f"tiny-{env_name}-v{VERSION}"
    if rebuild or not cached_agent_is_current(folder, env_name):
        build_tiny_agent(env_name, folder, RECIPES[env_name])
    return folder


def build_tiny_agent(env_name: str, folder: Path, recipe: dict) -> None:
    """Play, analyze, tokenize and clone (module doc); write the model and warmstart.json to `folder`."""
    start = time.perf_counter()
    print(f"[warmstart] building the tiny {env_name} agent in {folder} (once; cached afterwards)")
    examples = demonstrations(env_name, recipe["episodes"], recipe["noise"], recipe["hint_share"],
                              spaced_targets=full_recipe(recipe)["spaced_targets"])
    random.Random(0).shuffle(examples)
    examples = examples[:recipe["max_examples"]]
    print(f"[warmstart] {len(examples)} cloning examples from {recipe['episodes']} noisy-expert episodes "
          f"({time.perf_counter() - start:.0f}s)")
    tokenizer = policy.train_tiny_tokenizer([p for p, _ in examples] + [r for _, r in examples])
    model = policy.build_tiny_model(tokenizer, **MODEL_SIZE)
    losses = policy.behaviour_clone(model, tokenizer, examples, epochs=recipe["epochs"], lr=1e-3, batch_size=16,
                                    seed=0, prompt_loss_weight=recipe["prompt_loss_weight"], log_every=50)
    tmp = folder.with_name(folder.name + ".tmp")
    policy.save_policy(model, tokenizer, tmp)
    (tmp / "warmstart.json").write_text(json.dumps({
        "env": env_name, "recipe": recipe, "model_size": MODEL_SIZE, "examples": len(examples),
        "final_loss": losses[-1] if losses else None, "build_seconds": time.perf_counter() - start}, indent=1))
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    print(f"[warmstart] done in {time.perf_counter() - start:.0f}s")
