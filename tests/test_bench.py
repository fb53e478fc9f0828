"""Every bench.py sub-command at toy sizes, so that a benchmark cannot silently rot.

(`opid-cost` once crashed as the README documented it: its stand-in for train.teacher_logprobs
had missed the temperature argument.)
"""
import json

import bench

GAMES = 6  # a small generated ALFWorld split


def test_env_steps_per_second(small_cache):
    for env in ("alfworld", "search"):
        r = bench.bench_env(env, batch=2, steps=4, games=GAMES)
        assert r["steps"] >= 4 and r["steps_per_s"] > 0 and r["resets"] >= 2


def test_generate_engine_and_update_tokens_per_second(small_cache, capsys):
    r = bench.bench_generate("tiny", batch=2, new_tokens=4, repeats=1, games=GAMES)
    assert r["generated"] == 8 and len(r["times"]["engine"]) == len(r["times"]["bare"]) == 1
    assert r["engine_tps"] > 0 and r["update_tps"] > 0 and r["update_response_tokens"] == 8
    bench.print_generate(r)
    assert "ratio engine/bare" in capsys.readouterr().out


def test_opid_cost_counts_old_teacher_and_update_parts(small_cache, capsys):
    r = bench.bench_opid_cost(iters=1, tasks_per_batch=1, group_size=2, max_steps=2, games=GAMES)
    assert set(r["results"]) == set(bench.VARIANTS)
    for variant, parts in r["results"].items():
        assert all(len(parts[k]) == 1 for k in ("learn", "old", "analysis", "teacher", "update")), variant
        assert parts["old"][0] > 0 and parts["update"][0] > 0
    assert r["passes"][("grpo", "step_priority")]["passes"] == 0  # GRPO scores no teacher
    assert r["passes"][("opid", "step_priority")]["routed_samples"] > 0
    bench.print_opid_cost(r)
    assert "OPID/GRPO [step_priority]" in capsys.readouterr().out


def test_gpu_check_at_toy_shapes_writes_one_json_per_environment_and_mode(small_cache, tmp_path):
    bench.main(["gpu", "--toy", "--out", str(tmp_path)])
    for env in ("search", "alfworld"):
        for mode in ("lora", "full"):
            r = json.loads((tmp_path / f"{env}-{mode}.json").read_text())
            assert r["samples"] == r["settings"]["tasks_per_batch"] * r["settings"]["group_size"] * r["settings"]["max_steps"]
            # responses forced to max_new_tokens (EOS masked), so the shapes are the recipe's
            assert r["response_tokens"] == r["samples"] * r["settings"]["max_new_tokens"]
            assert all(r["seconds"][k] > 0 for k in ("rollout", "old", "teacher", "update"))
            assert r["update_tokens_per_s"] > 0 and r["rollout_tokens_per_s"] > 0
            assert r["trainable_dtype"] == "torch.float32"  # fp32 master weights (full) / fp32 adapters (LoRA)
            total = r["model_shapes"]["parameters"]
            assert (r["trainable_parameters"] == total) == (mode == "full")
            assert r["record"]["routing/share_step"] + r["record"]["routing/share_episode"] > 0  # teacher passes ran


def test_memory_estimate_counts_qwen_parameters_and_bytes(capsys):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**json.loads(bench.QWEN_CONFIG.read_text()))
    with torch.device("meta"):
        real = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    assert bench.qwen_parameters(bench.QWEN_SHAPES["1.5B"]) == real == 1_543_714_304
    full = bench.memory_estimate("1.5B", "alfworld")
    # fp32 weights + fp32 reference (8 B), fp32 gradients (4 B), AdamW moments (8 B) per parameter
    assert (full["weights"] + full["gradients"] + full["optimizer"]) * 2**30 == 20 * real
    unchecked = bench.memory_estimate("1.5B", "alfworld", checkpointing=False)
    assert unchecked["activations"] > 5 * full["activations"]
    bench.main(["memory"])
    assert "ESTIMATES" in capsys.readouterr().out
