"""The training loop: Δ from real re-scoring, the all-failed group, and the real CLI end to end."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.tracking import GeneralTracker

import opid
import policy
import rollout
import skills
import ppo
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
    # in fp32 generate's own log-probs agree with the scoring forward; the trainer still recomputes
    # log π_old with that forward (in bf16 they differ: tests/test_devices.py)
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


def test_validity_reaches_the_environments_that_have_admissible_actions():
    for env, expected in [("alfworld", "admissible"), ("webshop", "admissible"), ("search", None)]:
        kwargs = train.env_kwargs(train.resolve_defaults(train.parse_config(["--env", env, "--validity", "admissible"])))
        assert kwargs.get("validity") == expected
    assert train.env_kwargs(train.resolve_defaults(train.parse_config([])))["validity"] == "format"


def test_config_help_lists_every_field():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    for field in train.dataclasses.fields(train.Config):
        assert "--" + field.name.replace("_", "-") in out.stdout


def test_bad_values_are_rejected_with_a_clear_message():
    for argv, message in [(["--env", "minecraft"], "--env must be one of"), (["--algo", "ppo2"], "--algo must be one of"),
                          (["--routing", "random"], "--routing must be one of"),
                          (["--alfworld-task-types", "pick"], "--alfworld-task-types takes"),
                          (["--env", "search", "--alfworld-task-types", "pick_and_place"], "--alfworld-task-types takes"),
                          (["--eval-split", "test"], "--eval-split must be one of eval, train"),
                          (["--train-split", "eval"], "--train-split must be one of train, fresh"),
                          (["--env", "search", "--train-split", "fresh"], "--train-split fresh exists only for --env alfworld"),
                          (["--penalty-scope", "episode"], "--penalty-scope must be one of step, trajectory"),
                          (["--validity", "strict"], "--validity must be one of format, admissible"),
                          (["--lr-warmup-ratio", "1.5"], "--lr-warmup-ratio must be in"),
                          (["--dual-clip", "0.5"], "--dual-clip must be 0 \\(off\\) or > 1")]:
        with pytest.raises(SystemExit, match=message):
            train.resolve_defaults(train.parse_config(argv))


# ---------------------------------------------------------------------------------------------
# The real CLI, end to end, with a small random-initialised model (the warm-started tiny agent
# takes minutes to build; these runs check the plumbing, not learning).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from environments import make_env
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
    assert (tmp_path / "r" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the learning curve


def test_cli_log_is_whole_lines_with_a_summary_when_piped(model_dir, tmp_path):
    """`python train.py 2>&1 | tee log`: stderr is not a terminal, so no progress bar writes
    carriage-return fragments; every iteration and evaluation is one line, and the run ends with a
    before/after table and the paths of its metrics and plot."""
    argv = [sys.executable, "train.py", "--model", str(model_dir), "--out-dir", str(tmp_path), "--env", "search",
            "--algo", "grpo", "--iters", "1", "--tasks-per-batch", "2", "--group-size", "2", "--max-new-tokens", "8",
            "--eval-episodes", "2", "--name", "r"]
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    log = done.stdout.decode()  # bytes: text mode would turn every carriage return into a newline
    assert "\r" not in log, [line for line in log.split("\n") if "\r" in line]
    lines = log.splitlines()
    assert sum(line.startswith("[eval start") for line in lines) == 1
    assert sum(line.startswith("[iter 1/1]") for line in lines) == 1
    assert "eval split: 2 episodes over 200 games per evaluation (success ± standard error)" in lines
    assert sum(line.startswith(("start ", "end ", "change ")) for line in lines) == 3
    assert f"metrics: {tmp_path / 'r' / 'metrics.jsonl'}   plot: {tmp_path / 'r' / 'curves.png'}" in lines
    assert (tmp_path / "r" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what it is given (stands in for tensorboard / wandb)."""
    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_trackers_get_the_scalars_of_metrics_jsonl(model_dir, tmp_path):
    tracker = RecordingTracker()
    cfg = train.parse_config(["--model", str(model_dir), "--out-dir", str(tmp_path), "--name", "r", "--env", "search",
                              "--algo", "opid", "--iters", "2", "--tasks-per-batch", "2", "--group-size", "2",
                              "--max-new-tokens", "8", "--eval-episodes", "2"])
    train.main(cfg, trackers=[tracker])
    recs = records(tmp_path / "r")
    assert [step for step, _ in tracker.logged] == [r["updates"] for r in recs] == [0, 1, 2, 2]
    for (_, values), rec in zip(tracker.logged, recs):
        expected = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and k != "updates"}
        expected.update({f"eval/per_task_type/{t}": v for t, v in rec.get("eval/per_task_type", {}).items()})
        assert values == expected
    assert "delta/mean_abs" in tracker.logged[1][1] and "eval/success_rate" in tracker.logged[0][1]
    assert tracker.config["algo"] == "opid" and tracker.config["env"] == "search" and tracker.finished


def test_report_to_rejects_unknown_and_missing_trackers(monkeypatch):
    assert train.report_to(train.Config()) == []  # default: none
    with pytest.raises(SystemExit, match="--report-to must be one of"):
        train.report_to(train.Config(report_to="mlflow"))
    import accelerate.utils
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        train.report_to(train.Config(report_to="tensorboard"))
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    assert train.report_to(train.Config(report_to="wandb")) == ["wandb"]


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
            "--iters", "6", "--save-every", "1", "--name", "r", "--alfworld-games", "6"]
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
    accelerator = Accelerator(cpu=True)
    plan = ppo.update_plan(samples, cfg, accelerator, random.Random(0))
    stats = ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, None, None, None, mask, cfg)
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
    accelerator = Accelerator(cpu=True)
    plan = ppo.update_plan(samples, cfg, accelerator, random.Random(0))
    stats = ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, old.clone(), None, None,
                             mask, cfg)
    model.eval()
    assert stats["clipfrac"] == 0
    assert stats["pg_loss"] == pytest.approx(-(advantages.sum() / mask.sum()).item(), abs=1e-5)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)


def test_warmup_schedule_by_hand(monkeypatch):
    # the search recipe: 150 updates, 10 % warm-up -> 15 warm-up iterations, lr 1e-6
    monkeypatch.setattr(train, "check_model_loadable", lambda name: None)  # no hub here
    cfg = train.resolve_defaults(train.Config(env="search", model="Qwen/Qwen2.5-3B-Instruct", iters=150))
    assert cfg.lr_warmup_ratio == 0.1 and train.warmup_iterations(cfg) == 15 and cfg.lr == 1e-6
    lrs = [train.warmup_lr(1e-6, it, 15) for it in (0, 1, 7, 14, 15, 149)]
    assert lrs == pytest.approx([0.0, 1e-6 / 15, 7e-6 / 15, 14e-6 / 15, 1e-6, 1e-6], rel=1e-12, abs=0)
    assert train.warmup_iterations(train.resolve_defaults(train.Config(env="alfworld", iters=150))) == 0
    assert train.warmup_iterations(train.Config(iters=5, lr_warmup_ratio=0.1)) == 0   # int(0.5)
    assert train.warmup_iterations(train.Config(iters=5, lr_warmup_iters=3, lr_warmup_ratio=0.1)) == 3
    assert [train.warmup_lr(2.0, it, 0) for it in range(3)] == [2.0, 2.0, 2.0]


def test_mini_batch_size_follows_the_environment(monkeypatch):
    # the released scripts: 256 ALFWorld, 64 WebShop, 512 search step-samples per optimizer step
    monkeypatch.setattr(train, "check_model_loadable", lambda name: None)
    sizes = {env: train.resolve_defaults(train.Config(env=env)).mini_batch_size
             for env in ("alfworld", "webshop", "search")}
    assert sizes == {"alfworld": 256, "webshop": 64, "search": 512}
    assert train.resolve_defaults(train.Config(env="webshop", mini_batch_size=8)).mini_batch_size == 8
    with pytest.raises(SystemExit, match="--mini-batch-size must be >= 1"):
        train.resolve_defaults(train.Config(env="search", mini_batch_size=0))


def test_non_finite_gradient_skips_the_step_and_is_counted(tiny):
    import copy
    import random
    from accelerate import Accelerator

    base, tokenizer = tiny
    model = copy.deepcopy(base)
    samples = [make_sample(tokenizer, model, PROMPT, seed=s) for s in range(4)]
    length, mask, old = response_tensors(samples)
    advantages = torch.ones(4, length) * mask
    cfg = train.Config(mini_batch_size=2, micro_batch_size=2, kl_coef=0.0, entropy_coef=0.0)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    poisoned = next(p for p in model.parameters() if p.requires_grad)
    handle = poisoned.register_hook(lambda grad: grad * float("nan"))  # every backward yields a NaN gradient
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    accelerator = Accelerator(cpu=True)
    plan = ppo.update_plan(samples, cfg, accelerator, random.Random(0))
    assert len(plan) == 2  # two mini-batches of 2 samples
    stats = ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, None, None, None,
                       mask, cfg)
    handle.remove()
    assert stats["update/skipped_nonfinite"] == 2 and stats["grad_norm"] == 0.0  # both mini-batches skipped
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # no step taken
    assert not optimizer.state  # Adam's moments were never touched
    # the same update without the poison moves the weights and counts nothing
    stats = ppo.update(model, optimizer, accelerator, samples, plan, advantages, old, None, None, None,
                       mask, cfg)
    assert stats["update/skipped_nonfinite"] == 0 and stats["grad_norm"] > 0
    assert any(not torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_warmup_learning_rate_reaches_the_update(model_dir, tmp_path):
    run_train(model_dir, tmp_path, "--env", "search", "--algo", "grpo", "--iters", "2", "--max-steps", "2",
              "--lr-warmup-iters", "2", "--lr", "1e-3", "--eval-episodes", "0", "--name", "w")
    train_recs = [r for r in records(tmp_path / "w") if r["kind"] == "train"]
    assert [r["update/lr"] for r in train_recs] == pytest.approx([0.0, 5e-4])
    assert [r["update/skipped_nonfinite"] for r in train_recs] == [0, 0]


def test_evaluation_progress_bar_counts_episodes_on_a_terminal_only(model_dir, monkeypatch):
    import io
    from environments import make_env

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model, tokenizer = policy.load_policy(str(model_dir))
    make = lambda: make_env("search", split="eval", think=False, max_steps=2)
    outputs = []
    for stream in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stream)
        _, trajs = rollout.evaluate_policy(model, tokenizer, make, 5, episodes=3, max_new_tokens=4, batch_size=2,
                                           desc="eval test")
        assert len(trajs) == 3
        outputs.append(stream.getvalue())
    terminal, piped = outputs
    assert "eval test:" in terminal and "0/3" in terminal and "episode" in terminal
    assert piped == ""  # a pipe or a log file gets no bar at all


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


def test_before_after_table_pairs_by_game(tmp_path):
    wins0 = [[t, int(t < 3)] for t in range(10)]                 # games 0-2 won
    wins1 = [[t, int(t < 5)] for t in range(10)]                 # games 0-4 won: d = 1 on games 3, 4
    records = [{"kind": "eval", "updates": 0, "env_steps": 0, "eval/success_rate": 0.3, "eval/invalid_rate": 0.0,
                "eval/episode_wins": wins0},
               {"kind": "eval", "updates": 4, "env_steps": 99, "eval/success_rate": 0.5, "eval/invalid_rate": 0.0,
                "eval/episode_wins": wins1}]
    table = train.before_after_table(records, 10, 10, "eval", tmp_path)
    # d̄ = 0.2, Σ(d − d̄)² = 2 · 0.64 + 8 · 0.04 = 1.6, s.e. = sqrt(10 · 1.6 / 9) / 10 = 0.1333
    change_line = table.splitlines()[4]
    assert "+0.200 ± 0.133" in change_line and "paired by game" in change_line


def test_summarize_records_every_episode_by_game():
    trajs = [rollout.Trajectory(uid=0, traj_uid=i, task_index=t, task="x", task_type="y", env_name="alfworld", won=w) for i, (t, w) in enumerate(((2, True), (0, False), (2, False)))]
    assert rollout.summarize(trajs)["episode_wins"] == [[0, 0], [2, 0], [2, 1]]


def test_advantage_metrics_by_hand():
    # group 0 all lost (A = 0), group 1 mixed (A = ±1); the token-level term adds 0.5 on one token
    outcome = torch.tensor([0.0, 0.0, 1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    advantages = outcome[:, None] * mask
    advantages[2, 1] += 0.5
    stats = train.advantage_metrics(outcome, advantages, torch.tensor([0, 0, 1, 1]), mask)
    assert stats["adv/groups_with_signal"] == 0.5
    assert stats["adv/outcome_mean_abs"] == pytest.approx(4 / 7)   # tokens 2 + 1 + 3 + 1; |A| 1 on 4 of them
    assert stats["adv/token_term_mean_abs"] == pytest.approx(0.5 / 7)
