"""One process of the FSDP check in test_distributed.py, started by `accelerate launch` with the
repository's configs/accelerate_fsdp.yaml on a machine without GPU (2 processes, gloo):

    accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2 tests/fsdp_worker.py MODEL SAMPLES GRADS RUNS

The launcher passes the config file's fsdp_config on as FSDP_* variables, but accelerate turns
FSDP on only for GPU processes; here its state is set to FSDP by hand with the plugin those
variables describe — torch's FSDP2 itself runs on the CPU. Process 1's episodes end after one
step, process 0's run to --max-steps: process 1 must keep stepping (dummy generate calls) while
process 0 still plays. First the gradient of one PPO step on a fixed batch split 3 / 1 (as in
distributed_worker.py, gathered from the shards into GRADS), then 2 iterations of `train.main`,
then --resume for a third (the gathered checkpoint reloaded). Process 0 plots 2 s late: without
the barrier at the end of `train.main`, process 1 exits under a live peer and aborts (gloo:
"terminate called without an active exception").
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import policy  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
from tests import distributed_worker  # noqa: E402


def force_fsdp_on_cpu():
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    accelerator = Accelerator(cpu=True)
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    return accelerator


class OneStepEpisodes:
    """An environment whose episodes end after their first step (the rest is the wrapped env's)."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, text):
        observation, reward, _, info = self.env.step(text)
        return observation, reward, True, info


def main() -> None:
    model_folder, samples_file, grads_file, runs_dir = sys.argv[1:5]
    accelerator = force_fsdp_on_cpu()
    samples = torch.load(samples_file, weights_only=False)  # a fixed batch, split 3 / 1 as in the DDP check
    share = samples[:3] if accelerator.process_index == 0 else samples[3:]
    grads = distributed_worker.fixed_batch_gradient(model_folder, share, accelerator)
    if accelerator.is_main_process:
        torch.save(grads, grads_file)
    accelerator.wait_for_everyone()
    calls = {"everyone_finished": 0, "dummy_generate": 0}
    everyone_finished, generate = rollout.everyone_finished, policy.generate

    def counted_everyone_finished(model, finished_here):
        calls["everyone_finished"] += 1
        return everyone_finished(model, finished_here)

    def counted_generate(model, tokenizer, prompt_ids, **kwargs):
        calls["dummy_generate"] += prompt_ids == [[tokenizer.pad_token_id]]
        return generate(model, tokenizer, prompt_ids, **kwargs)
    rollout.everyone_finished, policy.generate = counted_everyone_finished, counted_generate
    if accelerator.process_index == 0:  # the main process plots last, slowly: process 1 must wait for it
        plot = train.plot_learning_curve

        def slow_plot(*args, **kwargs):
            time.sleep(2)
            return plot(*args, **kwargs)
        train.plot_learning_curve = slow_plot
    if accelerator.process_index == 1:
        make_env = train.make_env
        train.make_env = lambda *args, **kwargs: OneStepEpisodes(make_env(*args, **kwargs))
    train.main(train.parse_config([
        "--model", model_folder, "--out-dir", runs_dir, "--name", "fsdp", "--env", "search", "--iters", "2",
        "--tasks-per-batch", "3", "--group-size", "2", "--max-steps", "3", "--max-new-tokens", "6",
        "--micro-batch-size", "1", "--mini-batch-size", "4", "--eval-episodes", "3", "--lora-rank", "0",
        "--analyzer", "rule", "--kl-coef", "0.01"]))
    train.main(train.parse_config(["--resume", str(Path(runs_dir, "fsdp")), "--iters", "3"]))
    # how often this process asked "is everyone done?" and how many dummy generate calls it made
    Path(runs_dir, f"lockstep-{accelerator.process_index}.json").write_text(json.dumps(calls))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
