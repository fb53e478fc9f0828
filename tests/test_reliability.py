"""Bad input and faults: hostile analyzer replies never stop training, bad flags stop the program
in one line before any file is written, and a run folder survives a kill at any point of a save."""
import copy
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import policy
import warmstart
import rollout
import run_folder
import skills as S
import train
from fake_server import FakeServer, answer, reset

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("You answer questions with the help of a search engine.\n"
          "Your question: who founded the town of Brenmoor?\n"
          "Now it's your turn: this is step 1 of 4.\n"
          "Write exactly one of the following.")
GOOD = {"episode_skill": "Search for the founder first, then answer with the full name.",
        "step_skills": {"0": "Search for 'Brenmoor founder'."}}
# The three replies that crashed training before (issue text): a list as step index, 1,000 "[",
# and a lone surrogate that the parser accepts and the tokenizer then chokes on.
LIST_AS_STEP = '{"episode_skill":"E","step_skills":[{"step":[1,2],"skill":"x"}]}'
DEEP = '{"episode_skill":"E","step_skills":' + "[" * 1000
LONE_SURROGATE = '{"episode_skill":"Do \\ud800 this"}'


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    texts = [PROMPT, "<search>Brenmoor founder</search>", "<answer>Rilbrir Bemstund</answer>",
             GOOD["episode_skill"], "Critical-Step Skill Episode-Level Skill"] * 3
    tokenizer = warmstart.train_tiny_tokenizer(texts, vocab_size=400)
    model = warmstart.build_tiny_model(tokenizer, hidden_size=32, num_layers=1, heads=2, intermediate_size=64)
    model.eval()
    return model, tokenizer


class Fixed:
    """An analyzer back-end that always answers `reply` (whatever type it is)."""

    def __init__(self, reply):
        self.reply = reply

    def complete(self, messages):
        return self.reply


def view(num_steps: int = 3) -> S.TrajectoryView:
    return S.make_trajectory_view("search", "who founded Brenmoor?", "nq", False, ["q"] * num_steps,
                                  ["<search>x</search>"] * num_steps, ["x"] * num_steps, [True] * num_steps,
                                  [0.0] * num_steps)


# ---------------------------------------------------------------------------------------------
# Extraction: linear, bounded, prefers the skills object
# ---------------------------------------------------------------------------------------------

def test_the_three_crashing_replies_are_read_without_an_exception(tiny):
    _, tokenizer = tiny
    skills, stats = S.analyze_one(view(), Fixed(LIST_AS_STEP), 2, tokenizer)
    assert skills == S.Skills("E", {}, "") and stats["no_skill"] == 0  # the bad step index is dropped
    skills, stats = S.analyze_one(view(), Fixed(DEEP), 2, tokenizer)
    assert skills is None and (stats["parse_failures"], stats["repairs"], stats["no_skill"]) == (2, 1, 1)
    skills, stats = S.analyze_one(view(), Fixed(LONE_SURROGATE), 2, tokenizer)
    assert skills.episode_skill == "Do this"
    policy.chat_prompt_ids(tokenizer, S.inject_skills(PROMPT, skills.episode_skill))  # the teacher prompt tokenises


def test_a_note_object_before_the_skills_object_is_skipped():
    good = json.dumps(GOOD)
    for text in ['{"note": 1} ' + good, 'Notes: {"a": {"b": 2}}\n```json\n' + good + "\n```",
                 '{"result": ' + good + "}", "Use {braces} wisely: " + good, "I think { the answer: " + good,
                 '{"x": "a } b"} ' + good, '{"broken": } ' + good]:
        assert S.parse_skills_json(text, 5, 3).episode_skill == GOOD["episode_skill"], text
    assert S.extract_json_object('{"note": 1} and {"other": 2}') == {"note": 1}  # none expected: the first


@pytest.mark.parametrize("shape", ["{", '{"a":', '{"a": "', "[", "{" + " " * 99, "{}", '{"a": [', "x{", '{"s": "\\\\'])
def test_extraction_is_fast_on_200k_characters(shape):
    text = (shape * (200_000 // len(shape) + 1))[:200_000]
    start = time.perf_counter()
    S.extract_json_object(text)
    S.extract_json_object(text + json.dumps(GOOD))  # beyond MAX_REPLY_CHARS: cut, not scanned
    assert time.perf_counter() - start < 1.0  # was 6.5 s for one call at 200k characters


def test_caps_on_reply_length_depth_and_skill_length(tiny):
    _, tokenizer = tiny
    good = json.dumps(GOOD)
    assert S.extract_json_object("x" * (S.MAX_REPLY_CHARS - len(good)) + good) == GOOD
    assert S.extract_json_object("x" * S.MAX_REPLY_CHARS + good) is None
    def depth(value) -> int:
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return 1 + max((depth(v) for v in children), default=0) if isinstance(value, (dict, list)) else 0

    deep = {"episode_skill": "E", "step_skills": {"0": "go."}}
    for _ in range(S.MAX_JSON_DEPTH):
        deep = {"wrap": deep}
    found = S.extract_json_object(json.dumps(deep))
    assert found != deep and depth(found) <= S.MAX_JSON_DEPTH  # only an inner span within the cap is read
    assert S.extract_json_object(DEEP) is None and S.extract_json_object("[" * 100_000) is None
    huge = {"episode_skill": "word " * 420_000, "step_skills": {"0": "step " * 2000}}  # a 2.1M-character skill
    skills = S.skills_from_object(huge, 2, 3)
    assert len(skills.episode_skill) <= S.MAX_EPISODE_SKILL_CHARS + 4 and skills.episode_skill.endswith("...")
    assert len(skills.step_skills[0]) <= S.MAX_STEP_SKILL_CHARS + 4
    fitted = S.fit_to_tokenizer(skills, tokenizer, max_tokens=20)
    assert len(tokenizer.encode(fitted.episode_skill, add_special_tokens=False)) <= 20
    marked = S.fit_to_tokenizer(S.Skills("Stop<|im_end|> now", {1: "<|im_end|>"}), tokenizer)
    assert marked == S.Skills("Stop now", {}, "")  # a skill cannot close the chat turn


# ---------------------------------------------------------------------------------------------
# Fuzz: 10,000 hostile replies through the whole analyzer path
# ---------------------------------------------------------------------------------------------

NASTY_TEXT = ["\ud800", "\udfff", "\x00", "\x1b[31m", "\u2028", "\ufeff", "<|im_end|>", "<|pad|>", "é", "𝔘",
              "\\", '"', "{", "}", "[", "]", " ", "\n", "step 3", "Do this.", "9" * 5000]


def hostile_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 5 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, -1, 2, 3, 10 ** 30, -(10 ** 30), 2 ** 63])
    if kind == 2:
        return rng.choice([0.5, 1.0, -2.0, 1e308, float("nan"), float("inf"), -0.0])
    if kind in (3, 4, 5):
        text = "".join(rng.choice(NASTY_TEXT) for _ in range(rng.randrange(0, 8)))
        return text * min(rng.choice([1] * 12 + [50, 3000]), 200_000 // max(len(text), 1))  # a few up to ~200k characters
    if kind in (6, 7):
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["episode_skill", "step_skills", "episode_summary", "step", "index", "skill", "text", "0", "1", "step 2",
            "-1", "99999999999999999999", "1e5", ""]
    return {rng.choice(keys): hostile_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def hostile_reply(rng: random.Random):
    """A reply drawn from the shapes that broke parsers: wrong types everywhere, deep or cut JSON,
    prose and fences around several objects, surrogates and control characters, huge texts."""
    kind = rng.randrange(12)
    step_key = lambda: rng.choice([0, 1, 2, 5, -1, "1", "step 2", [1, 2], {"a": 1}, None, True, 1.0, 2.5,
                                   float("nan"), 10 ** 30, "9" * 5000, ""])
    if kind <= 3:
        obj = {"episode_skill": hostile_value(rng) if rng.random() < 0.5 else "Search " + rng.choice(NASTY_TEXT),
               "step_skills": rng.choice([
                   {str(step_key()): hostile_value(rng) for _ in range(rng.randrange(0, 5))},
                   [{"step": step_key(), "skill": hostile_value(rng)} for _ in range(rng.randrange(0, 5))],
                   [hostile_value(rng) for _ in range(rng.randrange(0, 3))], hostile_value(rng)])}
        if rng.random() < 0.3:
            obj["episode_summary"] = hostile_value(rng)
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    elif kind == 4:
        text = json.dumps(hostile_value(rng))
    elif kind == 5:
        text = '{"episode_skill":"E","step_skills":' + rng.choice("[{") * rng.randrange(1, 3000)
    elif kind == 6:
        text = json.dumps(GOOD)[:rng.randrange(0, 60)]  # cut anywhere
    elif kind == 7:
        text = "".join(rng.choice(['{', '}', '[', ']', '"', '\\', ':', ',', 'a', ' ', '1']) for _ in range(200))
    elif kind == 8:
        text = (f"Sure! {json.dumps(hostile_value(rng))} ```json\n{json.dumps(GOOD)}\n``` "
                f"{{not json}} {json.dumps({'note': hostile_value(rng)})}")
    elif kind == 9:
        text = rng.choice(["{", "[", '"', "x", "{}"]) * rng.randrange(1000, 60_000)
    elif kind == 10:
        text = rng.choice([None, 42, 3.5, b"bytes", ["list"], {"dict": 1}, ""])  # not text at all
    else:
        text = json.dumps({"episode_skill": "E", "step_skills": {str(i): f"s{i}" for i in range(rng.randrange(0, 500))}})
    return text


def test_fuzz_10000_hostile_replies_through_the_analyzer_path(tiny):
    _, tokenizer = tiny
    rng = random.Random(1234)
    traj, k = view(num_steps=3), 2
    specials = [t for t in tokenizer.all_special_tokens if t]
    counts = {"skills": 0, "no_skill": 0}
    start = time.perf_counter()
    for n in range(10_000):
        reply = hostile_reply(rng)
        skills, stats = S.analyze_one(traj, Fixed(reply), k, tokenizer)  # must not raise
        assert set(stats) == set(S.STAT_KEYS) and stats["no_skill"] == (skills is None)
        assert stats["requests"] in (1, 2) and stats["transport_errors"] == 0
        if skills is None:
            counts["no_skill"] += 1
            continue
        counts["skills"] += 1
        texts = [skills.episode_skill, *skills.step_skills.values()]
        assert skills.episode_skill and len(skills.episode_skill) <= S.MAX_EPISODE_SKILL_CHARS + 4
        assert all(isinstance(i, int) and 0 <= i < traj.steps.__len__() for i in skills.step_skills)
        assert len(skills.step_skills) <= k
        for text in texts:
            text.encode("utf-8")  # strict: no lone surrogate survives
            assert not any(t in text for t in specials)
            assert len(tokenizer.encode(text, add_special_tokens=False)) <= S.MAX_SKILL_TOKENS
        if n % 25 == 0:  # the teacher prompt of this skill tokenises
            step = next(iter(skills.step_skills.values()), None)
            policy.chat_prompt_ids(tokenizer, S.inject_skills(PROMPT, skills.episode_skill, step))
    elapsed = time.perf_counter() - start
    assert counts["skills"] > 1000 and counts["no_skill"] > 1000  # both outcomes were exercised
    assert elapsed < 30, elapsed  # a few seconds on one core


# ---------------------------------------------------------------------------------------------
# Training continues: the real learn_from_batch with the HTTP analyzer on a fake endpoint
# ---------------------------------------------------------------------------------------------

def batch(model, tokenizer) -> list[rollout.Trajectory]:
    """2 groups x 2 trajectories x 2 steps of real generated samples (ids and log-probs as generated)."""
    prompt_ids = policy.chat_prompt_ids(tokenizer, PROMPT)
    trajs = []
    for t in range(4):
        traj = rollout.Trajectory(uid=t // 2, traj_uid=t, task_index=t // 2, task="who founded Brenmoor?",
                                  task_type="nq", env_name="search", won=t == 0, episode_reward=float(t == 0))
        for step in range(2):
            gen = policy.generate(model, tokenizer, [prompt_ids], max_new_tokens=6, seed=10 * t + step)[0]
            traj.samples.append(rollout.Sample(uid=t // 2, traj_uid=t, step=step, prompt_text=PROMPT,
                                               prompt_ids=prompt_ids, response_ids=gen.response_ids,
                                               old_logprobs=gen.logprobs, response_text=gen.text, action="x",
                                               valid=True, invalid_reason="", observation=f"obs {step}",
                                               reward=float(t == 0 and step == 1), privileged=""))
        trajs.append(traj)
    return trajs


@pytest.mark.parametrize("reply,expected", [
    (LIST_AS_STEP, {"no_skill": 0, "invalid_replies": 0, "parse_failures": 0}),
    (DEEP, {"no_skill": 4, "parse_failures": 8, "repairs": 4}),
    (LONE_SURROGATE, {"no_skill": 0, "invalid_replies": 0}),
    ('{"episode_skill": 7}', {"no_skill": 4, "invalid_replies": 4}),
    (None, {"no_skill": 4, "transport_errors": 4})], ids=["list-step", "deep", "surrogate", "wrong-type", "reset"])
def test_training_continues_and_counts_the_failure(tiny, reply, expected):
    import accelerate
    base, tokenizer = tiny
    model = copy.deepcopy(base)
    trajs = batch(model, tokenizer)
    cfg = train.resolve_defaults(train.Config(env="search", mini_batch_size=8, micro_batch_size=4, kl_coef=0.0,
                                              lr_warmup_ratio=0.0, analyzer="openai", analyzer_workers=2))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with FakeServer(reset if reply is None else answer(reply)) as server:
        analyzer = S.OpenAIChatAnalyzer(base_url=server.url, api_key="sk", timeout=2.0, max_retries=0, backoff=0)
        record = train.learn_from_batch(cfg, trajs, model, model, None, tokenizer, optimizer,
                                        accelerate.Accelerator(cpu=True), analyzer, 0, {})
    for key, value in expected.items():
        assert record[f"analyzer/{key}"] == value, (key, record)
    assert set(f"analyzer/{k}" for k in S.STAT_KEYS) <= set(record)  # in every record, skills or not
    assert math.isfinite(record["grad_norm"]) and math.isfinite(record["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the update happened
    warning = train.analyzer_warning(record, len(trajs))
    if expected["no_skill"] > 2:
        assert "4 of 4 trajectories got no skill" in warning
    else:
        assert warning is None and record["skills/share_with_skills"] == 1.0


# ---------------------------------------------------------------------------------------------
# Bad flags: one line, within seconds, no run folder
# ---------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--mini-batch-size", "0"], "--mini-batch-size must be >= 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--env", "search", "--search-retriever", "foo"], "--search-retriever must be one of bm25, server"),
    (["--env", "webshop", "--webshop-backend", "foo"], "--webshop-backend must be one of sim, official"),
    (["--save-every", "0"], "--save-every must be >= 1"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--clip-eps", "-0.2"], "--clip-eps must be in"),
    (["--top-p", "0"], "--top-p must be in"),
    (["--top-p", "1.5"], "--top-p must be in"),
    (["--history-length", "-1"], "--history-length must be >= 0"),
    (["--max-step-skills", "-1"], "--max-step-skills must be >= 0"),
    (["--ppo-epochs", "0"], "--ppo-epochs must be >= 1"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--model", "/no/such/model/folder"], "--model /no/such/model/folder: no model folder at"),
    (["--model", "not a model!"], "is neither tiny, smollm2, an existing folder nor a hub id"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--seed", "-1"], "--seed must be in"),
    (["--gamma", "1.5"], "--gamma must be in"),
    (["--iters", "-1"], "--iters must be >= 0"),
    (["--tasks-per-batch", "0"], "--tasks-per-batch must be >= 1"),
    (["--analyzer", "foo"], "--analyzer must be one of"),
    (["--adv-mode", "foo"], "--adv-mode must be one of"),
    (["--dual-clip", "0.5"], "--dual-clip must be 0"),
    (["--eval-temperature", "0"], "--eval-temperature must be > 0"),
    (["--rlsd-decay-iters", "0"], "--rlsd-decay-iters must be >= 1"),
    (["--name", "../elsewhere"], "--name must be a folder name"),
    (["--env", "search", "--search-retriever", "server", "--retrieval-url", "localhost:8000"], "--retrieval-url"),
    (["--env", "search", "--qa-corpus", "/no/such/corpus.jsonl"], "--qa-corpus"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_clear_line_and_no_run_folder(argv, message, tmp_path):
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=message) as exit_info:
        train.main(train.parse_config(argv + ["--out-dir", str(tmp_path / "runs")]))
    assert "\n" not in str(exit_info.value.code)
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "runs").exists()


def test_bad_model_folders_and_hub_ids(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    saved = policy.save_policy(model, tokenizer, tmp_path / "whole")
    train.check_model_loadable(str(saved))  # a whole saved folder passes
    cut = tmp_path / "cut"
    policy.save_policy(model, tokenizer, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, message in [(str(empty), "has no config.json"), (str(cut), "model.safetensors is truncated"),
                          ("no-such-org/no-such-model", "not in the local Hugging Face cache and HF_HUB_OFFLINE")]:
        with pytest.raises(SystemExit, match=message):
            train.check_model_loadable(name)


def test_the_cli_prints_one_line_for_a_bad_model(tmp_path):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", "--model", str(tmp_path / "missing"), "--out-dir",
                           str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "--model" in done.stderr
    assert time.perf_counter() - start < 60  # the import of torch/transformers is most of it
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Run folders: refuse, overwrite, resume with changed flags
# ---------------------------------------------------------------------------------------------

def write_run(run_dir: Path, **fields) -> train.Config:
    cfg = train.resolve_defaults(train.Config(env="search", out_dir=str(run_dir.parent), name=run_dir.name, **fields))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(train.dataclasses.asdict(cfg)))
    return cfg


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path):
    run_dir = tmp_path / "r"
    write_run(run_dir)
    (run_dir / "metrics.jsonl").write_text('{"updates": 1}\n')
    (run_dir / "notes.txt").write_text("mine")
    argv = ["--env", "search", "--out-dir", str(tmp_path), "--name", "r"]
    with pytest.raises(SystemExit, match=f"{run_dir} already holds a run: continue it with --resume"):
        train.open_run(train.parse_config(argv))
    cfg, found, resume_from, _ = train.open_run(train.parse_config(argv + ["--overwrite"]))
    assert found == run_dir and resume_from is None
    train.start_run_folder(cfg, found, None)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "notes.txt"]  # only the run's files went


def test_resume_refuses_changed_flags_and_reports_the_allowed_ones(tmp_path, tiny):
    model, tokenizer = tiny
    run_dir = tmp_path / "r"
    write_run(run_dir, lr=1e-4, iters=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run_folder.save_checkpoint(run_dir, model, tokenizer, optimizer, {"updates": 4, "env_steps": 40})
    with pytest.raises(SystemExit, match=r"these flags differ: --env 'webshop' \(the run has 'search'\); --lr 0.5 \(the run has 0.0001\)"):
        train.open_run(train.parse_config(["--resume", str(run_dir), "--lr", "0.5", "--env", "webshop"]))
    cfg, _, resume_from, notes = train.open_run(train.parse_config(
        ["--resume", str(run_dir), "--iters", "9", "--lr", "1e-4", "--env", "search"]))  # same values pass
    assert cfg.iters == 9 and cfg.lr == 1e-4 and resume_from == "checkpoint"
    assert notes == ["--iters 9 (the run had 4)"]


# ---------------------------------------------------------------------------------------------
# Kill points inside save_checkpoint; damaged files
# ---------------------------------------------------------------------------------------------

class Killed(Exception):
    """Stands for SIGKILL at a point of save_checkpoint."""


def kill_on_call(monkeypatch, module_function: str, call_number: int):
    real, calls = getattr(run_folder, module_function), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == call_number:
            raise Killed(module_function)
        return real(*args, **kwargs)
    monkeypatch.setattr(run_folder, module_function, wrapper)


@pytest.fixture()
def saved_run(tmp_path, tiny):
    """A run folder with a complete checkpoint of update 1 (model, optimizer state, RNG states)."""
    base, tokenizer = tiny
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    run_dir = tmp_path / "r"
    write_run(run_dir, iters=3)
    run_folder.save_checkpoint(run_dir, model, tokenizer, optimizer, {"updates": 1, "env_steps": 10})
    return run_dir, model, tokenizer, optimizer


# (what is patched, which call is the kill, the update resume finds, where it came from)
KILL_POINTS = {
    "while writing checkpoint.tmp": ("torch_save", 1, 1, "checkpoint"),
    "after checkpoint.tmp is complete": ("_rename", 1, 2, "checkpoint.tmp"),
    "after checkpoint -> checkpoint.old": ("_rename", 2, 2, "checkpoint.tmp"),
    "after checkpoint.tmp -> checkpoint": ("_remove_tree", 3, 2, "checkpoint"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_recovers_from_a_kill_at_every_point_of_a_save(saved_run, monkeypatch, point):
    run_dir, model, tokenizer, optimizer = saved_run
    patched, call, updates, source = KILL_POINTS[point]
    if patched == "torch_save":
        monkeypatch.setattr(run_folder.torch, "save", lambda *a, **k: (_ for _ in ()).throw(Killed("save")))
    else:
        kill_on_call(monkeypatch, patched, call)
    with pytest.raises(Killed):
        run_folder.save_checkpoint(run_dir, model, tokenizer, optimizer, {"updates": 2, "env_steps": 20})
    monkeypatch.undo()

    cfg, found, resume_from, notes = train.open_run(train.parse_config(["--resume", str(run_dir)]))
    assert resume_from == source
    if source != "checkpoint":
        assert f"recovered the checkpoint of update {updates} from {source}/ (a save was cut short)" in notes
    train.start_run_folder(cfg, found, resume_from)  # what main does next: finish the rotation
    checkpoint = run_dir / "checkpoint"
    assert run_folder.read_state(checkpoint)["updates"] == updates
    assert set(run_folder.load_trainer_state(checkpoint)) == {"optimizer", "torch_rng", "numpy_rng", "python_rng"}
    policy.load_policy(str(checkpoint / "model"))  # the model loads
    run_folder.save_checkpoint(run_dir, model, tokenizer, optimizer, {"updates": 3, "env_steps": 30})
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_half_removed_old_checkpoint_is_ignored(saved_run, monkeypatch):
    run_dir, model, tokenizer, optimizer = saved_run
    kill_on_call(monkeypatch, "_remove_tree", 3)
    with pytest.raises(Killed):
        run_folder.save_checkpoint(run_dir, model, tokenizer, optimizer, {"updates": 2, "env_steps": 20})
    (run_dir / "checkpoint.old" / "model" / "config.json").unlink()  # rmtree had got that far
    best, state, notes = run_folder.find_checkpoint(run_dir)
    assert (best, state["updates"]) == ("checkpoint", 2)
    assert notes == ["ignored a damaged checkpoint.old/: " + f"{run_dir}/checkpoint.old/model has no config.json "
                     "(not a saved model folder, or a cut save)"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize("damage,message", [
    (lambda c: truncate(c / "trainer_state.pt"), "trainer_state.pt is truncated or not a torch file"),
    (lambda c: truncate(c / "state.json"), "state.json is truncated or not JSON"),
    (lambda c: truncate(c / "model" / "model.safetensors"), "model.safetensors is truncated"),
    (lambda c: (c / "model" / "config.json").unlink(), "model has no config.json"),
    (lambda c: (c / "state.json").write_text('{"updates": "two"}'), "lacks integer 'updates'"),
], ids=["trainer_state.pt", "state.json", "model.safetensors", "config.json", "state-not-counts"])
def test_a_damaged_checkpoint_is_one_clear_line(saved_run, damage, message):
    run_dir = saved_run[0]
    damage(run_dir / "checkpoint")
    with pytest.raises(SystemExit, match=message) as exit_info:
        train.open_run(train.parse_config(["--resume", str(run_dir)]))
    assert "\n" not in str(exit_info.value.code) and "no complete checkpoint" in str(exit_info.value.code)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(saved_run, monkeypatch):
    run_dir, model, tokenizer, optimizer = saved_run
    kill_on_call(monkeypatch, "_remove_tree", 3)  # leaves checkpoint (update 2) and checkpoint.old (update 1)
    with pytest.raises(Killed):
        run_folder.save_checkpoint(run_dir, model, tokenizer, optimizer, {"updates": 2, "env_steps": 20})
    truncate(run_dir / "checkpoint" / "trainer_state.pt")
    best, state, notes = run_folder.find_checkpoint(run_dir)
    assert (best, state["updates"]) == ("checkpoint.old", 1) and notes[0].startswith("ignored a damaged checkpoint/")
    run_folder.finish_rotation(run_dir, best)
    assert run_folder.read_state(run_dir / "checkpoint")["updates"] == 1
    assert (run_dir / "checkpoint.damaged" / "trainer_state.pt").exists()  # kept for a look, not deleted


def test_an_unreadable_trainer_state_is_one_clear_line(saved_run):
    import zipfile
    path = saved_run[0] / "checkpoint" / "trainer_state.pt"
    with zipfile.ZipFile(path, "w") as archive:  # a whole zip archive, but not a torch file
        archive.writestr("notes.txt", "hello")
    with pytest.raises(SystemExit, match="cannot read .*trainer_state.pt") as exit_info:
        run_folder.load_trainer_state(path.parent)
    assert "\n" not in str(exit_info.value.code)
    torch.save({"optimizer": {}}, path)  # a torch file without the RNG states
    with pytest.raises(SystemExit, match=r"trainer_state.pt lacks \['numpy_rng', 'python_rng', 'torch_rng'\]"):
        run_folder.load_trainer_state(path.parent)


def test_damaged_metrics_lines_are_kept_aside_not_crashing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"kind": "train", "updates": 1}', "[1, 2]", "3", '"text"', '{"updates": "x"}', "",
             '{"kind": "eval", "updates": 2}', '{"kind": "train", "updates": 3}', '{"kind": "train", "upd']
    path.write_text("\n".join(lines))
    records, damaged = run_folder.load_metrics(path, completed_updates=2)
    assert records == [{"kind": "train", "updates": 1}, {"kind": "eval", "updates": 2}]
    assert damaged == ["[1, 2]", "3", '"text"', '{"updates": "x"}', '{"kind": "train", "upd']
    run_folder.rewrite_metrics(path, records, damaged)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    assert (tmp_path / "metrics.jsonl.damaged").read_text().splitlines() == damaged
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


# ---------------------------------------------------------------------------------------------
# step() before reset()
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [("alfworld", dict(n_games=6, train_games=6)), ("webshop", {}),
                                         ("search", {})])
def test_step_before_reset_is_a_clear_error(name, kwargs):
    from environments import make_env
    env = make_env(name, split="train", think=False, **kwargs)
    with pytest.raises(RuntimeError, match=r"step\(\) called before reset\(task_index\)"):
        env.step("<action>look</action>")
