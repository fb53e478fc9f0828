"""Tests for skills.py: injection (§6), routing (§5), JSON parsing, back-ends and the batch
runner (§4) and the statistical critical-step selector (§4). The rule-based analyzer is tested in
test_rule_analyzer.py, which reuses the hand-made trajectories below."""
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


def test_injection_without_task_line_puts_the_episode_block_before_the_turn_line():
    # the authors' placement: no task line -> before "Now it's your turn", ahead of the step block
    prompt = "Intro.\nObservation: a table 1.\nNow it's your turn to act.\nUse <action> tags."
    out = S.inject_skills(prompt, episode_skill="E", step_skill="S")
    assert out.split("\n") == ["Intro.", "Observation: a table 1.",
                               f"{S.EPISODE_TITLE}:", S.EPISODE_NOTE, "E", "",
                               f"{S.STEP_TITLE}:", S.STEP_NOTE, "S", "",
                               "Now it's your turn to act.", "Use <action> tags."]
    only_episode = S.inject_skills(prompt, episode_skill="E")
    assert only_episode.split("\n")[2:7] == [f"{S.EPISODE_TITLE}:", S.EPISODE_NOTE, "E", "", "Now it's your turn to act."]


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


@pytest.mark.parametrize("mode,step,use_episode,use_step,expected", [
    # w_step = 0: a critical step falls back to the episode skill instead of a zero-weighted term
    ("step_priority", 2, True, False, ("EP", None)), ("step_priority", 0, True, False, ("EP", None)),
    # w_ep = 0: steps without a step skill get no teacher
    ("step_priority", 2, False, True, (None, "ST")), ("step_priority", 0, False, True, (None, None)),
    ("additive", 2, True, False, ("EP", None)), ("additive", 2, False, True, (None, "ST")),
    ("episode_only", 2, False, True, (None, None)), ("step_only", 2, True, False, (None, None)),
    ("step_priority", 2, False, False, (None, None)),
])
def test_route_with_a_skill_kind_switched_off(mode, step, use_episode, use_step, expected):
    assert S.route(step, ROUTE_SKILLS, mode, use_episode=use_episode, use_step=use_step) == expected


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
    monkeypatch.setenv("OPID_ANALYZER_URL", "https://example.invalid/v1/")
    monkeypatch.setenv("OPID_ANALYZER_MODEL", "gemini-flash")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    client = S.OpenAIChatAnalyzer()
    assert (client.base_url, client.model, client.api_key) == ("https://example.invalid/v1", "gemini-flash", "sk-test")


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
    assert stats == {"requests": 6, "parse_failures": 2, "repairs": 1, "transport_errors": 2, "timeouts": 1,
                     "invalid_replies": 0, "no_skill": 3}
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
    assert stats == {"requests": 1, "parse_failures": 0, "repairs": 0, "transport_errors": 0, "timeouts": 0,
                     "invalid_replies": 1, "no_skill": 1}
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
