"""Tests for rule_analyzer.py (§4, the offline analyzer): phrase builders, skills for won and lost
trajectories of each environment, the JSON protocol, the batch runner, and real ALFWorld games."""
from __future__ import annotations

import json

import rule_analyzer as R
import skills as S
from test_skills import ALF_INTRO, act, alfworld_lost, alfworld_won


# ---------------------------------------------------------------------------------------------
# Hand-made WebShop and search trajectories (the ALFWorld ones live in test_skills.py)
# ---------------------------------------------------------------------------------------------

def webshop_won() -> S.TrajectoryView:
    task = "i need a red cotton t-shirt in size large, and price lower than 30.00 dollars"
    obs = ["WebShop [SEP] Instruction: [SEP] " + task + " [SEP] Search",
           "[SEP] Back to Search [SEP] Page 1 (Total results: 2) [SEP] Next > [SEP] B0RED1 [SEP] Red Cotton Tee [SEP] $19.99",
           "[SEP] Back to Search [SEP] < Prev [SEP] size [SEP] small [SEP] large [SEP] Red Cotton Tee [SEP] Buy Now",
           "[SEP] Back to Search [SEP] < Prev [SEP] size [SEP] small [SEP] large (selected) [SEP] Buy Now"]
    acts = ["search[red cotton t-shirt large]", "click[b0red1]", "click[large]", "click[buy now]"]
    return S.make_trajectory_view("webshop", task, "fashion", True, obs, [act(a) for a in acts], acts,
                                  [True] * 4, [0, 0, 0, 10])


def webshop_lost() -> S.TrajectoryView:
    task = "i need a red cotton t-shirt in size large, and price lower than 30.00 dollars"
    results = "[SEP] Back to Search [SEP] Page 1 [SEP] B0BLU2 [SEP] Blue Polyester Shirt [SEP] $45.00"
    obs = ["WebShop [SEP] Instruction: [SEP] " + task + " [SEP] Search", results,
           "WebShop [SEP] Search", results, "[SEP] Back to Search [SEP] Blue Polyester Shirt [SEP] Buy Now"]
    acts = ["search[shirt]", "click[back to search]", "search[shirt]", "click[b0blu2]", "click[buy now]"]
    return S.make_trajectory_view("webshop", task, "fashion", False, obs, [act(a) for a in acts], acts,
                                  [True] * 5, [0, 0, 0, 0, 0])


def search_won() -> S.TrajectoryView:
    q = "who wrote the novel that the film blade runner is based on?"
    obs = ["Question: " + q, "<information>Doc 1: Blade Runner is based on Do Androids Dream of Electric Sheep?</information>",
           "<information>Doc 1: Do Androids Dream of Electric Sheep? is a novel by Philip K. Dick.</information>"]
    responses = ["<search>blade runner based on novel</search>", "<search>do androids dream of electric sheep author</search>",
                 "<answer>Philip K. Dick</answer>"]
    acts = ["blade runner based on novel", "do androids dream of electric sheep author", "Philip K. Dick"]
    return S.make_trajectory_view("search", q, "hotpotqa", True, obs, responses, acts, [True] * 3, [0, 0, 1])


def search_lost() -> S.TrajectoryView:
    q = "who wrote the novel that the film blade runner is based on?"
    info = "<information>Doc 1: Blade Runner is a 1982 film by Ridley Scott.</information>"
    obs = ["Question: " + q, info, info, info]
    responses = ["<search>blade runner</search>", "<search>blade runner</search>", "no tags here",
                 "<answer>Ridley Scott</answer>"]
    acts = ["blade runner", "blade runner", "", "Ridley Scott"]
    return S.make_trajectory_view("search", q, "hotpotqa", False, obs, responses, acts,
                                  [True, True, False, True], [0, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# Rule-based analyzer (§4)
# ---------------------------------------------------------------------------------------------

def test_rule_alfworld_won_workflow():
    skills = R.RuleBasedAnalyzer().analyze(alfworld_won(), 5)
    ep = skills.episode_skill
    for word in ("take mug 1 from countertop 2", "clean mug 1 with sinkbasin 1", "move mug 1 to coffeemachine 1",
                 "sinkbasin", "coffeemachine"):
        assert word in ep
    assert ep.index("take mug 1") < ep.index("clean mug 1") < ep.index("move mug 1")
    assert skills.step_skills == {0: "Go to countertop 2 next.", 1: "Take the mug 1 from countertop 2 now.",
                                  2: "Go to sinkbasin 1 next.", 3: "Clean the mug 1 with sinkbasin 1 now.",
                                  5: "Put the mug 1 in/on coffeemachine 1 now."}
    assert set(R.RuleBasedAnalyzer().analyze(alfworld_won(), 3).step_skills) == {1, 3, 5}


def test_rule_alfworld_lost_avoidance():
    skills = R.RuleBasedAnalyzer().analyze(alfworld_lost(), 5)
    ep = skills.episode_skill
    assert "mug" in ep and "coffeemachine" in ep and "never found the mug" in ep
    assert "go to cabinet 1" in ep
    # the loop starts at step 2 (same action in the same state as... step 2 repeats step 0's action
    # after cabinet 2); the ineffective take at 4; the invalid response at 5
    assert skills.step_skills[2].startswith("Do not repeat 'go to cabinet 1'; look for the mug")
    assert "countertop" in skills.step_skills[2]  # an unvisited receptacle from the room list
    assert "coffeemachine" not in skills.step_skills[2]  # ... but not the goal receptacle
    assert skills.step_skills[4].startswith("Do not try 'take mug 1 from countertop 1' again")
    assert skills.step_skills[5].startswith("Do not reply without exactly one valid action tag")
    assert 0 not in skills.step_skills and len(skills.step_skills) <= 5
    assert 3 not in skills.step_skills  # step 3 continues the loop that starts at 2: one loop, one hint
    assert skills.episode_summary == "Failed after 7 steps: 1 loops, 1 no-effect, 1 invalid."


def test_rule_alfworld_lost_covers_each_kind_of_mistake_first():
    c1 = "You arrive at cabinet 1. The cabinet 1 is closed."
    c2 = "You arrive at cabinet 2. The cabinet 2 is closed."
    room = "You are in the middle of a room. Looking quickly around you, you see nothing."
    obs = [ALF_INTRO, c1, c2, c1, room, room, "Nothing happens."]
    acts = ["go to cabinet 1", "go to cabinet 2", "go to cabinet 1", "look", "look", "", "inventory"]
    valid = [True, True, True, True, True, False, True]
    traj = S.make_trajectory_view("alfworld", "put a clean mug in coffeemachine.", "pick_clean_then_place", False,
                                  obs, [act(a) if a else "hmm" for a in acts], acts, valid, [0.0] * 7)
    # loops start at 2 and 4, the invalid response is at 5: with K=2 the first loop and the invalid
    # response come before a second loop (round robin over loops, invalid, no-effect)
    assert set(R.RuleBasedAnalyzer().analyze(traj, 2).step_skills) == {2, 5}
    assert set(R.RuleBasedAnalyzer().analyze(traj, 1).step_skills) == {2}
    assert set(R.RuleBasedAnalyzer().analyze(traj, 5).step_skills) == {2, 4, 5}


def test_phrase_builders_exact_wording():
    assert R.step_hint_for_action("take mug 1 from countertop 2") == "Take the mug 1 from countertop 2 now."
    assert R.step_hint_for_action("move mug 1 to coffeemachine 1") == "Put the mug 1 in/on coffeemachine 1 now."
    assert R.step_hint_for_action("heat egg 1 with microwave 1") == "Heat the egg 1 with microwave 1 now."
    assert R.step_hint_for_action("use desklamp 1") == "Use the desklamp 1 now."
    assert R.step_hint_for_action("go to drawer 3") == "Go to drawer 3 next."
    assert R.step_hint_for_action("search[red tee]") == "Search for 'red tee'."
    assert R.step_hint_for_action("click[Buy Now]") == "Click 'Buy Now' to buy this product."
    assert R.avoid_hint("go to cabinet 1", "search a receptacle you have not opened yet.") == \
        "Do not repeat 'go to cabinet 1'; search a receptacle you have not opened yet."
    assert R.avoid_hint("take x 1 from y 1", "look elsewhere", "invalid") == \
        "Do not send 'take x 1 from y 1', it is not an admissible action; look elsewhere."
    assert R.avoid_hint("", "look elsewhere", "invalid") == \
        "Do not reply without exactly one valid action tag; look elsewhere."
    assert R.avoid_hint("open drawer 1", "look elsewhere", "ineffective") == \
        "Do not try 'open drawer 1' again, it changed nothing; look elsewhere."
    assert R.avoid_hint("click[buy now]", "check the options first", "wrong") == \
        "Do not commit to 'click[buy now]' here; check the options first."


def test_rule_alfworld_pick_two_after_first_placed():
    intro = ALF_INTRO.replace("put a clean mug in coffeemachine.", "find two laptop and put them in sofa.")
    obs = [intro, "You arrive at bed 1. On the bed 1, you see a laptop 1, and a pillow 1.",
           "You pick up the laptop 1 from the bed 1.", "You arrive at sofa 1. On the sofa 1, you see nothing.",
           "You move the laptop 1 to the sofa 1.", "You arrive at bed 1. On the bed 1, you see a pillow 1."]
    acts = ["go to bed 1", "take laptop 1 from bed 1", "go to sofa 1", "move laptop 1 to sofa 1", "go to bed 1", "look"]
    traj = S.make_trajectory_view("alfworld", "find two laptop and put them in sofa.", "pick_two_obj_and_place",
                                  False, obs, [act(a) for a in acts], acts, [True] * 6, [0.0] * 6)
    skills = R.RuleBasedAnalyzer().analyze(traj, 5)
    # after placing the first laptop the agent holds nothing: the advice is to fetch one, not to put
    # and laptop 1 is no longer on the bed, so it must look for another one
    assert "it placed only one laptop" in skills.episode_skill
    assert "look for the laptop in a place you have not searched yet" in skills.episode_skill
    assert "put the laptop in/on it" not in skills.episode_skill and "take the laptop 1" not in skills.episode_skill


def test_rule_alfworld_lost_after_seeing_object_points_there():
    traj = alfworld_lost()
    traj.steps[1].observation = "You arrive at countertop 2. On the countertop 2, you see a mug 1."
    skills = R.RuleBasedAnalyzer().analyze(traj, 5)
    assert "found the mug but never picked it up" in skills.episode_skill
    assert "take the mug 1 from it" in skills.episode_skill and "countertop 2" in skills.episode_skill


def test_rule_webshop_won_and_lost():
    won = R.RuleBasedAnalyzer().analyze(webshop_won(), 5)
    for word in ("red cotton t-shirt large", "b0red1", "large", "Buy Now"):
        assert word in won.episode_skill
    assert won.step_skills == {0: "Search for 'red cotton t-shirt large'.", 1: "Click 'b0red1'.",
                               2: "Click 'large'.", 3: "Click 'Buy Now' to buy this product."}
    lost = R.RuleBasedAnalyzer().analyze(webshop_lost(), 5)
    assert "bought a product that did not match" in lost.episode_skill
    assert "red cotton t-shirt" in lost.episode_skill
    assert lost.step_skills[4].startswith("Do not commit to 'click[buy now]'")
    assert lost.step_skills[3].startswith("Do not commit to 'click[b0blu2]'")
    assert lost.step_skills[2].startswith("Do not repeat 'search[shirt]'")


def test_rule_search_won_and_lost():
    won = R.RuleBasedAnalyzer().analyze(search_won(), 2)
    assert "Philip K. Dick" in won.episode_skill and "do androids dream of electric sheep author" in won.episode_skill
    assert won.step_skills == {1: "Search for 'do androids dream of electric sheep author'.", 2: "Answer 'Philip K. Dick'."}
    lost = R.RuleBasedAnalyzer().analyze(search_lost(), 2)
    assert "wrong answer" in lost.episode_skill and "Ridley Scott" in lost.episode_skill
    assert "blade runner" in lost.episode_skill
    assert lost.step_skills == {
        1: "Do not repeat 'search[blade runner]'; search for a different part of the question, e.g. "
           "'who wrote novel film blade runner based'.",
        3: "Do not commit to 'answer[Ridley Scott]' here; search again for the missing fact before answering."}


def test_rule_analyzer_through_complete_matches_analyze_and_is_deterministic():
    analyzer = R.RuleBasedAnalyzer()
    for traj in (alfworld_won(), alfworld_lost(), webshop_won(), webshop_lost(), search_won(), search_lost()):
        messages = S.build_analyzer_messages(traj, 3)
        reply = analyzer.complete(messages)
        assert reply == analyzer.complete(messages)
        assert S.parse_skills_json(reply, 3, len(traj.steps)) == analyzer.analyze(traj, 3)
        # a repair request is answered from the original user message
        assert analyzer.complete(S.build_repair_messages(messages, "x")) == reply


# ---------------------------------------------------------------------------------------------
# Through the batch runner (skills.analyze_trajectories, §4)
# ---------------------------------------------------------------------------------------------

def test_rule_based_through_the_runner():
    trajs = [alfworld_won(), alfworld_lost(), webshop_won(), webshop_lost(), search_won(), search_lost()]
    result, stats = S.analyze_trajectories(trajs, R.RuleBasedAnalyzer(), 5, max_workers=3)
    assert result == [R.RuleBasedAnalyzer().analyze(t, 5) for t in trajs]
    assert stats["requests"] == 6 and stats["no_skill"] == 0


# ---------------------------------------------------------------------------------------------
# Real ALFWorld games (alfworld_env.AlfWorldEnv on games worlds.py generates): expert and random play
# ---------------------------------------------------------------------------------------------

def _play(env, task_index: int, policy) -> S.TrajectoryView:
    """Roll one episode and turn it into the analyzer's view, as the trainer does (anchor_obs)."""
    env.reset(task_index)
    obs, responses, actions, valids, rewards, done = [], [], [], [], [], False
    while not done:
        response = policy(env)
        _, reward, done, info = env.step(response)
        obs.append(info["anchor_obs"])
        responses.append(response)
        actions.append(info["action"])
        valids.append(info["action_valid"])
        rewards.append(reward)
    return S.make_trajectory_view("alfworld", env.task, env.task_type, info["won"], obs, responses, actions,
                                  valids, rewards)


def test_rule_based_skills_on_real_alfworld_games():
    import random

    import alfworld_env
    env = alfworld_env.AlfWorldEnv(split="train", n_games=6, max_steps=30, think=False)
    rng = random.Random(0)

    def expert(e):
        return f"<action>{e.expert_action()}</action>"

    def random_policy(e):
        roll = rng.random()
        if roll < 0.1:
            return "I will look around the room."                 # no tag: invalid
        if roll < 0.2:
            return "<action>take unicorn 1 from moon 1</action>"  # well-formed, not admissible: "Nothing happens."
        return f"<action>{rng.choice(e.admissible_actions())}</action>"

    analyzer = R.RuleBasedAnalyzer()
    task_types = set()
    for index in range(env.num_tasks()):
        won = _play(env, index, expert)
        task_types.add(won.task_type)
        with open(env.game_files[index].replace("game.tw-pddl", "traj_data.json")) as f:
            params = json.load(f)["pddl_params"]   # ground truth, used only to check the text
        obj = params["object_target"].lower()
        rec = (params["toggle_target"] if won.task_type == "look_at_obj_in_light" else params["parent_target"]).lower()
        assert won.won and won.episode_reward == 10.0, won.task
        skills = analyzer.analyze(won, 5)
        assert obj in skills.episode_skill and rec in skills.episode_skill, (won.task, skills.episode_skill)
        assert 1 <= len(skills.step_skills) <= 5
        for step, hint in skills.step_skills.items():
            assert hint == R.step_hint_for_action(won.steps[step].action)
        # the key actions of the expert's plan appear, in order
        verbs = [R._split_action(s.action)[0] for s in won.steps]
        assert "take" in verbs and (("use" in verbs) if won.task_type == "look_at_obj_in_light" else "move" in verbs)
        ep = skills.episode_skill
        taken = next(s.action for s in won.steps if s.action.startswith("take "))
        last = won.steps[-1].action
        assert taken in ep and last in ep and ep.index(taken) < ep.index(last)

        lost = _play(env, index, random_policy)
        if lost.won:   # a lucky random walk: nothing to avoid
            continue
        skills = analyzer.analyze(lost, 5)
        assert skills.episode_skill.startswith("Avoid what failed")
        assert obj in skills.episode_skill and rec in skills.episode_skill, (lost.task, skills.episode_skill)
        assert skills.step_skills and all(h.startswith("Do not") for h in skills.step_skills.values())
        for step, hint in skills.step_skills.items():
            action = lost.steps[step].action
            assert (f"'{action}'" in hint) if action else "valid action tag" in hint
            if action.startswith("take unicorn"):   # a valid step (format-only validity) that changed nothing
                assert "it changed nothing" in hint or hint.startswith("Do not repeat")
        invalid = [s.index for s in lost.steps if not s.valid]
        assert not invalid or any(i in skills.step_skills for i in invalid)  # every kind of mistake is covered
    assert task_types == {"pick_and_place", "look_at_obj_in_light", "pick_clean_then_place",
                          "pick_heat_then_place", "pick_cool_then_place", "pick_two_obj_and_place"}
