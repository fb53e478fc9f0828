"""The tiny agent's cloning data: expert targets, and hinted copies in OPID's injection format."""
import pytest

import warmstart


def test_demonstrations_have_expert_targets_and_hinted_copies():
    examples = warmstart.demonstrations("search", episodes=12, noise=0.3, hint_share=0.5, seed=0)
    plain = [(p, r) for p, r in examples if "Skill" not in p]
    hinted = [(p, r) for p, r in examples if "Skill" in p]
    assert plain and hinted
    for prompt, response in examples:
        # targets are the oracle's tagged responses, never the noisy detours' placeholders
        assert response.startswith(("<search>", "<answer>")) and response.endswith(("</search>", "</answer>"))
    for prompt, _ in hinted:
        lines = prompt.splitlines()
        question = next(i for i, line in enumerate(lines) if "Your question:" in line)
        turn = next(i for i, line in enumerate(lines) if line.startswith("Now it's your turn"))
        titles = [i for i, line in enumerate(lines) if "Skill" in line and line.rstrip().endswith(":")]
        assert titles and all(question < i < turn for i in titles)  # both blocks between the two anchors
    # every hinted copy repeats a plain example's target for the same un-hinted state
    assert {r for _, r in hinted} <= {r for _, r in plain}


def test_demonstrations_are_deterministic():
    assert warmstart.demonstrations("search", 4, 0.3, 0.5, seed=1) == warmstart.demonstrations("search", 4, 0.3, 0.5, seed=1)


def test_every_recipe_names_what_the_builder_reads():
    needed = {"episodes", "noise", "hint_share", "epochs", "max_examples", "prompt_loss_weight"}
    for env_name, recipe in warmstart.RECIPES.items():
        assert needed <= set(recipe) <= needed | set(warmstart.RECIPE_DEFAULTS), env_name
        assert 0 <= recipe["noise"] < 1 and 0 <= recipe["hint_share"] <= 1 and recipe["epochs"] >= 1
    assert set(warmstart.RECIPES) == set(warmstart.TINY_HISTORY)


def test_the_tiny_response_budget_fits_every_cloned_target():
    """Every expert response the tiny agent is cloned on, plus its closing EOS, fits in the
    generation budget training and evaluation give it: a cut-off action is invalid however well
    the agent learned it (a 24-token cap truncated WebShop's instruction-long first search)."""
    import train
    for env_name in ("webshop", "search"):
        examples = warmstart.demonstrations(env_name, episodes=40, noise=0.3, hint_share=0.0, seed=0)
        tokenizer = warmstart.train_tiny_tokenizer([p for p, _ in examples[:200]] + [r for _, r in examples])
        longest = max(len(tokenizer.encode(r, add_special_tokens=False)) + 1 for _, r in examples)
        budget = train.resolve_defaults(train.Config(env=env_name)).max_new_tokens
        assert budget == warmstart.TINY_MAX_NEW_TOKENS[env_name]
        assert longest <= budget, (env_name, longest, budget)
        if env_name == "webshop":
            assert longest > 24  # the case the old cap got wrong


def test_spaced_targets_keep_the_prompt_token_of_a_copied_name():
    assert warmstart.respond(None, "<search>Rilbrir Bemstund born</search>", spaced=True) == \
        "<search> Rilbrir Bemstund born </search>"
    assert warmstart.respond(None, "<answer> 1831</answer>", spaced=True) == "<answer> 1831 </answer>"
    assert warmstart.respond(None, "go to shelf 1", spaced=True) == "<action> go to shelf 1 </action>"
    assert warmstart.respond(None, "go to shelf 1") == "<action>go to shelf 1</action>"  # the default is unchanged
    question = "In what year was Rilbrir Bemstund born?"
    tokenizer = warmstart.train_tiny_tokenizer([question, "Rilbrir Bemstund", "<search>Rilbrir"] * 20)
    name = tokenizer.encode(" Rilbrir", add_special_tokens=False)
    in_question = tokenizer.encode(question, add_special_tokens=False)
    spaced = tokenizer.encode(warmstart.respond(None, "<search>Rilbrir Bemstund born</search>", spaced=True),
                              add_special_tokens=False)
    unspaced = tokenizer.encode("<search>Rilbrir Bemstund born</search>", add_special_tokens=False)
    assert len(name) == 1 and name[0] in in_question  # the name is one token in the question ...
    assert name[0] in spaced                           # ... and the same id in the spaced response,
    assert name[0] not in unspaced                     # but another one right after ">"
    # the environments read the spaced form exactly as the unspaced one
    from envs import parse_response
    assert parse_response("<search> Rilbrir Bemstund born </search>", ("search", "answer")).action == "Rilbrir Bemstund born"


def test_a_cached_agent_is_reused_only_for_the_current_recipe(tmp_path, monkeypatch):
    import json
    folder = tmp_path / "tiny-search-v2"
    assert not warmstart.cached_agent_is_current(folder, "search")  # nothing built yet
    folder.mkdir()
    meta = {"env": "search", "recipe": dict(warmstart.RECIPES["search"]), "model_size": dict(warmstart.MODEL_SIZE)}
    (folder / "warmstart.json").write_text(json.dumps(meta))
    assert warmstart.cached_agent_is_current(folder, "search")
    for key, changed in [("recipe", {**meta["recipe"], "epochs": meta["recipe"]["epochs"] + 1}),
                         ("model_size", {**meta["model_size"], "num_layers": 3})]:
        (folder / "warmstart.json").write_text(json.dumps({**meta, key: changed}))
        assert not warmstart.cached_agent_is_current(folder, "search"), key
    # a build from before the optional key existed is current for a recipe that leaves it at its
    # default, and stale for one that sets it
    base = {k: v for k, v in meta["recipe"].items() if k not in warmstart.RECIPE_DEFAULTS}
    (folder / "warmstart.json").write_text(json.dumps({**meta, "recipe": base}))
    monkeypatch.setitem(warmstart.RECIPES, "search", {**base, "spaced_targets": False})
    assert warmstart.cached_agent_is_current(folder, "search")
    monkeypatch.setitem(warmstart.RECIPES, "search", {**base, "spaced_targets": True})
    assert not warmstart.cached_agent_is_current(folder, "search")
    monkeypatch.setitem(warmstart.RECIPES, "search", {**base, "expert_version": 2})  # a new expert
    assert not warmstart.cached_agent_is_current(folder, "search")


@pytest.mark.parametrize("env_name", ["alfworld", "webshop"])
def test_cloned_examples_do_not_depend_on_the_validity_rule(env_name, monkeypatch):
    """The noisy expert only takes admissible actions, so format-only validity (the default) and
    the admissible-only rule give the same cloning data, hinted copies included."""
    import environments
    format_only = warmstart.demonstrations(env_name, episodes=3, noise=0.3, hint_share=0.5, seed=0)
    monkeypatch.setattr(warmstart, "make_env", lambda name, **kw: environments.make_env(name, validity="admissible", **kw))
    admissible_only = warmstart.demonstrations(env_name, episodes=3, noise=0.3, hint_share=0.5, seed=0)
    assert format_only == admissible_only and any("Skill" in p for p, _ in format_only)


def test_action_hint_copies_name_the_expert_action(small_cache):
    import re

    import rule_analyzer
    import skills
    examples = warmstart.demonstrations("alfworld", episodes=2, noise=0.3, hint_share=0.0, seed=0,
                                        world="small", action_hint_share=1.0)
    plain = [(p, r) for p, r in examples if skills.STEP_TITLE not in p]
    hinted = [(p, r) for p, r in examples if skills.STEP_TITLE in p]
    assert len(plain) == len(hinted) > 0           # share 1: one hinted copy of every step, right after it
    for (prompt, target), (hinted_prompt, hinted_target) in zip(plain, hinted):
        assert hinted_target == target
        action = re.fullmatch(r"<action>(.*)</action>", target).group(1)
        assert hinted_prompt == skills.inject_skills(prompt, None, rule_analyzer.step_hint_for_action(action))
    # a share of 0 draws nothing more from the random stream: the earlier recipes rebuild as they were
    assert warmstart.demonstrations("alfworld", 2, 0.3, 0.5, seed=0, world="small") == \
        warmstart.demonstrations("alfworld", 2, 0.3, 0.5, seed=0, world="small", action_hint_share=0.0)


def test_habit_steps_are_cloned_plain_and_never_hinted(small_cache):
    """`habit_share`: the demonstrator wastes a share of its steps on HABIT_ACTION and the plain copy of
    such a step is cloned on it; a hinted copy of any step keeps the expert's action, so with a skill
    in its prompt the agent learns to drop the habit (what OPID's teacher relies on)."""
    import skills
    habit = f"<action>{warmstart.HABIT_ACTION}</action>"
    examples = warmstart.demonstrations("alfworld", episodes=2, noise=0.3, hint_share=0.5, seed=0,
                                        world="small", action_hint_share=0.5, habit_share=0.5)
    hinted = [(p, r) for p, r in examples if skills.STEP_TITLE in p or skills.EPISODE_TITLE in p]
    plain = [(p, r) for p, r in examples if (p, r) not in hinted]
    habit_steps = [p for p, r in plain if r == habit]
    assert hinted and 0.2 < len(habit_steps) / len(plain) < 0.8     # 8 of 30 steps here (seeds 1-3: about half)
    assert all(r != habit for _, r in hinted)
    # the step after a habit step shows it in the history: the habit was taken, not only cloned
    prompts = [p for p, _ in plain]
    for prompt in habit_steps:
        following = prompts[prompts.index(prompt) + 1:prompts.index(prompt) + 2]
        if following and "This is your first step" not in following[0]:     # not the episode's last step
            assert f"| Action: {warmstart.HABIT_ACTION}\n" in following[0]
    # without a habit no step is cloned on it (the expert never checks its inventory)
    plain_expert = warmstart.demonstrations("alfworld", 2, 0.3, 0.5, seed=0, world="small", action_hint_share=0.5)
    assert all(r != habit for _, r in plain_expert)
    # a share of 0 draws nothing more from the random stream: builds from before the option are unchanged
    assert plain_expert == warmstart.demonstrations("alfworld", 2, 0.3, 0.5, seed=0, world="small",
                                                    action_hint_share=0.5, habit_share=0.0)


def test_the_unclosed_habit_writes_the_experts_action_without_its_closing_tag(small_cache):
    """habit="unclosed": a habit step's plain copy is the expert's own action with `</action>` left off
    (invalid by format, so the engine answers "Nothing happens." and the state stays); hinted copies
    keep the well-formed expert action."""
    import re

    import skills
    from envs import parse_response
    assert warmstart.habit_response(None, "unclosed", "open cabinet 1") == "<action>open cabinet 1"
    assert warmstart.habit_response(None, "inventory", "open cabinet 1") == "<action>inventory</action>"
    assert not parse_response(warmstart.habit_response(None, "unclosed", "open cabinet 1")).valid
    with pytest.raises(ValueError, match="unknown habit"):
        warmstart.habit_response(None, "shouting", "look")
    with pytest.raises(ValueError, match="unknown habit"):    # before any game is played, at any share
        warmstart.demonstrations("alfworld", 2, 0.3, 0.5, world="small", habit_share=0.0, habit="shouting")
    examples = warmstart.demonstrations("alfworld", episodes=2, noise=0.3, hint_share=0.5, seed=0,
                                        world="small", action_hint_share=0.5, habit_share=0.5, habit="unclosed")
    hinted = [(p, r) for p, r in examples if skills.STEP_TITLE in p or skills.EPISODE_TITLE in p]
    plain = [(p, r) for p, r in examples if (p, r) not in hinted]
    unclosed = [(p, r) for p, r in plain if not r.endswith("</action>")]
    assert hinted and 0.2 < len(unclosed) / len(plain) < 0.8
    assert all(re.fullmatch(r"<action>[a-z0-9 ]+</action>", r) for _, r in hinted)
    assert all(re.fullmatch(r"<action>[a-z0-9 ]+", r) for _, r in unclosed)
    # the unclosed step was taken: the next prompt of the episode shows the engine's "Nothing happens."
    prompts = [p for p, _ in plain]
    followed = [prompts[prompts.index(p) + 1] for p, _ in unclosed
                if prompts.index(p) + 1 < len(prompts) and "This is your first step" not in prompts[prompts.index(p) + 1]]
    assert followed and all("Nothing happens." in f for f in followed)
    # neither habit moves the world, so the same random stream puts the habit on the same steps
    inventory = warmstart.demonstrations("alfworld", episodes=2, noise=0.3, hint_share=0.5, seed=0,
                                         world="small", action_hint_share=0.5, habit_share=0.5)
    inventory_plain = [r for p, r in inventory if skills.STEP_TITLE not in p and skills.EPISODE_TITLE not in p]
    assert [i for i, (_, r) in enumerate(plain) if not r.endswith("</action>")] == \
        [i for i, r in enumerate(inventory_plain) if r == f"<action>{warmstart.HABIT_ACTION}</action>"]


def split_episodes(examples):
    """Plain (prompt, response) examples split into episodes, each starting at its first step."""
    episodes = []
    for prompt, response in examples:
        if "This is your first step" in prompt:
            episodes.append([])
        episodes[-1].append((prompt, response))
    return episodes


def test_the_stall_habit_starts_at_a_take_and_loops_until_the_demonstration_ends(small_cache):
    """habit="stall": drawn only where the expert takes something; the demonstrator then checks its
    inventory on every step, and its demonstration ends after STALL_REPEATS repeats. Hinted copies of
    the stalled steps keep the expert's action (with a skill in its prompt the agent leaves the loop)."""
    import skills
    habit = f"<action>{warmstart.HABIT_ACTION}</action>"
    assert warmstart.habit_response(None, "stall", "take apple 1 from fridge 1") == habit
    examples = warmstart.demonstrations("alfworld", episodes=6, noise=0.3, hint_share=0.5, seed=0,
                                        world="small", action_hint_share=0.5, habit_share=0.9, habit="stall")
    hinted = [(p, r) for p, r in examples if skills.STEP_TITLE in p or skills.EPISODE_TITLE in p]
    plain = [(p, r) for p, r in examples if (p, r) not in hinted]
    assert hinted and all(r != habit for _, r in hinted)
    episodes = split_episodes(plain)
    assert len(episodes) == 6
    stalled = [e for e in episodes if any(r == habit for _, r in e)]
    assert len(stalled) >= 3         # 0.9 at every take: most episodes stall
    for episode in stalled:
        first = next(i for i, (_, r) in enumerate(episode) if r == habit)
        # the loop is the episode's end: the trigger and exactly STALL_REPEATS repeats, nothing after
        assert [r for _, r in episode[first:]] == [habit] * (1 + warmstart.STALL_REPEATS)
        # the trigger comes where a take is possible, and the repeats show the habit in their history
        assert "'take " in episode[first][0]
        assert all(f"| Action: {warmstart.HABIT_ACTION}\n" in p for p, _ in episode[first + 1:])
    # hinted copies of stalled states exist and name another action, the one that leaves the loop
    def state(prompt):
        return prompt[prompt.index("Now you are at step"):prompt.index("Now it's your turn")]
    stalled_states = {state(p) for e in stalled for p, r in e if r == habit}
    copies = [r for p, r in hinted if "Now you are at step" in p and state(p) in stalled_states]
    assert copies and habit not in copies
    # a share of 0 draws nothing: the agent without a habit
    assert warmstart.demonstrations("alfworld", 2, 0.3, 0.5, seed=0, world="small", action_hint_share=0.5) == \
        warmstart.demonstrations("alfworld", 2, 0.3, 0.5, seed=0, world="small", action_hint_share=0.5,
                                 habit_share=0.0, habit="stall")


def test_habit_step_draws_a_stall_once_at_a_take_and_keeps_it_for_its_repeats():
    """The pure draw: a stall starts only at a take, lasts 1 + STALL_REPEATS steps, is not drawn
    again; other habits draw at every step; a share of 0 consumes no random numbers."""
    import random
    rng, loop = random.Random(0), []
    actions = ["go to desk 1", "take pen 1 from desk 1", "look", "look", "go to shelf 1", "take pen 2 from shelf 1"]
    taken = [warmstart.habit_step("stall_resume", 1.0, a, t, loop, rng) for t, a in enumerate(actions)]
    assert taken == [False, True, True, True, False, False] and loop == [1, 2, 3]
    never = random.Random(0)
    assert not any(warmstart.habit_step(h, 0.0, "take pen 1 from desk 1", 0, [], never)
                   for h in warmstart.HABITS)
    assert never.random() == random.Random(0).random()        # nothing was drawn
    rng = random.Random(1)
    draws = [warmstart.habit_step("inventory", 0.5, "look", t, [], rng) for t in range(400)]
    assert 150 < sum(draws) < 250


def test_the_resumed_stall_loops_then_plays_on_and_leaves_the_loops_shadow_uncloned(small_cache):
    """habit="stall_resume": the same trigger and repeats as "stall", then the expert's play again;
    the plain copies of the steps whose history window still shows the loop are left out (their
    history reads like the loop's last step, which says to loop), later steps are cloned."""
    import skills
    habit = f"<action>{warmstart.HABIT_ACTION}</action>"
    kwargs = dict(episodes=6, noise=0.0, hint_share=0.0, seed=0, world="small", habit_share=0.9)
    resumed = warmstart.demonstrations("alfworld", habit="stall_resume", **kwargs)
    stalled = warmstart.demonstrations("alfworld", habit="stall", **kwargs)
    assert not any(skills.STEP_TITLE in p or skills.EPISODE_TITLE in p for p, _ in resumed)
    resumed_episodes, stalled_episodes = split_episodes(resumed), split_episodes(stalled)
    assert len(resumed_episodes) == len(stalled_episodes) == 6
    step = lambda p: int(p.split("Now you are at step ")[1].split(".")[0])
    looped = played_on = 0
    for i, played in enumerate(resumed_episodes):
        responses = [r for _, r in played]
        if habit not in responses:
            continue
        first = responses.index(habit)
        loop = played[first:first + 1 + warmstart.STALL_REPEATS]
        assert [r for _, r in loop] == [habit] * (1 + warmstart.STALL_REPEATS) and "'take " in loop[0][0]
        if not looped:   # the same random stream up to the first loop's end: "stall"'s demonstration
            assert played[:first + len(loop)] == stalled_episodes[i]
        looped += 1
        after = played[first + len(loop):]
        assert habit not in [r for _, r in after]           # the game goes on with the expert's actions
        # steps 1 .. history_length after the loop are missing; the first cloned one sees no loop
        if after:
            played_on += 1
            assert step(after[0][0]) == step(loop[-1][0]) + 1 + 2
            assert f"| Action: {warmstart.HABIT_ACTION}\n" not in after[0][0]
    assert looped >= 3 and played_on >= 1 and len(resumed) > len(stalled)


def test_label_smoothing_of_the_response_loss_by_hand():
    import math

    import torch

    from policy import pad_batch

    class ConstantLogits(torch.nn.Module):
        """Every position predicts p = (1/4, 1/4, 1/2) over a 3-token vocabulary."""
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, **kwargs):
            logits = torch.tensor([0.0, 0.0, math.log(2.0)]).expand(*input_ids.shape, 3) + self.weight
            return type("Out", (), {"logits": logits})()

    batch = pad_batch([[1]], [[2, 0]], pad_id=0)      # response tokens 2 (p = 1/2) and 0 (p = 1/4)
    plain, _ = warmstart.clone_losses(ConstantLogits(), batch)
    smoothed, _ = warmstart.clone_losses(ConstantLogits(), batch, label_smoothing=0.1)
    ln2 = math.log(2.0)
    assert plain.item() == pytest.approx(1.5 * ln2)                    # (ln 2 + ln 4) / 2
    # 0.9 · NLL + 0.1 · mean_v(−log p_v) = 0.9 · 1.5 ln 2 + 0.1 · (ln 4 + ln 4 + ln 2) / 3
    assert smoothed.item() == pytest.approx(0.9 * 1.5 * ln2 + 0.1 * 5 * ln2 / 3)


def test_kept_alfworld_agent_is_a_build_of_the_current_recipe():
    """The weights kept in the repository are used instead of a build only while they are a build of
    today's recipe; change the recipe (or MODEL_SIZE, VERSION) and this fails until
    `python warmstart.py alfworld --keep` has rebuilt them."""
    import hashlib
    import json
    folder = warmstart.KEPT_AGENTS / warmstart.agent_name("alfworld")
    meta = json.loads((folder / "warmstart.json").read_text())
    assert meta["recipe_hash"] == warmstart.recipe_hash(warmstart.RECIPES["alfworld"])
    assert warmstart.full_recipe(meta["recipe"]) == warmstart.full_recipe(warmstart.RECIPES["alfworld"])
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() == meta["weights_sha256"]
    assert warmstart.tiny_agent_folder("alfworld") == folder     # served without a build


def test_recipe_hash_changes_with_every_input(monkeypatch):
    recipe = warmstart.RECIPES["alfworld"]
    base = warmstart.recipe_hash(recipe)
    assert warmstart.recipe_hash(dict(recipe)) == base
    assert warmstart.recipe_hash({**recipe, "epochs": recipe["epochs"] + 1}) != base
    assert warmstart.recipe_hash({**recipe, "label_smoothing": 0.3}) != base
    assert warmstart.recipe_hash({**recipe, "habit_share": 0.3}) != base
    assert warmstart.recipe_hash({**recipe, "habit_share": 0.0}) != base
    assert warmstart.recipe_hash({**recipe, "habit": "unclosed"}) != base
    # an optional key left out hashes as its default (a build from before the key existed)
    bare = {k: v for k, v in recipe.items() if k not in ("habit_share", "habit")}
    assert warmstart.recipe_hash(bare) == warmstart.recipe_hash({**bare, "habit_share": 0.0, "habit": "inventory"})
    assert warmstart.recipe_hash(bare) != base
    monkeypatch.setattr(warmstart, "MODEL_SIZE", {**warmstart.MODEL_SIZE, "num_layers": 3})
    assert warmstart.recipe_hash(recipe) != base


def test_a_build_is_bit_identical_when_repeated(small_cache, tmp_path):
    """What `python warmstart.py alfworld --keep` relies on, at a small scale: the same recipe builds
    the same bits (demonstrations, tokenizer, initialisation and cloning are all seeded)."""
    import json
    recipe = dict(episodes=2, noise=0.3, hint_share=0.5, epochs=1, max_examples=48, prompt_loss_weight=1.0,
                  world="small", action_hint_share=0.5)
    digests = []
    for name in ("a", "b"):
        warmstart.build_tiny_agent("alfworld", tmp_path / name, recipe)
        digests.append(json.loads((tmp_path / name / "warmstart.json").read_text())["weights_sha256"])
    assert digests[0] == digests[1]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_habit_share_builds_are_refused_with_a_clear_message(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = str(Path(warmstart.__file__))
    cases = [(["webshop", "--habit-share", "0.3", "--out", str(tmp_path)], "ALFWorld experiment"),
             (["alfworld", "--habit-share", "1.5", "--out", str(tmp_path)], "must be in [0, 1)"),
             (["alfworld", "--habit-share", "0.3"], "go together"),
             (["alfworld", "--out", str(tmp_path), "--keep"], "go together"),
             (["alfworld", "--habit", "unclosed"], "give --habit-share and --out"),
             (["alfworld", "--habit-share", "0.3", "--habit", "loud", "--out", str(tmp_path)], "invalid choice")]
    for argv, message in cases:
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, argv
    assert not any(tmp_path.iterdir())      # nothing was built
