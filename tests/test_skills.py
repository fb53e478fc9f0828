"""Tests for skills.py: injection (§6), routing (§5), JSON parsing, back-ends and the batch
runner (§4), the rule-based analyzer and the statistical critical-step selector (§4)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import skills as S


# ---------------------------------------------------------------------------------------------
# Injection (§6)
# ---------------------------------------------------------------------------------------------

ALFWORLD_PROMPT = (
    "You are an expert agent operating in the ALFRED embodied environment.\n"
    "Your task is to: put a clean mug in coffeemachine.\n"
    "You have already taken 2 step(s). Below are the most recent 2 observations and actions:\n"
    "[Observation 1: 'You arrive at countertop 2.', Action 1: 'go to countertop 2']\n"
    "You are now at step 3 and your current observation is: You pick up the mug 1.\n"
    "Your admissible actions of the current situation are: ['go to sinkbasin 1', 'inventory'].\n"
    "\n"
    "Now it's your turn to take an action.\n"
    "You should first reason step-by-step inside <think> </think>, then give the action inside <action> </action>.\n"
)
WEBSHOP_PROMPT = (
    "You are an expert autonomous agent operating in the WebShop e-commerce environment.\n"
    "Your task is to: i need a red cotton t-shirt in size large, price lower than 30.00 dollars.\n"
    "Prior to this step, you have already taken 1 step(s).\n"
    "You are now at step 2 and your current observation is: [SEP] Back to Search [SEP] B01 [SEP] Red Tee.\n"
    "Your admissible actions of the current situation are: ['click[b01]', 'click[back to search]'].\n"
    "Now it's your turn to take one action for the current step.\n"
    "Give the action inside <action> </action>.\n"
)
SEARCH_PROMPT = (
    "You are a question-answering agent that can search a knowledge base.\n"
    "Your question: who wrote the novel that the film Blade Runner is based on?\n"
    "Previous turns:\n<search>blade runner novel</search>\n<information>Do Androids Dream...</information>\n"
    "Now it's your turn to respond for the current step.\n"
    "Use <search> query </search> or <answer> answer </answer>."
)


@pytest.mark.parametrize("prompt,task_line", [
    (ALFWORLD_PROMPT, "Your task is to: put a clean mug in coffeemachine."),
    (WEBSHOP_PROMPT, "Your task is to: i need a red cotton t-shirt in size large, price lower than 30.00 dollars."),
    (SEARCH_PROMPT, "Your question: who wrote the novel that the film Blade Runner is based on?"),
])
def test_injection_positions_for_each_template(prompt, task_line):
    out = S.inject_skills(prompt, episode_skill="EPISODE LESSON", step_skill="STEP LESSON")
    lines = out.split("\n")
    original = prompt.split("\n")
    task_at = lines.index(task_line)
    assert lines[task_at + 1: task_at + 5] == [f"{S.EPISODE_TITLE}:", S.EPISODE_NOTE, "EPISODE LESSON", ""]
    turn_at = next(i for i, line in enumerate(lines) if line.startswith("Now it's your turn"))
    assert lines[turn_at - 4: turn_at] == [f"{S.STEP_TITLE}:", S.STEP_NOTE, "STEP LESSON", ""]
    # removing the 8 inserted lines gives back the original prompt, line for line
    rest = lines[:task_at + 1] + lines[task_at + 5: turn_at - 4] + lines[turn_at:]
    assert rest == original
    assert out.count("EPISODE LESSON") == 1 and out.count("STEP LESSON") == 1


def test_injection_one_block_at_a_time_and_none_is_identity():
    only_step = S.inject_skills(ALFWORLD_PROMPT, step_skill="S1")
    assert S.EPISODE_TITLE not in only_step and only_step.index("S1") < only_step.index("Now it's your turn")
    only_episode = S.inject_skills(SEARCH_PROMPT, episode_skill="E1")
    assert S.STEP_TITLE not in only_episode
    assert only_episode.index("Your question:") < only_episode.index("E1") < only_episode.index("Previous turns")
    assert S.inject_skills(WEBSHOP_PROMPT) == WEBSHOP_PROMPT
    assert S.inject_skills(WEBSHOP_PROMPT, episode_skill="", step_skill=None) == WEBSHOP_PROMPT


def test_injection_missing_anchors_appends_at_end():
    prompt = "Some intro line.\nObservation: you see a table 1.\nAct now."
    out = S.inject_skills(prompt, episode_skill="E", step_skill="S")
    assert out.startswith(prompt + "\n")
    tail = out[len(prompt):]
    assert tail.index(S.EPISODE_TITLE) < tail.index("E\n") < tail.index(S.STEP_TITLE) < tail.index("S\n")
    # only the turn anchor missing: episode block in place, step block at the end
    no_turn = ALFWORLD_PROMPT.replace("Now it's your turn", "Go ahead")
    out = S.inject_skills(no_turn, episode_skill="E", step_skill="S")
    assert out.index("Your task is to:") < out.index(S.EPISODE_TITLE) < out.index("You have already taken")
    assert out.rstrip().endswith("S") and out.index(S.STEP_TITLE) > out.index("<action> </action>")


def test_injection_task_line_without_trailing_newline():
    out = S.inject_skills("intro\nYour task is to: do it", episode_skill="E")
    assert out.split("\n")[:5] == ["intro", "Your task is to: do it", f"{S.EPISODE_TITLE}:", S.EPISODE_NOTE, "E"]


# ---------------------------------------------------------------------------------------------
# Routing (§5)
# ---------------------------------------------------------------------------------------------

ROUTE_SKILLS = S.Skills("EP", {2: "ST", 4: "  "}, "")


@pytest.mark.parametrize("mode,step,expected", [
    ("step_priority", 2, (None, "ST")), ("step_priority", 0, ("EP", None)), ("step_priority", 4, ("EP", None)),
    ("additive", 2, ("EP", "ST")), ("additive", 0, ("EP", None)), ("additive", 4, ("EP", None)),
    ("episode_only", 2, ("EP", None)), ("episode_only", 0, ("EP", None)),
    ("step_only", 2, (None, "ST")), ("step_only", 0, (None, None)), ("step_only", 4, (None, None)),
])
def test_route_truth_table(mode, step, expected):
    assert S.route(step, ROUTE_SKILLS, mode) == expected


@pytest.mark.parametrize("mode", S.ROUTING_MODES)
def test_route_without_skills(mode):
    assert S.route(0, None, mode) == (None, None)


def test_route_default_and_unknown_mode():
    assert S.route(2, ROUTE_SKILLS) == (None, "ST")
    with pytest.raises(ValueError):
        S.route(0, ROUTE_SKILLS, "both")


# ---------------------------------------------------------------------------------------------
# JSON parsing (§4)
# ---------------------------------------------------------------------------------------------

GOOD = {"episode_skill": "Find the mug, clean it, then place it.",
        "step_skills": {"1": "Take the mug 1 now.", "3": "Clean the mug 1 now."}, "episode_summary": "won"}


def test_parse_bare_fence_and_prose():
    bare = S.parse_skills_json(json.dumps(GOOD), 5, 6)
    assert bare == S.Skills("Find the mug, clean it, then place it.", {1: "Take the mug 1 now.", 3: "Clean the mug 1 now."}, "won")
    fenced = S.parse_skills_json("```json\n" + json.dumps(GOOD, indent=2) + "\n```", 5, 6)
    assert fenced == bare
    prose = S.parse_skills_json("Sure! Here is the analysis: " + json.dumps(GOOD) + " Hope it helps {not json}.", 5, 6)
    assert prose == bare


def test_parse_key_forms_range_and_empty_sentences():
    obj = {"episode_skill": "E", "step_skills": {"step 0": "A.", 2: "B.", "Step_3": "  ", "7": "C.", "5": "C5.", "-1": "D.",
                                                  "t=4": "F   G.", "x": "H."}}
    parsed = S.parse_skills_json(json.dumps(obj), 5, 5)
    assert parsed.step_skills == {0: "A.", 2: "B.", 4: "F G."}
    assert parsed.episode_summary == ""


def test_parse_keeps_first_k_in_given_order():
    obj = {"episode_skill": "E", "step_skills": {"4": "d", "0": "a", "3": "c", "1": "b"}}
    assert S.parse_skills_json(json.dumps(obj), 2, 5).step_skills == {0: "a", 4: "d"}


def test_parse_list_form_and_failures():
    listed = {"episode_skill": "E", "step_skills": [{"step": 1, "skill": "x"}, {"step": 9, "skill": "y"}]}
    assert S.parse_skills_json(json.dumps(listed), 5, 3).step_skills == {1: "x"}
    assert S.parse_skills_json(json.dumps({"episode_skill": "  ", "step_skills": {"0": "x"}}), 5, 3) is None
    assert S.parse_skills_json(json.dumps({"step_skills": {"0": "x"}}), 5, 3) is None
    assert S.parse_skills_json("I could not analyze this episode.", 5, 3) is None
    assert S.parse_skills_json('{"episode_skill": "E", "step_skills": {', 5, 3) is None
    assert S.parse_skills_json("[1, 2, 3]", 5, 3) is None


# ---------------------------------------------------------------------------------------------
# Hand-made trajectories
# ---------------------------------------------------------------------------------------------

ALF_INTRO = ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, "
             "you see a cabinet 2, a cabinet 1, a coffeemachine 1, a countertop 2, a countertop 1, a drawer 1, "
             "a fridge 1, a microwave 1, a sinkbasin 1, and a toaster 1.\n\nYour task is to: put a clean mug in coffeemachine.")


def act(a: str) -> str:
    return f"<think>ok</think><action>{a}</action>"


def alfworld_won() -> S.TrajectoryView:
    obs = [ALF_INTRO,
           "You arrive at countertop 2. On the countertop 2, you see a bread 1, a mug 1, and a spoon 2.",
           "You pick up the mug 1 from the countertop 2.",
           "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing.",
           "You clean the mug 1 using the sinkbasin 1.",
           "You arrive at coffeemachine 1. On the coffeemachine 1, you see nothing."]
    acts = ["go to countertop 2", "take mug 1 from countertop 2", "go to sinkbasin 1",
            "clean mug 1 with sinkbasin 1", "go to coffeemachine 1", "move mug 1 to coffeemachine 1"]
    return S.make_trajectory_view("alfworld", "put a clean mug in coffeemachine.", "pick_clean_then_place", True,
                                  obs, [act(a) for a in acts], acts, [True] * 6, [0, 0, 0, 0, 0, 10])


def alfworld_lost() -> S.TrajectoryView:
    c1 = "You arrive at cabinet 1. The cabinet 1 is closed."
    c2 = "You arrive at cabinet 2. The cabinet 2 is closed."
    obs = [ALF_INTRO, c1, c2, c1, c2, "Nothing happens.", "Nothing happens."]
    acts = ["go to cabinet 1", "go to cabinet 2", "go to cabinet 1", "go to cabinet 2",
            "take mug 1 from countertop 1", "", "look"]
    valid = [True, True, True, True, True, False, True]
    responses = [act(a) if v else "I think I should look around" for a, v in zip(acts, valid)]
    return S.make_trajectory_view("alfworld", "put a clean mug in coffeemachine.", "pick_clean_then_place", False,
                                  obs, responses, acts, valid, [0.0] * 7)


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


def test_discounted_returns_hand_computed():
    assert S.discounted_returns([0, 0, 10]) == pytest.approx([9.025, 9.5, 10.0])
    assert alfworld_won().steps[0].discounted_return == pytest.approx(10 * 0.95 ** 5)


def test_analyzer_messages_carry_the_trajectory():
    traj = alfworld_won()
    messages = S.build_analyzer_messages(traj, 5)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "SUCCEEDED" in user and "at most 5 critical steps" in user
    payload = json.loads(user.split(S.TRAJECTORY_MARKER, 1)[1])
    assert payload["candidate_steps"] == [0, 1, 2, 3, 4, 5] and payload["success"] is True
    assert payload["steps"][1]["response"] == act("take mug 1 from countertop 2")
    assert payload["steps"][0]["discounted_return"] == pytest.approx(7.7378, abs=1e-4)
    assert S.trajectory_from_json(user.split(S.TRAJECTORY_MARKER, 1)[1]).steps[3].action == "clean mug 1 with sinkbasin 1"
    assert "FAILED" in S.build_analyzer_messages(alfworld_lost(), 5)[1]["content"]
    repair = S.build_repair_messages(messages, "oops")
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"]
    assert repair[2]["content"] == "oops" and "JSON" in repair[3]["content"]


# ---------------------------------------------------------------------------------------------
# Rule-based analyzer (§4c)
# ---------------------------------------------------------------------------------------------

def test_rule_alfworld_won_workflow():
    skills = S.RuleBasedAnalyzer().analyze(alfworld_won(), 5)
    ep = skills.episode_skill
    for word in ("take mug 1 from countertop 2", "clean mug 1 with sinkbasin 1", "move mug 1 to coffeemachine 1",
                 "sinkbasin", "coffeemachine"):
        assert word in ep
    assert ep.index("take mug 1") < ep.index("clean mug 1") < ep.index("move mug 1")
    assert skills.step_skills == {0: "Go to countertop 2 next.", 1: "Take the mug 1 from countertop 2 now.",
                                  2: "Go to sinkbasin 1 next.", 3: "Clean the mug 1 with sinkbasin 1 now.",
                                  5: "Put the mug 1 in/on coffeemachine 1 now."}
    assert set(S.RuleBasedAnalyzer().analyze(alfworld_won(), 3).step_skills) == {1, 3, 5}


def test_rule_alfworld_lost_avoidance():
    skills = S.RuleBasedAnalyzer().analyze(alfworld_lost(), 5)
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
    assert set(S.RuleBasedAnalyzer().analyze(traj, 2).step_skills) == {2, 5}
    assert set(S.RuleBasedAnalyzer().analyze(traj, 1).step_skills) == {2}
    assert set(S.RuleBasedAnalyzer().analyze(traj, 5).step_skills) == {2, 4, 5}


def test_phrase_builders_exact_wording():
    assert S.step_hint_for_action("take mug 1 from countertop 2") == "Take the mug 1 from countertop 2 now."
    assert S.step_hint_for_action("move mug 1 to coffeemachine 1") == "Put the mug 1 in/on coffeemachine 1 now."
    assert S.step_hint_for_action("heat egg 1 with microwave 1") == "Heat the egg 1 with microwave 1 now."
    assert S.step_hint_for_action("use desklamp 1") == "Use the desklamp 1 now."
    assert S.step_hint_for_action("go to drawer 3") == "Go to drawer 3 next."
    assert S.step_hint_for_action("search[red tee]") == "Search for 'red tee'."
    assert S.step_hint_for_action("click[Buy Now]") == "Click 'Buy Now' to buy this product."
    assert S.avoid_hint("go to cabinet 1", "search a receptacle you have not opened yet.") == \
        "Do not repeat 'go to cabinet 1'; search a receptacle you have not opened yet."
    assert S.avoid_hint("take x 1 from y 1", "look elsewhere", "invalid") == \
        "Do not send 'take x 1 from y 1', it is not an admissible action; look elsewhere."
    assert S.avoid_hint("", "look elsewhere", "invalid") == \
        "Do not reply without exactly one valid action tag; look elsewhere."
    assert S.avoid_hint("open drawer 1", "look elsewhere", "ineffective") == \
        "Do not try 'open drawer 1' again, it changed nothing; look elsewhere."
    assert S.avoid_hint("click[buy now]", "check the options first", "wrong") == \
        "Do not commit to 'click[buy now]' here; check the options first."


def test_rule_alfworld_pick_two_after_first_placed():
    intro = ALF_INTRO.replace("put a clean mug in coffeemachine.", "find two laptop and put them in sofa.")
    obs = [intro, "You arrive at bed 1. On the bed 1, you see a laptop 1, and a pillow 1.",
           "You pick up the laptop 1 from the bed 1.", "You arrive at sofa 1. On the sofa 1, you see nothing.",
           "You move the laptop 1 to the sofa 1.", "You arrive at bed 1. On the bed 1, you see a pillow 1."]
    acts = ["go to bed 1", "take laptop 1 from bed 1", "go to sofa 1", "move laptop 1 to sofa 1", "go to bed 1", "look"]
    traj = S.make_trajectory_view("alfworld", "find two laptop and put them in sofa.", "pick_two_obj_and_place",
                                  False, obs, [act(a) for a in acts], acts, [True] * 6, [0.0] * 6)
    skills = S.RuleBasedAnalyzer().analyze(traj, 5)
    # after placing the first laptop the agent holds nothing: the advice is to fetch one, not to put
    # and laptop 1 is no longer on the bed, so it must look for another one
    assert "it placed only one laptop" in skills.episode_skill
    assert "look for the laptop in a place you have not searched yet" in skills.episode_skill
    assert "put the laptop in/on it" not in skills.episode_skill and "take the laptop 1" not in skills.episode_skill


def test_rule_alfworld_lost_after_seeing_object_points_there():
    traj = alfworld_lost()
    traj.steps[1].observation = "You arrive at countertop 2. On the countertop 2, you see a mug 1."
    skills = S.RuleBasedAnalyzer().analyze(traj, 5)
    assert "found the mug but never picked it up" in skills.episode_skill
    assert "take the mug 1 from it" in skills.episode_skill and "countertop 2" in skills.episode_skill


def test_rule_webshop_won_and_lost():
    won = S.RuleBasedAnalyzer().analyze(webshop_won(), 5)
    for word in ("red cotton t-shirt large", "b0red1", "large", "Buy Now"):
        assert word in won.episode_skill
    assert won.step_skills == {0: "Search for 'red cotton t-shirt large'.", 1: "Click 'b0red1'.",
                               2: "Click 'large'.", 3: "Click 'Buy Now' to buy this product."}
    lost = S.RuleBasedAnalyzer().analyze(webshop_lost(), 5)
    assert "bought a product that did not match" in lost.episode_skill
    assert "red cotton t-shirt" in lost.episode_skill
    assert lost.step_skills[4].startswith("Do not commit to 'click[buy now]'")
    assert lost.step_skills[3].startswith("Do not commit to 'click[b0blu2]'")
    assert lost.step_skills[2].startswith("Do not repeat 'search[shirt]'")


def test_rule_search_won_and_lost():
    won = S.RuleBasedAnalyzer().analyze(search_won(), 2)
    assert "Philip K. Dick" in won.episode_skill and "do androids dream of electric sheep author" in won.episode_skill
    assert won.step_skills == {1: "Search for 'do androids dream of electric sheep author'.", 2: "Answer 'Philip K. Dick'."}
    lost = S.RuleBasedAnalyzer().analyze(search_lost(), 2)
    assert "wrong answer" in lost.episode_skill and "Ridley Scott" in lost.episode_skill
    assert "blade runner" in lost.episode_skill
    assert lost.step_skills == {
        1: "Do not repeat 'search[blade runner]'; search for a different part of the question, e.g. "
           "'who wrote novel film blade runner based'.",
        3: "Do not commit to 'answer[Ridley Scott]' here; search again for the missing fact before answering."}


def test_rule_analyzer_through_complete_matches_analyze_and_is_deterministic():
    analyzer = S.RuleBasedAnalyzer()
    for traj in (alfworld_won(), alfworld_lost(), webshop_won(), webshop_lost(), search_won(), search_lost()):
        messages = S.build_analyzer_messages(traj, 3)
        reply = analyzer.complete(messages)
        assert reply == analyzer.complete(messages)
        assert S.parse_skills_json(reply, 3, len(traj.steps)) == analyzer.analyze(traj, 3)
        # a repair request is answered from the original user message
        assert analyzer.complete(S.build_repair_messages(messages, "x")) == reply


# ---------------------------------------------------------------------------------------------
# Back-ends and the batch runner (§4)
# ---------------------------------------------------------------------------------------------

def _case_of(body: dict) -> str:
    text = " ".join(m["content"] for m in body["messages"])
    return text.split("case:", 1)[1].split()[0].strip("\"',.") if "case:" in text else "good"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append((self.path, self.headers.get("Authorization"), body))
        case = _case_of(body)
        try:
            if case == "error500" or (case == "flaky" and sum(_case_of(b) == "flaky" for _, _, b in server.requests) == 1):
                self.send_response(500)
                self.end_headers()
                return
            if case == "slow":
                time.sleep(1.0)
            content = {"good": json.dumps(GOOD), "flaky": json.dumps(GOOD), "slow": json.dumps(GOOD),
                       "fence": "Here it is:\n```json\n" + json.dumps(GOOD) + "\n```",
                       "broken": '{"episode_skill": "unterminated'}[case]
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout case)
            pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.lock = [], threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _client(httpd, **kw) -> S.OpenAIChatAnalyzer:
    args = dict(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m", api_key="k",
                timeout=0.3, max_retries=2, backoff=0.0)
    return S.OpenAIChatAnalyzer(**{**args, **kw})


def _traj_with_case(case: str) -> S.TrajectoryView:
    traj = alfworld_won()
    traj.task = f"case:{case} put a clean mug in coffeemachine."
    return traj


def test_openai_backend_request_shape(server):
    client = _client(server, temperature=0.7, max_tokens=77)
    reply = client.complete([{"role": "user", "content": "hi"}])
    assert json.loads(reply) == GOOD
    path, auth, body = server.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "max_tokens": 77}


def test_openai_backend_env_defaults(monkeypatch):
    monkeypatch.setenv("OPID_ANALYZER_URL", "http://example.invalid/v1/")
    monkeypatch.setenv("OPID_ANALYZER_MODEL", "gemini-flash")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    client = S.OpenAIChatAnalyzer()
    assert (client.base_url, client.model, client.api_key) == ("http://example.invalid/v1", "gemini-flash", "sk-test")


def test_openai_backend_retries_500_then_succeeds(server):
    reply = _client(server).complete([{"role": "user", "content": "case:flaky"}])
    assert json.loads(reply) == GOOD and len(server.requests) == 2


def test_openai_backend_raises_after_retries(server):
    with pytest.raises(S.AnalyzerTransportError):
        _client(server, max_retries=2).complete([{"role": "user", "content": "case:error500"}])
    assert len(server.requests) == 3
    with pytest.raises(S.AnalyzerTimeout):
        _client(server, max_retries=0).complete([{"role": "user", "content": "case:slow"}])


def test_analyze_trajectories_counts_every_failure(server):
    cases = ["good", "fence", "broken", "error500", "slow"]
    start = time.time()
    result, stats = S.analyze_trajectories([_traj_with_case(c) for c in cases], _client(server, max_retries=1), k=5)
    assert time.time() - start < 5
    assert result[0] == result[1] == S.Skills(GOOD["episode_skill"], {1: "Take the mug 1 now.", 3: "Clean the mug 1 now."}, "won")
    assert result[2:] == [None, None, None]
    assert stats == {"requests": 6, "parse_failures": 2, "repairs": 1, "transport_errors": 2, "timeouts": 1, "no_skill": 3}
    # the repair request carried the bad reply and the repair instruction
    broken = [b for _, _, b in server.requests if _case_of(b) == "broken"]
    assert len(broken) == 2 and len(broken[1]["messages"]) == 4
    assert broken[1]["messages"][2]["content"].startswith('{"episode_skill"')
    assert broken[1]["messages"][3]["content"] == S.REPAIR_INSTRUCTIONS
    # HTTP 500 with max_retries=1: two HTTP calls, one analyzer request; slow: 2 tries
    assert sum(_case_of(b) == "error500" for _, _, b in server.requests) == 2


def test_analyze_empty_episode_skill_is_no_skill_without_repair():
    class Fixed:
        def __init__(self, replies):
            self.replies, self.calls = list(replies), 0

        def complete(self, messages):
            self.calls += 1
            return self.replies.pop(0)

    empty = Fixed(['{"episode_skill": "", "step_skills": {}}'])
    result, stats = S.analyze_trajectories([alfworld_won()], empty, 5)
    assert result == [None] and empty.calls == 1
    assert stats == {"requests": 1, "parse_failures": 0, "repairs": 0, "transport_errors": 0, "timeouts": 0, "no_skill": 1}
    repaired = Fixed(["no json, sorry", json.dumps(GOOD)])
    result, stats = S.analyze_trajectories([alfworld_won()], repaired, 1)
    assert result[0].step_skills == {1: "Take the mug 1 now."}
    assert stats["repairs"] == 1 and stats["parse_failures"] == 1 and stats["no_skill"] == 0


def test_local_model_analyzer_and_submit_handle():
    seen = []

    def generate(batch):
        seen.append(batch)
        return [json.dumps({"episode_skill": f"E{len(batch[0])}", "step_skills": {"0": "go."}})]

    handle = S.submit_analysis([alfworld_won(), alfworld_lost()], S.LocalModelAnalyzer(generate), 5, max_workers=2)
    result, stats = handle.result()
    assert handle.done() and [r.episode_skill for r in result] == ["E2", "E2"]
    assert len(seen) == 2 and seen[0][0][0]["role"] == "system"
    assert stats["requests"] == 2 and stats["no_skill"] == 0

    def crash(batch):
        raise RuntimeError("CUDA out of memory")

    result, stats = S.analyze_trajectories([alfworld_won()], S.LocalModelAnalyzer(crash), 5)
    assert result == [None] and stats["transport_errors"] == 1 and stats["timeouts"] == 0


def test_rule_based_through_the_runner():
    trajs = [alfworld_won(), alfworld_lost(), webshop_won(), webshop_lost(), search_won(), search_lost()]
    result, stats = S.analyze_trajectories(trajs, S.RuleBasedAnalyzer(), 5, max_workers=3)
    assert result == [S.RuleBasedAnalyzer().analyze(t, 5) for t in trajs]
    assert stats["requests"] == 6 and stats["no_skill"] == 0


# ---------------------------------------------------------------------------------------------
# Statistical critical steps (§4)
# ---------------------------------------------------------------------------------------------

def test_statistical_critical_steps_hand_made():
    rows = [
        # group u1, state "A": returns 10, 0, 0 -> mean 10/3, variance 22.2 (high)
        ("u1", "t1", 0, "A", 10.0), ("u1", "t2", 0, "A", 0.0), ("u1", "t3", 0, "A", 0.0),
        # state "B": returns 9, 1 -> mean 5, variance 16 (high)
        ("u1", "t1", 1, "B", 9.0), ("u1", "t2", 2, "B", 1.0),
        # state "C": 5, 4 -> variance 0.25 (low quartile)
        ("u1", "t2", 1, "C", 5.0), ("u1", "t3", 1, "C", 4.0),
        # state "D": 2, 2 -> variance 0
        ("u1", "t3", 2, "D", 2.0), ("u1", "t1", 2, "D", 2.0),
        # a singleton and the same text in another task group (not merged with u1's "A")
        ("u1", "t3", 3, "E", 0.0), ("u2", "t4", 0, "A", 0.0),
    ]
    # variances of groups of size >= 2: [22.22, 16, 0.25, 0]; 75th percentile = 16 + 0.25*(22.22-16) = 17.56
    # -> only "A" is kept: t2 step 0 and t3 step 0 are below its mean
    assert S.statistical_critical_steps(rows, 2) == {"t1": [], "t2": [0], "t3": [0], "t4": []}
    # lowering the bar: add another high-variance group so B is in the top quartile too
    rows += [("u1", "t1", 3, "F", 20.0), ("u1", "t3", 4, "F", 0.0), ("u1", "t2", 3, "G", 30.0), ("u1", "t3", 5, "G", 0.0)]
    # variances: A 22.2, B 16, C .25, D 0, F 100, G 225 -> q75 = 22.2 + .75*(100-22.2) = 80.6: F and G kept
    assert S.statistical_critical_steps(rows, 1) == {"t1": [], "t2": [], "t3": [5], "t4": []}
    assert S.statistical_critical_steps(rows, 5) == {"t1": [], "t2": [], "t3": [4, 5], "t4": []}


def test_statistical_steps_at_the_mean_are_not_picked():
    # one group, returns 0, 5, 10: mean 5, the step at exactly the mean is not "below" it
    rows = [("g", "a", 0, "S", 0.0), ("g", "b", 0, "S", 5.0), ("g", "c", 0, "S", 10.0)]
    assert S.statistical_critical_steps(rows, 3) == {"a": [0], "b": [], "c": []}


def test_restrict_to_selected_steps():
    skills = S.Skills("EP", {1: "one", 3: "three"}, "")
    restricted = S.restrict_to_selected_steps(skills, [3, 0])
    assert restricted.step_skills == {0: "EP", 3: "three"} and restricted.episode_skill == "EP"
    assert S.restrict_to_selected_steps(None, [1]) is None
    assert S.route(1, restricted) == ("EP", None) and S.route(0, restricted) == (None, "EP")


# ---------------------------------------------------------------------------------------------
# Real ALFWorld games (envs.AlfWorldEnv on games worlds.py generates): expert and random play
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

    import envs
    env = envs.AlfWorldEnv(split="train", n_games=6, max_steps=30, think=False)
    rng = random.Random(0)

    def expert(e):
        return f"<action>{e.expert_action()}</action>"

    def random_policy(e):
        roll = rng.random()
        if roll < 0.1:
            return "I will look around the room."                 # no tag: invalid
        if roll < 0.2:
            return "<action>take unicorn 1 from moon 1</action>"  # well-formed but not admissible
        return f"<action>{rng.choice(e.admissible_actions())}</action>"

    analyzer = S.RuleBasedAnalyzer()
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
            assert hint == S.step_hint_for_action(won.steps[step].action)
        # the key actions of the expert's plan appear, in order
        verbs = [S._split_action(s.action)[0] for s in won.steps]
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
            if action.startswith("take unicorn"):   # invalid (not admissible), or a repeat of it
                assert "not an admissible action" in hint or hint.startswith("Do not repeat")
        invalid = [s.index for s in lost.steps if not s.valid]
        assert not invalid or any(i in skills.step_skills for i in invalid)  # every kind of mistake is covered
    assert task_types == {"pick_and_place", "look_at_obj_in_light", "pick_clean_then_place",
                          "pick_heat_then_place", "pick_cool_then_place", "pick_two_obj_and_place"}
