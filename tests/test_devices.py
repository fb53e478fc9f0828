"""The real-model path on the CPU: devices, precision, the recomputed old pass, memory bounds, resume.

A GPU run differs from the CPU default in three ways these tests reproduce here: the model's
outputs live on another device than the trainer's CPU tensors (the `meta` device stands in),
the compute is bf16 (CPU autocast gives the same rounding), and full fine-tuning meets learning
rates (1e-6) far below bf16's resolution.
"""
import random
import types

import pytest
import torch
from accelerate import Accelerator

import opid
import policy
import warmstart
import rollout
import ppo
import train

PROMPT = ("You are an agent in a small test world.\n"
          "Your task is to: put a clean mug in the coffeemachine\n"
          "Current observation: You arrive at countertop 1. On the countertop 1, you see a mug 1.\n"
          "Now it's your turn to choose the next action.\n"
          "Reply with one action inside <action> </action> tags.")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [PROMPT, "<action>take mug 1 from countertop 1</action>", "go to cabinet 1 open fridge 1"] * 3
    return warmstart.train_tiny_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def model_folder(tokenizer, tmp_path_factory):
    model = warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=2, intermediate_size=128, seed=1)
    return policy.save_policy(model, tokenizer, tmp_path_factory.mktemp("model") / "tiny-random")


def make_samples(model, tokenizer, n: int, cfg=None) -> list[rollout.Sample]:
    """n samples of different prompt lengths, generated (in cfg's compute precision) and kept as ids."""
    samples = []
    for i in range(n):
        text = PROMPT + "\nYou have taken %d step(s) so far." % i + " Look around." * (i % 3)
        ids = policy.chat_prompt_ids(tokenizer, text)
        with ppo.compute_autocast(cfg or train.Config(), torch.device("cpu")):
            gen = policy.generate(model, tokenizer, [ids], max_new_tokens=6, seed=i)[0]
        samples.append(rollout.Sample(uid=i // 2, traj_uid=i, step=0, prompt_text=text, prompt_ids=ids,
                                      response_ids=gen.response_ids, old_logprobs=gen.logprobs, response_text=gen.text,
                                      action="", valid=True, invalid_reason="", observation="", reward=0.0,
                                      privileged=""))
    return samples


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


class MetaStandIn(torch.nn.Module):
    """A "model" whose parameter, and therefore every output, lives on the meta device."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))
        self.config = types.SimpleNamespace(pad_token_id=0)


def test_ppo_update_meets_model_outputs_on_the_models_device(monkeypatch):
    """The trainer's per-sample tensors (mask, old, advantages, reference, teacher) are CPU
    tensors; the log-probs come back on the model's device. Before the fix the first micro-batch
    died with "Tensor on device cpu is not on the expected device meta"."""
    def forward_on_meta(model, batch, temperature=1.0, with_entropy=False, chunk_tokens=0):
        rows, width = batch["response_ids"].shape
        values = model.weight * torch.ones(rows, width, device="meta")  # carries a gradient to the weight
        return values, batch["response_mask"].to("meta"), (values if with_entropy else None)

    monkeypatch.setattr(policy, "forward_response_logprobs", forward_on_meta)
    samples = [rollout.Sample(uid=0, traj_uid=i, step=0, prompt_text="", prompt_ids=[1, 2, 3][:i + 1],
                              response_ids=[4, 5, 6, 7][:i + 2], old_logprobs=[-1.0] * (i + 2), response_text="",
                              action="", valid=True, invalid_reason="", observation="", reward=0.0, privileged="")
               for i in range(3)]
    length = 4
    mask = train.padded([[1.0] * len(s.response_ids) for s in samples], length)
    old = train.padded([s.old_logprobs for s in samples], length)
    advantages = torch.tensor([[1.0], [-1.0], [0.5]]) * mask
    cfg = train.Config(mini_batch_size=3, micro_batch_size=2, kl_coef=0.01, entropy_coef=0.001, algo="skill_sd")
    model = MetaStandIn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = Accelerator(cpu=True)
    plan = ppo.update_plan(samples, cfg, accelerator, random.Random(0))
    stats = ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, old.clone(), old.clone(),
                             torch.ones(3, dtype=torch.bool), mask, cfg)
    assert set(stats) == {"loss", "pg_loss", "kl", "entropy", "clipfrac", "grad_norm", "update/skipped_nonfinite"}
    assert all(v.device.type == "meta" and v.shape == () for v in stats.values())
    assert model.weight.grad is not None and model.weight.grad.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# Precision: fp32 master weights, bf16 compute, one forward path for old / teacher / update
# ---------------------------------------------------------------------------------------------


def test_full_fine_tuning_keeps_fp32_master_weights_and_moves_them_at_lr_1e6(model_folder, tokenizer):
    """AdamW's first step changes every weight by lr·sign(g) = 1e-6. fp32 weights of scale 0.02
    (resolution ~1e-9) all move; bf16 weights (resolution ~1e-4) almost all stay: the reason
    full fine-tuning loads in fp32 and leaves bf16 to the autocast compute."""
    cfg = train.Config(model=str(model_folder), mixed_precision="bf16", lr=1e-6, mini_batch_size=8,
                       micro_batch_size=4, kl_coef=0.0, entropy_coef=0.0, gradient_checkpointing=False)

    def share_moved(model, accelerator):
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        samples = make_samples(accelerator.unwrap_model(prepared), tokenizer, 8, cfg)
        length = max(len(s.response_ids) for s in samples)
        mask = train.padded([[1.0] * len(s.response_ids) for s in samples], length)
        plan = ppo.update_plan(samples, cfg, accelerator, random.Random(0))
        old = ppo.score_samples(prepared, samples, plan[0]["micro_batches"], cfg, accelerator)
        advantages = torch.linspace(-1, 1, 8)[:, None] * mask
        ppo.update(prepared, optimizer, accelerator, samples, plan, advantages, old, None, None, None, mask, cfg)
        moved = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
        return moved / sum(b.numel() for b in before)

    accelerator = Accelerator(cpu=True)
    model, _ = train.load_model(cfg, accelerator.device)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32_share = share_moved(model, accelerator)
    bf16_model, _ = policy.load_policy(str(model_folder), dtype=torch.bfloat16)
    bf16_share = share_moved(bf16_model, accelerator)
    assert fp32_share >= 0.99, fp32_share
    assert bf16_share < 0.2, bf16_share  # seen: about 0.02


def test_bf16_first_ratio_is_exactly_one_and_an_empty_skill_gives_zero_delta(model_folder, tokenizer, monkeypatch):
    """In bf16 the generate-time log-probs differ from the scoring forward's (KV cache, other
    padding); the recomputed old pass shares the micro-batches of the teacher and update passes,
    so the first PPO ratio is exactly 1 and a skill that changes nothing gives Δ = 0 exactly."""
    cfg = train.Config(model=str(model_folder), mixed_precision="bf16", mini_batch_size=6, micro_batch_size=3,
                       kl_coef=0.0, entropy_coef=0.0, gradient_checkpointing=True)
    accelerator = Accelerator(cpu=True)
    model, _ = train.load_model(cfg, accelerator.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    samples = make_samples(unwrapped, tokenizer, 6, cfg)
    length = max(len(s.response_ids) for s in samples)
    mask = train.padded([[1.0] * len(s.response_ids) for s in samples], length)
    generated = train.padded([s.old_logprobs for s in samples], length)
    plan = ppo.update_plan(samples, cfg, accelerator, random.Random(0))
    groups = [g for step in plan for g in step["micro_batches"]]
    old = ppo.score_samples(unwrapped, samples, groups, cfg, accelerator)

    with ppo.compute_autocast(cfg, accelerator.device):
        teacher, routed = train.teacher_logprobs(unwrapped, tokenizer, samples, [(i, None, None) for i in range(6)],
                                                 length, 3, cfg.temperature, groups)
    assert routed.all()
    assert torch.equal(opid.skill_delta(teacher, old, mask), torch.zeros_like(mask))
    # what Δ was before: the teacher against generate's numbers, noise of bf16's size
    assert opid.skill_delta(teacher, generated, mask).abs().max() > 1e-4

    seen = []
    real_loss = opid.ppo_clip_loss

    def spy(logprobs, old_logprobs, *args, **kwargs):
        seen.append((logprobs.detach().clone(), old_logprobs.clone()))
        return real_loss(logprobs, old_logprobs, *args, **kwargs)

    monkeypatch.setattr(opid, "ppo_clip_loss", spy)
    advantages = torch.linspace(-1, 1, 6)[:, None] * mask
    stats = ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, None, None, None, mask, cfg)
    assert len(seen) == 2 and float(stats["clipfrac"]) == 0.0
    for logprobs, old_logprobs in seen:
        assert torch.equal(torch.exp(logprobs - old_logprobs), torch.ones_like(logprobs))  # ratio exactly 1
    # the metric that shows the generate-time mismatch instead of training on it
    shown = ppo.generate_mismatch(old, generated, mask, cfg.clip_eps)
    assert shown["old/mean_abs_diff_generate"] > 0


# ---------------------------------------------------------------------------------------------
# Memory: chunked log-softmax
# ---------------------------------------------------------------------------------------------


def test_chunked_logprobs_and_entropy_equal_unchunked_with_gradients(model_folder, tokenizer):
    model, _ = policy.load_policy(str(model_folder))
    samples = make_samples(model, tokenizer, 4)
    prompts, responses = [s.prompt_ids for s in samples], [s.response_ids for s in samples]
    results = []
    for chunk in (10_000, 5, 1):  # one slice; slices of ⌊5/4⌋ = 1 column; 1 column
        model.zero_grad(set_to_none=True)
        logprobs, mask, entropy = policy.response_logprobs(model, prompts, responses, micro_batch_size=4,
                                                           with_entropy=True, requires_grad=True, chunk_tokens=chunk)
        ((logprobs * mask).sum() + 0.1 * entropy.sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), [p.grad.clone() for p in model.parameters()]))
    for logprobs, entropy, grads in results[1:]:
        torch.testing.assert_close(logprobs, results[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(entropy, results[0][1], atol=1e-6, rtol=0)
        for g, g0 in zip(grads, results[0][2]):
            torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)


def test_chunked_forward_never_builds_an_fp32_tensor_over_the_bound(model_folder, tokenizer, monkeypatch):
    """Every fp32 [rows, columns, vocabulary] slice holds at most `chunk_tokens` tokens."""
    model, _ = policy.load_policy(str(model_folder))
    samples = make_samples(model, tokenizer, 4)
    sizes = []
    real = policy._token_logprobs_and_entropy

    def spy(logits, tokens, temperature, with_entropy):
        sizes.append(logits.shape[0] * logits.shape[1])
        return real(logits, tokens, temperature, with_entropy)

    monkeypatch.setattr(policy, "_token_logprobs_and_entropy", spy)
    policy.response_logprobs(model, [s.prompt_ids for s in samples], [s.response_ids for s in samples],
                             micro_batch_size=4, with_entropy=True, chunk_tokens=8)
    width = max(len(s.response_ids) for s in samples)
    assert max(sizes) <= 8 and sum(sizes) == 4 * width  # every response column, 2 columns × 4 rows at a time


# ---------------------------------------------------------------------------------------------
# Resume keeps the initial KL reference; a model that cannot be loaded stops before a run folder
# ---------------------------------------------------------------------------------------------


def test_resume_of_full_fine_tuning_keeps_the_initial_reference(model_folder, tmp_path, monkeypatch, small_cache):
    seen = []
    real_reference_policy = policy.reference_policy

    def spy(model, reference=None):
        seen.append(None if reference is None else {k: v.clone() for k, v in reference.state_dict().items()})
        return real_reference_policy(model, reference)

    monkeypatch.setattr(policy, "reference_policy", spy)
    argv = ["--model", str(model_folder), "--out-dir", str(tmp_path), "--name", "r", "--env", "search",
            "--tasks-per-batch", "1", "--group-size", "2", "--max-new-tokens", "4", "--max-steps", "2",
            "--eval-episodes", "0", "--kl-coef", "0.01", "--lr", "1e-2", "--iters", "1"]
    train.main(train.parse_config(argv))
    train.main(train.parse_config(["--resume", str(tmp_path / "r"), "--iters", "2"]))
    initial = policy.load_policy(str(model_folder))[0].state_dict()
    trained = policy.load_policy(str(tmp_path / "r" / "checkpoint" / "model"))[0].state_dict()
    first, at_resume = seen[0], seen[-1]
    assert all(torch.equal(first[k], initial[k]) for k in initial)
    assert all(torch.equal(at_resume[k], initial[k]) for k in initial)  # not the checkpoint's weights
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    kl_at_resume = train.load_metrics(tmp_path / "r" / "metrics.jsonl", 2)[0][-1]["kl"]
    assert kl_at_resume > 1e-6  # the trained weights are measured against the initial model (0 before the fix)


def test_a_model_that_cannot_be_loaded_stops_before_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, message in [(str(tmp_path / "missing"), "no model folder at"),
                          (str(tmp_path), "has no config.json"),
                          ("nobody-here/no-such-model", "not in the local Hugging Face cache and HF_HUB_OFFLINE")]:
        out = tmp_path / "runs"
        with pytest.raises(SystemExit, match=message) as stop:
            train.main(train.parse_config(["--model", name, "--out-dir", str(out), "--env", "search"]))
        assert str(stop.value).startswith(f"--model {name}: ") and "\n" not in str(stop.value)
        assert not out.exists()
