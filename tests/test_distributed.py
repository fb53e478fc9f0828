"""Data parallel on the CPU: torchrun, 2 processes over gloo (accelerate's MULTI_CPU), uneven shares.

Before the fix, each process ran its own number of micro-batches and optimizer steps, each
backward was an all-reduce, and the process with fewer samples ran ahead into the next
iteration: the run died ("Connection closed by peer"), and every process appended its own
partial metrics line.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import policy
import warmstart
import rollout

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"


def load_worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def model_and_samples(tmp_path):
    texts = ["Your question: who founded the company? <search>founder</search> <answer>x</answer>"] * 4
    tokenizer = warmstart.train_tiny_tokenizer(texts, vocab_size=300)
    model = warmstart.build_tiny_model(tokenizer, hidden_size=32, num_layers=2, heads=2, intermediate_size=64, seed=3)
    folder = policy.save_policy(model, tokenizer, tmp_path / "model")
    samples = []
    for i in range(4):  # prompts and responses of different lengths
        prompt = policy.chat_prompt_ids(tokenizer, "Your question: who founded it?" + " Search first." * i)
        response = tokenizer.encode("<search>founder</search>"[: 8 + 4 * i], add_special_tokens=False)[:6]
        samples.append(rollout.Sample(uid=0, traj_uid=i, step=0, prompt_text="", prompt_ids=prompt,
                                      response_ids=response, old_logprobs=[0.0] * len(response), response_text="",
                                      action="", valid=True, invalid_reason="", observation="", reward=0.0,
                                      privileged=""))
    torch.save(samples, tmp_path / "samples.pt")
    return folder, samples


def test_two_processes_with_uneven_shares_stay_in_step_and_match_one_process(model_and_samples, tmp_path,
                                                                             small_cache):
    from accelerate import Accelerator
    from environments import make_env

    folder, samples = model_and_samples
    make_env("search", split="train")  # build the generated QA data once, before two processes race for it
    env = dict(os.environ, OPID_CACHE=str(small_cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(WORKER), str(folder), str(tmp_path / "samples.pt"), str(tmp_path / "grads.pt"), str(tmp_path / "runs")]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    # one metrics line per iteration and per evaluation, written by one process, combining both shares
    records = [json.loads(line) for line in (tmp_path / "runs" / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["updates"]) for r in records] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    for r in records:
        if r["kind"] == "train":
            assert r["processes"] == 2 and r["samples"] >= 6  # 3 groups × 2 rollouts × ≥ 1 step, both shares
            assert r["mean_steps"] >= 1 and r["grad_norm"] > 0

    # the gradient of the uneven 2-process update equals one process's on the whole batch
    single = load_worker().fixed_batch_gradient(str(folder), samples, Accelerator(cpu=True))
    parallel = torch.load(tmp_path / "grads.pt")
    assert len(parallel) == len(single)
    for g2, g1 in zip(parallel, single):
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-4)  # fp32; only the summation order differs
    assert sum(float(g.abs().sum()) for g in single) > 0


def test_micro_batches_are_length_sorted_and_deterministic():
    import ppo
    lengths = [5, 3, 5, 1, 9]
    assert ppo.micro_batches([0, 1, 2, 3], lengths, 2) == [[3, 1], [0, 2]]  # ties by index
    assert ppo.micro_batches([4, 2, 0], lengths, 2) == [[0, 2], [4]]


def test_merge_records_adds_counts_takes_slowest_time_and_weights_by_samples():
    import train
    merged = train.merge_records([{"samples": 2, "clipfrac": 0.5, "time/update_s": 3.0, "delta/mean": 1.0},
                                  {"samples": 6, "clipfrac": 0.1, "time/update_s": 5.0}])
    assert merged["samples"] == 8 and merged["time/update_s"] == 5.0
    assert merged["clipfrac"] == pytest.approx((2 * 0.5 + 6 * 0.1) / 8)  # 0.2
    assert merged["delta/mean"] == 1.0  # only the process that had skills reports Δ


class TwoProcessStandIn:
    """What `update_plan` asks of an accelerator, for process 1 of 2 whose partner's numbers are
    given: `gather` stacks the partner's tensor after this process's own."""
    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, partner_count: int, partner_micro: list[int], partner_tokens: list[int]):
        self.partner = [torch.tensor([partner_count]), torch.tensor([[partner_micro, partner_tokens]])]

    def gather(self, tensor):
        partner = self.partner.pop(0)
        return torch.cat([tensor, partner])


def test_update_plan_pads_to_the_partners_micro_batch_count_and_counts_global_tokens():
    import random
    import ppo
    import train
    samples = [rollout.Sample(uid=0, traj_uid=0, step=0, prompt_text="", prompt_ids=[1] * 4, response_ids=[2] * 5,
                              old_logprobs=[0.0] * 5, response_text="", action="", valid=True, invalid_reason="",
                              observation="", reward=0.0, privileged="")]
    # this process: 1 sample (5 response tokens); the partner: 3 samples in 3 micro-batches, 12 tokens
    cfg = train.Config(mini_batch_size=64, micro_batch_size=1)
    plan = ppo.update_plan(samples, cfg, TwoProcessStandIn(3, [3], [12]), random.Random(0))
    assert len(plan) == 1  # ⌈4 global samples / 64⌉ optimizer steps
    assert plan[0]["micro_batches"] == [[0], [], []]  # two zero-weight micro-batches keep the pace
    assert plan[0]["tokens"] == 17.0  # 5 + 12: the token-mean's global denominator
    cfg = train.Config(mini_batch_size=2, micro_batch_size=1)  # ⌈4 / 2⌉ = 2 steps; this process has 1 sample
    plan = ppo.update_plan(samples, cfg, TwoProcessStandIn(3, [1, 2], [4, 8]), random.Random(0))
    assert [step["micro_batches"] for step in plan] == [[[]], [[0], []]]
    assert [step["tokens"] for step in plan] == [4.0, 13.0]


def test_fsdp_two_processes_with_uneven_episode_lengths_stay_in_lock_step(model_and_samples, tmp_path, small_cache):
    """configs/accelerate_fsdp.yaml through `accelerate launch`, 2 CPU processes (FSDP2 over gloo):
    process 1's episodes last 1 step, process 0's 3. Before this, train.py refused FSDP; with
    `ppo.lockstep` forced off, the run dies in the first scoring pass (process 1 runs 1 micro-batch,
    process 0 runs 3, their all-gathers no longer pair: gloo "Connection reset by peer")."""
    from accelerate import Accelerator
    from environments import make_env

    folder, samples = model_and_samples
    make_env("search", split="train")
    env = dict(os.environ, OPID_CACHE=str(small_cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate_fsdp.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port()), str(ROOT / "tests" / "fsdp_worker.py"),
            str(folder), str(tmp_path / "samples.pt"), str(tmp_path / "grads.pt"), str(tmp_path / "runs")]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    # the sharded, uneven (3 / 1 samples, padding micro-batches) gradient equals one process's on all four
    single = load_worker().fixed_batch_gradient(str(folder), samples, Accelerator(cpu=True))
    sharded = torch.load(tmp_path / "grads.pt")
    assert len(sharded) == len(single)
    for g2, g1 in zip(sharded, single):
        torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-4)  # fp32; only the summation order differs

    run = tmp_path / "runs" / "fsdp"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["updates"]) for r in records] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2),
                                                            ("train", 3), ("eval", 3)]
    for r in records:
        if r["kind"] == "train":  # process 0: 2 groups × 2 copies × 3 steps; process 1: 1 × 2 × 1
            assert r["processes"] == 2 and r["samples"] == 14 and r["grad_norm"] > 0
        else:  # 3 episodes: 2 on process 0 (3 steps), 1 on process 1 (1 step)
            assert r["eval/mean_steps"] == pytest.approx(7 / 3)
    # both processes asked "everyone done?" equally often; process 1 idled in dummy generate calls:
    # 6 rollouts (3 evaluations, 3 iterations) × (3 steps + the final check), 2 idle steps each
    calls = [json.loads((tmp_path / "runs" / f"lockstep-{r}.json").read_text()) for r in (0, 1)]
    assert calls == [{"everyone_finished": 24, "dummy_generate": 0}, {"everyone_finished": 24, "dummy_generate": 12}]
    # the checkpoint holds the whole model (gathered from the shards), trained away from the start
    trained, _ = policy.load_policy(str(run / "checkpoint" / "model"), device="cpu")
    initial, _ = policy.load_policy(str(folder), device="cpu")
    initial_weights = initial.state_dict()
    assert trained.state_dict().keys() == initial_weights.keys()
    for name, weight in trained.state_dict().items():
        assert weight.shape == initial_weights[name].shape
    assert sum(not torch.equal(w, initial_weights[n]) for n, w in trained.state_dict().items()) > 0
    optimizer_state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["optimizer"]
    assert len(optimizer_state["state"]) == len(list(initial.parameters()))  # every parameter's AdamW moments
