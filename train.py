"""Train an LLM agent with OPID (or GRPO and the other baselines) in a multi-turn text environment.

    python train.py                                  # OPID, tiny model, generated ALFWorld games, CPU
    python train.py --algo grpo                      # the outcome-only baseline
    python train.py --model smollm2 --iters 1        # one iteration with a real (135M) instruct model
    python train.py --resume runs/<name>             # continue a run from its last checkpoint
    python train.py --help                           # every knob, one line each

One iteration reads in the order of the paper's figure (OPID_SPEC §2–§8):
rollout groups → trajectory records → skills → augmented prompts → teacher log-probs → Δ →
combined advantage → PPO update.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

import opid
import policy
import rollout
import skills
from envs import make_env


def arg(default, help: str):
    """A config field with its one-line documentation (shown by --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- run ---
    name: str = arg("", "run name; the run lives in <out_dir>/<name> (default: <env>-<algo>-<model>-s<seed>)")
    out_dir: str = arg("runs", "folder holding the runs")
    resume: str = arg("", "path of a run folder to continue from its last checkpoint")
    seed: int = arg(0, "seed of task sampling, generation and initialisation")
    iters: int = arg(12, "training iterations (one rollout batch + one PPO update each)")
    save_every: int = arg(5, "checkpoint every k iterations (and always at the end)")
    eval_every: int = arg(0, "evaluate every k iterations (0: only before the first and after the last)")
    eval_episodes: int = arg(60, "episodes per evaluation (0: no evaluation; 60 = each held-out ALFWorld game once)")
    eval_split: str = arg("eval", "split the evaluations play: eval, or train to measure the games trained on")
    eval_temperature: float = arg(0.4, "sampling temperature of evaluation (the paper's validation setting)")
    eval_greedy: bool = arg(False, "evaluate with greedy decoding instead of T=eval_temperature sampling")
    # --- environment (None = the environment's default from OPID_SPEC §9) ---
    env: str = arg("alfworld", "environment: alfworld | webshop | search")
    tasks_per_batch: int = arg(4, "B: task groups per iteration (CPU-sized; the paper: 16, search 128)")
    group_size: int = arg(4, "N: rollouts per task, the GRPO group (CPU-sized; the paper: 8)")
    max_steps: int | None = arg(None, "max environment steps per episode (alfworld 20 small / 30 full world, webshop 15, search 4)")
    history_length: int | None = arg(None, "H: past (observation, action) pairs in the prompt (5 / 2 / 4)")
    think: bool | None = arg(None, "ask for <think> reasoning before the action (default: off for tiny, on otherwise)")
    invalid_penalty: float | None = arg(None, "score penalty per invalid step (0.1 / 0.1 / 0.01)")
    penalty_scope: str = arg("step", "where the invalid penalty lands: step (the invalid step's sample, as the authors) | trajectory (every step, ablation)")
    webshop_backend: str = arg("sim", "WebShop: sim (offline simulator) | official (web_agent_site, see webshop.py)")
    search_retriever: str = arg("bm25", "search QA: bm25 (in-process over the corpus) | server (Search-R1 /retrieve)")
    retrieval_url: str = arg("http://127.0.0.1:8000/retrieve", "search QA: retrieval server address")
    qa_data: str = arg("synthetic", "search QA data: synthetic | fanoutqa | hf:NAME[:CONFIG] | a JSONL/parquet path ({split} allowed)")
    qa_corpus: str = arg("", "search QA: JSONL corpus {id,title,contents} for BM25 (default: the generated one)")
    alfworld_games: int = arg(0, "generated ALFWorld games per split (0: 240 train / 60 eval; small = quick tests)")
    alfworld_task_types: str = arg("", "comma-separated ALFWorld task types to train and evaluate on (empty: all six)")
    alfworld_world: str = arg("small", "generated ALFWorld world size: small (4-6 receptacles, 20 steps) | full (8-30, 30)")
    # --- model ---
    model: str = arg("tiny", "tiny | smollm2 | a Hugging Face hub id | a local model folder")
    lora_rank: int = arg(0, "LoRA rank (0: full fine-tuning); the KL reference is then the adapter-free base")
    lora_alpha: int = arg(32, "LoRA alpha")
    lora_target_modules: str = arg("q_proj,k_proj,v_proj,o_proj", "comma-separated module names LoRA adapts")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass to save memory")
    max_new_tokens: int | None = arg(None, "max tokens per response (tiny: warmstart.TINY_MAX_NEW_TOKENS, 24 / 48 / 24; otherwise 512)")
    temperature: float = arg(1.0, "rollout sampling temperature (the update, reference and teacher score at it too)")
    top_p: float = arg(1.0, "rollout nucleus sampling top-p")
    # --- algorithm ---
    algo: str = arg("opid", "opid | grpo | gigpo | skill_sd | rlsd | opsd | skill_grpo")
    adv_mode: str | None = arg(None, "outcome advantage: mean_std_norm | mean_norm (alfworld/search std, webshop mean)")
    gamma: float = arg(0.95, "discount of the step returns G_t shown to the analyzer and used by GiGPO")
    w_episode: float = arg(0.001, "w_ep: weight of the episode-skill Δ in the combined advantage (§8)")
    w_step: float = arg(0.001, "w_step: weight of the step-skill Δ in the combined advantage (§8)")
    routing: str = arg("step_priority", "skill routing (§5): step_priority | additive | episode_only | step_only")
    critical_steps: str = arg("analyzer", "who picks critical steps: analyzer | statistics (§4 selector)")
    max_step_skills: int | None = arg(None, "K: at most this many step skills per trajectory (5 / 5 / 2)")
    analyzer: str = arg("rule", "rule | openai (OpenAI-compatible endpoint) | policy (the policy model itself)")
    analyzer_url: str = arg("", "OpenAI-compatible base URL (default $OPID_ANALYZER_URL), e.g. http://localhost:8000/v1")
    analyzer_model: str = arg("", "analyzer model name at that endpoint (default $OPID_ANALYZER_MODEL)")
    analyzer_workers: int = arg(8, "parallel analyzer calls")
    delta_normalize: bool = arg(False, "standardise Δ over the batch's tokens (off in the paper's runs)")
    delta_clip: float = arg(0.0, "clamp Δ to ±delta_clip (0: no clipping)")
    gigpo_omega: float = arg(1.0, "GiGPO: weight ω of the step-level advantage")
    distill_coef: float = arg(0.001, "Skill-SD / OPSD: λ of the sampled-token reverse-KL term")
    rlsd_lambda: float = arg(0.5, "RLSD: initial λ, decayed linearly to 0")
    rlsd_decay_iters: int = arg(100, "RLSD: iterations over which λ decays to 0")
    # --- PPO update ---
    lr: float | None = arg(None, "learning rate (tiny 1e-4; LoRA 1e-5; full fine-tuning 1e-6)")
    clip_eps: float = arg(0.2, "PPO clip range ε")
    dual_clip: float = arg(0.0, "dual-clip constant c for negative advantages (0: off; 3 in verl)")
    kl_coef: float | None = arg(None, "β of the k3 KL to the reference policy (0.01 / 0.01 / 0.001; 0 skips the pass)")
    entropy_coef: float | None = arg(None, "entropy bonus c_ent (0.001 / 0.001 / 0)")
    ppo_epochs: int = arg(1, "passes over the batch per iteration")
    mini_batch_size: int = arg(256, "step-samples per optimizer step")
    micro_batch_size: int = arg(16, "step-samples per forward/backward (gradient accumulation)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")


ENV_DEFAULTS = {  # OPID_SPEC §9 (released scripts)
    "alfworld": dict(max_steps=30, history_length=5, invalid_penalty=0.1, max_step_skills=5, kl_coef=0.01,
                     entropy_coef=0.001, adv_mode="mean_std_norm"),
    "webshop": dict(max_steps=15, history_length=2, invalid_penalty=0.1, max_step_skills=5, kl_coef=0.01,
                    entropy_coef=0.001, adv_mode="mean_norm"),
    "search": dict(max_steps=4, history_length=4, invalid_penalty=0.01, max_step_skills=2, kl_coef=0.001,
                   entropy_coef=0.0, adv_mode="mean_std_norm"),
}
ALGOS = ("opid", "grpo", "gigpo", "skill_sd", "rlsd", "opsd", "skill_grpo")
ROUTINGS = ("step_priority", "additive", "episode_only", "step_only")


def resolve_defaults(cfg: Config) -> Config:
    """Fill the None fields from the environment's and model's defaults; reject bad values early."""
    if cfg.env not in ENV_DEFAULTS:
        raise SystemExit(f"--env must be one of {sorted(ENV_DEFAULTS)}, got {cfg.env!r}")
    if cfg.algo not in ALGOS:
        raise SystemExit(f"--algo must be one of {ALGOS}, got {cfg.algo!r}")
    if cfg.routing not in ROUTINGS:
        raise SystemExit(f"--routing must be one of {ROUTINGS}, got {cfg.routing!r}")
    if cfg.critical_steps not in ("analyzer", "statistics"):
        raise SystemExit("--critical-steps must be analyzer or statistics")
    if cfg.penalty_scope not in ("step", "trajectory"):
        raise SystemExit(f"--penalty-scope must be step or trajectory, got {cfg.penalty_scope!r}")
    if cfg.eval_split not in ("eval", "train"):
        raise SystemExit(f"--eval-split must be eval or train, got {cfg.eval_split!r}")
    if cfg.tasks_per_batch < 1 or cfg.group_size < 1 or cfg.iters < 0:
        raise SystemExit("--tasks-per-batch and --group-size must be ≥ 1, --iters ≥ 0")
    if cfg.alfworld_task_types:
        from envs import ALFWORLD_TASK_TYPES
        wanted = alfworld_task_types(cfg)
        if cfg.env != "alfworld" or not wanted or not set(wanted) <= set(ALFWORLD_TASK_TYPES):
            raise SystemExit(f"--alfworld-task-types takes a comma-separated subset of {ALFWORLD_TASK_TYPES} "
                             f"with --env alfworld, got {cfg.alfworld_task_types!r}")
    if cfg.env == "alfworld":
        import worlds
        if cfg.alfworld_world not in worlds.WORLDS:
            raise SystemExit(f"--alfworld-world must be one of {sorted(worlds.WORLDS)}, got {cfg.alfworld_world!r}")
        if cfg.max_steps is None:
            cfg.max_steps = worlds.WORLDS[cfg.alfworld_world]["max_steps"]
    tiny = cfg.model == "tiny"
    if tiny:
        import warmstart
        if cfg.history_length is None:
            cfg.history_length = warmstart.TINY_HISTORY[cfg.env]  # the history the tiny agent was cloned with
        if cfg.max_new_tokens is None:
            cfg.max_new_tokens = warmstart.TINY_MAX_NEW_TOKENS[cfg.env]
    for key, value in ENV_DEFAULTS[cfg.env].items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.think is None:
        cfg.think = not tiny
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = 512
    if cfg.lr is None:
        cfg.lr = 1e-4 if tiny else (1e-5 if cfg.lora_rank > 0 else 1e-6)
    if not cfg.name:
        cfg.name = f"{cfg.env}-{cfg.algo}-{Path(cfg.model).name}-s{cfg.seed}"
    return cfg


def parse_config(argv: list[str] | None = None) -> Config:
    """Every Config field becomes a --flag (underscores as dashes); its doc line is the help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split("|")[0].strip()
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, type={"int": int, "float": float, "str": str}[kind],
                                default=f.default, help=f.metadata["help"])
    return Config(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Model, analyzer, environments
# ---------------------------------------------------------------------------------------------


def load_model(cfg: Config, device: torch.device, checkpoint: Path | None = None):
    """The policy (and, for full fine-tuning with KL, a frozen reference copy)."""
    name = cfg.model
    if name == "tiny":
        import warmstart
        name = str(warmstart.tiny_agent_folder(cfg.env, world=cfg.alfworld_world if cfg.env == "alfworld" else None))
    model, tokenizer = policy.load_policy(
        name, device=str(device), lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_target_modules=cfg.lora_target_modules.split(","),
        gradient_checkpointing=cfg.gradient_checkpointing,
        adapter_dir=None if checkpoint is None else str(checkpoint))
    return model, tokenizer


def build_analyzer(cfg: Config, model, tokenizer):
    """OPID_SPEC §4: who writes the skills."""
    if cfg.analyzer == "rule":
        import rule_analyzer
        return rule_analyzer.RuleBasedAnalyzer()
    if cfg.analyzer == "openai":
        return skills.OpenAIChatAnalyzer(base_url=cfg.analyzer_url or None, model=cfg.analyzer_model or None)
    if cfg.analyzer == "policy":
        def generate_fn(message_lists):
            ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
                   for m in message_lists]
            return [g.text for g in policy.generate(model, tokenizer, ids, max_new_tokens=512, temperature=0.7)]
        return skills.LocalModelAnalyzer(generate_fn)
    raise SystemExit(f"--analyzer must be rule, openai or policy, got {cfg.analyzer!r}")


def alfworld_task_types(cfg: Config) -> tuple[str, ...]:
    """`--alfworld-task-types` as a tuple of names (empty: all six types)."""
    return tuple(name.strip() for name in cfg.alfworld_task_types.split(",") if name.strip())


def env_kwargs(cfg: Config) -> dict:
    kwargs = dict(history_length=cfg.history_length, max_steps=cfg.max_steps, think=cfg.think)
    if cfg.env == "alfworld" and cfg.alfworld_games > 0:
        kwargs.update(n_games=cfg.alfworld_games, train_games=cfg.alfworld_games)
    if cfg.env == "alfworld" and cfg.alfworld_task_types:
        kwargs.update(task_types=alfworld_task_types(cfg))
    if cfg.env == "alfworld":
        kwargs.update(world=cfg.alfworld_world)
    if cfg.env == "webshop" and cfg.webshop_backend != "sim":
        kwargs.update(backend=cfg.webshop_backend)
    if cfg.env == "search":
        kwargs.update(data=cfg.qa_data, retriever=cfg.search_retriever, retrieval_url=cfg.retrieval_url,
                      corpus_path=cfg.qa_corpus or None)
    return kwargs


# ---------------------------------------------------------------------------------------------
# Steps of one iteration
# ---------------------------------------------------------------------------------------------


def trajectory_views(trajs: list[rollout.Trajectory], gamma: float, penalty: float) -> list[skills.TrajectoryView]:
    """The text of each finished trajectory as the analyzer reads it (§4): no token ids, no hidden state."""
    views = []
    for t in trajs:
        returns = opid.step_returns([s.reward for s in t.samples], [s.valid for s in t.samples], gamma, penalty)
        steps = [skills.StepView(index=s.step, observation=s.observation, response=s.response_text,
                                 action=s.action, valid=s.valid, reward=s.reward, discounted_return=g)
                 for s, g in zip(t.samples, returns)]
        views.append(skills.TrajectoryView(env_name=t.env_name, task=t.task, task_type=t.task_type,
                                           won=t.won, episode_reward=t.episode_reward, steps=steps))
    return views


def sample_scores(trajs: list[rollout.Trajectory], penalty: float, scope: str) -> torch.Tensor:
    """§2–§3: the score S_i of every step-sample, trajectories in order (see opid.step_scores)."""
    return torch.tensor([score for t in trajs
                         for score in opid.step_scores(t.episode_reward, [s.valid for s in t.samples], penalty, scope)])


def padded(rows: list[list[float]] | list[torch.Tensor], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.float32)
        out[i, :len(row)] = row
    return out


def teacher_logprobs(model, tokenizer, samples: list[rollout.Sample], contexts: list[tuple[int, str | None, str | None]],
                     length: int, micro_batch_size: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """§6–§7: re-score each sample's OWN response ids under its skill-augmented prompt.

    contexts: (sample index, episode text or None, step text or None) per teacher pass. The
    augmented prompt text is re-templated; the response token ids are reused unchanged.
    `temperature` is the rollout temperature: Δ compares log-probs of one distribution family.
    Returns (teacher log-probs [S, length], rows that were scored [S] bool).
    """
    result, scored = torch.zeros(len(samples), length), torch.zeros(len(samples), dtype=torch.bool)
    if not contexts:
        return result, scored
    prompts = [policy.chat_prompt_ids(tokenizer, skills.inject_skills(samples[i].prompt_text, ep, st))
               for i, ep, st in contexts]
    responses = [samples[i].response_ids for i, _, _ in contexts]
    with torch.no_grad():
        logprobs, _, _ = policy.response_logprobs(model, prompts, responses, temperature=temperature,
                                                  micro_batch_size=micro_batch_size)
    for row, (i, _, _) in enumerate(contexts):
        n = len(samples[i].response_ids)
        result[i, :n] = logprobs[row, :n].float().cpu()
        scored[i] = True
    return result, scored


FORMAT_TAGS = ("<think>", "</think>", "<action>", "</action>", "<search>", "</search>", "<answer>", "</answer>")


def format_token_mask(tokenizer, response_ids: list[int], length: int) -> torch.Tensor:
    """1 for response tokens that spell a tag or the end-of-turn token (metrics only, §8 note)."""
    pieces = [tokenizer.decode([t]) for t in response_ids]
    text, starts = "", []
    for p in pieces:
        starts.append(len(text))
        text += p
    spans = [(k, k + len(tag)) for tag in FORMAT_TAGS for k in range(len(text)) if text.startswith(tag, k)]
    mask = torch.zeros(length)
    for j, (tok, start) in enumerate(zip(response_ids, starts)):
        end = start + len(pieces[j])
        if tok in tokenizer.all_special_ids or any(a < end and start < b for a, b in spans):
            mask[j] = 1.0
    return mask


def ppo_update(model, optimizer, accelerator, samples, advantages, old, ref, distill_teacher, distill_rows,
               mask, cfg: Config, rng: random.Random) -> dict:
    """§8: clipped PPO on token-level advantages, + β·k3 KL − c_ent·H (+ λ·Skill-SD/OPSD term).

    Mini-batches of `mini_batch_size` samples, each accumulated over micro-batches, loss
    normalised by the mini-batch's response-token count (token-mean). Log-probs are taken at the
    rollout temperature, as the saved old log-probs were: the first ratio is exactly 1.
    """
    model.train()
    totals = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clipfrac": 0.0, "grad_norm": 0.0}
    order = list(range(len(samples)))
    num_minibatches = 0
    for _ in range(cfg.ppo_epochs):
        rng.shuffle(order)
        for mb_start in range(0, len(order), cfg.mini_batch_size):
            minibatch = order[mb_start:mb_start + cfg.mini_batch_size]
            num_tokens = float(mask[minibatch].sum())
            optimizer.zero_grad(set_to_none=True)
            for mc_start in range(0, len(minibatch), cfg.micro_batch_size):
                idx = minibatch[mc_start:mc_start + cfg.micro_batch_size]
                logp, _, entropy = policy.response_logprobs(
                    model, [samples[i].prompt_ids for i in idx], [samples[i].response_ids for i in idx],
                    temperature=cfg.temperature, micro_batch_size=len(idx), with_entropy=True,
                    requires_grad=True)
                width = logp.shape[1]
                m, a, o = mask[idx, :width], advantages[idx, :width], old[idx, :width]
                pg_loss, stats = opid.ppo_clip_loss(logp, o, a, m, cfg.clip_eps, cfg.dual_clip or None, num_tokens)
                loss = pg_loss
                if ref is not None:
                    kl = opid.token_mean(opid.k3_kl(logp, ref[idx, :width]), m, num_tokens)
                    loss = loss + cfg.kl_coef * kl
                    totals["kl"] += kl.item()
                ent = opid.token_mean(entropy, m, num_tokens)  # logged always, in the loss when c_ent > 0
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * ent
                totals["entropy"] += ent.item()
                if distill_teacher is not None:
                    rows = distill_rows[idx].float()[:, None]
                    loss = loss + cfg.distill_coef * opid.skill_sd_loss(
                        logp, distill_teacher[idx, :width], o, m * rows, num_tokens)
                accelerator.backward(loss)
                totals["loss"] += loss.item()
                totals["pg_loss"] += pg_loss.item()
                totals["clipfrac"] += stats["clipfrac"] * float(m.sum()) / max(num_tokens, 1.0)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            totals["grad_norm"] += float(grad_norm)
            num_minibatches += 1
    model.eval()
    return {k: v / max(num_minibatches, 1) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints: model (HF format), optimizer, RNG states, iteration — written atomically
# ---------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, state: dict) -> None:
    tmp, final = run_dir / "checkpoint.tmp", run_dir / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_policy(model, tokenizer, tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_metrics(path: Path, completed_updates: int) -> list[dict]:
    """Well-formed metric lines up to the checkpoint (a line cut by a kill, or lines written after
    the last checkpoint, are dropped so a resumed run never duplicates or corrupts records)."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("updates", 0) <= completed_updates:
                kept.append(record)
    return kept


def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def learn_from_batch(cfg: Config, trajs: list[rollout.Trajectory], model, unwrapped, reference, tokenizer,
                     optimizer, accelerator, analyzer, iteration: int, skill_bank: dict[int, str]) -> dict:
    """Steps 2–7 of one iteration on a collected batch of trajectories; returns its metrics.

    `model` is the (accelerate-prepared) module that is trained, `unwrapped` the same weights for
    the no-grad passes; `reference` the frozen KL reference (None with LoRA: adapter disabled);
    `skill_bank` (Skill-GRPO only) is updated in place.
    """
    # 2. Trajectory records: scores S_i (the invalid penalty on the invalid step's own sample), tensors.
    samples = [s for t in trajs for s in t.samples]
    traj_of = [t for t in trajs for _ in t.samples]
    length = max(len(s.response_ids) for s in samples)
    mask = padded([[1.0] * len(s.response_ids) for s in samples], length)
    old = padded([s.old_logprobs for s in samples], length)
    scores = sample_scores(trajs, cfg.invalid_penalty, cfg.penalty_scope)
    group_ids = torch.tensor([s.uid for s in samples])

    # 3. Skills from the finished trajectories (analyzer threads run while we do the reference pass).
    t_analysis = time.perf_counter()
    views = trajectory_views(trajs, cfg.gamma, cfg.invalid_penalty)
    pending = skills.submit_analysis(views, analyzer, cfg.max_step_skills, cfg.analyzer_workers) if analyzer else None
    ref = None
    if cfg.kl_coef > 0:
        with torch.no_grad(), policy.reference_policy(unwrapped, reference) as ref_model:
            ref_lp, _, _ = policy.response_logprobs(ref_model, [s.prompt_ids for s in samples],
                                                    [s.response_ids for s in samples], temperature=cfg.temperature,
                                                    micro_batch_size=cfg.micro_batch_size)
        ref = padded(list(ref_lp.float().cpu()), length) * mask
    traj_skills, analysis_stats = pending.result() if pending else ([None] * len(trajs), {})
    if cfg.critical_steps == "statistics" and analyzer is not None:
        rows = [(s.uid, s.traj_uid, s.step, s.observation, v.discounted_return)
                for t, view in zip(trajs, views) for s, v in zip(t.samples, view.steps)]
        chosen = skills.statistical_critical_steps(rows, cfg.max_step_skills)
        traj_skills = [skills.restrict_to_selected_steps(sk, chosen.get(t.traj_uid, [])) if sk else None
                       for t, sk in zip(trajs, traj_skills)]
    analysis_s = time.perf_counter() - t_analysis
    if cfg.algo == "skill_grpo":
        for t, sk in sorted(zip(trajs, traj_skills), key=lambda p: p[0].won):  # a won trajectory's skill wins
            if sk is not None:
                skill_bank[t.task_index] = sk.episode_skill

    # 4.–5. Augmented prompts → teacher log-probs (old policy = the current weights, no grad).
    t_teacher = time.perf_counter()
    skills_of = {t.traj_uid: sk for t, sk in zip(trajs, traj_skills)}
    routing = cfg.routing if cfg.algo == "opid" else "step_priority"
    episode_ctx, step_ctx = [], []
    for i, s in enumerate(samples):
        if cfg.algo == "opsd":  # privileged teacher: ground truth instead of a hindsight skill
            if s.privileged:
                episode_ctx.append((i, s.privileged, None))
            continue
        if cfg.algo not in ("opid", "skill_sd", "rlsd"):
            continue
        ep_text, step_text = skills.route(s.step, skills_of.get(s.traj_uid), routing)
        if step_text:
            step_ctx.append((i, None, step_text))
        if ep_text:
            episode_ctx.append((i, ep_text, None))
    teacher_ep, routed_ep = teacher_logprobs(unwrapped, tokenizer, samples, episode_ctx, length, cfg.micro_batch_size,
                                             cfg.temperature)
    teacher_st, routed_st = teacher_logprobs(unwrapped, tokenizer, samples, step_ctx, length, cfg.micro_batch_size,
                                             cfg.temperature)
    delta_clip = cfg.delta_clip or None
    delta_ep = opid.skill_delta(teacher_ep, old, mask * routed_ep[:, None], cfg.delta_normalize, delta_clip)
    delta_st = opid.skill_delta(teacher_st, old, mask * routed_st[:, None], cfg.delta_normalize, delta_clip)
    teacher_s = time.perf_counter() - t_teacher

    # 6. Advantages: outcome (GRPO §3) + the algorithm's token-level term.
    outcome = opid.outcome_advantage(scores, group_ids, cfg.adv_mode)
    distill_teacher, distill_rows = None, None
    if cfg.algo == "opid":
        advantages = opid.combined_advantage(outcome, mask, delta_ep, routed_ep, delta_st, routed_st,
                                             cfg.w_episode, cfg.w_step)
    elif cfg.algo == "gigpo":
        step_returns = torch.tensor([g.discounted_return for v in views for g in v.steps])
        anchor_index: dict[str, int] = {}
        anchors = torch.tensor([anchor_index.setdefault(s.observation, len(anchor_index)) for s in samples])
        step_adv = opid.gigpo_step_advantage(step_returns, group_ids, anchors, cfg.adv_mode)
        advantages = opid.combined_advantage(outcome + cfg.gigpo_omega * step_adv, mask)
    elif cfg.algo == "rlsd":
        teacher = torch.where(routed_st[:, None], teacher_st, torch.where(routed_ep[:, None], teacher_ep, old))
        advantages = opid.rlsd_advantage(outcome, teacher, old, mask,
                                         opid.rlsd_lambda(iteration, cfg.rlsd_lambda, cfg.rlsd_decay_iters))
    else:
        advantages = opid.combined_advantage(outcome, mask)
        if cfg.algo in ("skill_sd", "opsd"):
            distill_teacher = torch.where(routed_st[:, None], teacher_st, teacher_ep)
            distill_rows = routed_st | routed_ep

    # 7. PPO update.
    t_update = time.perf_counter()
    update_stats = ppo_update(model, optimizer, accelerator, samples, advantages, old, ref, distill_teacher,
                              distill_rows, mask, cfg, random.Random(cfg.seed + iteration))
    update_s = time.perf_counter() - t_update

    record = {"samples": len(samples), **update_stats, "time/analysis_s": analysis_s,
              "time/teacher_s": teacher_s, "time/update_s": update_s}
    record.update(skill_metrics(tokenizer, samples, traj_of, traj_skills, analysis_stats, routed_ep, routed_st,
                                delta_ep, delta_st, mask, length))
    return record


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> Path:
    resume_dir = Path(cfg.resume) if cfg.resume else None
    if resume_dir is not None:
        if not (resume_dir / "checkpoint" / "state.json").exists():
            raise SystemExit(f"--resume {resume_dir}: no checkpoint/state.json there")
        saved = json.loads((resume_dir / "config.json").read_text())
        saved["resume"] = str(resume_dir)
        if cfg.iters != Config().iters:  # `--resume RUN --iters N` extends a finished run
            saved["iters"] = cfg.iters
        cfg = Config(**saved)
    cfg = resolve_defaults(cfg)
    run_dir = resume_dir or Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if torch.cuda.is_available() else "no")
    rank, world = accelerator.process_index, accelerator.num_processes
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    log = tqdm.write if accelerator.is_main_process else (lambda *a, **k: None)  # keeps the progress bar intact

    checkpoint = run_dir / "checkpoint" if resume_dir else None
    model, tokenizer = load_model(cfg, accelerator.device, checkpoint / "model" if checkpoint else None)
    reference = policy.make_reference(model) if cfg.kl_coef > 0 else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = {"updates": 0, "env_steps": 0}
    if checkpoint is not None:
        saved_state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved_state["optimizer"])
        torch.set_rng_state(saved_state["torch_rng"])
        np.random.set_state(saved_state["numpy_rng"])
        random.setstate(saved_state["python_rng"])
        state = json.loads((checkpoint / "state.json").read_text())
        log(f"resumed {run_dir} after {state['updates']} updates")
    metrics_path = run_dir / "metrics.jsonl"
    records = load_metrics(metrics_path, state["updates"])
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    skill_bank: dict[int, str] = {int(k): v for k, v in state.get("skill_bank", {}).items()}

    unwrapped = accelerator.unwrap_model(model)
    envs = [make_env(cfg.env, split="train", **env_kwargs(cfg)) for _ in range(cfg.tasks_per_batch * cfg.group_size)]
    num_train_tasks = envs[0].num_tasks()
    analyzer = build_analyzer(cfg, unwrapped, tokenizer) if cfg.algo in ("opid", "skill_sd", "rlsd", "skill_grpo") else None

    num_eval_tasks = None

    def evaluate(tag: str) -> None:
        nonlocal num_eval_tasks
        if cfg.eval_episodes <= 0 or not accelerator.is_main_process:
            return
        def make_eval_env():
            return make_env(cfg.env, split=cfg.eval_split, **env_kwargs(cfg))
        if num_eval_tasks is None:
            num_eval_tasks = make_eval_env().num_tasks()
        summary, _ = rollout.evaluate_policy(
            unwrapped, tokenizer, make_eval_env, num_eval_tasks,
            episodes=cfg.eval_episodes, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
            greedy=cfg.eval_greedy, seed=cfg.seed)
        append_metrics(metrics_path, {"kind": "eval", "updates": state["updates"], "env_steps": state["env_steps"],
                                      "split": cfg.eval_split, **{f"eval/{k}": v for k, v in summary.items()}})
        log(f"[eval {tag}, {cfg.eval_split} split] updates={state['updates']} success={summary['success_rate']:.3f} "
            f"score={summary['mean_score']:.3f} invalid={summary['invalid_rate']:.3f} "
            f"per-type={json.dumps(summary['per_task_type'])}")

    if state["updates"] == 0:
        evaluate("start")
    bar = tqdm(range(state["updates"], cfg.iters), desc=cfg.name, disable=not accelerator.is_main_process,
               initial=state["updates"], total=cfg.iters)
    for iteration in bar:
        t_iter = time.perf_counter()
        # 1. Rollout groups: B tasks × N copies; this process plays its share of the groups.
        task_rng = random.Random(cfg.seed * 1_000_003 + iteration)
        tasks = [task_rng.randrange(num_train_tasks) for _ in range(cfg.tasks_per_batch)]
        my_groups = list(range(rank, cfg.tasks_per_batch, world))
        task_indices = [tasks[g] for g in my_groups for _ in range(cfg.group_size)]
        uids = [g for g in my_groups for _ in range(cfg.group_size)]
        hook = None
        if cfg.algo == "skill_grpo":  # Skill-GRPO: the student itself sees last iteration's skill for its task
            hook = lambda i, text: skills.inject_skills(text, skill_bank.get(task_indices[i]), None)
        trajs, rstats = rollout.collect_rollouts(
            unwrapped, tokenizer, envs[:len(task_indices)], task_indices, uids, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, prompt_hook=hook)

        record = learn_from_batch(cfg, trajs, model, unwrapped, reference, tokenizer, optimizer, accelerator,
                                  analyzer, iteration, skill_bank)
        state["updates"] = iteration + 1
        state["env_steps"] += rstats["env_steps"]

        # 8. Metrics, checkpoint.
        record = {"kind": "train", "updates": state["updates"], "env_steps": state["env_steps"],
                  **rollout.summarize(trajs), "tokens_generated": rstats["generated_tokens"], **record,
                  "time/rollout_s": rstats["rollout_s"], "time/iteration_s": time.perf_counter() - t_iter}
        record.pop("per_task_type", None)
        append_metrics(metrics_path, record)
        bar.set_postfix(success=f"{record['success_rate']:.2f}", kl=f"{record['kl']:.4f}")
        log(f"[iter {state['updates']}/{cfg.iters}] success={record['success_rate']:.3f} "
            f"return={record['mean_return']:.2f} invalid={record['invalid_rate']:.3f} "
            f"tokens={record['tokens_generated']} kl={record['kl']:.4f} entropy={record['entropy']:.3f} "
            f"skills={record.get('skills/share_with_skills', 0):.2f} |Δ|={record.get('delta/mean_abs', 0):.3f} "
            f"time rollout/teacher/update={rstats['rollout_s']:.1f}/{record['time/teacher_s']:.1f}/"
            f"{record['time/update_s']:.1f}s")
        last = state["updates"] == cfg.iters
        if cfg.eval_every and state["updates"] % cfg.eval_every == 0 and not last:
            evaluate(f"iter {state['updates']}")
        if accelerator.is_main_process and (state["updates"] % cfg.save_every == 0 or last):
            state["skill_bank"] = {str(k): v for k, v in skill_bank.items()}
            save_checkpoint(run_dir, accelerator.unwrap_model(model), tokenizer, optimizer, state)
    if state["updates"] == cfg.iters:
        evaluate("end")
    log(f"done: {run_dir}")
    if accelerator.is_main_process and cfg.eval_episodes > 0:
        log(before_after_table(load_metrics(metrics_path, state["updates"]), cfg.eval_episodes, num_eval_tasks,
                               cfg.eval_split, run_dir))
    return run_dir


def before_after_table(records: list[dict], episodes: int, games: int | None, split: str, run_dir: Path) -> str:
    """The run's first and last evaluation side by side: success ± its standard error
    sqrt(p(1 − p)/n) over the n evaluation episodes, the invalid-action rate, and where the
    metrics are. The change's error treats the two evaluations as independent samples."""
    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        return f"no evaluation in {run_dir / 'metrics.jsonl'}"
    first, last = evals[0], evals[-1]
    def error(p: float) -> float:
        return (p * (1 - p) / episodes) ** 0.5
    lines = [f"{split} split: {episodes} episodes over {games or '?'} games per evaluation (success ± standard error)",
             f"{'':8}{'updates':>8}{'env steps':>11}{'success':>18}{'invalid rate':>14}"]
    for tag, r in (("start", first), ("end", last)):
        p = r["eval/success_rate"]
        lines.append(f"{tag:8}{r['updates']:>8}{r['env_steps']:>11}{f'{p:.3f} ± {error(p):.3f}':>18}"
                     f"{r['eval/invalid_rate']:>14.3f}")
    change = last["eval/success_rate"] - first["eval/success_rate"]
    spread = (error(first["eval/success_rate"]) ** 2 + error(last["eval/success_rate"]) ** 2) ** 0.5
    lines.append(f"{'change':8}{'':19}{f'{change:+.3f} ± {spread:.3f}':>18}"
                 f"{last['eval/invalid_rate'] - first['eval/invalid_rate']:>+14.3f}")
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}   curves: python eval.py --compare {run_dir} --plot curves.png")
    return "\n".join(lines)


def skill_metrics(tokenizer, samples, traj_of, traj_skills, analysis_stats, routed_ep, routed_st,
                  delta_ep, delta_st, mask, length) -> dict:
    """§8 diagnostics: skill coverage, routing shares, and where Δ lands (won/lost, tags/content)."""
    if all(sk is None for sk in traj_skills) and not (routed_ep.any() or routed_st.any()):
        return {}
    delta = delta_ep * routed_ep[:, None] + delta_st * routed_st[:, None]
    routed = (routed_ep | routed_st)[:, None] * mask
    won = torch.tensor([t.won for t in traj_of])[:, None] * routed
    lost = (~torch.tensor([t.won for t in traj_of]))[:, None] * routed
    fmt = torch.stack([format_token_mask(tokenizer, s.response_ids, length) for s in samples]) * routed

    def mean(values, m):
        return float((values * m).sum() / m.sum()) if m.sum() > 0 else 0.0
    out = {"skills/share_with_skills": sum(sk is not None for sk in traj_skills) / max(len(traj_skills), 1),
           "routing/share_step": float(routed_st.float().mean()), "routing/share_episode": float(routed_ep.float().mean()),
           "delta/mean": mean(delta, routed), "delta/mean_abs": mean(delta.abs(), routed),
           "delta/mean_won": mean(delta, won), "delta/mean_lost": mean(delta, lost),
           "delta/mean_format_tokens": mean(delta, fmt), "delta/mean_content_tokens": mean(delta, routed - fmt)}
    out.update({f"analyzer/{k}": v for k, v in analysis_stats.items()})
    return out


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
