"""Tests of webshop.py: reward by hand, pages and clickables, search, expert, catalogue, contract."""
import json
import random
import sys
import types

import pytest

import webshop
from webshop import OfficialWebShopEnv, WebShopEnv, build_catalogue, webshop_score

REQUIRED_INFO = {"won", "action_valid", "invalid_reason", "action", "admissible_actions", "task_type",
                 "anchor_obs", "expert_action", "task", "score", "privileged"}


def act(text: str) -> str:
    return f"<think>ok</think><action>{text}</action>"


@pytest.fixture(scope="module")
def env():
    return WebShopEnv(split="eval")


# --- reward (WebShop's get_reward), computed by hand ----------------------------------------

LIP_BALM = {"asin": "B0TEST0001", "title": "Acme Long Lasting Lip Balm", "query": "lip balm",
            "product_category": "Beauty & Personal Care › Skin Care › Lip Care › Lip Balm",
            "attributes": ["long lasting", "paraben free", "cruelty free"], "features": ["Smooth feel."],
            "description": "A balm.", "price": 12.5, "options": {"flavor": ["cherry", "mint"]}}
GOAL = {"query": "lip balm", "name": "Acme Long Lasting Lip Balm",
        "product_category": "Beauty & Personal Care › Skin Care › Lip Care › Lip Balm",
        "attributes": ["long lasting", "paraben free", "cruelty free"], "goal_options": {"flavor": "cherry"},
        "price_upper": 20.0}


def test_reward_all_matched_is_one():
    assert webshop_score(LIP_BALM, {"flavor": "cherry"}, GOAL) == 1.0


def test_reward_one_of_three_attributes_missing():
    product = dict(LIP_BALM, attributes=["long lasting", "paraben free"])
    assert webshop_score(product, {"flavor": "cherry"}, GOAL) == pytest.approx(4 / 5)  # (2 + 1 + 1) / 5


def test_reward_attribute_found_in_features_text_counts():
    product = dict(LIP_BALM, attributes=["long lasting", "paraben free"], features=["CRUELTY FREE: yes."])
    assert webshop_score(product, {"flavor": "cherry"}, GOAL) == 1.0


def test_reward_wrong_or_missing_option():
    assert webshop_score(LIP_BALM, {"flavor": "mint"}, GOAL) == pytest.approx(4 / 5)
    assert webshop_score(LIP_BALM, {}, GOAL) == pytest.approx(4 / 5)


def test_reward_price_over_bound():
    assert webshop_score(dict(LIP_BALM, price=20.01), {"flavor": "cherry"}, GOAL) == pytest.approx(4 / 5)
    assert webshop_score(dict(LIP_BALM, price=20.0), {"flavor": "cherry"}, GOAL) == 1.0  # bound inclusive


def test_reward_wrong_type_is_zero_and_partial_type():
    cable = dict(LIP_BALM, title="Zed Braided USB C Cable", query="usb c cable",
                 product_category="Electronics › Computers & Accessories › Cables › Usb C Cable")
    assert webshop_score(cable, {"flavor": "cherry"}, GOAL) == 0.0
    # one title word of five shared (0.2, not > 0.2), no query or category match: r_type = 0.5
    gloss = dict(cable, title="Zed Lip Gloss Case")
    assert webshop.type_match(gloss, GOAL) == 0.5
    assert webshop_score(gloss, {"flavor": "cherry"}, GOAL) == pytest.approx(0.5)


# --- pages, search, clickables -------------------------------------------------------------

def test_search_results_and_pagination(env):
    env.reset(0)
    first, _, _, info = env.step(act("search[machine washable cotton]"))
    assert info["action_valid"] and first.startswith("Back to Search [SEP] Page 1 (Total results: 50)")
    assert "click[next >]" in info["admissible_actions"] and "click[< prev]" not in info["admissible_actions"]
    asins = [a for a in info["admissible_actions"] if a.startswith("click[b0")]
    assert len(asins) == 10
    second, _, _, info = env.step(act("click[Next >]"))  # clicks are case-insensitive
    assert "Page 2 (Total results: 50)" in second and "click[< prev]" in info["admissible_actions"]
    assert set(asins).isdisjoint(info["admissible_actions"])
    back, _, _, _ = env.step(act("click[< prev]"))
    assert back == first
    for _ in range(4):
        last, _, _, info = env.step(act("click[next >]"))
    assert "Page 5 (Total results: 50)" in last and "click[next >]" not in info["admissible_actions"]


def test_search_ranks_exact_title_first_and_unknown_words_give_nothing(env):
    catalogue = env.catalogue
    product = catalogue["products"][123]
    assert webshop.search_products(catalogue, product["title"])[0] == 123
    env.reset(0)
    obs, _, _, info = env.step(act("search[zzqx wibble]"))
    assert "Total results: 0" in obs and info["admissible_actions"] == ["click[back to search]"]


def test_click_not_on_page_is_a_valid_step_that_changes_nothing(env):
    """Format-only validity (the authors' rule, the official text environment's behaviour): a
    well-formed action the page cannot carry out is counted, leaves the page as it was, and is valid."""
    obs0, _ = env.reset(1)
    obs, reward, done, info = env.step(act("click[buy now]"))
    assert (obs, reward, done) == (obs0, 0.0, False)
    assert info["action_valid"] and info["invalid_reason"] == "" and env.steps == 1
    results, _, _, _ = env.step(act("search[lip balm]"))
    for bad in ["search[shampoo]", "click[B0NOTTHERE]", "jump[3]", "click[buy now]"]:
        obs, _, _, info = env.step(act(bad))
        assert obs == results and info["action_valid"] and info["action"] == bad
    assert env.steps == 6 and env.history[-1][1] == "click[buy now]"


def test_admissible_validity_makes_those_clicks_invalid():
    strict = WebShopEnv(split="eval", validity="admissible")
    obs0, _ = strict.reset(1)
    obs, reward, done, info = strict.step(act("click[buy now]"))
    assert (obs, reward, done) == (obs0, 0.0, False)
    assert not info["action_valid"] and "not clickable" in info["invalid_reason"] and strict.steps == 1
    results, _, _, _ = strict.step(act("search[lip balm]"))
    for bad in ["search[shampoo]", "click[B0NOTTHERE]", "jump[3]", "click[buy now]"]:
        obs, _, _, info = strict.step(act(bad))
        assert obs == results and not info["action_valid"] and info["invalid_reason"]
    with pytest.raises(ValueError, match="unknown validity rule"):
        WebShopEnv(split="eval", validity="page")


def test_think_is_required_when_the_prompt_asks_for_it():
    thinking = WebShopEnv(split="eval", think=True)
    thinking.reset(0)
    _, _, _, info = thinking.step("<action>search[lip balm]</action>")
    assert not info["action_valid"] and "think" in info["invalid_reason"]
    _, _, _, info = thinking.step("<think>the <action>search[lip balm]</action></think>")
    assert not info["action_valid"] and "before </think>" in info["invalid_reason"]
    _, _, _, info = thinking.step(act("search[lip balm]"))
    assert info["action_valid"]
    short = WebShopEnv(split="eval", think=False)
    short.reset(0)
    assert short.step("<action>search[lip balm]</action>")[3]["action_valid"]


def test_item_page_options_subpages_and_buy(env):
    env.reset(2)
    goal = env.goal
    env.step(act(f"search[{goal['name']}]"))
    item, _, _, info = env.step(act(f"click[{goal['asin']}]"))
    assert goal["name"] in item and item.endswith("Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
    product = env.catalogue["products"][env.catalogue["by_asin"][goal["asin"]]]
    for group, values in product["options"].items():
        assert all(f"click[{v}]" in info["admissible_actions"] for v in values)
        env.step(act(f"click[{values[0]}]"))
        env.step(act(f"click[{values[-1]}]"))  # a second value of the same group replaces the first
        assert env.chosen[group] == values[-1]
    sub, _, _, info = env.step(act("click[features]"))
    assert sub.startswith("Back to Search [SEP] < Prev [SEP] ") and product["features"][0] in sub
    assert info["admissible_actions"] == ["click[back to search]", "click[< prev]"]
    assert env.step(act("click[< prev]"))[0] == item
    obs, reward, done, info = env.step(act("click[buy now]"))
    expected = webshop_score(product, env.chosen, goal)
    assert done and info["score"] == pytest.approx(expected) and reward == 10.0 * (expected == 1.0)
    assert "Thank you for shopping" in obs


# --- expert and random policy --------------------------------------------------------------

def run_expert(env, index):
    env.reset(index)
    done, info = False, {}
    while not done:
        _, reward, done, info = env.step(act(env.expert_action()))
    return reward, info


def test_expert_wins_a_sample_of_eval_instructions(env):
    for index in range(0, env.num_tasks(), max(1, env.num_tasks() // 30)):
        reward, info = run_expert(env, index)
        assert info["won"] and reward == 10.0 and info["score"] == 1.0 and env.steps <= 15


def test_expert_recovers_from_a_detour(env):
    env.reset(5)
    env.step(act("search[hdmi cable gold plated]"))
    env.step(act(f"click[{env.admissible_actions()[-1][6:-1]}]"))  # some item, likely the wrong one
    done, info = False, {}
    while not done:
        _, _, done, info = env.step(act(env.expert_action()))
    assert info["won"]


def test_expert_buys_the_first_result_that_scores_one_not_the_hidden_target():
    train = WebShopEnv(split="train")
    train.reset(3)  # "a gold plated hdmi cable, price lower than 30": the target is the 6th result
    train.step(act(train.expert_action()))
    catalogue, goal = train.catalogue, train.goal
    target = catalogue["by_asin"][goal["asin"]]
    first = train.results[0]
    assert train.results.index(target) == 5
    assert webshop.best_purchase_score(catalogue["products"][first], goal) == 1.0
    assert train.expert_action() == f"click[{catalogue['products'][first]['asin'].lower()}]"
    done, info = False, {}
    while not done:
        _, reward, done, info = train.step(act(train.expert_action()))
    assert info["won"] and reward == 10.0 and train.item == first != target


def test_search_breaks_score_ties_by_catalogue_index():
    # "gold plated hdmi cable": one product scores highest, then seven tie (129 388 462 758 869 1276
    # 1461); the page lists the tie in catalogue order whatever order numpy's top-k selection gives
    catalogue = webshop.load_catalogue(0)
    found = webshop.search_products(catalogue, "please find a gold plated hdmi cable")
    assert found[:8] == [314, 129, 388, 462, 758, 869, 1276, 1461]
    assert len(found) == webshop.MAX_RESULTS


def test_best_purchase_score_chooses_the_goal_options_the_product_offers():
    assert webshop.best_purchase_score(LIP_BALM, GOAL) == 1.0
    no_cherry = {**LIP_BALM, "options": {"flavor": ["mint"]}}  # 3 attributes + price of 5 items match
    assert webshop.best_purchase_score(no_cherry, GOAL) == pytest.approx(4 / 5)


def test_random_admissible_policy_is_far_below_expert(env):
    rng, wins = random.Random(0), 0
    for episode in range(60):
        env.reset(episode % env.num_tasks())
        done, info = False, {}
        while not done:
            choice = rng.choice(env.admissible_actions())
            choice = f"search[{env.task}]" if choice.startswith("search[") else choice
            _, _, done, info = env.step(act(choice))
        wins += info["won"]
    assert wins / 60 <= 0.15


# --- catalogue -----------------------------------------------------------------------------

def test_catalogue_is_deterministic_and_seed_dependent():
    a, b, c = build_catalogue(3, 300, 50, 20), build_catalogue(3, 300, 50, 20), build_catalogue(4, 300, 50, 20)
    assert json.dumps(a) == json.dumps(b)
    assert a["products"][0]["asin"] != c["products"][0]["asin"]


def test_catalogue_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("OPID_CACHE", str(tmp_path))
    monkeypatch.setattr(webshop, "_CATALOGUES", {})
    loaded = webshop.load_catalogue(9, 200)
    files = list((tmp_path / "webshop").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == build_catalogue(9, 200)
    assert loaded["products"] == build_catalogue(9, 200)["products"]


def test_catalogue_size_categories_and_disjoint_splits(env):
    cat = env.catalogue
    assert len(cat["products"]) >= 1000 and len({p["asin"] for p in cat["products"]}) == len(cat["products"])
    assert {p["category"] for p in cat["products"]} == {"clothing", "beauty", "electronics", "grocery", "home"}
    train, evals = cat["train"], cat["eval"]
    assert len(train) >= 1000 and len(evals) >= 100
    assert not {g["instruction"] for g in train} & {g["instruction"] for g in evals}
    assert not {g["asin"] for g in train} & {g["asin"] for g in evals}
    for goal in evals + train[:200]:
        text = goal["instruction"]
        assert all(a in text for a in goal["attributes"]) and f"{goal['price_upper']:.2f} dollars" in text
        assert all(v in text for v in goal["goal_options"].values())
        assert webshop_score(cat["products"][cat["by_asin"][goal["asin"]]], goal["goal_options"], goal) == 1.0


# --- contract ------------------------------------------------------------------------------

def test_info_keys_at_reset_and_every_step(env):
    obs, info = env.reset(3)
    assert REQUIRED_INFO <= set(info) and info["anchor_obs"] == obs == "Search"
    assert info["admissible_actions"] == ["search[<your query>]"] and info["task_type"] == env.goal["category"]
    assert "required attributes" in info["privileged"] and env.task == info["task"]
    while True:
        previous = env.observation
        expert = env.expert_action()
        _, _, done, info = env.step(act(expert))
        assert REQUIRED_INFO <= set(info) and info["anchor_obs"] == previous and info["action"] == expert
        if done:
            break
    assert info["expert_action"] is None and info["won"] is True


def test_garbage_never_raises_and_counts_as_steps():
    env = WebShopEnv(split="train", max_steps=5)
    obs0, _ = env.reset(0)
    noise = bytes(random.Random(1).getrandbits(8) for _ in range(10_000)).decode("latin-1")
    for garbage in ["", "no tags at all", noise, "<action></action>", "<action>click[x]</action>" * 2]:
        obs, reward, done, info = env.step(garbage)
        assert obs == obs0 and reward == 0.0 and not info["action_valid"] and info["invalid_reason"]
    assert done and env.steps == 5
    obs, reward, done, info = env.step(act("search[lip balm]"))  # after the end: no raise, no effect
    assert done and reward == 0.0 and not info["action_valid"]


def test_prompt_structure_history_and_think_variants():
    env = WebShopEnv(split="eval", history_length=2, think=True)
    env.reset(0)
    for _ in range(3):
        env.step(act(env.expert_action()))
    text = env.prompt()
    assert text.count(f"Your task is to: {env.task}\n") == 1 and text.count("Now it's your turn") == 1
    assert text.count("|| action:") == 2 and "<think>" in text and "(step 2)" in text and "(step 1)" not in text
    assert text.index("Your task is to") < text.index("Now it's your turn") < text.index("<action>")
    short = WebShopEnv(split="eval", think=False)
    short.reset(0)
    assert "<think>" not in short.prompt() and "<action>" in short.prompt()


def test_official_backend_missing_gives_setup_instructions(monkeypatch):
    monkeypatch.setitem(sys.modules, "web_agent_site", None)
    with pytest.raises(ImportError, match="WebShop"):
        OfficialWebShopEnv(split="eval")


def test_official_adapter_on_a_fake_text_env(monkeypatch):
    class FakeTextEnv:  # the slice of WebAgentTextEnv the adapter uses
        def __init__(self, observation_mode, **kwargs):
            assert observation_mode == "text"
            goal = {"category": "beauty", "query": "lip balm", "attributes": ["long lasting"],
                    "goal_options": ["cherry"], "price_upper": 20.0}
            self.server = types.SimpleNamespace(goals=[goal] * 600)
            self.instruction_text = "Instruction: i need a lip balm"
            self.sent = []

        def reset(self, session):
            self.page = "search"
            return "WebShop [SEP] Instruction: [SEP] i need a lip balm [SEP] Search", None

        def get_available_actions(self):
            return {"has_search_bar": self.page == "search",
                    "clickables": [] if self.page == "search" else ["back to search", "Buy Now"]}

        def step(self, action):
            self.sent.append(action)
            if action.startswith("search["):
                self.page = "item"
                return "Instruction: [SEP] i need a lip balm [SEP] Back to Search [SEP] Buy Now", 0.0, False, None
            if action.lower() == "click[buy now]" and self.page == "item":
                return "Thank you", 1.0, True, None
            page = "Search" if self.page == "search" else "Back to Search [SEP] Buy Now"
            return f"Instruction: [SEP] i need a lip balm [SEP] {page}", 0.0, False, None  # nothing happens

    fake = types.ModuleType("web_agent_site.envs")
    fake.WebAgentTextEnv = FakeTextEnv
    monkeypatch.setitem(sys.modules, "web_agent_site", types.ModuleType("web_agent_site"))
    monkeypatch.setitem(sys.modules, "web_agent_site.envs", fake)
    env = OfficialWebShopEnv(split="eval")
    obs, info = env.reset(0)
    assert env.num_tasks() == 500 and obs == "Search" and env.task == "i need a lip balm"
    assert info["admissible_actions"] == ["search[<your query>]"] and "cherry" in info["privileged"]
    obs, _, _, info = env.step(act("click[buy now]"))  # not on the search page: sent, nothing happens
    assert info["action_valid"] and obs == "Search" and env.env.sent == ["click[buy now]"]
    strict = OfficialWebShopEnv(split="eval", validity="admissible")
    strict.reset(0)
    _, _, _, info = strict.step(act("click[buy now]"))
    assert not info["action_valid"] and strict.env.sent == []  # rejected before the official env
    obs, _, _, info = env.step(act("search[lip balm]"))
    assert obs == "Back to Search [SEP] Buy Now" and "click[buy now]" in info["admissible_actions"]
    obs, reward, done, info = env.step(act("click[buy now]"))
    assert done and reward == 10.0 and info["won"] and info["score"] == 1.0
