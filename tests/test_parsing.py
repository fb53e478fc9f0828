"""Response parsing (envs.parse_response), ALFWorld validity, and the ALFWorld prompt template."""
import random

import pytest

import alfworld_env
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


def test_think_must_close_before_the_answer_opens():
    # the authors only look for both think tags; here the action must follow the reasoning
    inside = parse_response("<think>maybe <action>look</action></think>", require_think=True)
    assert not inside.valid and "before </think>" in inside.reason
    after = parse_response("<action>look</action><think>why</think>", require_think=True)
    assert not after.valid and "before </think>" in after.reason
    swapped = parse_response("</think>x<think><action>look</action>", require_think=True)
    assert not swapped.valid and "</think> comes before <think>" in swapped.reason
    assert parse_response("<think>a</think> <action>look</action>", require_think=True).valid
    # thinking not asked for: a think block anywhere is just text
    assert parse_response("<think>maybe <action>look</action></think>").valid
    searched = parse_response("<think>q</think><search>x</search>", ("search", "answer"), require_think=True)
    assert searched.valid and searched.tag == "search"


def test_chinese_characters_make_a_response_invalid():
    # the authors' projections reject any character of U+4E00–U+9FFF anywhere in the text
    for text in ("<think>我想</think><action>look</action>", "<action>look</action> 好", "<action>打开 fridge 1</action>"):
        p = parse_response(text)
        assert not p.valid and p.reason == "Chinese characters in the response"
    assert parse_response("<action>look</action>。").valid  # U+3002 (punctuation) is outside that range
    assert parse_response("<action>café crème</action>").valid


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
    return alfworld_env.AlfWorldEnv(split="eval", n_games=6, train_games=6, **kw)


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
    env = make(small_cache, think=True, max_steps=7)
    env.reset(2)
    rng = random.Random(1)
    junk = bytes(rng.randrange(256) for _ in range(10_000)).decode("utf-8", errors="replace")
    bad = ["", junk, "<action>look</action>",                         # missing think
           "<think>x <action>look</action></think>",                  # action inside the reasoning
           "<think>x</think><action>look</action><action>look</action>",
           "<think>想</think><action>look</action>"]                   # Chinese characters
    reasons = []
    for i, response in enumerate(bad, start=1):
        obs, reward, done, info = env.step(response)
        assert not info["action_valid"] and info["invalid_reason"]
        assert obs == "Nothing happens." and reward == 0.0 and not done
        assert env.steps == i
        reasons.append(info["invalid_reason"])
    assert "think" in reasons[2] and "before </think>" in reasons[3] and "Chinese" in reasons[5]
    obs, reward, done, info = env.step("<think>x</think><action>look</action>")
    assert info["action_valid"] and done and env.steps == 7            # max_steps reached
    obs, reward, done, info = env.step("<think>x</think><action>look</action>")
    assert done and not info["action_valid"]                           # stepping past the end is harmless


def test_non_admissible_action_is_a_valid_step_by_default(small_cache):
    """Format-only validity (the authors' rule): a well-formed action the world cannot carry out
    is answered "Nothing happens.", counted, and valid (no penalty); the world is untouched."""
    env = make(small_cache, think=False, max_steps=5)
    env.reset(2)
    before = sorted(env.admissible_actions())
    obs, reward, done, info = env.step("<action>dance wildly</action>")
    assert (obs, reward, done, env.steps) == ("Nothing happens.", 0.0, False, 1)
    assert info["action_valid"] and info["invalid_reason"] == "" and info["action"] == "dance wildly"
    assert sorted(env.admissible_actions()) == before
    assert env.history[-1][1] == "dance wildly"
    # actions are lower-cased before the engine sees them, as in the authors' projection
    first = before[0]
    obs, _, _, info = env.step(f"<action>{first.upper()}</action>")
    assert info["action_valid"] and info["action"] == first and obs != "Nothing happens."


def test_admissible_validity_is_kept_as_an_option(small_cache):
    env = make(small_cache, think=False, max_steps=5, validity="admissible")
    env.reset(2)
    obs, reward, done, info = env.step("<action>dance wildly</action>")
    assert obs == "Nothing happens." and not info["action_valid"] and env.steps == 1
    assert info["invalid_reason"] == "'dance wildly' is not one of the admissible actions"
    obs, _, _, info = env.step(f"<action>{env.admissible_actions()[0]}</action>")
    assert info["action_valid"]
    with pytest.raises(ValueError, match="unknown validity rule"):
        make(small_cache, validity="strict")


def test_top_k_ranks_by_score_then_index_and_keeps_only_positive_scores():
    import numpy as np
    scores = np.array([0.5, 2.0, 0.5, 0.0, 2.0, 0.5, 1.0])
    assert envs.top_k(scores, 3) == [1, 4, 6]            # 2.0 tie in index order, then 1.0
    assert envs.top_k(scores, 5) == [1, 4, 6, 0, 2]      # the 0.5 tie at the cut: lowest indices first
    assert envs.top_k(scores, 10) == [1, 4, 6, 0, 2, 5]  # the 0 score never
    assert envs.top_k(scores, 0) == [] and envs.top_k(np.zeros(3), 2) == []
    # the same ranking whatever order the tie arrives in
    assert envs.top_k(scores[::-1], 2) == [2, 5]
