"""Response parsing (envs.parse_response) and the ALFWorld prompt template (CONTRACT.md)."""
import random


import envs
from envs import parse_response


# ---- parser ---------------------------------------------------------------------------------

def test_plain_action_is_valid_and_stripped():
    p = parse_response("<action>  go to   cabinet 1 </action>")
    assert (p.valid, p.tag, p.action, p.reason) == (True, "action", "go to cabinet 1", "")


def test_no_tags_is_invalid():
    p = parse_response("go to cabinet 1")
    assert not p.valid and p.action == "" and "no <action> tag" in p.reason


def test_repeated_tags_are_invalid():
    p = parse_response("<action>look</action><action>inventory</action>")
    assert not p.valid and "repeated" in p.reason


def test_empty_action_is_invalid():
    p = parse_response("<think>hmm</think><action>   </action>")
    assert not p.valid and "empty" in p.reason


def test_empty_string_is_invalid():
    p = parse_response("")
    assert not p.valid and p.reason


def test_tags_in_wrong_order_are_invalid():
    p = parse_response("</action>look<action>")
    assert not p.valid and "before" in p.reason


def test_ten_kilobytes_of_random_bytes_never_raise():
    rng = random.Random(0)
    for _ in range(5):
        text = bytes(rng.randrange(256) for _ in range(10_000)).decode("utf-8", errors="replace")
        p = parse_response(text, require_think=True)
        assert not p.valid and p.reason
    # random bytes that happen to sit inside tags are still rejected (control characters)
    p = parse_response("<action>" + "\x00\x01\x02 go" + "</action>")
    assert not p.valid and "control" in p.reason


def test_non_string_is_invalid():
    assert not parse_response(None).valid


def test_think_required():
    assert parse_response("<think>a</think><action>look</action>", require_think=True).valid
    missing = parse_response("<action>look</action>", require_think=True)
    assert not missing.valid and "think" in missing.reason
    repeated = parse_response("<think>a</think><think>b</think><action>look</action>", require_think=True)
    assert not repeated.valid
    # without the requirement the think block is optional
    assert parse_response("<action>look</action>", require_think=False).valid


def test_search_answer_tags():
    p = parse_response("<search>capital of France</search>", answer_tags=("search", "answer"))
    assert (p.valid, p.tag, p.action) == (True, "search", "capital of France")
    both = parse_response("<search>a</search><answer>b</answer>", answer_tags=("search", "answer"))
    assert not both.valid and "more than one" in both.reason


def test_too_long_action_is_invalid():
    p = parse_response("<action>" + "a" * (envs.MAX_ACTION_CHARS + 1) + "</action>")
    assert not p.valid and "longer" in p.reason


# ---- prompt template ------------------------------------------------------------------------

def make(small_cache, **kw):
    return envs.AlfWorldEnv(split="eval", n_games=6, train_games=6, **kw)


def test_template_first_step(small_cache):
    env = make(small_cache, think=True, history_length=2)
    obs, info = env.reset(0)
    text = env.prompt()
    lines = text.split("\n")
    task_lines = [ln for ln in lines if "Your task is to: " in ln]
    assert task_lines == [f"Your task is to: {info['task']}"]
    assert text.count("Your task is to:") == 1
    turn = [ln for ln in lines if ln.startswith("Now it's your turn")]
    assert len(turn) == 1 and text.count("Now it's your turn") == 1
    assert "no history" in text
    assert "[Step" not in text
    for action in info["admissible_actions"]:
        assert f"'{action}'" in text
    assert "help" not in info["admissible_actions"]
    # tag instructions follow the closing line
    after = text.split("Now it's your turn", 1)[1]
    assert "<think>" in after and "<action>" in after
    assert obs in text


def test_template_history_window_and_no_think(small_cache):
    env = make(small_cache, think=False, history_length=2)
    env.reset(1)
    actions = []
    for _ in range(4):
        a = env.expert_action()
        actions.append(a)
        env.step(f"<action>{a}</action>")
    text = env.prompt()
    history_lines = [ln for ln in text.split("\n") if ln.startswith("[Step")]
    assert len(history_lines) == 2                                   # exactly H pairs
    assert history_lines[0].startswith("[Step 3]") and history_lines[1].startswith("[Step 4]")
    assert history_lines[1].endswith(f"Action: {actions[3]}")
    assert "You have taken 4 step(s)" in text and "step 5" in text
    after = text.split("Now it's your turn", 1)[1]
    assert "<action>" in after and "<think>" not in text             # no-think variant
    assert text.count("Your task is to:") == 1


def test_invalid_responses_counted_and_episode_goes_on(small_cache):
    env = make(small_cache, think=True, max_steps=6)
    env.reset(2)
    rng = random.Random(1)
    junk = bytes(rng.randrange(256) for _ in range(10_000)).decode("utf-8", errors="replace")
    bad = ["", junk, "<action>look</action>",                         # missing think
           "<think>x</think><action>dance wildly</action>",           # not admissible
           "<think>x</think><action>look</action><action>look</action>"]
    reasons = []
    for i, response in enumerate(bad, start=1):
        obs, reward, done, info = env.step(response)
        assert not info["action_valid"] and info["invalid_reason"]
        assert obs == "Nothing happens." and reward == 0.0 and not done
        assert env.steps == i
        reasons.append(info["invalid_reason"])
    assert reasons[3] == "'dance wildly' is not one of the admissible actions"
    assert "think" in reasons[2]
    obs, reward, done, info = env.step("<think>x</think><action>look</action>")
    assert info["action_valid"] and done and env.steps == 6            # max_steps reached
    obs, reward, done, info = env.step("<think>x</think><action>look</action>")
    assert done and not info["action_valid"]                           # stepping past the end is harmless
