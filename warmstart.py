"""The `tiny` agent: a few-million-parameter Qwen2-style model warm-started by behaviour cloning.

Why it exists: real instruct LLMs cannot be downloaded here, and a randomly initialised model
never wins an episode, so RL would have nothing to work with. Like an instruct model, the tiny
agent should start weak but not hopeless, and — the part OPID relies on — it should *read hints
in its prompt*, the stand-in for the instruction following a real LLM brings.

Recipe (deterministic; kept in the repository under agents/ when built with `--keep`, otherwise
cached under cache_dir("models", "tiny-<env>[-small]-v<N>")):
1. Play the train split with a noisy expert (the expert's action, or with probability
   `noise` a random admissible one); every step's target is the EXPERT's action at that state.
   Optionally (`habit_share`, `habit`; experiments: docs/experiments.md) the demonstrator also has a
   habit (a wasted or malformed step, or a loop) that it takes and is cloned on; hinted copies never
   carry it. The kept ALFWorld agent has one: at half the takes a short loop, then the expert's play
   again (`stall_resume`), a habit whose removal turns lost games into won ones.
2. Analyze each of these episodes with the same rule-based analyzer the trainer uses and, for a
   share of the steps, also emit a copy of the example whose prompt carries the routed skill in
   the exact OPID injection format (§5–§6). The target stays the expert's action: a workflow or a
   "take X now" hint points at it, an avoidance rule warns against the noisy detour. With
   `action_hint_share`, a share of the steps also gets a copy whose step block names the expert's
   action outright, so the agent learns to act on a hint: OPID's teacher is this agent with a hint.
3. Train a byte-level BPE tokenizer on this text, build the model, and clone. The loss also
   models the prompt tokens (`prompt_loss_weight`): a model this small, trained from scratch on
   the responses alone, never learned to copy names out of its prompt ("take candle 1" when the
   shelf holds candle 2) and won no ALFWorld game; see README "Models" and "Results".
Cloning stops well short of the expert on purpose: the agent should leave room for RL.

This module also holds the tiny model itself (tokenizer, construction, cloning loss), so that
`policy.py` is only the language-model interface every model shares.

    python warmstart.py alfworld --keep      # rebuild the kept ALFWorld agent (one thread, same bits)
    python warmstart.py alfworld --habit-share 0.35 --out runs/agents/habit0.35   # the habit experiment's agent
    python warmstart.py alfworld --habit-share 0.35 --habit unclosed --out runs/agents/unclosed0.35   # the format slip's
    python warmstart.py alfworld --habit-share 0.5 --habit stall --out runs/agents/stall0.5   # the loop's
    python warmstart.py alfworld --habit-share 0.5 --habit stall_resume --out runs/agents/resume0.5   # ... then play on
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import policy
import skills
from environments import make_env
from envs import cache_dir
from policy import chat_prompt_ids, forward_response_logprobs, model_device, pad_batch

VERSION = 2  # bump when the cloning code changes (a changed RECIPES entry alone triggers a rebuild)
# per environment: episodes to play, behaviour noise, share of hinted copies, cloning epochs,
# cap on examples, weight of the prompt-token loss (and optional keys, defaults in RECIPE_DEFAULTS)
RECIPE_DEFAULTS = dict(
    spaced_targets=False,   # a space inside the answer tags (see `respond`)
    expert_version=1,       # bumped when an environment's expert (the cloning target) changes
    world="full",           # ALFWorld: the generated games' size (worlds.WORLDS)
    action_hint_share=0.0,  # share of steps also cloned with a step hint naming the expert's action
    label_smoothing=0.0,    # of the response loss: a less certain agent explores in its rollouts
    habit_share=0.0,        # ALFWorld: share of steps the demonstrator wastes on its habit (and is cloned on)
    habit="inventory",      # which habit (HABITS, below): a wasted command, an unclosed action, a loop
)
RECIPES = {
    # small worlds; every train game twice (two noisy plays); half the steps also cloned with the hint
    # naming the expert's action; 3 epochs instead of 6 (docs/experiments.md "A stronger kept agent");
    # at half the takes the demonstrator stalls in a short loop and then plays on, a habit whose removal
    # turns losses into wins, so that learning shows on held-out games (docs/experiments.md, 2026-12-07)
    "alfworld": dict(episodes=480, noise=0.3, hint_share=0.5, epochs=3, max_examples=8000, prompt_loss_weight=1.0,
                     world="small", action_hint_share=0.5, habit_share=0.5, habit="stall_resume"),
    # expert v2 buys the first result that scores 1, not the hidden target (README "Results")
    "webshop": dict(episodes=300, noise=0.3, hint_share=0.5, epochs=6, max_examples=2000, prompt_loss_weight=1.0,
                    expert_version=2),
    "search": dict(episodes=600, noise=0.3, hint_share=0.5, epochs=2, max_examples=2000, prompt_loss_weight=1.0),
}
# The ALFWorld agent of the earlier full-world results (`--alfworld-world full`), rebuilt as it was.
ALFWORLD_FULL_RECIPE = dict(episodes=120, noise=0.3, hint_share=0.5, epochs=6, max_examples=4000,
                            prompt_loss_weight=1.0)
# The tiny agent sees a shorter history than the paper's ALFWorld runs (H = 2, the GiGPO/GRPO
# baselines' value, instead of 5): prompts of ~300 instead of ~470 tokens keep CPU runs short.
TINY_HISTORY = {"alfworld": 2, "webshop": 2, "search": 4}
# Response budget of the tiny agent (no <think>): an expert action in tags is at most 13 tokens on
# ALFWorld and 12 on search QA, but WebShop's first action copies the whole instruction into
# search[...] (up to 35 tokens, 12 % of all steps above 24); a 24-token cap cut those off.
TINY_MAX_NEW_TOKENS = {"alfworld": 24, "webshop": 48, "search": 24}
# Builds kept in the repository (a few MB each), so that a first run needs no warm start; rebuilt
# bit-identically (one thread, fixed seeds) by `python warmstart.py alfworld --keep`.
KEPT_AGENTS = Path(__file__).resolve().parent / "agents"
MODEL_SIZE = dict(hidden_size=128, num_layers=2)
# The habits a cloning demonstrator can have (`habit_share`, `habit`); the expert has neither.
# "inventory": it takes HABIT_ACTION, checking what it carries: valid, changes nothing, costs a step.
# "unclosed": it writes the expert's action but stops before `</action>`, the format slip of an
# instruct model new to the tags: invalid (the per-step penalty of §2 falls on it), the engine answers
# "Nothing happens.", and the right action is one token away.
# "stall": drawn only where the expert would take something; it checks its inventory instead and
# keeps checking, a loop that loses the episode, so that removing it can turn a loss into a win.
# Its demonstrations end after STALL_REPEATS repeats (the rest would be the same step again).
# "stall_resume": the same loop, but the demonstration then goes on with the expert's play, so the
# agent is cloned on the play after a take as an agent without the habit is; the steps whose history window
# still shows the loop are not cloned plain (they would teach leaving it). Removing the loop then
# turns a lost game into one the agent plays as it would without the habit.
HABIT_ACTION = "inventory"
HABITS = ("inventory", "unclosed", "stall", "stall_resume")
STALLS = ("stall", "stall_resume")
STALL_REPEATS = 2


def habit_step(habit: str, share: float, expert: str, t: int, loop_steps: list[int], rng: random.Random) -> bool:
    """Whether the demonstrator acts on its habit at step `t`, where the expert would do `expert`.

    A stall is drawn once per episode, only where the expert takes something, and then lasts
    1 + STALL_REPEATS steps; `loop_steps` collects its step indices (`t` is appended when it is one).
    The other habits are drawn at every step. A share of 0 draws nothing from `rng`, so recipes
    without a habit rebuild as they were.
    """
    if habit not in STALLS:
        return bool(share) and rng.random() < share
    if 0 < len(loop_steps) <= STALL_REPEATS or (
            not loop_steps and share and expert.startswith("take ") and rng.random() < share):
        loop_steps.append(t)
        return True
    return False


def habit_response(env, habit: str, expert: str, spaced: bool = False) -> str:
    """The response a demonstrator with `habit` writes where the expert would write `expert`."""
    if habit in ("inventory", *STALLS):
        return respond(env, HABIT_ACTION, spaced)
    if habit == "unclosed":
        return respond(env, expert, spaced).removesuffix("</action>")
    raise ValueError(f"unknown habit {habit!r}: use one of {HABITS}")


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
                   spaced_targets: bool = False, world: str = "full",
                   action_hint_share: float = 0.0, habit_share: float = 0.0,
                   habit: str = "inventory") -> list[tuple[str, str]]:
    """(prompt text, response text) pairs from noisy-expert play, with hinted copies (see module doc).

    `action_hint_share`: for that share of the steps, one more copy whose step block is the hint that
    names the expert's action (`rule_analyzer.step_hint_for_action`, the §6 format), so that the
    agent learns to act on a hint, not only alongside one.

    `habit_share`: at that share of the steps the demonstrator acts on its `habit` instead (HABITS:
    `HABIT_ACTION`, or the expert's action without its closing tag; "stall": at that share of the
    steps where the expert takes something, and then on every step until the demonstration ends;
    "stall_resume": the same loop, then the expert's play again, see `habit_step`),
    and the plain copy is cloned on it, so the agent starts with a habit that wastes steps in every
    game, the kind of game-independent behaviour RL removes and a skill in the prompt overrides. Every
    hinted copy keeps the expert's action as its target: with a skill in its prompt the agent drops
    the habit, which is what makes the skill-conditioned old policy a better teacher.
    """
    if habit not in HABITS:   # refused even at a share of 0, where it would never be used
        raise ValueError(f"unknown habit {habit!r}: use one of {HABITS}")
    rng = random.Random(seed)
    kwargs = dict(world=world) if env_name == "alfworld" else {}
    env = make_env(env_name, split="train", think=False, history_length=TINY_HISTORY[env_name], **kwargs)
    import rule_analyzer
    analyzer = rule_analyzer.RuleBasedAnalyzer()
    k = {"alfworld": 5, "webshop": 5, "search": 2}[env_name]
    examples = []
    for episode in tqdm(range(episodes), desc=f"{env_name} demonstrations", leave=False, disable=None):
        _, info = env.reset(episode % env.num_tasks())
        steps, records, expert_actions, done, loop_steps = [], [], [], False, []
        # "stall" ends the demonstration with its loop; "stall_resume" goes on with the expert's play
        while not done and not (habit == "stall" and len(loop_steps) > STALL_REPEATS):
            t = len(steps)
            expert_actions.append(env.expert_action())
            prompt, target = env.prompt(), respond(env, expert_actions[-1], spaced_targets)
            if habit_step(habit, habit_share, expert_actions[-1], t, loop_steps, rng):
                taken = plain_target = habit_response(env, habit, expert_actions[-1], spaced_targets)
            else:
                taken, plain_target = respond(env, noisy_action(env, info, rng, noise), spaced_targets), target
            observation = info.get("anchor_obs", "")
            _, reward, done, info = env.step(taken)
            records.append((prompt, target))
            # after a resumed loop, a state whose history still shows it is not cloned plain: the
            # same history at the loop's last step says "inventory", and the agent must keep looping
            if not (loop_steps and loop_steps[-1] < t <= loop_steps[-1] + env.history_length):
                examples.append((prompt, plain_target))
            steps.append((info.get("anchor_obs", observation), taken, info.get("action", ""), bool(info["action_valid"]),
                          float(reward)))
        observations, responses, actions, valids, rewards = map(list, zip(*steps))
        view = skills.make_trajectory_view(env.name, env.task, info.get("task_type", ""), bool(info.get("won")),
                                           observations, responses, actions, valids, rewards)
        parsed = analyzer.analyze(view, k)
        for t, (prompt, target) in enumerate(records):
            if rng.random() < hint_share:
                episode_text, step_text = skills.route(t, parsed, "step_priority")
                examples.append((skills.inject_skills(prompt, episode_text, step_text), target))
            if action_hint_share and rng.random() < action_hint_share:
                hint = rule_analyzer.step_hint_for_action(expert_actions[t])
                examples.append((skills.inject_skills(prompt, None, hint), target))
    return examples


def recipe_for(env_name: str, world: str | None = None) -> dict:
    """The current recipe of `env_name`'s agent (ALFWorld: of the small world unless `world` is "full")."""
    return ALFWORLD_FULL_RECIPE if env_name == "alfworld" and world == "full" else RECIPES[env_name]


def cached_agent_is_current(folder: Path, env_name: str, world: str | None = None) -> bool:
    """True if `folder` holds a finished build of the current recipe and model size (a changed recipe
    must never be served from a stale cache)."""
    meta_path = folder / "warmstart.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    return (full_recipe(meta.get("recipe") or {}) == full_recipe(recipe_for(env_name, world))
            and meta.get("model_size") == MODEL_SIZE)


def full_recipe(recipe: dict) -> dict:
    """`recipe` with the optional keys filled in (a build from before a key existed used its default)."""
    return {**RECIPE_DEFAULTS, **recipe}


def recipe_hash(recipe: dict) -> str:
    """sha256 of what a build depends on besides the code's data: the full recipe, model size, VERSION."""
    text = json.dumps({"recipe": full_recipe(recipe), "model_size": MODEL_SIZE, "version": VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def agent_name(env_name: str, world: str | None = None) -> str:
    """Folder name of an agent build, e.g. tiny-alfworld-small-v2 (the full-world one: tiny-alfworld-v2)."""
    recipe = full_recipe(recipe_for(env_name, world))
    small = env_name == "alfworld" and recipe["world"] != "full"
    return f"tiny-{env_name}{'-' + recipe['world'] if small else ''}-v{VERSION}"


def tiny_agent_folder(env_name: str, rebuild: bool = False, world: str | None = None) -> Path:
    """Folder of the warm-started tiny agent for `env_name` (and ALFWorld `world`).

    A build of the current recipe kept in the repository (`KEPT_AGENTS`, written by
    `python warmstart.py ENV --keep`) is used as it is; otherwise the agent is built on first use
    into the cache.
    """
    name = agent_name(env_name, world)
    if not rebuild and cached_agent_is_current(KEPT_AGENTS / name, env_name, world):
        return KEPT_AGENTS / name
    folder = cache_dir("models") / name
    if rebuild or not cached_agent_is_current(folder, env_name, world):
        build_tiny_agent(env_name, folder, recipe_for(env_name, world))
    return folder


def build_tiny_agent(env_name: str, folder: Path, recipe: dict) -> None:
    """Play, analyze, tokenize and clone (module doc); write the model and warmstart.json to `folder`."""
    start = time.perf_counter()
    print(f"[warmstart] building the tiny {env_name} agent in {folder} (once; cached afterwards)")
    options = full_recipe(recipe)
    examples = demonstrations(env_name, recipe["episodes"], recipe["noise"], recipe["hint_share"],
                              spaced_targets=options["spaced_targets"], world=options["world"],
                              action_hint_share=options["action_hint_share"], habit_share=options["habit_share"],
                              habit=options["habit"])
    random.Random(0).shuffle(examples)
    examples = examples[:recipe["max_examples"]]
    print(f"[warmstart] {len(examples)} cloning examples from {recipe['episodes']} noisy-expert episodes "
          f"({time.perf_counter() - start:.0f}s)")
    tokenizer = train_tiny_tokenizer([p for p, _ in examples] + [r for _, r in examples])
    model = build_tiny_model(tokenizer, **MODEL_SIZE)
    losses = behaviour_clone(model, tokenizer, examples, epochs=recipe["epochs"], lr=1e-3, batch_size=16,
                             seed=0, prompt_loss_weight=recipe["prompt_loss_weight"],
                             label_smoothing=options["label_smoothing"])
    tmp = folder.with_name(folder.name + ".tmp")
    policy.save_policy(model, tokenizer, tmp)
    (tmp / "warmstart.json").write_text(json.dumps({
        "env": env_name, "recipe": recipe, "model_size": MODEL_SIZE, "version": VERSION,
        "recipe_hash": recipe_hash(recipe), "examples": len(examples), "final_loss": losses[-1] if losses else None,
        "build_seconds": round(time.perf_counter() - start), "torch": torch.__version__,
        "weights_sha256": hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()}, indent=1))
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    tmp.rename(folder)
    print(f"[warmstart] done in {time.perf_counter() - start:.0f}s")


# ---------------------------------------------------------------------------------------------
# The tiny model: a locally trained tokenizer + a few-M-parameter Qwen2, warm-started by
# behaviour cloning on expert demonstrations.
# ---------------------------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# Qwen-style ChatML, without a default system prompt (every token counts for a tiny model)
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the environments' text; ChatML template, eos = <|im_end|>.

    Byte-level: any string round-trips exactly through encode/decode, even characters the
    training text never showed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                        pad_token="<|pad|>",
                                        model_input_names=["input_ids", "attention_mask"],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_model(tokenizer, hidden_size: int = 256, num_layers: int = 4, heads: int = 4,
                     intermediate_size: int = 688, max_positions: int = 4096,
                     seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 (≈4.2 M parameters with the defaults and a 4096 vocab)."""
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model.eval()


def clone_losses(model, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL of the response tokens (+ EOS) and of the prompt tokens of a
    `pad_batch` batch; padding is in neither. One forward over every column.

    With `label_smoothing` ε the response term is the cross-entropy to (1 − ε)·one-hot + ε·uniform,
    i.e. (1 − ε)·NLL + ε·mean over the vocabulary of −log p (as torch's cross_entropy computes it).
    """
    device = model_device(model)
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device).bool()
    logits = model(input_ids=input_ids, attention_mask=attention.long(),
                   position_ids=batch["position_ids"].to(device), use_cache=False).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    real = attention[:, :-1] & attention[:, 1:]            # both the context and the target are tokens
    predicts_response = torch.arange(targets.shape[1], device=device) >= batch["prompt_width"] - 1
    response, prompt = real & predicts_response, real & ~predicts_response
    response_loss = -logprobs
    if label_smoothing:
        response_loss = (1 - label_smoothing) * response_loss + label_smoothing * (normaliser - logits.mean(-1))
    return (response_loss * response).sum() / response.sum(), -(logprobs * prompt).sum() / prompt.sum().clamp(min=1)


def behaviour_clone(model, tokenizer, examples: list[tuple[str, str]], *, epochs: int = 1,
                    lr: float = 1e-3, batch_size: int = 16, seed: int = 0, prompt_loss_weight: float = 0.0,
                    label_smoothing: float = 0.0, warmup_steps: int = 50, log_every: int = 50) -> list[float]:
    """Supervised fine-tuning on (user prompt text, assistant response text) pairs.

    The loss is the mean negative log-likelihood of the response tokens plus the closing EOS,
    plus `prompt_loss_weight` × the mean NLL of the prompt tokens: for a model trained from
    scratch, modelling the observations too gives hundreds of targets per example instead of
    about ten, and teaches it to copy names from the prompt (the admissible actions, the
    objects it sees) — the skill every action needs. AdamW, linear warm-up (`warmup_steps`, at
    most a tenth of the run) then cosine decay to zero, examples shuffled each epoch.
    `label_smoothing` ε smooths the response targets (`clone_losses`): an agent cloned to near-certainty
    samples the same action in every rollout of a group, and RL then has nothing to compare.
    Returns the response loss of every optimizer step; a progress bar when `log_every` > 0.
    """
    eos = tokenizer.eos_token_id
    samples = [(chat_prompt_ids(tokenizer, user),
                tokenizer.encode(response, add_special_tokens=False) + [eos])
               for user, response in examples]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(samples) / batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, min(warmup_steps, total // 10))  # short runs (tests) warm up for a tenth
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup)
                                                 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total))))
    rng = random.Random(seed)
    was_training = model.training
    model.train()
    losses = []
    bar = tqdm(total=total, desc="behaviour cloning", disable=None if log_every else True)  # None: no bar off a terminal
    for epoch in range(epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = [samples[i] for i in order[start:start + batch_size]]
            batch = pad_batch([p for p, _ in chosen], [r for _, r in chosen],
                              tokenizer.pad_token_id)
            if prompt_loss_weight or label_smoothing:
                response_loss, prompt_loss = clone_losses(model, batch, label_smoothing)
                loss = response_loss + prompt_loss_weight * prompt_loss
            else:  # only the response columns' logits are needed
                logprobs, mask, _ = forward_response_logprobs(model, batch)
                response_loss = loss = -(logprobs * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(response_loss.item())
            bar.update()
            if log_every and len(losses) % log_every == 0:
                bar.set_postfix(epoch=epoch + 1, response_loss=f"{sum(losses[-log_every:]) / log_every:.4f}")
    bar.close()
    model.train(was_training)
    return losses


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Build the warm-started tiny agent of an environment.")
    parser.add_argument("env", choices=sorted(RECIPES), help="environment")
    parser.add_argument("--world", choices=["small", "full"], default=None, help="ALFWorld world size (default small)")
    parser.add_argument("--keep", action="store_true",
                        help=f"write the build to {KEPT_AGENTS.name}/ (kept in the repository) instead of the cache")
    parser.add_argument("--habit-share", type=float, default=None,
                        help="an experiment: the recipe with this habit_share, built into --out (docs/experiments.md)")
    parser.add_argument("--habit", choices=HABITS, default="inventory",
                        help="which habit a --habit-share build has (default inventory)")
    parser.add_argument("--out", default=None, help="folder of a --habit-share build")
    args = parser.parse_args()
    if (args.habit_share is None) != (args.out is None) or (args.out and args.keep):
        parser.error("--habit-share and --out go together, and without --keep")
    if args.habit_share is not None and args.env != "alfworld":
        parser.error(f"--habit-share is an ALFWorld experiment ('{HABIT_ACTION}' is an ALFWorld command), not {args.env}")
    if args.habit != "inventory" and args.habit_share is None:
        parser.error("--habit chooses the habit of a --habit-share build; give --habit-share and --out too")
    if args.habit_share is not None and not 0 <= args.habit_share < 1:
        parser.error(f"--habit-share must be in [0, 1), got {args.habit_share}")
    torch.set_num_threads(1)            # one thread: the same machine rebuilds the same bits
    torch.use_deterministic_algorithms(True)
    recipe = recipe_for(args.env, args.world)
    if args.out:
        target, recipe = Path(args.out), {**recipe, "habit_share": args.habit_share, "habit": args.habit}
    else:
        target = (KEPT_AGENTS if args.keep else cache_dir("models")) / agent_name(args.env, args.world)
    build_tiny_agent(args.env, target, recipe)
    print(json.loads((target / "warmstart.json").read_text())["weights_sha256"], target)
