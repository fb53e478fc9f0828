"""ALFWorld on the real engine: generated games, splits, the expert, the environment contract."""
import hashlib
import json
import random
import re

import pytest
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
from textworld import EnvInfos
from textworld.envs.pddl import PddlEnv

import alfworld_engine
import alfworld_env
import environments
import worlds


@pytest.fixture(scope="module")
def splits(small_cache):
    return worlds.ensure_split("train", 6), worlds.ensure_split("eval", 6, train_games=6)


def test_generator_is_deterministic(tmp_path):
    a = worlds._make_game(("t", 0, "pick_two_obj_and_place", str(tmp_path / "a")))
    b = worlds._make_game(("t", 0, "pick_two_obj_and_place", str(tmp_path / "b")))
    assert a == b
    for name in ("game.tw-pddl", "traj_data.json"):
        assert (tmp_path / "a" / a["dir"] / name).read_bytes() == (tmp_path / "b" / b["dir"] / name).read_bytes()
    # a different seed is a different game
    assert worlds.draw_game(1, "pick_and_place")["pddl_problem"] != worlds.draw_game(2, "pick_and_place")["pddl_problem"]
    assert worlds.draw_game(7, "pick_and_place") == worlds.draw_game(7, "pick_and_place")


def test_drawn_games_follow_alfred_rules():
    for seed in range(12):
        for task_type in worlds.TASK_TYPES:
            game = worlds.draw_game(seed, task_type)
            assert 8 <= game["n_receptacles"] <= 30
            params = game["traj_data"]["pddl_params"]
            assert set(params) == {"object_target", "parent_target", "mrecep_target", "toggle_target", "object_sliced"}
            assert game["traj_data"]["task_type"] == worlds.TASK_TYPES[task_type]
            problem = game["pddl_problem"]
            assert "#" not in problem and problem.count("(") == problem.count(")")
            if task_type == "look_at_obj_in_light":
                assert params["toggle_target"] == "DeskLamp" and "(toggleable DeskLamp_bar_" in problem
            if task_type == "pick_clean_then_place":
                assert "_bar_SinkBasin - receptacle" in problem


def test_full_world_draws_are_those_of_the_earlier_generator():
    # sha256 of the same draws made by the generator before small worlds existed (commit 41a08ee)
    draws = [worlds.draw_game(seed, task_type) for seed in range(3) for task_type in worlds.TASK_TYPES]
    digest = hashlib.sha256(json.dumps(draws, sort_keys=True).encode()).hexdigest()
    assert digest == "a9edae8357e5ebec7cdecdf878252bd89cab5fda8961c01b5e4b3e629680f45b"
    assert worlds.split_dir_name("train", 240, "full") == "train_n240_v1"   # old caches stay valid
    assert worlds.split_dir_name("train", 240, "small") == "train_small_n240_v1"


def test_small_world_keeps_what_the_task_needs():
    for seed in range(20):
        for task_type in worlds.TASK_TYPES:
            game = worlds.draw_game(seed, task_type, "small")
            problem, params = game["pddl_problem"], game["traj_data"]["pddl_params"]
            receptacles = re.findall(r"\(receptacleType \w+_bar_\S+ (\w+)Type\)", problem)  # not the goal's ?r
            assert 4 <= len(receptacles) == game["n_receptacles"] <= 6
            if params["parent_target"]:
                assert params["parent_target"] in receptacles
            appliance = worlds.APPLIANCE.get(task_type)
            assert appliance is None or appliance in receptacles
            if task_type == "look_at_obj_in_light":
                assert set(receptacles) & set(worlds.LAMP_HOLDERS)
            targets = len(re.findall(rf"\(objectType \w+_bar_\S+ {params['object_target']}Type\)", problem))
            distractors = game["n_objects"] - targets - (task_type == "look_at_obj_in_light")
            assert 2 <= distractors <= 4 and targets >= 1
            assert game["traj_data"]["generator"]["world"] == "small"


def test_small_world_env_has_the_short_horizon(splits):
    assert alfworld_env.AlfWorldEnv(split="train", n_games=6, think=False).max_steps == worlds.WORLDS["small"]["max_steps"] == 20
    with pytest.raises(ValueError, match="world size"):
        alfworld_env.AlfWorldEnv(split="train", n_games=6, world="huge")


def test_splits_disjoint_and_cover_all_types(splits):
    train_dir, eval_dir = splits
    train = json.loads((train_dir / "manifest.json").read_text())["games"]
    evals = json.loads((eval_dir / "manifest.json").read_text())["games"]
    assert [g["task_type"] for g in evals] == list(worlds.TASK_TYPES)   # slot i has type i mod 6
    assert not {g["fingerprint"] for g in train} & {g["fingerprint"] for g in evals}
    problems = lambda d: {json.loads(p.read_text())["pddl_problem"] for p in worlds.game_files(d)}
    assert not problems(train_dir) & problems(eval_dir)
    assert len(worlds.game_files(train_dir)) == 6 and not list(train_dir.parent.glob(".*tmp-*"))


def test_fresh_split_is_disjoint_from_train_and_eval(splits):
    """The games RL may play instead of the cloned ones share no game with either split."""
    train_dir, eval_dir = splits
    fresh_dir = worlds.ensure_split("fresh", 6, train_games=6, eval_games=6)
    assert fresh_dir.name == f"fresh_small_n6_vs6_ve6_v{worlds.GENERATOR_VERSION}"
    fresh = set(worlds.split_fingerprints(fresh_dir))
    assert len(fresh) == 6
    assert not fresh & set(worlds.split_fingerprints(train_dir))
    assert not fresh & set(worlds.split_fingerprints(eval_dir))
    env = alfworld_env.AlfWorldEnv(split="fresh", n_games=6, train_games=6, think=False)
    assert env.game_files == [str(p) for p in worlds.game_files(fresh_dir)]
    with pytest.raises(ValueError, match="only among the generated games"):
        alfworld_env.AlfWorldEnv(split="fresh", data_dir=train_dir)


def test_generation_redraws_excluded_games(splits, tmp_path):
    train_dir, _ = splits
    first = json.loads((train_dir / "manifest.json").read_text())["games"][0]
    records = worlds.generate_split("train", 1, tmp_path / "x", exclude={first["fingerprint"]},
                                    workers=1, progress=False)
    assert records[0]["fingerprint"] != first["fingerprint"]
    assert (tmp_path / "x" / "manifest.json").exists()


def test_every_generated_game_is_expert_solvable(splits):
    for folder in splits:
        for game in json.loads((folder / "manifest.json").read_text())["games"]:
            assert game["expert_steps"] <= worlds.EXPERT_STEPS
            steps = worlds.expert_solves(folder / game["dir"] / "game.tw-pddl")
            assert steps == game["expert_steps"]          # replay gives the same expert run


def test_expert_wins_every_task_type_with_reward_10(splits):
    env = alfworld_env.AlfWorldEnv(split="eval", n_games=6, train_games=6, think=False)
    seen = set()
    for task in range(env.num_tasks()):
        obs, info = env.reset(task)
        total, done = 0.0, False
        while not done:
            obs, reward, done, info = env.step(f"<action>{env.expert_action()}</action>")
            assert info["action_valid"]
            total += reward
        assert info["won"] and total == 10.0 and info["score"] == 1.0 and reward == 10.0
        seen.add(info["task_type"])
    assert seen == set(worlds.TASK_TYPES)


def test_batched_reset_groups_share_a_task(splits):
    copies = [alfworld_env.AlfWorldEnv(split="train", n_games=6, think=True) for _ in range(6)]
    infos = [env.reset(task)[1] for env, task in zip(copies, [0, 0, 0, 3, 3, 3])]
    assert len({i["task"] for i in infos[:3]}) == 1 and len({i["task"] for i in infos[3:]}) == 1
    assert infos[0]["task"] != infos[3]["task"]
    assert len({i["anchor_obs"] for i in infos[:3]}) == 1
    keys = {"won", "action_valid", "invalid_reason", "action", "admissible_actions", "task_type",
            "anchor_obs", "expert_action", "task", "score", "privileged"}
    assert all(set(i) == keys for i in infos)
    # copies of a group stepped with the same actions stay identical; the expert is per copy
    rng = random.Random(0)
    for _ in range(5):
        action = rng.choice(copies[0].admissible_actions())
        outs = [env.step(f"<think>t</think><action>{action}</action>") for env in copies[:3]]
        assert len({o[0] for o in outs}) == 1 and len({o[3]["expert_action"] for o in outs}) == 1


def test_cached_command_text_equals_stock_engine(splits):
    game_file = str(worlds.game_files(splits[0])[5])
    stock = AlfredDemangler(PddlEnv(EnvInfos(admissible_commands=True, won=True)), shuffle=False)
    fast = AlfredDemangler(alfworld_engine.CachedPddlEnv(EnvInfos(admissible_commands=True, won=True)), shuffle=False)
    stock.load(game_file)
    fast.load(game_file)
    s1, s2 = stock.reset(), fast.reset()
    rng = random.Random(3)
    for _ in range(25):
        assert s1["feedback"] == s2["feedback"]
        assert s1["admissible_commands"] == s2["admissible_commands"]
        command = rng.choice(s1["admissible_commands"])
        s1, _, _ = stock.step(command)
        s2, _, _ = fast.step(command)


def test_pick_two_fix_tracks_put():
    expert = alfworld_engine.PutTrackingExpert(max_steps=50)

    class Policy:
        def act(self, game_state, last_action):
            self.seen = last_action
            return "look"

    expert.policy = Policy()
    expert.act({"admissible_commands": ["look"]}, 0, False, "move apple 1 to countertop 1")
    assert expert.policy.seen == "put apple 1 to countertop 1"
    expert.act({"admissible_commands": ["look"]}, 0, False, "go to fridge 1")
    assert expert.policy.seen == "go to fridge 1"


def test_make_env_and_unknown_name(splits):
    env = environments.make_env("alfworld", split="eval", n_games=6, train_games=6, history_length=3, max_steps=50)
    assert isinstance(env, alfworld_env.AlfWorldEnv) and env.max_steps == 50 and env.answer_tags == ("action",)
    with pytest.raises(ValueError):
        environments.make_env("nethack")


def test_engine_leaves_sys_argv_alone(splits, monkeypatch):
    # fast-downward's PDDL translator overwrites sys.argv; a CLI reading it later must not notice
    import sys
    monkeypatch.setattr(sys, "argv", ["train.py", "--iters", "3"])
    alfworld_engine._TRANSLATIONS.clear()
    alfworld_env.AlfWorldEnv(split="train", n_games=6, think=False).reset(1)
    assert sys.argv == ["train.py", "--iters", "3"]


def test_task_type_filter_keeps_only_those_games(splits):
    every = alfworld_env.AlfWorldEnv(split="eval", n_games=6, train_games=6, think=False)
    types = sorted(alfworld_env._game_task_type(f) for f in every.game_files)
    assert types == sorted(alfworld_env.ALFWORLD_TASK_TYPES)          # one game of each type in the small split
    picked = alfworld_env.AlfWorldEnv(split="eval", n_games=6, train_games=6, think=False,
                              task_types=("pick_and_place", "pick_cool_then_place"))
    assert picked.num_tasks() == 2
    assert {picked.reset(i)[1]["task_type"] for i in range(2)} == {"pick_and_place", "pick_cool_then_place"}
    with pytest.raises(ValueError, match="unknown ALFWorld task type"):
        alfworld_env.AlfWorldEnv(split="eval", n_games=6, train_games=6, task_types=("pick",))
