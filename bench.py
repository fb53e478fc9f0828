"""Micro-benchmarks, one function per benchmark, one argparse subcommand each.

    python bench.py env --env alfworld --batch 16 --steps 200
    python bench.py generate --model tiny --batch 8 --new-tokens 64 --repeats 3
    python bench.py opid-cost --iters 2 --tasks-per-batch 2 --group-size 4 --max-steps 15

`generate`: rollout-engine throughput (`policy.generate`, which also records log π_old per token)
against a bare `model.generate` on the same prompts, and the update's forward+backward tokens/s.
`opid-cost`: OPID's learning step against GRPO's on the SAME rollout batch (OPID_SPEC §7: one extra
no-grad teacher pass per routed sample, no extra backward pass).
Every comparison is measured inside one run, interleaved; numbers from different runs (or a
machine shared with other work) are not comparable.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import random
import statistics
import time

import torch

from envs import cache_dir, make_env


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


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def alfworld_prompts(n: int, think: bool, history_length: int = 2) -> list[str]:
    """User-message texts of `n` real ALFWorld train episodes at reset (tasks 0..n-1)."""
    env = make_env("alfworld", split="train", think=think, history_length=history_length)
    texts = []
    for k in range(n):
        env.reset(k % env.num_tasks())
        texts.append(env.prompt())
    return texts


def load_bench_model(name: str):
    """(model, tokenizer, description). `tiny`: the warm-started ALFWorld agent when it is already
    cached (never built here: that takes minutes), else a random-initialised tiny model of the same
    size with a 1024-token BPE trained on a few ALFWorld prompts."""
    import policy
    if name != "tiny":
        model, tokenizer = policy.load_policy(name)
        return model.eval(), tokenizer, f"{name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)"
    import warmstart
    folder = cache_dir("models") / f"tiny-alfworld-v{warmstart.VERSION}"
    if (folder / "warmstart.json").exists():
        model, tokenizer = policy.load_policy(str(folder))
        what = f"warm-started tiny agent {folder.name}"
    else:
        tokenizer = warmstart.train_tiny_tokenizer(alfworld_prompts(32, think=False), 1024)
        model = warmstart.build_tiny_model(tokenizer, **warmstart.MODEL_SIZE)
        what = "RANDOM-INIT tiny model (warm-started agent not cached yet), 1024-token BPE"
    return model.eval(), tokenizer, f"{what} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"


@contextlib.contextmanager
def eos_suppressed(model, token_ids: list[int]):
    """Set the logits of `token_ids` to -inf in every forward pass of `model` while active.

    Used on BOTH generation paths so neither can stop early: each runs exactly max_new_tokens
    decode steps on the full batch, whatever the model would have sampled.
    """
    def hook(module, args, output):
        output.logits[..., token_ids] = float("-inf")
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
                   seed: int = 0) -> dict:
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
    import policy
    from transformers import GenerationConfig
    torch.manual_seed(seed)
    model, tokenizer, what = load_bench_model(model_name)
    think = model_name != "tiny"  # train.resolve_defaults: <think> off for tiny only
    prompt_ids = [policy.chat_prompt_ids(tokenizer, t) for t in alfworld_prompts(batch, think)]
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
                    seed: int = 0) -> dict:
    """Time of `train.learn_from_batch` for GRPO, OPID (step_priority) and OPID (additive) on ONE
    rollout batch, each from a deep copy of the same weights with a fresh AdamW and reference.

    Repeated `iters` times, the variant order reversed every other repeat. The rollout is collected
    once (as train.main does) and added to every variant for the full-iteration ratio. Teacher
    passes are counted by wrapping `train.teacher_logprobs` (bookkeeping only, nothing re-computed
    inside the timed region).
    """
    from accelerate import Accelerator
    import policy
    import rollout
    import skills
    import train
    cfg = train.resolve_defaults(train.Config(model="tiny", env="alfworld", seed=seed, iters=1, eval_episodes=0,
                                              tasks_per_batch=tasks_per_batch, group_size=group_size,
                                              max_steps=max_steps))
    random.seed(seed)
    torch.manual_seed(seed)
    base, tokenizer, what = load_bench_model("tiny")
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

    def counting_teacher_logprobs(model, tok, smp, contexts, length, micro_batch_size):
        calls.append((smp, list(contexts)))
        return original(model, tok, smp, contexts, length, micro_batch_size)

    accelerator = Accelerator(cpu=True)
    results = {v: {"learn": [], "analysis": [], "teacher": [], "update": []} for v in VARIANTS}
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
                for part in ("analysis", "teacher", "update"):
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
    print(f"{'variant':22s} {'ref+analysis':>12s} {'teacher':>8s} {'update':>8s} {'learn':>8s} {'+rollout':>9s}"
          f" {'passes':>7s} {'routed':>7s} {'re-scored tok (resp)':>21s}")
    med = {v: {k: median(x) for k, x in res.items()} for v, res in r["results"].items()}
    for v in VARIANTS:
        m, p = med[v], r["passes"][v]
        print(f"{v[0] + ' ' + (v[1] if v[0] == 'opid' else ''):22s} {m['analysis']:12.3f} {m['teacher']:8.3f} "
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
          "'ref+analysis' = the KL reference pass with the skill analyzer running alongside (GRPO: ref pass only).")


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
    for p in (p_gen, p_cost):
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "env":
        r = bench_env(args.env, args.batch, args.steps, args.split)
        print(f"{r['env']}: {r['steps_per_s']:.1f} env steps/s over {r['steps']} random steps "
              f"({r['batch']} copies); {r['resets']} resets, {r['seconds_per_reset']:.2f} s each")
    elif args.command == "generate":
        print(machine_note())
        print_generate(bench_generate(args.model, args.batch, args.new_tokens, args.repeats, args.temperature, args.seed))
        print(machine_note())
    elif args.command == "opid-cost":
        print(machine_note())
        print_opid_cost(bench_opid_cost(args.iters, args.tasks_per_batch, args.group_size, args.max_steps or None,
                                        args.seed))
        print(machine_note())


if __name__ == "__main__":
    main()
