"""One process of the data-parallel check in test_distributed.py (started by torchrun, 2 processes, gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py MODEL SAMPLES GRADS RUNS

1. A fixed batch, split unevenly (process 0: samples 0–2, process 1: sample 3), one PPO update
   with micro-batches of one sample: process 1 runs two padding micro-batches. Process 0 saves the
   all-reduced gradient to GRADS for comparison with a single-process run on all four samples.
2. `train.main` for 2 iterations with 3 task groups (2 on process 0, 1 on process 1), process 1
   starting 2 s late: the main process may not write the run folder before every process has
   checked that it is free to use.
"""
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ppo  # noqa: E402
import train  # noqa: E402

GRADIENT_CFG = dict(mini_batch_size=64, micro_batch_size=1, kl_coef=0.01, entropy_coef=0.01, max_grad_norm=1e9,
                    gradient_checkpointing=False)


def fixed_batch_gradient(model_folder: str, samples, accelerator) -> list[torch.Tensor]:
    """The gradient of one PPO step on `samples` (this process's share), averaged over processes."""
    cfg = train.Config(model=model_folder, **GRADIENT_CFG)
    model, _ = train.load_model(cfg, accelerator.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay, the gradient stays in .grad
    model, optimizer = accelerator.prepare(model, optimizer)
    length = 8
    mask = train.padded([[1.0] * len(s.response_ids) for s in samples], length)
    plan = ppo.update_plan(samples, cfg, accelerator, random.Random(0))
    groups = ppo.pad_groups([g for step in plan for g in step["micro_batches"] if g], accelerator)  # FSDP: equal counts
    old = torch.nn.functional.pad(ppo.score_samples(model, samples, groups, cfg, accelerator),
                                  (0, length - max(len(s.response_ids) for s in samples)))
    advantages = torch.tensor([[1.0 - 0.5 * s.traj_uid] for s in samples]) * mask
    ref = (old - 0.1) * mask
    ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, ref, None, None, mask, cfg)
    grads = [p.grad.detach().clone() for p in accelerator.unwrap_model(model).parameters()]
    return [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]  # FSDP: gather the shards


def main() -> None:
    model_folder, samples_file, grads_file, runs_dir = sys.argv[1:5]
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    samples = torch.load(samples_file, weights_only=False)
    share = samples[:3] if accelerator.process_index == 0 else samples[3:]
    grads = fixed_batch_gradient(model_folder, share, accelerator)
    if accelerator.is_main_process:
        torch.save(grads, grads_file)
    accelerator.wait_for_everyone()
    if accelerator.process_index == 1:  # late to start: the main process must not write the run folder before
        time.sleep(2)                   # this one has checked it is free ("already holds a run")
    train.main(train.parse_config([
        "--model", model_folder, "--out-dir", runs_dir, "--name", "dp", "--env", "search", "--iters", "2",
        "--tasks-per-batch", "3", "--group-size", "2", "--max-steps", "2", "--max-new-tokens", "6",
        "--micro-batch-size", "1", "--mini-batch-size", "4", "--eval-episodes", "3"]))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
