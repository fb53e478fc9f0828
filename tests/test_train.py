"""The training loop: Δ from real re-scoring, the all-failed group, and the real CLI end to end."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import opid
import policy
import rollout
import skills
import train
import warmstart

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("You are an agent in a small test world.\n"
          "Your task is to: put a clean mug in the coffeemachine\n"
          "You have taken 1 step(s) so far.\n"
          "Current observation: You arrive at countertop 1. On the countertop 1, you see a mug 1.\n"
          "Now it's your turn to choose the next action.\n"
          "Reply with one action inside <action> </action> tags.")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    texts = [PROMPT, "<action>take mug 1 from countertop 1</action>", "Critical-Step Skill Episode-Level Skill"] * 3
    tokenizer = warmstart.train_tiny_tokenizer(texts, vocab_size=400)
    model = warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=2, intermediate_size=128)
    model.eval()
    return model, tokenizer


def explicit_logprobs(model, prompt_ids, response_ids):
    """log π(y_ℓ | prompt, y_<ℓ) from one plain forward over [prompt ‖ response] (no padding)."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return logp.gather(1, torch.tensor(response_ids)[:, None])[:, 0]


def response_tensors(samples):
    """(longest response, response mask, saved old log-probs), padded the way learn_from_batch pads."""
    length = max(len(s.response_ids) for s in samples)
    mask = train.padded([[1.0] * len(s.response_ids) for s in samples], length)
    return length, mask, train.padded([s.old_logprobs for s in samples], length)


def make_sample(tokenizer, model, prompt_text, seed, temperature=1.0):
    prompt_ids = policy.chat_prompt_ids(tokenizer, prompt_text)
    gen = policy.generate(model, tokenizer, [prompt_ids], max_new_tokens=8, seed=seed, temperature=temperature)[0]
    return rollout.Sample(uid=0, traj_uid=seed, step=0, prompt_text=prompt_text, prompt_ids=prompt_ids,
                          response_ids=gen.response_ids, old_logprobs=gen.logprobs, response_text=gen.text,
                          action="", valid=False, invalid_reason="", observation="", reward=0.0, privileged="")


def test_delta_equals_difference_of_two_explicit_logprob_computations(tiny):
    model, tokenizer = tiny
    sample = make_sample(tokenizer, model, PROMPT, seed=3)
    step_skill = "Take the mug 1 from countertop 1 now."
    length = len(sample.response_ids)
    teacher, scored = train.teacher_logprobs(model, tokenizer, [sample], [(0, None, step_skill)], length, 4)
    assert scored.tolist() == [True]
    augmented_ids = policy.chat_prompt_ids(tokenizer, skills.inject_skills(PROMPT, None, step_skill))
    assert augmented_ids != sample.prompt_ids
    with_skill = explicit_logprobs(model, augmented_ids, sample.response_ids)
    without_skill = explicit_logprobs(model, sample.prompt_ids, sample.response_ids)
    # the saved generation log-probs are the original-context term of Δ (no second pass)
    assert torch.allclose(torch.tensor(sample.old_logprobs), without_skill, atol=1e-4)
    delta = opid.skill_delta(teacher, torch.tensor([sample.old_logprobs]), torch.ones(1, length))
    assert torch.allclose(delta[0], with_skill - without_skill, atol=1e-4)
    assert delta.abs().max() > 1e-3  # the inserted skill really changes the scores


def policy_gradient_norm(model, tokenizer, samples, advantages_per_token):
    model.zero_grad()
    logp, mask, _ = policy.response_logprobs(model, [s.prompt_ids for s in samples],
                                             [s.response_ids for s in samples], requires_grad=True)
    width = logp.shape[1]
    old = train.padded([s.old_logprobs for s in samples], width)
    loss, _ = opid.ppo_clip_loss(logp, old, advantages_per_token[:, :width], mask)
    loss.backward()
    return sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5


def test_all_failed_group_grpo_gradient_is_zero_opid_is_not(tiny):
    model, tokenizer = tiny
    samples = [make_sample(tokenizer, model, PROMPT, seed=s) for s in range(4)]
    length, mask, old = response_tensors(samples)
    scores = torch.tensor([opid.trajectory_score(0.0, 1, 0.1)] * 4)  # every rollout failed the same way
    outcome = opid.outcome_advantage(scores, torch.zeros(4, dtype=torch.long))
    assert outcome.abs().max() == 0

    grpo_adv = opid.combined_advantage(outcome, mask)
    assert policy_gradient_norm(model, tokenizer, samples, grpo_adv) == 0

    contexts = [(i, None, "Avoid repeating 'go to cabinet 1'; open the fridge 1 instead.") for i in range(4)]
    teacher, routed = train.teacher_logprobs(model, tokenizer, samples, contexts, length, 4)
    delta = opid.skill_delta(teacher, old, mask)
    opid_adv = opid.combined_advantage(outcome, mask, delta_step=delta, routed_step=routed, w_step=0.001)
    assert opid_adv.abs().max() > 0
    assert policy_gradient_norm(model, tokenizer, samples, opid_adv) > 0


def test_format_token_mask_marks_tags_and_end_of_turn(tiny):
    _, tokenizer = tiny
    ids = tokenizer.encode("<action>take mug 1 from countertop 1</action>", add_special_tokens=False)
    ids = ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    fmt = train.format_token_mask(tokenizer, ids, len(ids) + 2)
    pieces = [tokenizer.decode([t]) for t in ids]
    for j, piece in enumerate(pieces):
        is_tag = any(ch in piece for ch in "<>/") or j == len(ids) - 1
        is_word = piece.strip() in ("take", "mug", "from", "countertop")
        if is_word:
            assert fmt[j] == 0, piece
        if is_tag:
            assert fmt[j] == 1, piece
    assert fmt[len(ids):].sum() == 0  # padding is never a format token


def fake_trajectory(traj_uid, rewards, valids, episode_reward):
    samples = [rollout.Sample(uid=0, traj_uid=traj_uid, step=t, prompt_text="", prompt_ids=[1], response_ids=[2],
                              old_logprobs=[-1.0], response_text="", action="look", valid=v, invalid_reason="",
                              observation=f"obs {t}", reward=r, privileged="")
               for t, (r, v) in enumerate(zip(rewards, valids))]
    return rollout.Trajectory(uid=0, traj_uid=traj_uid, task_index=0, task="t", task_type="pick", env_name="alfworld",
                              samples=samples, won=episode_reward > 0, episode_reward=episode_reward)


def test_scores_and_step_returns_put_the_penalty_on_the_invalid_step():
    trajs = [fake_trajectory(0, [0.0, 0.0, 10.0], [True, False, True], 10.0),
             fake_trajectory(1, [0.0, 0.0], [False, True], 0.0)]
    close = lambda a, b: torch.testing.assert_close(a, torch.tensor(b), atol=1e-6, rtol=0)  # noqa: E731
    close(train.sample_scores(trajs, 0.1, "step"), [10.0, 9.9, 10.0, -0.1, 0.0])
    close(train.sample_scores(trajs, 0.1, "trajectory"), [9.9, 9.9, 9.9, -0.1, -0.1])
    views = train.trajectory_views(trajs, 0.95, 0.1)
    returns = [s.discounted_return for v in views for s in v.steps]
    assert returns == pytest.approx([9.025, 9.4, 10.0, -0.1, 0.0])  # γ-discounted, then −0.1 on the invalid step


def test_config_help_lists_every_field():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    for field in train.dataclasses.fields(train.Config):
        assert "--" + field.name.replace("_", "-") in out.stdout


def test_bad_values_are_rejected_with_a_clear_message():
    for argv, message in [(["--env", "minecraft"], "--env must be one of"), (["--algo", "ppo2"], "--algo must be one of"),
                          (["--routing", "random"], "--routing must be one of"),
                          (["--alfworld-task-types", "pick"], "--alfworld-task-types takes"),
                          (["--env", "search", "--alfworld-task-types", "pick_and_place"], "--alfworld-task-types takes"),
                          (["--eval-split", "test"], "--eval-split must be eval or train"),
                          (["--penalty-scope", "episode"], "--penalty-scope must be step or trajectory")]:
        with pytest.raises(SystemExit, match=message):
            train.resolve_defaults(train.parse_config(argv))


# ---------------------------------------------------------------------------------------------
# The real CLI, end to end, with a small random-initialised model (the warm-started tiny agent
# takes minutes to build; these runs check the plumbing, not learning).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from envs import make_env
    texts = []
    for name, kw in [("alfworld", dict(n_games=6, train_games=6)), ("webshop", {}), ("search", {})]:
        env = make_env(name, split="train", think=False, **kw)
        for i in range(2):
            env.reset(i)
            texts.append(env.prompt())
    texts += ["<action>go to cabinet 1</action>", "<search>who</search>", "<answer>x</answer>", "click[buy now]"]
    torch.manual_seed(0)
    tokenizer = warmstart.train_tiny_tokenizer(texts, vocab_size=1024)
    model = warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=2, intermediate_size=128)
    folder = tmp_path_factory.mktemp("model") / "tiny-random"
    policy.save_policy(model, tokenizer, folder)
    return folder


def run_train(model_dir, out_dir, *extra, check=True):
    argv = [sys.executable, "train.py", "--model", str(model_dir), "--out-dir", str(out_dir), "--tasks-per-batch", "2",
            "--group-size", "2", "--max-new-tokens", "8", "--eval-episodes", "2", "--alfworld-games", "6", *extra]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert not check or done.returncode == 0, done.stderr[-4000:]
    return done


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("env", ["alfworld", "webshop", "search"])
def test_opid_runs_two_iterations_on_every_environment(model_dir, tmp_path, env):
    run_train(model_dir, tmp_path, "--env", env, "--algo", "opid", "--iters", "2", "--max-steps", "3", "--name", "r")
    recs = records(tmp_path / "r")
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["updates"] for r in train_recs] == [1, 2]
    assert [r["updates"] for r in recs if r["kind"] == "eval"] == [0, 2]
    for r in train_recs:
        assert r["skills/share_with_skills"] > 0  # the rule-based analyzer found something to say
        assert r["routing/share_step"] + r["routing/share_episode"] > 0
        assert "delta/mean_format_tokens" in r and r["time/teacher_s"] >= 0
    assert (tmp_path / "r" / "checkpoint" / "model" / "config.json").exists()


def test_eval_split_train_plays_the_training_games(model_dir, tmp_path, monkeypatch):
    splits = []
    real_make_env = train.make_env

    def spy(name, split, **kwargs):
        splits.append(split)
        return real_make_env(name, split=split, **kwargs)

    monkeypatch.setattr(train, "make_env", spy)
    cfg = train.parse_config(["--model", str(model_dir), "--out-dir", str(tmp_path), "--name", "r", "--iters", "0",
                              "--tasks-per-batch", "1", "--group-size", "1", "--max-new-tokens", "4", "--max-steps", "2",
                              "--alfworld-games", "6", "--eval-episodes", "3", "--eval-split", "train"])
    train.main(cfg)
    evals = [r for r in records(tmp_path / "r") if r["kind"] == "eval"]
    assert [r["split"] for r in evals] == ["train", "train"]  # start and end of a zero-iteration run
    assert set(splits) == {"train"}  # no eval-split game was ever built


@pytest.mark.parametrize("algo", ["grpo", "gigpo", "skill_sd", "rlsd", "opsd", "skill_grpo"])
def test_every_baseline_runs_an_iteration(model_dir, tmp_path, algo):
    run_train(model_dir, tmp_path, "--env", "search", "--algo", algo, "--iters", "1", "--eval-episodes", "0",
              "--name", "r")
    (rec,) = records(tmp_path / "r")
    assert rec["updates"] == 1 and rec["samples"] > 0 and rec["grad_norm"] >= 0
    if algo in ("grpo", "gigpo"):
        assert "delta/mean" not in rec  # no teacher pass at all


def test_kill_mid_run_and_resume_continues_without_corrupting_metrics(model_dir, tmp_path):
    argv = [sys.executable, "train.py", "--model", str(model_dir), "--out-dir", str(tmp_path), "--env", "search",
            "--tasks-per-batch", "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-episodes", "0",
            "--iters", "6", "--save-every", "1", "--name", "r"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "r" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text())["updates"] >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["updates"]
    assert 2 <= done < 6
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "updates": ')  # a line cut by the kill
    run_train(model_dir, tmp_path, "--resume", str(tmp_path / "r"), "--iters", "6", "--eval-episodes", "0")
    recs = records(tmp_path / "r")
    assert [r["updates"] for r in recs] == [1, 2, 3, 4, 5, 6]  # every update once, in order
    assert json.loads(state.read_text())["updates"] == 6
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["env"] == "search" and config["iters"] == 6


def test_ppo_update_raises_positive_and_lowers_negative_advantage_responses(tiny):
    """The sign convention end to end: one real `ppo_update` step moves the log-likelihood of a
    response with A > 0 up and of one with A < 0 down (the rest of the batch has A = 0)."""
    import copy
    import random
    from accelerate import Accelerator

    base, tokenizer = tiny
    model = copy.deepcopy(base)  # the module fixture stays untouched
    samples = [make_sample(tokenizer, model, PROMPT, seed=s) for s in range(6)]
    length, mask, old = response_tensors(samples)
    advantages = torch.zeros(6, length)
    advantages[0], advantages[1] = 1.0, -1.0
    advantages = advantages * mask

    def sequence_logprob(i):
        s = samples[i]
        return explicit_logprobs(model, s.prompt_ids, s.response_ids).sum().item()

    before = [sequence_logprob(i) for i in range(2)]
    cfg = train.Config(mini_batch_size=6, micro_batch_size=3, kl_coef=0.0, entropy_coef=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = train.ppo_update(model, optimizer, Accelerator(cpu=True), samples, advantages, old, None, None, None,
                             mask, cfg, random.Random(0))
    after = [sequence_logprob(i) for i in range(2)]
    assert stats["grad_norm"] > 0
    assert after[0] > before[0] + 1e-3, (before, after)
    assert after[1] < before[1] - 1e-3, (before, after)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_ppo_ratio_is_one_at_the_rollout_temperature(tiny, temperature):
    """Rollouts sampled at T store log softmax(z/T); the update must score at the same T, so that
    before any step the ratio is exactly 1: no clipping, pg loss = −token-mean(A), KL to an
    identical reference = 0. (Scoring at T = 1 after sampling at 0.5 breaks all three.)"""
    import random
    from accelerate import Accelerator

    model, tokenizer = tiny
    samples = [make_sample(tokenizer, model, PROMPT, seed=s, temperature=temperature) for s in range(4)]
    length, mask, old = response_tensors(samples)
    advantages = torch.tensor([[1.0], [-0.5], [2.0], [-1.5]]) * mask
    cfg = train.Config(temperature=temperature, mini_batch_size=4, micro_batch_size=2, kl_coef=0.0, entropy_coef=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train.ppo_update(model, optimizer, Accelerator(cpu=True), samples, advantages, old, old.clone(), None,
                             None, mask, cfg, random.Random(0))
    model.eval()
    assert stats["clipfrac"] == 0
    assert stats["pg_loss"] == pytest.approx(-(advantages.sum() / mask.sum()).item(), abs=1e-5)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)


def test_before_after_table_by_hand(tmp_path):
    records = [{"kind": "eval", "updates": 0, "env_steps": 0, "eval/success_rate": 0.2, "eval/invalid_rate": 0.4},
               {"kind": "train", "updates": 1},
               {"kind": "eval", "updates": 5, "env_steps": 1234, "eval/success_rate": 0.3, "eval/invalid_rate": 0.25}]
    table = train.before_after_table(records, 60, 60, "eval", tmp_path)
    lines = table.splitlines()
    assert "60 episodes over 60 games" in lines[0]
    # standard errors sqrt(.2·.8/60) = 0.0516, sqrt(.3·.7/60) = 0.0592; change ± sqrt(0.0516² + 0.0592²) = 0.0785
    assert lines[2].split()[:5] == ["start", "0", "0", "0.200", "±"] and "0.052" in lines[2] and "0.400" in lines[2]
    assert lines[3].split()[:4] == ["end", "5", "1234", "0.300"] and "0.059" in lines[3] and "0.250" in lines[3]
    assert "+0.100 ± 0.079" in lines[4] and "-0.150" in lines[4]
    assert str(tmp_path / "metrics.jsonl") in lines[5]
    assert "no evaluation" in train.before_after_table(records[1:2], 60, 60, "eval", tmp_path)
