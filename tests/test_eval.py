"""eval.py: run comparison (tables, grouping by label, curves), seed aggregation, model and
baseline evaluation through the CLI. Numbers in the asserts are computed by hand."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev
import warmstart

REPO = Path(__file__).resolve().parent.parent


def write_run(folder: Path, lines: list) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return folder


def ev_line(updates, env_steps, success, score=0.0):
    return {"kind": "eval", "updates": updates, "env_steps": env_steps, "eval/success_rate": success,
            "eval/mean_score": score, "eval/per_task_type": {}}


def train_line(updates, env_steps, success, seconds):
    return {"kind": "train", "updates": updates, "env_steps": env_steps, "success_rate": success,
            "time/iteration_s": seconds}


@pytest.fixture
def fake_runs(tmp_path):
    a = write_run(tmp_path / "opid-s0", [ev_line(0, 0, 0.2), train_line(1, 100, 0.25, 10.0),
                                         train_line(2, 220, 0.5, 12.0), ev_line(2, 220, 0.6)])
    b = write_run(tmp_path / "opid-s1", [ev_line(0, 0, 0.1), train_line(1, 90, 0.125, 11.0),
                                         '{"kind": "train", "updates": 2, "env_st',  # cut by a kill
                                         train_line(2, 180, 0.75, 13.0), ev_line(2, 180, 0.8), "not json"])
    c = write_run(tmp_path / "grpo-s0", [ev_line(0, 0, 0.2), train_line(1, 120, 0.0, 9.0), ev_line(1, 120, 0.3)])
    return [str(a), str(b), str(c)]


def test_compare_groups_runs_by_label_mean_and_sample_std(fake_runs, capsys):
    groups = ev.compare_runs(fake_runs, ["opid", "opid", "grpo"])
    assert list(groups) == ["opid", "grpo"]
    opid = groups["opid"]["final"]
    # final eval success 0.6 and 0.8 → mean 0.7, sample std sqrt(2·0.1²/1) = 0.14142
    assert opid["final_eval_success"]["mean"] == pytest.approx(0.7)
    assert opid["final_eval_success"]["std"] == pytest.approx(math.sqrt(0.02))
    assert opid["final_train_success"]["mean"] == pytest.approx(0.625)   # (0.5 + 0.75) / 2
    assert opid["env_steps"]["mean"] == pytest.approx(200.0)              # (220 + 180) / 2
    assert opid["updates"]["mean"] == 2
    assert opid["wall_time_s"]["values"] == [22.0, 24.0]                 # broken line not counted
    grpo = groups["grpo"]["final"]
    assert grpo["final_eval_success"]["mean"] == pytest.approx(0.3) and grpo["final_eval_success"]["std"] == 0.0
    # the curve aligns runs by update count: at update 2, env steps (220+180)/2, success 0.7
    curve = groups["opid"]["curve"]
    assert [p["updates"] for p in curve] == [0, 2]
    assert curve[0]["mean"] == pytest.approx(0.15) and curve[1]["env_steps"] == pytest.approx(200.0)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 2 broken line(s)" in err and "opid-s1" in err


def test_paired_change_by_hand():
    # five games once each: d = [1, 0, 0, -1, 1], mean 0.2, Σ(d − d̄)² = 2.8, s.e. = sqrt(5 · 2.8 / 4) / 5 = 0.3742
    first = [[0, 0], [1, 1], [2, 0], [3, 1], [4, 0]]
    last = [[4, 1], [3, 0], [2, 0], [1, 1], [0, 1]]            # order does not matter, the game does
    change, se = ev.paired_change(first, last)
    assert change == pytest.approx(0.2) and se == pytest.approx(0.37417, abs=1e-5)
    # two games twice each: d = [2, -1] over 4 episodes → change 1/4; s.e. = sqrt(2 · 4.5 / 1) / 4 = 0.75
    change, se = ev.paired_change([[0, 0], [0, 0], [1, 1], [1, 0]], [[0, 1], [0, 1], [1, 0], [1, 0]])
    assert change == pytest.approx(0.25) and se == pytest.approx(0.75)
    # different games, a different number of plays, or too few games: no paired error
    assert ev.paired_change([[0, 1], [1, 0]], [[0, 1], [2, 0]]) is None
    assert ev.paired_change([[0, 1], [1, 0]], [[0, 1], [0, 1], [1, 0]]) is None
    assert ev.paired_change([[0, 1]], [[0, 0]]) is None


def test_compare_reports_each_runs_change_from_its_start(tmp_path, capsys):
    def wins(won):                                            # ten games once each, the first `won` won
        return [[t, int(t < won)] for t in range(10)]
    runs = [write_run(tmp_path / "a-s0", [{**ev_line(0, 0, 0.3), "eval/episode_wins": wins(3)},
                                          {**ev_line(4, 99, 0.5), "eval/episode_wins": wins(5)}]),
            write_run(tmp_path / "a-s1", [ev_line(0, 0, 0.4), ev_line(4, 99, 0.3)]),   # no per-episode record
            write_run(tmp_path / "b-s0", [ev_line(0, 0, 0.4)])]                        # one evaluation: no change
    groups = ev.compare_runs([str(r) for r in runs], ["a", "a", "b"])
    assert groups["a"]["changes"][0] == {"change": pytest.approx(0.2), "se": pytest.approx(0.13333, abs=1e-5)}
    assert groups["a"]["changes"][1] == {"change": pytest.approx(-0.1), "se": None}
    assert groups["b"]["changes"] == [None]
    table = ev.change_table(groups)
    # mean of +0.2 and −0.1 = +0.05; sample std 0.2121 / √2 = 0.150
    assert "| a | s0: +0.200 ± 0.133, s1: -0.100 | +0.050 ± 0.150 |" in table and "| b |" not in table
    ev.main(["--compare", *map(str, runs), "--labels", "a", "a", "b", "--plot", str(tmp_path / "c.png")])
    assert "s0: +0.200 ± 0.133" in capsys.readouterr().out
    one_seed = ev.change_table({"c": {"seeds": [0], "changes": [{"change": -0.017, "se": 0.061}]}})
    assert "| c | s0: -0.017 ± 0.061 | -0.017 (one seed) |" in one_seed   # no "± 0.000" over one seed


def test_compare_cli_prints_table_and_writes_png(fake_runs, tmp_path, capsys):
    png, md = tmp_path / "plots" / "curves.png", tmp_path / "cmp.md"
    ev.main(["--compare", *fake_runs, "--labels", "opid", "opid", "grpo", "--plot", str(png), "--md", str(md)])
    table = capsys.readouterr().out
    opid_row = next(l for l in table.splitlines() if l.startswith("| opid |"))
    assert "| 2 |" in opid_row and "0.700 ± 0.141" in opid_row and "0.625 ± 0.177" in opid_row
    assert "200 ± 28" in opid_row and "23 ± 1" in opid_row  # env steps; wall time 22 s / 24 s
    grpo_row = next(l for l in table.splitlines() if l.startswith("| grpo |"))
    assert "0.300" in grpo_row and "±" not in grpo_row
    assert md.read_text().strip() == table.strip()
    assert png.exists() and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_matplotlib_prints_table_only(fake_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    png = tmp_path / "curves.png"
    result = ev.main(["--compare", *fake_runs, "--plot", str(png)])
    captured = capsys.readouterr()
    assert "| opid-s0 |" in captured.out and "matplotlib is not installed" in captured.err
    assert result["plot"] is None and not png.exists()


def test_compare_errors(tmp_path, fake_runs):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        ev.compare_runs([str(tmp_path)])
    with pytest.raises(SystemExit, match="2 labels for 3 runs"):
        ev.compare_runs(fake_runs, ["a", "b"])


def test_seed_aggregation_by_hand():
    stubs = [{"episodes": 4, "success_rate": 0.5, "per_task_type": {"a": 1.0, "b": 0.0}},
             {"episodes": 4, "success_rate": 0.7, "per_task_type": {"a": 0.5}},
             {"episodes": 4, "success_rate": 0.9, "per_task_type": {"a": 0.0, "b": 1.0}}]
    agg = ev.aggregate(stubs)
    # mean 0.7; sample std sqrt((0.04 + 0 + 0.04) / 2) = 0.2
    assert agg["success_rate"]["mean"] == pytest.approx(0.7) and agg["success_rate"]["std"] == pytest.approx(0.2)
    assert agg["per_task_type/a"]["mean"] == pytest.approx(0.5) and agg["per_task_type/a"]["std"] == pytest.approx(0.5)
    assert agg["per_task_type/b"]["n"] == 2 and agg["per_task_type/b"]["std"] == pytest.approx(math.sqrt(0.5))
    assert ev.mean_std([0.3]) == (0.3, 0.0)
    assert ev.fmt(0.7, 0.2, 3) == "0.700 ± 0.200" and ev.fmt(None) == "—"


def test_summarize_search_em_per_source():
    recs = [dict(task_type="nq", won=True, score=1.0, steps=2, invalid=0, reward=1.0),
            dict(task_type="nq", won=False, score=0.0, steps=4, invalid=1, reward=0.0),
            dict(task_type="hotpotqa", won=True, score=1.0, steps=3, invalid=0, reward=1.0)]
    s = ev.summarize(recs, "search")
    assert s["per_data_source"] == {"hotpotqa": 1.0, "nq": 0.5}
    assert s["em_average"] == pytest.approx(0.75) and s["success_rate"] == pytest.approx(2 / 3)
    assert s["invalid_rate"] == pytest.approx(1 / 9) and s["mean_steps"] == pytest.approx(3.0)


@pytest.mark.parametrize("env_name", ["search", "webshop"])
def test_expert_policy_still_wins(env_name):
    result = ev.main(["--env", env_name, "--policy", "expert", "--episodes", "3"])
    assert result["per_seed"]["0"]["success_rate"] == 1.0 and result["per_seed"]["0"]["episodes"] == 3
    assert result["aggregate"]["mean_score"]["mean"] == 1.0


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random-initialised tiny model (it never wins, but exercises the whole model path)."""
    import policy
    from environments import make_env
    env = make_env("search", split="train", think=False, history_length=4, max_steps=2)
    texts = []
    for i in range(6):
        env.reset(i)
        texts += [env.prompt(), env.expert_action()]
    tokenizer = warmstart.train_tiny_tokenizer(texts, vocab_size=1024)
    model = warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=2, intermediate_size=128)
    return policy.save_policy(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


def test_checkpoint_cli_writes_per_source_json(tiny_folder, tmp_path):
    out, md = tmp_path / "res.json", tmp_path / "res.md"
    proc = subprocess.run(
        [sys.executable, "eval.py", "--checkpoint", str(tiny_folder), "--env", "search", "--episodes", "4",
         "--max-steps", "2", "--no-think", "--max-new-tokens", "6", "--seeds", "0", "1", "--out", str(out),
         "--md", str(md)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["settings"]["decoding"] == "T=0.4" and result["settings"]["env_kwargs"]["max_steps"] == 2
    assert result["settings"]["env_kwargs"]["history_length"] == 4 and result["settings"]["max_new_tokens"] == 6
    for seed in ("0", "1"):
        summary = result["per_seed"][seed]
        assert summary["episodes"] == 4 and set(summary["per_data_source"]) == {"synthetic_multi", "synthetic_single"}
        assert 1.0 <= summary["mean_steps"] <= 2.0 and len(result["records"][seed]) == 4
    assert result["aggregate"]["per_data_source/synthetic_single"]["n"] == 2
    assert "EM synthetic_multi" in md.read_text() and "| seed 1 |" in md.read_text()


def test_run_folder_loads_config_and_checkpoint(tiny_folder, tmp_path):
    import shutil

    import train
    run = tmp_path / "runs" / "r"
    with pytest.raises(SystemExit, match="no such folder"):
        ev.main(["--run", str(run)])
    run.mkdir(parents=True)
    with pytest.raises(SystemExit, match="no config.json"):
        ev.main(["--run", str(run)])
    cfg = train.Config(env="search", model="tiny", max_steps=1, max_new_tokens=4, think=False)
    (run / "config.json").write_text(json.dumps(train.dataclasses.asdict(cfg)))
    with pytest.raises(SystemExit, match="no checkpoint/model"):
        ev.main(["--run", str(run)])
    shutil.copytree(tiny_folder, run / "checkpoint" / "model")
    result = ev.main(["--run", str(run), "--episodes", "2", "--greedy", "--max-steps", "3"])  # flag ignored
    assert result["settings"]["source"]["kind"] == "run" and result["settings"]["decoding"] == "greedy"
    env_kwargs = result["settings"]["env_kwargs"]
    assert {k: env_kwargs[k] for k in ("history_length", "max_steps", "think")} == \
        {"history_length": 4, "max_steps": 1, "think": False}
    assert env_kwargs["retriever"] == "bm25" and env_kwargs["data"] == "synthetic"
    assert result["per_seed"]["0"]["mean_steps"] == 1.0 and "per_data_source" in result["per_seed"]["0"]


def test_bad_env_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--env", "minecraft"])
    assert "invalid choice: 'minecraft'" in capsys.readouterr().err


def test_budget_table_and_sample_efficiency_by_hand(tmp_path, capsys):
    # grpo: 0.1 → 0.2 → 0.3 at 0 / 100 / 200 steps; opid: 0.1 → 0.35 → 0.4 at 0 / 110 / 210 (2 seeds, mean)
    runs = [write_run(tmp_path / "grpo-s0", [ev_line(0, 0, 0.1), ev_line(1, 100, 0.2), ev_line(2, 200, 0.3)]),
            write_run(tmp_path / "opid-s0", [ev_line(0, 0, 0.1), ev_line(1, 100, 0.3), ev_line(2, 200, 0.4)]),
            write_run(tmp_path / "opid-s1", [ev_line(0, 0, 0.1), ev_line(1, 120, 0.4), ev_line(2, 220, 0.4)]),
            write_run(tmp_path / "flat-s0", [ev_line(0, 0, 0.1), ev_line(1, 100, 0.1), ev_line(2, 200, 0.2)])]
    groups = ev.compare_runs([str(r) for r in runs], ["grpo", "opid", "opid", "flat"])
    eff = ev.efficiency(groups, "grpo")
    assert eff["target"] == pytest.approx(0.3)
    assert eff["steps"] == {"grpo": 200, "opid": pytest.approx(110.0), "flat": None}
    assert eff["fraction"]["opid"] == pytest.approx(0.55) and eff["fraction"]["grpo"] == 1.0
    assert eff["fraction"]["flat"] is None
    table = ev.budget_table(groups)
    header, _, grpo_row, opid_row, flat_row = table.splitlines()
    assert "1 updates (103 env steps)" in header   # mean of the labels' means: (100 + 110 + 100) / 3
    assert opid_row.startswith("| opid |") and "0.350 ± 0.071" in opid_row and "0.400 ± 0.000" in opid_row
    result = ev.main(["--compare", *map(str, runs), "--labels", "grpo", "opid", "opid", "flat"])
    out = capsys.readouterr().out
    assert "| opid | 110 | 0.55 |" in out and "| flat | not reached | – |" in out
    assert result["efficiency"]["reference"] == "grpo"
    with pytest.raises(SystemExit, match="--reference"):
        ev.efficiency(groups, "nope")


def test_efficiency_is_undefined_when_the_reference_never_improves(tmp_path):
    runs = [write_run(tmp_path / "g", [ev_line(0, 0, 0.2), ev_line(1, 100, 0.1)]),
            write_run(tmp_path / "o", [ev_line(0, 0, 0.2), ev_line(1, 100, 0.3)])]
    eff = ev.efficiency(ev.compare_runs([str(r) for r in runs], ["grpo", "opid"]), "grpo")
    # target 0.1 is already met at the first evaluation (0 steps): no fraction can be formed
    assert eff["steps"] == {"grpo": 0, "opid": 0} and eff["fraction"] == {"grpo": None, "opid": None}
    assert "grpo never rose above its first evaluation" in ev.efficiency_table(eff)


def test_compare_says_when_runs_were_evaluated_on_the_train_split(tmp_path, fake_runs, capsys):
    assert ev.split_note(ev.compare_runs(fake_runs)) == ""  # old records without "split": the eval split
    train_split = [{**ev_line(0, 0, 0.1), "split": "train"}, {**ev_line(1, 50, 0.3), "split": "train"}]
    g16 = write_run(tmp_path / "g16-s0", train_split)
    ev.main(["--compare", str(g16), "--labels", "grpo"])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert first_line.startswith("Evaluation split: grpo on train") and "not comparable" not in first_line
    mixed = ev.split_note(ev.compare_runs([str(g16), fake_runs[2]], ["g16", "grpo"]))
    assert "g16 on train, grpo on eval" in mixed and "not comparable" in mixed


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_curves_png_beside_the_output_by_default(fake_runs, tmp_path, capsys):
    """Without --plot the curves land in the first run's folder, or beside --out when given."""
    result = ev.main(["--compare", *fake_runs, "--labels", "opid", "opid", "grpo"])
    first = Path(fake_runs[0]) / "curves.png"
    assert result["plot"] == str(first) and first.read_bytes()[:8] == PNG_SIGNATURE
    assert f"plot: {first}" in capsys.readouterr().err
    out = tmp_path / "cmp" / "table.json"
    result = ev.main(["--compare", *fake_runs, "--out", str(out)])
    assert result["plot"] == str(tmp_path / "cmp" / "curves.png")
    assert (tmp_path / "cmp" / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_paired_differences_and_delta_table_by_hand(tmp_path, capsys):
    # seeds come from config.json (or the folder name); grpo s0/s1 end at 0.2 / 0.3, opid at 0.3 / 0.6
    def run(name, seed, final, deltas=()):
        folder = write_run(tmp_path / name, [ev_line(0, 0, 0.1), *deltas, ev_line(1, 100, final)])
        if seed is not None:
            (folder / "config.json").write_text(json.dumps({"seed": seed}))
        return str(folder)

    def delta_line(success, won, lost):
        return {**train_line(1, 100, success, 1.0), "delta/mean_abs": 0.1, "delta/mean_won": won,
                "delta/mean_lost": lost, "delta/mean_format_tokens": 0.0, "delta/mean_content_tokens": -0.2}

    runs = [run("grpo-a", 0, 0.2), run("grpo-s1", None, 0.3),
            run("opid-a", 0, 0.3, [delta_line(0.25, 0.02, -0.04), delta_line(0.0, 0.0, -0.06)]),
            run("opid-b", 1, 0.6, [delta_line(0.5, 0.04, -0.02)]), run("opid-c", 7, 0.9)]
    groups = ev.compare_runs(runs, ["grpo", "grpo", "opid", "opid", "opid"])
    assert groups["grpo"]["seeds"] == [0, 1] and groups["opid"]["seeds"] == [0, 1, 7]
    paired = ev.paired_differences(groups, "grpo")
    # differences +0.1 and +0.3 (seed 7 has no partner): mean 0.2, s.e. sqrt(0.02) / sqrt(2) = 0.1
    assert paired["opid"]["seeds"] == [0, 1]
    assert paired["opid"]["differences"] == pytest.approx([0.1, 0.3])
    assert paired["opid"]["mean"] == pytest.approx(0.2) and paired["opid"]["se"] == pytest.approx(0.1)
    # Δ on won averages only iterations that won: run a 0.02 (not (0.02 + 0) / 2), run b 0.04 → 0.03
    assert ev.delta_stats(ev.read_metrics(Path(runs[2])))["delta/mean_won"] == pytest.approx(0.02)
    assert ev.delta_stats(ev.read_metrics(Path(runs[2])))["delta/mean_lost"] == pytest.approx(-0.05)
    table = ev.delta_table(groups)
    opid_row = next(l for l in table.splitlines() if l.startswith("| opid |"))
    assert "0.0300 ± 0.0141" in opid_row and "-0.0350 ± 0.0212" in opid_row
    assert "| grpo |" not in table   # no Δ computed: no row
    ev.main(["--compare", *runs, "--labels", "grpo", "grpo", "opid", "opid", "opid"])
    out = capsys.readouterr().out
    assert "| opid | s0: +0.100, s1: +0.300 | +0.200 ± 0.100 |" in out
    one = ev.paired_table({"opid": {"seeds": [0], "differences": [-0.017], "mean": -0.017, "se": 0.0}}, "grpo")
    assert "| opid | s0: -0.017 | -0.017 (one seed) |" in one


def test_failure_modes_counts_noops_repeats_habits_and_the_step_limit_by_hand():
    """scripts/failure_modes.py: a no-op is a step whose answer (the next step's observation) is
    "Nothing happens."; an action outside the prompt's admissible list is counted apart."""
    import importlib.util

    import rollout
    spec = importlib.util.spec_from_file_location("failure_modes", REPO / "scripts" / "failure_modes.py")
    failure_modes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(failure_modes)

    def traj(won, steps):  # steps: (action, admissible list shown, observation the action was taken on)
        # a step with no action is a malformed response (invalid by format)
        t = rollout.Trajectory(uid=0, traj_uid=0, task_index=0, task="", task_type="", env_name="alfworld", won=won)
        for k, (action, admissible, obs) in enumerate(steps):
            t.samples.append(rollout.Sample(uid=0, traj_uid=0, step=k, prompt_text=f"x\nAdmissible actions: {admissible!r}\ny",
                                            prompt_ids=[], response_ids=[], old_logprobs=[], response_text="",
                                            action=action, valid=bool(action), invalid_reason="", observation=obs,
                                            reward=0.0, privileged=""))
        return t

    room = ["go to shelf 1", "take plate 1 from shelf 1"]
    lost = traj(False, [("go to cabinet 1", room, "start"),            # not admissible; answered by a no-op
                        ("go to cabinet 1", room, "Nothing happens."),  # repeat, not admissible, no-op
                        ("", room, "Nothing happens."),                # malformed: outside the list, a no-op next
                        ("go to shelf 1", room, "Nothing happens.")])   # the last step: its answer is not seen
    room_carried = room + ["inventory"]
    won = traj(True, [("go to shelf 1", room_carried, "start"), ("inventory", room_carried, "On the shelf 1 ..."),
                      ("take plate 1 from shelf 1", room_carried, "You are carrying nothing.")])
    stats = failure_modes.step_stats([lost, won], max_steps=3)
    assert stats["lost"] == {"episodes": 1, "mean_steps": 4.0, "at_step_limit": 1, "noop_share": 3 / 4,
                             "not_admissible_share": 3 / 4, "repeat_share": 1 / 4, "habit_share": 0.0,
                             "malformed_share": 1 / 4, "noop_verbs": {"go": 2, "(none)": 1}}
    assert stats["won"] == {"episodes": 1, "mean_steps": 3.0, "at_step_limit": 1, "noop_share": 0.0,
                            "not_admissible_share": 0.0, "repeat_share": 0.0, "habit_share": 1 / 3,
                            "malformed_share": 0.0, "noop_verbs": {}}
    assert failure_modes.admissible_in("no list here") == []
