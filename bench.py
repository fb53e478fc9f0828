"""Micro-benchmarks, one function per benchmark, one argparse subcommand each.

    python bench.py env --env alfworld --batch 16 --steps 200
    python bench.py generate --model tiny --batch 8 --new-tokens 64 --repeats 3
    python bench.py opid-cost --iters 2 --tasks-per-batch 2 --group-size 4 --max-steps 15
    python bench.py gpu --out results/gpu            # scripts/gpu_check.sh: one GPU, random Qwen2.5-1.5B shapes
    python bench.py memory                           # estimated GPU memory at the recipes' shapes

`generate`: rollout-engine throughput (`policy.generate`, which also records log π_old per token)
against a bare `model.generate` on the same prompts, and the update's forward+backward tokens/s.
`opid-cost`: OPID's learning step against GRPO's on the SAME rollout batch (docs/method.md §7: one extra
no-grad teacher pass per routed sample, no extra backward pass).
`gpu`: one OPID iteration through train.py's functions with a randomly initialised model of
Qwen2.5-1.5B-Instruct's shapes (configs/qwen2.5-1.5b-instruct.json), on search QA and ALFWorld, LoRA
and full fine-tuning: peak memory, rollout and update tokens/s, MFU, seconds per phase (JSON).
Every comparison is measured inside one run, interleaved; numbers from different runs (or a
machine shared with other work) are not comparable.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import heapq
import json
import os
import random
import re
import statistics
import time
from pathlib import Path

import torch

import policy
import ppo
import searchqa
import warmstart
from environments import make_env
from envs import cache_dir


def games_kwargs(env_name: str, games: int) -> dict:
    """`make_env` keywords for a small generated ALFWorld split (0: the default split sizes)."""
    return dict(n_games=games, train_games=games) if env_name == "alfworld" and games > 0 else {}


def bench_env(env_name: str, batch: int, steps: int, split: str = "train", seed: int = 0, games: int = 0) -> dict:
    """Environment steps per second: `batch` copies stepped in lock-step with uniformly random
    admissible actions (search QA has none: random searches and answers over the question's
    words), resets excluded from the timing, counted separately."""
    rng = random.Random(seed)
    copies = [make_env(env_name, split=split, think=False, **games_kwargs(env_name, games)) for _ in range(batch)]
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
            if hasattr(env, "admissible_actions"):
                response = f"<action>{rng.choice(env.admissible_actions())}</action>"
            else:
                response = searchqa.random_response(rng, env.task.split() * 3, env.steps, env.max_steps)
            t = time.perf_counter()
            _, _, done, _ = env.step(response)
            step_time += time.perf_counter() - t
            done_steps += 1
            if done:
                reset(env)
    return {"env": env_name, "batch": batch, "steps": done_steps, "steps_per_s": done_steps / step_time,
            "resets": reset_count, "seconds_per_reset": reset_time / max(1, reset_count)}


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def alfworld_prompts(n: int, think: bool, history_length: int = 2, games: int = 0) -> list[str]:
    """User-message texts of `n` real ALFWorld train episodes at reset (tasks 0..n-1)."""
    env = make_env("alfworld", split="train", think=think, history_length=history_length,
                   **games_kwargs("alfworld", games))
    texts = []
    for k in range(n):
        env.reset(k % env.num_tasks())
        texts.append(env.prompt())
    return texts


def load_bench_model(name: str, games: int = 0):
    """(model, tokenizer, description). `tiny`: the warm-started ALFWorld agent when it is kept in
    agents/ or already cached (never built here: that takes minutes), else a random-initialised tiny model of the same
    size with a 1024-token BPE trained on a few ALFWorld prompts."""
    if name != "tiny":
        model, tokenizer = policy.load_policy(name)
        return model.eval(), tokenizer, f"{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)"
    kept = warmstart.KEPT_AGENTS / warmstart.agent_name("alfworld")
    folder = kept if kept.exists() else cache_dir("models") / warmstart.agent_name("alfworld")
    if (folder / "warmstart.json").exists():
        model, tokenizer = policy.load_policy(str(folder))
        what = f"warm-started tiny agent {folder.name}"
    else:
        tokenizer = warmstart.train_tiny_tokenizer(alfworld_prompts(32, think=False, games=games), 1024)
        model = warmstart.build_tiny_model(tokenizer, **warmstart.MODEL_SIZE)
        what = "RANDOM-INIT tiny model (warm-started agent not cached yet), 1024-token BPE"
    return model.eval(), tokenizer, f"{what} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"


@contextlib.contextmanager
def eos_suppressed(model, token_ids: list[int], from_id: int | None = None):
    """Set the logits of `token_ids` (and of every id ≥ `from_id`) to -inf in every forward pass of
    `model` while active.

    Used on BOTH generation paths so neither can stop early: each runs exactly max_new_tokens
    decode steps on the full batch, whatever the model would have sampled. `from_id` keeps a model
    whose vocabulary is larger than its tokenizer's (the gpu check) on ids the tokenizer can decode.
    """
    def hook(module, args, output):
        output.logits[..., token_ids] = float("-inf")
        if from_id is not None:
            output.logits[..., from_id:] = float("-inf")
        return output
    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def machine_note() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load avg (1 min) {load:.2f}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# generate: rollout engine vs bare model.generate, and update tokens/s
# ---------------------------------------------------------------------------------------------


def bench_generate(model_name: str, batch: int, new_tokens: int, repeats: int, temperature: float = 1.0,
                   seed: int = 0, games: int = 0) -> dict:
    """Generated tokens/s of `policy.generate` vs a bare `model.generate`, and update tokens/s.

    Fairness: same prompts (ALFWorld resets, chat-templated, left-padded), same batch, same
    GenerationConfig (sampling at `temperature`, top_p=1, top_k=0, KV cache), the model's own
    generation defaults blanked for both (the engine does so itself), and EOS logits forced to
    -inf on both by a forward hook, so both run exactly `new_tokens` steps. The engine's time
    includes its padding, its log-prob recorder and decoding the texts; the bare call's input
    tensors are built outside its timing. Order alternates every repeat.

    Update: forward+backward of `response_logprobs(requires_grad=True, with_entropy=True)` and the
    §8 loss (PPO clip + 0.01·k3 KL − 0.001·H) on the (prompt, engine response) pairs, one
    micro-batch of `batch` samples; no optimizer step (the weights stay those that generated).
    """
    import opid
    from transformers import GenerationConfig
    torch.manual_seed(seed)
    model, tokenizer, what = load_bench_model(model_name, games)
    think = model_name != "tiny"  # train.resolve_defaults: <think> off for tiny only
    prompt_ids = [policy.chat_prompt_ids(tokenizer, t) for t in alfworld_prompts(batch, think, games=games)]
    eos = policy.eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    inner = policy._unwrap(model)
    inner.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)  # what the engine swaps in

    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1

    def engine(n):
        gens = policy.generate(model, tokenizer, prompt_ids, max_new_tokens=n, temperature=temperature)
        assert all(len(g.response_ids) == n for g in gens), "engine stopped early"
        return gens

    def bare(n):
        config = GenerationConfig(max_new_tokens=n, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                  eos_token_id=eos, pad_token_id=pad, use_cache=True)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        assert out.shape[1] == width + n, "bare generate stopped early"
        return out

    gens = None
    times = {"engine": [], "bare": [], "update": []}
    with eos_suppressed(inner, eos):
        bare(new_tokens)  # full-length warm-up of both paths (allocator, kernels), untimed;
        gens = engine(new_tokens)  # the engine's warm-up responses are what the update pass scores
    responses = [g.response_ids for g in gens]
    old = torch.tensor([g.logprobs for g in gens])
    gen_adv = torch.Generator().manual_seed(seed)
    advantages = torch.randn(batch, 1, generator=gen_adv).expand(batch, new_tokens)
    all_tokens = sum(len(p) + len(r) for p, r in zip(prompt_ids, responses))
    response_tokens = sum(len(r) for r in responses)

    def update():
        model.zero_grad(set_to_none=True)
        model.train()
        logp, mask, entropy = policy.response_logprobs(model, prompt_ids, responses, micro_batch_size=batch,
                                                       requires_grad=True, with_entropy=True)
        m = mask.float()
        pg, _ = opid.ppo_clip_loss(logp, old, advantages, m, 0.2)
        loss = pg + 0.01 * opid.token_mean(opid.k3_kl(logp, old), m) - 0.001 * opid.token_mean(entropy, m)
        loss.backward()
        model.eval()

    for r in range(repeats):
        order = ("engine", "bare") if r % 2 == 0 else ("bare", "engine")
        with eos_suppressed(inner, eos):
            for which in order:
                t = time.perf_counter()
                engine(new_tokens) if which == "engine" else bare(new_tokens)
                times[which].append(time.perf_counter() - t)
        t = time.perf_counter()
        update()
        times["update"].append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    generated = batch * new_tokens
    paired = [b / e for e, b in zip(times["engine"], times["bare"])]
    return {"model": what, "batch": batch, "new_tokens": new_tokens, "repeats": repeats,
            "prompt_tokens": [len(p) for p in prompt_ids], "times": times, "generated": generated,
            "engine_tps": generated / median(times["engine"]), "bare_tps": generated / median(times["bare"]),
            "ratio_of_medians": median(times["bare"]) / median(times["engine"]), "ratio_paired_median": median(paired),
            "update_tokens": all_tokens, "update_response_tokens": response_tokens,
            "update_tps": all_tokens / median(times["update"]),
            "update_response_tps": response_tokens / median(times["update"])}


def print_generate(r: dict) -> None:
    p = r["prompt_tokens"]
    print(f"model: {r['model']}")
    print(f"batch {r['batch']} ALFWorld reset prompts ({min(p)}–{max(p)} tokens, left-padded to {max(p)}), "
          f"{r['new_tokens']} new tokens each (EOS masked on both paths), T=1 sampling, {r['repeats']} interleaved repeats")
    print(f"{'':34s} {'median s':>9s} {'tokens/s':>10s}   per repeat (s)")
    for key, label, tps in (("engine", "engine  policy.generate", r["engine_tps"]),
                            ("bare", "bare    model.generate", r["bare_tps"])):
        print(f"{label:34s} {median(r['times'][key]):9.3f} {tps:10.1f}   "
              + " ".join(f"{t:.3f}" for t in r["times"][key]))
    print(f"{'update  fwd+bwd, all tokens':34s} {median(r['times']['update']):9.3f} {r['update_tps']:10.1f}   "
          + " ".join(f"{t:.3f}" for t in r["times"]["update"]) + f"   ({r['update_tokens']} prompt+response tokens)")
    print(f"{'update  fwd+bwd, response tokens':34s} {'':9s} {r['update_response_tps']:10.1f}   "
          f"({r['update_response_tokens']} response tokens)")
    print(f"ratio engine/bare tokens/s: {r['ratio_of_medians']:.3f} (ratio of medians), "
          f"{r['ratio_paired_median']:.3f} (median of back-to-back pairs); goal >= 0.8")


# ---------------------------------------------------------------------------------------------
# opid-cost: OPID's learning step vs GRPO's on the same rollout batch
# ---------------------------------------------------------------------------------------------

VARIANTS = (("grpo", "step_priority"), ("opid", "step_priority"), ("opid", "additive"))


def bench_opid_cost(iters: int, tasks_per_batch: int, group_size: int, max_steps: int | None = None,
                    seed: int = 0, games: int = 0) -> dict:
    """Time of `train.learn_from_batch` for GRPO, OPID (step_priority) and OPID (additive) on ONE
    rollout batch, each from a deep copy of the same weights with a fresh AdamW and reference.
    Its parts: the recomputed old pass (every algorithm), the reference pass with the analyzer
    running alongside, the teacher passes (OPID only) and the update.

    Repeated `iters` times, the variant order reversed every other repeat. The rollout is collected
    once (as train.main does) and added to every variant for the full-iteration ratio. Teacher
    passes are counted by wrapping `train.teacher_logprobs` (bookkeeping only, nothing re-computed
    inside the timed region).
    """
    from accelerate import Accelerator
    import rollout
    import skills
    import train
    cfg = train.resolve_defaults(train.Config(model="tiny", env="alfworld", seed=seed, iters=1, eval_episodes=0,
                                              tasks_per_batch=tasks_per_batch, group_size=group_size,
                                              max_steps=max_steps, alfworld_games=games))
    random.seed(seed)
    torch.manual_seed(seed)
    base, tokenizer, what = load_bench_model("tiny", games)
    envs = [make_env(cfg.env, split="train", **train.env_kwargs(cfg)) for _ in range(tasks_per_batch * group_size)]
    task_rng = random.Random(cfg.seed * 1_000_003)  # train.main's task draw for iteration 0
    tasks = [task_rng.randrange(envs[0].num_tasks()) for _ in range(tasks_per_batch)]
    task_indices = [tasks[g] for g in range(tasks_per_batch) for _ in range(group_size)]
    uids = [g for g in range(tasks_per_batch) for _ in range(group_size)]
    trajs, rstats = rollout.collect_rollouts(base, tokenizer, envs, task_indices, uids, max_new_tokens=cfg.max_new_tokens,
                                             temperature=cfg.temperature, top_p=cfg.top_p)
    samples = [s for t in trajs for s in t.samples]

    calls: list[tuple[list, list]] = []
    original = train.teacher_logprobs

    def counting_teacher_logprobs(model, tok, smp, contexts, *args, **kwargs):
        calls.append((smp, list(contexts)))
        return original(model, tok, smp, contexts, *args, **kwargs)

    accelerator = Accelerator(cpu=True)
    results = {v: {"learn": [], "old": [], "analysis": [], "teacher": [], "update": []} for v in VARIANTS}
    passes: dict[tuple, dict] = {}
    train.teacher_logprobs = counting_teacher_logprobs
    try:
        for r in range(iters):
            for algo, routing in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                vcfg = dataclasses.replace(cfg, algo=algo, routing=routing)
                model = copy.deepcopy(base)
                reference = policy.make_reference(model)
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=vcfg.lr)
                model, optimizer = accelerator.prepare(model, optimizer)
                unwrapped = accelerator.unwrap_model(model)
                analyzer = train.build_analyzer(vcfg, unwrapped, tokenizer) if algo == "opid" else None
                calls.clear()
                t = time.perf_counter()
                record = train.learn_from_batch(vcfg, trajs, model, unwrapped, reference, tokenizer, optimizer,
                                                accelerator, analyzer, 0, {})
                learn = time.perf_counter() - t
                res = results[(algo, routing)]
                res["learn"].append(learn)
                for part in ("old", "analysis", "teacher", "update"):
                    res[part].append(record[f"time/{part}_s"])
                passes[(algo, routing)] = {
                    "passes": sum(len(c) for _, c in calls),
                    "routed_samples": len({i for _, c in calls for i, _, _ in c}),
                    "response_tokens": sum(len(s[i].response_ids) for s, c in calls for i, _, _ in c),
                    "prompt_tokens": sum(len(policy.chat_prompt_ids(tokenizer, skills.inject_skills(s[i].prompt_text, ep, st)))
                                         for s, c in calls for i, ep, st in c)}
                accelerator.free_memory()  # drop accelerate's references to this copy
    finally:
        train.teacher_logprobs = original
    return {"model": what, "cfg": cfg, "rollout": rstats, "summary": rollout.summarize(trajs), "samples": len(samples),
            "update_tokens": sum(len(s.prompt_ids) + len(s.response_ids) for s in samples),
            "response_tokens": sum(len(s.response_ids) for s in samples), "results": results, "passes": passes}


def print_opid_cost(r: dict) -> None:
    cfg, rs, summary = r["cfg"], r["rollout"], r["summary"]
    print(f"model: {r['model']}")
    print(f"batch: ALFWorld train, {cfg.tasks_per_batch} tasks x {cfg.group_size} rollouts, max_steps {cfg.max_steps}, "
          f"H={cfg.history_length}, max_new_tokens {cfg.max_new_tokens}: {r['samples']} step-samples, "
          f"{r['update_tokens']} prompt+response tokens ({r['response_tokens']} response), "
          f"success {summary['success_rate']:.2f}, invalid {summary['invalid_rate']:.2f}")
    print(f"rollout (collected once, shared): {rs['rollout_s']:.2f} s ({rs['generate_s']:.2f} s generate, "
          f"{rs['env_s']:.2f} s env), {rs['generated_tokens']} tokens generated")
    print(f"learn_from_batch, median of {len(r['results'][VARIANTS[0]]['learn'])} (order alternated), seconds:")
    print(f"{'variant':22s} {'old':>6s} {'ref+analysis':>12s} {'teacher':>8s} {'update':>8s} {'learn':>8s} {'+rollout':>9s}"
          f" {'passes':>7s} {'routed':>7s} {'re-scored tok (resp)':>21s}")
    med = {v: {k: median(x) for k, x in res.items()} for v, res in r["results"].items()}
    for v in VARIANTS:
        m, p = med[v], r["passes"][v]
        print(f"{v[0] + ' ' + (v[1] if v[0] == 'opid' else ''):22s} {m['old']:6.3f} {m['analysis']:12.3f} "
              f"{m['teacher']:8.3f} "
              f"{m['update']:8.3f} {m['learn']:8.3f} {m['learn'] + rs['rollout_s']:9.3f} {p['passes']:7d} "
              f"{p['routed_samples']:7d} {p['prompt_tokens'] + p['response_tokens']:>13d} ({p['response_tokens']})"
              f"   learn per repeat: " + " ".join(f"{t:.2f}" for t in r["results"][v]["learn"]))
    grpo = med[VARIANTS[0]]["learn"]
    for v in VARIANTS[1:]:
        learn = med[v]["learn"]
        print(f"OPID/GRPO [{v[1]}]: learning part {learn / grpo:.3f}, full iteration (rollout + learning) "
              f"{(learn + rs['rollout_s']) / (grpo + rs['rollout_s']):.3f}; "
              f"{r['passes'][v]['passes'] / max(r['samples'], 1):.2f} teacher passes per step-sample")
    print("goal: full-iteration ratio <= 1.35 with step_priority (one teacher pass per routed sample). "
          "'old' = the recomputed log π_old pass (no grad, every algorithm); 'ref+analysis' = the KL reference "
          "pass with the skill analyzer running alongside (GRPO: ref pass only).")


# ---------------------------------------------------------------------------------------------
# gpu: one OPID iteration of a randomly initialised Qwen2.5-1.5B-Instruct-shaped model
# ---------------------------------------------------------------------------------------------

QWEN_CONFIG = Path(__file__).resolve().parent / "configs" / "qwen2.5-1.5b-instruct.json"
TOY_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096)  # a vocabulary above the tokenizer's, like the real one
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peak per chip
# README "Reproduction recipes" shapes (group size, history, 512-token responses, micro-batches, K, β, c_ent);
# 2 tasks and 2 steps per episode instead of 16-128 tasks and 4-30 steps, so one iteration fits the check
GPU_RECIPES = {
    "search": dict(group_size=8, history_length=4, max_new_tokens=512, micro_batch_size=8, mini_batch_size=512,
                   max_step_skills=2, kl_coef=0.001, entropy_coef=0.0),
    "alfworld": dict(group_size=8, history_length=5, max_new_tokens=512, micro_batch_size=4, mini_batch_size=256,
                     max_step_skills=5, kl_coef=0.01, entropy_coef=0.001),
}
TOY_RECIPE = dict(group_size=2, max_new_tokens=8, micro_batch_size=2, mini_batch_size=64)


class WordOverlapRetriever:
    """Stands in for BM25 where `bm25s` is not installed: passages ranked by the number of query
    words they contain (the check measures shapes and speed, not answers)."""

    def __init__(self, corpus_path):
        rows = searchqa.read_jsonl(corpus_path)
        self.passages = [{"id": str(row.get("id", i)), "title": str(row.get("title", "")),
                          "contents": str(row.get("contents", ""))} for i, row in enumerate(rows)]
        self.words = [set(re.findall(r"\w+", f"{p['title']} {p['contents']}".lower())) for p in self.passages]

    def search(self, query: str, k: int = 3) -> list[dict]:
        query_words = set(re.findall(r"\w+", query.lower()))
        best = heapq.nlargest(k, ((len(query_words & words), -i) for i, words in enumerate(self.words)))
        return [{**self.passages[-i], "score": float(n)} for n, i in best if n > 0]


def start_retrieval_server() -> str:
    """A Search-R1-style /retrieve server over the generated QA corpus, in a thread; returns its URL."""
    import threading
    _, corpus = searchqa.load_questions("synthetic", "train")
    server = searchqa.make_retrieval_server(WordOverlapRetriever(corpus), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/retrieve"


def random_qwen_folder(folder: Path, tokenizer, toy: bool) -> dict:
    """Save a randomly initialised model of Qwen2.5-1.5B-Instruct's exact shapes (toy: TOY_SHAPES, same
    vocabulary) in bf16 with `tokenizer`, so train.load_model reads it like any checkpoint."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    fields = {**json.loads(QWEN_CONFIG.read_text()), **(TOY_SHAPES if toy else {})}
    fields.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2Config(**fields)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shapes = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads", "vocab_size")}
    return {"parameters": sum(p.numel() for p in model.parameters()), **shapes}


def forward_flops(samples, shapes: dict) -> float:
    """FLOPs of one forward over the samples: 2·(non-embedding parameters) per token, the tied output
    head on response positions only (logits_to_keep), and causal attention 4·layers·hidden·L²/2."""
    hidden, vocab, layers = shapes["hidden_size"], shapes["vocab_size"], shapes["num_hidden_layers"]
    non_embedding = shapes["parameters"] - hidden * vocab
    total = 0.0
    for s in samples:
        length = len(s.prompt_ids) + len(s.response_ids)
        total += 2 * non_embedding * length + 2 * hidden * vocab * (len(s.response_ids) + 1)
        total += 4 * layers * hidden * length * length / 2
    return total


def bench_gpu_run(env_name: str, mode: str, folder: Path, shapes: dict, toy: bool, retrieval_url: str,
                  accelerator) -> dict:
    """One OPID iteration (rollout → old pass → reference + rule analyzer → teacher passes → update)
    through train.py's own functions, responses forced to max_new_tokens by masking EOS and every id
    past the tokenizer's vocabulary during generation."""
    import gc
    import rollout
    import train
    recipe = {**GPU_RECIPES[env_name], **(TOY_RECIPE if toy else {})}
    lora = mode == "lora"
    cfg = train.resolve_defaults(train.Config(
        env=env_name, model=str(folder), algo="opid", tasks_per_batch=1 if toy else 2, max_steps=2, eval_episodes=0,
        lora_rank=64 if lora else 0, lora_target_modules="q_proj,k_proj,v_proj,o_proj", lr=1e-5 if lora else 1e-6,
        search_retriever="server", retrieval_url=retrieval_url, alfworld_games=6, **recipe))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, tokenizer = train.load_model(cfg, accelerator.device)
    reference = train.load_reference(cfg, model, accelerator.device, resumed=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    load_s = time.perf_counter() - t0
    envs = [make_env(cfg.env, split="train", **train.env_kwargs(cfg)) for _ in range(cfg.tasks_per_batch * cfg.group_size)]
    task_indices = [g for g in range(cfg.tasks_per_batch) for _ in range(cfg.group_size)]
    eos = policy.eos_token_ids(unwrapped, tokenizer)
    with eos_suppressed(policy._unwrap(unwrapped), eos, from_id=len(tokenizer)), \
            ppo.compute_autocast(cfg, accelerator.device):
        trajs, rstats = rollout.collect_rollouts(unwrapped, tokenizer, envs, task_indices, task_indices,
                                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    analyzer = train.build_analyzer(cfg, unwrapped, tokenizer)
    record = train.learn_from_batch(cfg, trajs, model, unwrapped, reference, tokenizer, optimizer, accelerator,
                                    analyzer, 0, {})
    samples = [s for t in trajs for s in t.samples]
    fwd = forward_flops(samples, shapes)
    update_flops = (3.0 if not lora else 2.0) * fwd  # LoRA: no weight gradients of the frozen base
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)
    result = {
        "env": env_name, "mode": mode, "toy": toy, "device": device_name, "bf16_peak_tflops": peak,
        "model": f"random init, {'toy shapes' if toy else 'Qwen2.5-1.5B-Instruct shapes'} ({QWEN_CONFIG.name})",
        "model_shapes": shapes, "trainable_parameters": sum(p.numel() for p in unwrapped.parameters() if p.requires_grad),
        "trainable_dtype": str(next(p for p in unwrapped.parameters() if p.requires_grad).dtype),
        "mixed_precision": ppo.mixed_precision(cfg), "gradient_checkpointing": True,
        "settings": {k: getattr(cfg, k) for k in ("tasks_per_batch", "group_size", "max_steps", "history_length",
                                                   "max_new_tokens", "micro_batch_size", "mini_batch_size", "lora_rank",
                                                   "lr", "kl_coef", "entropy_coef", "logprob_chunk_size")},
        "samples": len(samples), "tokens": tokens, "response_tokens": sum(len(s.response_ids) for s in samples),
        "prompt_tokens_mean": sum(len(s.prompt_ids) for s in samples) / len(samples),
        "prompt_tokens_max": max(len(s.prompt_ids) for s in samples),
        "seconds": {"load": load_s, "rollout": rstats["rollout_s"], "generate": rstats["generate_s"],
                    "env": rstats["env_s"], "old": record["time/old_s"],
                    "reference_and_analysis": record["time/analysis_s"],
                    "teacher": record["time/teacher_s"], "update": record["time/update_s"]},
        "rollout_tokens_per_s": rstats["generated_tokens"] / max(rstats["generate_s"], 1e-9),
        "update_tokens_per_s": tokens / max(record["time/update_s"], 1e-9),
        "old_pass_tokens_per_s": tokens / max(record["time/old_s"], 1e-9),
        "update_tflops_per_s": update_flops / max(record["time/update_s"], 1e-9) / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "record": record,
    }
    result["update_mfu"] = result["update_tflops_per_s"] / peak if peak else None
    result["old_pass_mfu"] = fwd / max(record["time/old_s"], 1e-9) / 1e12 / peak if peak else None
    del model, optimizer, unwrapped, reference
    accelerator.free_memory()
    gc.collect()
    return result


def bench_gpu(out_dir: str, toy: bool = False, envs: tuple = ("search", "alfworld"),
              modes: tuple = ("lora", "full")) -> list[dict]:
    """Every (environment, LoRA/full fine-tuning) pair once; one JSON file per pair in `out_dir`."""
    import importlib.util
    import tempfile
    from accelerate import Accelerator
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runnable = [e for e in envs if e != "alfworld" or importlib.util.find_spec("alfworld")]
    texts = []
    for name in runnable:
        env = make_env(name, split="train", think=True, **games_kwargs(name, 6))
        for k in range(8):
            env.reset(k % env.num_tasks())
            texts.append(env.prompt())
    tokenizer = warmstart.train_tiny_tokenizer(texts + ["<think>", "</think>", "<action>", "</action>", "<search>",
                                                     "</search>", "<answer>", "</answer>"], 1024 if toy else 8192)
    url = start_retrieval_server()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes = random_qwen_folder(Path(tmp) / "model", tokenizer, toy)
        for env_name in envs:
            for mode in modes:
                if env_name not in runnable:
                    result = {"env": env_name, "mode": mode,
                              "skipped": "alfworld is not installed (see scripts/gpu_check.sh)"}
                else:
                    result = bench_gpu_run(env_name, mode, Path(tmp) / "model", shapes, toy, url, accelerator)
                (out / f"{env_name}-{mode}.json").write_text(json.dumps(result, indent=1, default=str))
                print_gpu(result)
                results.append(result)
    return results


def print_gpu(r: dict) -> None:
    if "skipped" in r:
        print(f"{r['env']:9s} {r['mode']:5s} skipped: {r['skipped']}")
        return
    sec = r["seconds"]
    memory = f"{r['peak_memory_gib']:.1f} GiB peak" if r["peak_memory_gib"] is not None else "no GPU"
    mfu = f"{100 * r['update_mfu']:.1f}%" if r["update_mfu"] is not None else "n/a"
    print(f"{r['env']:9s} {r['mode']:5s} {r['samples']} samples, {r['tokens']} tokens: {memory}; rollout "
          f"{r['rollout_tokens_per_s']:.0f} tok/s, update {r['update_tokens_per_s']:.0f} tok/s (MFU {mfu}); seconds: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))


# ---------------------------------------------------------------------------------------------
# memory: an ESTIMATE of GPU memory per process at the README recipes' shapes (no GPU needed)
# ---------------------------------------------------------------------------------------------

QWEN_SHAPES = {  # Qwen2.5-*-Instruct config.json values
    "1.5B": dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936, tied=True),
    "3B": dict(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936, tied=True),
    "7B": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tied=False),
}
RECIPE_SHAPES = {"alfworld": dict(micro_batch=4, prompt=2048, response=512),   # docs/method.md §9 maxima
                 "search": dict(micro_batch=8, prompt=4096, response=512)}
GIB = 2**30


def qwen_parameters(m: dict) -> int:
    head = m["hidden"] // m["heads"]
    attention = m["hidden"] * head * (m["heads"] * 2 + m["kv_heads"] * 2) + head * (m["heads"] + 2 * m["kv_heads"])
    mlp = 3 * m["hidden"] * m["intermediate"]
    per_layer = attention + mlp + 2 * m["hidden"]
    return m["layers"] * per_layer + m["vocab"] * m["hidden"] * (1 if m["tied"] else 2) + m["hidden"]


def memory_estimate(size: str, env: str, lora_rank: int = 0, checkpointing: bool = True,
                    chunk_tokens: int = 1024) -> dict:
    """GiB per process, by part. Full fine-tuning: fp32 weights, fp32 gradients, AdamW's two fp32
    moments, the frozen fp32 reference (20 bytes per parameter). LoRA (q,k,v,o): the bf16 base; the
    adapters' weights, gradients and moments are small. Activations of one micro-batch in bf16:
    per token and layer ≈ 14·hidden + 10·intermediate bytes (attention by SDPA, no [L×L] scores);
    with checkpointing only each layer's 2·hidden-byte input is kept, plus one layer being
    recomputed. Logits: bf16 [micro-batch, response+1, vocab] and their gradient; fp32 softmax
    work on at most `chunk_tokens` tokens at a time (≈ 4 tensors alive)."""
    m, r = QWEN_SHAPES[size], RECIPE_SHAPES[env]
    params = qwen_parameters(m)
    tokens = r["micro_batch"] * (r["prompt"] + r["response"])
    if lora_rank:
        head = m["hidden"] // m["heads"]
        adapter = m["layers"] * lora_rank * (2 * m["hidden"] + m["hidden"] + m["heads"] * head
                                             + 2 * (m["hidden"] + m["kv_heads"] * head))
        weights, optimizer = 2 * params + 4 * adapter, 12 * adapter
    else:
        weights, optimizer = 4 * params + 4 * params, 8 * params  # trained + reference; gradients below
    gradients = 0 if lora_rank else 4 * params
    per_layer = (14 * m["hidden"] + 10 * m["intermediate"]) * tokens
    activations = (m["layers"] * 2 * m["hidden"] * tokens + 2 * per_layer) if checkpointing else m["layers"] * per_layer
    logits = 2 * 2 * r["micro_batch"] * (r["response"] + 1) * m["vocab"] + 4 * 4 * chunk_tokens * m["vocab"]
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
             "logits": logits}
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["parameters_b"] = params / 1e9
    return out


def print_memory() -> None:
    print("ESTIMATES (not measurements), GiB per process, README recipe shapes "
          "(ALFWorld micro-batch 4 x 2048+512 tokens, search 8 x 4096+512), bf16 compute:")
    print(f"{'model':6s} {'env':9s} {'mode':22s} {'weights':>8s} {'grads':>6s} {'optim':>6s} {'activ.':>7s} "
          f"{'logits':>7s} {'total':>7s}")
    for size in QWEN_SHAPES:
        for env in RECIPE_SHAPES:
            for label, kwargs in (("full, checkpointing", {}), ("LoRA 64, checkpointing", {"lora_rank": 64}),
                                  ("full, no checkpointing", {"checkpointing": False})):
                e = memory_estimate(size, env, **kwargs)
                print(f"{size:6s} {env:9s} {label:22s} {e['weights']:8.1f} {e['gradients']:6.1f} {e['optimizer']:6.1f} "
                      f"{e['activations']:7.1f} {e['logits']:7.1f} {e['total']:7.1f}")


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env", help="environment steps per second with random admissible actions")
    p_env.add_argument("--env", default="alfworld", choices=["alfworld", "webshop", "search"])
    p_env.add_argument("--batch", type=int, default=16, help="copies stepped together")
    p_env.add_argument("--steps", type=int, default=200, help="environment steps in total")
    p_env.add_argument("--split", default="train")
    p_gen = sub.add_parser("generate", help="rollout-engine vs bare model.generate tokens/s, and update tokens/s")
    p_gen.add_argument("--model", default="tiny", help="tiny | smollm2 | a model folder or hub id")
    p_gen.add_argument("--batch", type=int, default=8, help="prompts generated together")
    p_gen.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (exactly)")
    p_gen.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats")
    p_gen.add_argument("--temperature", type=float, default=1.0)
    p_cost = sub.add_parser("opid-cost", help="OPID vs GRPO iteration time on the same rollout batch")
    p_cost.add_argument("--iters", type=int, default=2, help="timed repeats of each variant (order alternated)")
    p_cost.add_argument("--tasks-per-batch", type=int, default=2)
    p_cost.add_argument("--group-size", type=int, default=4)
    p_cost.add_argument("--max-steps", type=int, default=15,
                        help="episode cap (15 keeps the default run short; 0: ALFWorld's 30 as in training)")
    p_gpu = sub.add_parser("gpu", help="one OPID iteration of a random Qwen2.5-1.5B-shaped model: memory, tokens/s, MFU")
    p_gpu.add_argument("--out", default="results/gpu", help="folder of the JSON results, one per environment and mode")
    p_gpu.add_argument("--toy", action="store_true", help="toy shapes and sizes (seconds on a CPU; checks the plumbing)")
    p_gpu.add_argument("--envs", default="search,alfworld")
    p_gpu.add_argument("--modes", default="lora,full")
    sub.add_parser("memory", help="ESTIMATED GPU memory per process for Qwen2.5 1.5B/3B/7B at the recipes' shapes")
    for p in (p_gen, p_cost):
        p.add_argument("--seed", type=int, default=0)
    for p in (p_env, p_gen, p_cost):
        p.add_argument("--alfworld-games", type=int, default=0, help="generated ALFWorld games (0: the default splits)")
    args = parser.parse_args(argv)
    if args.command == "env":
        r = bench_env(args.env, args.batch, args.steps, args.split, games=args.alfworld_games)
        print(f"{r['env']}: {r['steps_per_s']:.1f} env steps/s over {r['steps']} random steps "
              f"({r['batch']} copies); {r['resets']} resets, {r['seconds_per_reset']:.2f} s each")
    elif args.command == "generate":
        print(machine_note())
        print_generate(bench_generate(args.model, args.batch, args.new_tokens, args.repeats, args.temperature, args.seed,
                                      args.alfworld_games))
        print(machine_note())
    elif args.command == "opid-cost":
        print(machine_note())
        print_opid_cost(bench_opid_cost(args.iters, args.tasks_per_batch, args.group_size, args.max_steps or None,
                                        args.seed, args.alfworld_games))
        print(machine_note())
    elif args.command == "memory":
        print_memory()
    elif args.command == "gpu":
        bench_gpu(args.out, args.toy, tuple(args.envs.split(",")), tuple(args.modes.split(",")))


if __name__ == "__main__":
    main()
