"""WebShop: an offline WebShop-format simulator, its catalogue, reward and expert (docs/method.md §2, §9).

What runs here (no WebShop code or product data can be had offline):
- `build_catalogue(seed)` generates a deterministic product catalogue (1,500 products, five
  categories: clothing, beauty, electronics, grocery, home) and WebShop-style instructions
  ("i need a long lasting lip balm in cherry flavor, and price lower than 20.00 dollars") split
  into disjoint train / eval sets (disjoint by instruction text and by target product).
  `load_catalogue(seed)` caches it as JSON under `envs.cache_dir("webshop")`.
- `WebShopEnv` reproduces WebShop's text mode: pages are `[SEP]`-joined text, the actions are
  `search[...]` (only where a search box is) and `click[...]` (only on a clickable of the page):
  search page -> results (10 per page, top 50 by BM25, `Next >` / `< Prev`, `Back to Search`)
  -> item page (option values, `Description` / `Features` / `Reviews` sub-pages, `Buy Now`).
  The instruction is not repeated inside every page (it is the prompt's task line).
- `webshop_score` is WebShop's reward (web_agent_site/engine/goal.py `get_reward`):
      score = r_type * (#matched goal attributes + #matched goal options + 1[price <= bound])
                     / (#goal attributes + #goal options + 1)
  The episode reward is 10 * (score == 1) on `Buy Now` (§2), the raw score is `info["score"]`.
- `WebShopEnv.expert_action()` is an oracle that knows the target product.

Real back-end on a user's machine: `OfficialWebShopEnv` wraps the official text environment
(`web_agent_site.envs.WebAgentTextEnv`, observation_mode="text") behind the same contract. It
needs the WebShop repository (Python <= 3.10, Java for pyserini, its product data):
    git clone https://github.com/princeton-nlp/WebShop && cd WebShop && ./setup.sh -d all
    pip install -e .   # so that `import web_agent_site` works from this project
Sessions 0..499 are WebShop's test goals (our "eval"), 1500.. its training goals ("train").
"""
from __future__ import annotations

import json
import math
import random
import os
import re

from envs import VALIDITY_RULES, cache_dir, parse_response, top_k

CATALOGUE_VERSION = 1     # bump when the generator changes: it names the cached JSON file
RESULTS_PER_PAGE = 10
MAX_RESULTS = 50          # WebShop's search engine returns the top 50
SEP = " [SEP] "

# ---------------------------------------------------------------------------------------------
# Catalogue content. One row per product type:
# (type, category path below the root, (min price, max price), option groups {group: value
# pool}, attribute pool). Types ending in "s" are plural. Option values are canonical: exact match.
# ---------------------------------------------------------------------------------------------

CATEGORY_ROOTS = {
    "clothing": "Clothing, Shoes & Jewelry", "beauty": "Beauty & Personal Care",
    "electronics": "Electronics", "grocery": "Grocery & Gourmet Food", "home": "Home & Kitchen",
}
_SIZES = "x-small|small|medium|large|x-large|xx-large"
_COLORS = "black|white|navy|heather gray|red|olive green|royal blue|pink|beige|burgundy"
_SHOE_SIZES = "6|6.5|7|7.5|8|8.5|9|9.5|10|10.5|11|12"
PRODUCT_TYPES = {
    "clothing": [
        ("t-shirt", "Women › Clothing › Tops & Tees", (8, 35), {"size": _SIZES, "color": _COLORS},
         "machine washable|cotton|short sleeve|relaxed fit|moisture wicking|crew neck"),
        ("hoodie", "Men › Clothing › Fashion Hoodies", (20, 60), {"size": _SIZES, "color": _COLORS},
         "machine washable|fleece lined|long sleeve|drawstring closure|relaxed fit|kangaroo pocket"),
        ("jeans", "Men › Clothing › Jeans", (25, 80),
         {"size": "28w x 30l|30w x 30l|32w x 32l|34w x 32l|36w x 34l",
          "color": "dark wash|light wash|black|medium indigo"},
         "machine washable|slim fit|stretch denim|button closure|high waist|straight leg"),
        ("running shoes", "Women › Shoes › Athletic", (35, 140), {"size": _SHOE_SIZES, "color": _COLORS},
         "non slip|breathable mesh|rubber sole|lightweight|memory foam|arch support"),
        ("socks", "Men › Clothing › Socks", (6, 25),
         {"size": "small|medium|large", "count": "pack of 3|pack of 6|pack of 12"},
         "moisture wicking|cushioned sole|machine washable|ankle length|cotton"),
        ("rain jacket", "Women › Clothing › Coats & Jackets", (30, 120), {"size": _SIZES, "color": _COLORS},
         "waterproof|hooded|zipper closure|packable|windproof"),
        ("sandals", "Women › Shoes › Sandals", (15, 70),
         {"size": _SHOE_SIZES, "color": "black|brown|tan|white|silver"},
         "open toe|adjustable strap|rubber sole|arch support|quick drying"),
    ],
    "beauty": [
        ("lip balm", "Skin Care › Lip Care", (2, 18),
         {"flavor": "cherry|mint|vanilla|strawberry|coconut|honey", "count": "pack of 2|pack of 4|pack of 6"},
         "long lasting|natural ingredients|paraben free|cruelty free|spf 15|moisturizing"),
        ("shampoo", "Hair Care › Shampoo & Conditioner", (6, 40),
         {"scent": "lavender|coconut|tea tree|citrus|unscented", "size": "8 fl oz|12 fl oz|16 fl oz|32 fl oz"},
         "sulfate free|paraben free|for dry hair|natural ingredients|color safe|cruelty free"),
        ("face serum", "Skin Care › Face › Serums", (10, 60), {"size": "0.5 fl oz|1 fl oz|2 fl oz"},
         "hyaluronic acid|vitamin c|fragrance free|dermatologist tested|anti aging|cruelty free"),
        ("nail polish", "Makeup › Nails › Nail Polish", (4, 20),
         {"color": "ruby red|nude pink|coral|midnight blue|clear|lilac"},
         "long lasting|quick dry|non toxic|chip resistant|vegan"),
        ("body wash", "Personal Care › Bath & Bathing", (5, 30),
         {"scent": "lavender|coconut|eucalyptus|citrus|unscented", "size": "12 fl oz|18 fl oz|32 fl oz"},
         "sulfate free|moisturizing|natural ingredients|dermatologist tested|sensitive skin"),
        ("deodorant", "Personal Care › Deodorants", (4, 22),
         {"scent": "lavender|cedarwood|citrus|unscented", "count": "pack of 1|pack of 2|pack of 3"},
         "aluminum free|long lasting|natural ingredients|baking soda free|cruelty free"),
        ("eyeshadow palette", "Makeup › Eyes › Eyeshadow", (8, 50),
         {"color": "warm neutrals|smoky|rose gold|bright mix"},
         "long lasting|highly pigmented|cruelty free|vegan|shimmer finish"),
    ],
    "electronics": [
        ("bluetooth headphones", "Headphones › Over-Ear Headphones", (20, 200),
         {"color": "black|white|navy|rose gold|gray"},
         "noise cancelling|long battery life|fast charging|water resistant|foldable|built-in microphone"),
        ("usb c cable", "Computers & Accessories › Cables", (5, 25),
         {"length": "3 ft|6 ft|10 ft", "count": "pack of 1|pack of 2|pack of 3"},
         "fast charging|braided nylon|high speed data|durable|tangle free"),
        ("phone case", "Cell Phones & Accessories › Cases", (8, 40),
         {"model": "iphone 13|iphone 14|iphone 15|galaxy s23|pixel 8", "color": "black|clear|navy|pink|green"},
         "shockproof|slim fit|wireless charging compatible|scratch resistant|kickstand"),
        ("power bank", "Cell Phones & Accessories › Chargers", (15, 70),
         {"capacity": "10000mah|20000mah|26800mah", "color": "black|white|blue"},
         "fast charging|portable|led display|dual usb ports|airline approved"),
        ("hdmi cable", "Television & Video › Cables", (6, 30), {"length": "3 ft|6 ft|10 ft|15 ft"},
         "high speed|4k resolution|gold plated|braided nylon|ethernet support"),
        ("wireless mouse", "Computers & Accessories › Mice", (10, 60), {"color": "black|white|gray|pink|blue"},
         "ergonomic|rechargeable|silent click|bluetooth|adjustable dpi"),
        ("memory card", "Computers & Accessories › Memory Cards", (8, 60),
         {"capacity": "32gb|64gb|128gb|256gb|512gb"},
         "high speed|4k video|waterproof|adapter included"),
        ("portable speaker", "Portable Audio › Speakers", (20, 150), {"color": "black|blue|red|teal|gray"},
         "waterproof|long battery life|bluetooth|deep bass|built-in microphone"),
    ],
    "grocery": [
        ("green tea", "Beverages › Tea › Green", (4, 25),
         {"flavor": "jasmine|mint|lemon|peach|original", "count": "20 count|40 count|100 count"},
         "organic|non gmo|individually wrapped|low calorie|kosher"),
        ("protein bar", "Snack Foods › Bars › Protein", (10, 45),
         {"flavor": "chocolate chip|peanut butter|cookie dough|salted caramel|birthday cake",
          "count": "pack of 6|pack of 12|pack of 24"},
         "gluten free|high protein|low sugar|keto friendly|non gmo"),
        ("coffee beans", "Beverages › Coffee › Whole Bean", (8, 40),
         {"roast": "light roast|medium roast|dark roast|espresso roast", "size": "12 oz|2 lb|5 lb"},
         "organic|fair trade|low acid|non gmo|kosher"),
        ("olive oil", "Pantry › Oils", (7, 35), {"size": "16.9 fl oz|25.3 fl oz|33.8 fl oz|101 fl oz"},
         "extra virgin|cold pressed|organic|non gmo|kosher"),
        ("dark chocolate", "Snack Foods › Candy & Chocolate", (4, 30),
         {"flavor": "sea salt|almond|orange|raspberry|mint", "count": "pack of 3|pack of 6|pack of 12"},
         "sugar free|vegan|dairy free|fair trade|individually wrapped"),
        ("beef jerky", "Snack Foods › Jerky & Dried Meats", (6, 35),
         {"flavor": "original|teriyaki|peppered|sweet and spicy", "size": "3 oz|8 oz|16 oz"},
         "high protein|gluten free|low fat|no artificial preservatives|grass fed"),
        ("granola", "Breakfast Foods › Cereals › Granola", (4, 25),
         {"flavor": "honey almond|cinnamon|blueberry|dark cherry", "size": "11 oz|24 oz|35 oz"},
         "gluten free|whole grain|low sugar|organic|high fiber"),
    ],
    "home": [
        ("throw pillow cover", "Home Décor › Decorative Pillows", (8, 35),
         {"size": "16x16 inch|18x18 inch|20x20 inch", "color": _COLORS},
         "machine washable|hidden zipper|soft velvet|double sided|fade resistant"),
        ("bath towel set", "Bath › Towels", (18, 70), {"color": _COLORS, "count": "set of 2|set of 4|set of 6"},
         "quick dry|machine washable|highly absorbent|cotton|plush"),
        ("frying pan", "Kitchen & Dining › Cookware › Skillets", (15, 90), {"size": "8 inch|10 inch|12 inch"},
         "non stick|dishwasher safe|oven safe|induction compatible|pfoa free"),
        ("storage basket", "Storage & Organization › Baskets", (10, 45),
         {"size": "small|medium|large", "color": "natural|gray|white|black"},
         "foldable|handwoven|sturdy handles|space saving|easy to clean"),
        ("scented candle", "Home Décor › Candles", (6, 40),
         {"scent": "lavender|vanilla|sandalwood|fresh linen|pumpkin spice"},
         "long lasting|soy wax|lead free wick|natural ingredients|hand poured"),
        ("shower curtain", "Bath › Shower Curtains", (10, 40),
         {"color": _COLORS, "size": "72x72 inch|72x84 inch"},
         "waterproof|machine washable|mildew resistant|rust proof grommets|heavy duty"),
        ("desk lamp", "Lighting › Desk Lamps", (15, 70), {"color": "black|white|silver|wood grain"},
         "dimmable|energy efficient|usb charging port|eye caring|touch control"),
        ("food storage containers", "Kitchen & Dining › Food Storage", (10, 45),
         {"count": "set of 5|set of 10|set of 24"},
         "bpa free|dishwasher safe|microwave safe|leak proof|stackable"),
    ],
}
OPTION_PHRASES = {  # how an instruction asks for one option value
    "size": "in size {v}", "color": "in {v} color", "flavor": "in {v} flavor", "scent": "with {v} scent",
    "count": "in a {v}", "length": "that is {v} long", "capacity": "with {v} capacity",
    "model": "for {v}", "roast": "in {v}",
}
OPENERS = ["i need", "i am looking for", "i want to buy", "find me", "i would like", "can you get me",
           "please find", "i'm searching for"]
# Neutral filler text: none of it may contain an attribute (the attribute fallback reads the text).
FILLERS = ["Designed in our own studio and checked by hand before it ships.",
           "A dependable pick for daily routines at home or on the go.",
           "Ships in recyclable packaging.", "Backed by a one year satisfaction promise.",
           "Thousands of customers reorder it every month.", "Simple to use right out of the box."]
REVIEW_LINES = ["Exactly what I wanted, would buy this {t} again.", "Good {t} for the price.",
                "The {v} one is my favorite.", "Arrived quickly and works as described.",
                "Not bad, but the {v} version was a bit different from the photo.",
                "My second {t} from this brand, still happy."]
STOPWORDS = {"a", "an", "the", "and", "or", "for", "with", "of", "in", "on", "to", "by", "is", "that",
             "it", "this", "i", "me", "my", "need", "want", "looking", "find", "would", "like", "buy",
             "please", "can", "you", "get", "am", "be", "are", "from", "at", "as", "x"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower())


def _brand(rng: random.Random) -> str:
    first = ["Lu", "Ker", "Bri", "Sol", "Var", "Ne", "Ama", "Tor", "Ze", "Cal", "Mo", "Fen", "Ori", "Pax"]
    last = ["mora", "vex", "dell", "ara", "ton", "lio", "nix", "wick", "stone", "ly", "ro", "quin"]
    return rng.choice(first) + rng.choice(last)


def _asin(rng: random.Random, used: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
        if asin not in used:
            used.add(asin)
            return asin


def _make_product(rng: random.Random, category: str, row: tuple, used: set[str]) -> dict:
    ptype, subpath, (low, high), groups, attr_pool = row
    brand = _brand(rng)
    attributes = rng.sample(attr_pool.split("|"), rng.randint(2, 4))
    options = {}
    for group, pool in groups.items():
        values = pool.split("|")
        keep = sorted(rng.sample(range(len(values)), rng.randint(2, min(6, len(values)))))
        options[group] = [values[i] for i in keep]
    price = round(rng.uniform(low, high)) + rng.choice([-0.01, -0.05, -0.51, 0.0])
    price = round(max(price, 1.99), 2)
    in_title = attributes[: rng.randint(1, 2)]
    title = f"{brand} {in_title[0].title()} {ptype.title()}"
    if len(in_title) > 1:
        title += f", {in_title[1].title()}"
    title += rng.choice(["", " for Women and Men", " - Everyday Essential", ", Premium Quality"])
    description = " ".join([f"The {brand} {ptype} is {attributes[0]}."]
                           + [f"It is also {a}." for a in attributes[1:]] + rng.sample(FILLERS, 2))
    features = [f"{a.upper()}: {rng.choice(FILLERS)}" for a in attributes] + [rng.choice(FILLERS)]
    any_value = next(iter(options.values()))[0] if options else ptype
    reviews = [{"rating": rng.randint(2, 5), "text": line.format(t=ptype, v=any_value)}
               for line in rng.sample(REVIEW_LINES, 2)]
    return {"asin": _asin(rng, used), "title": title, "category": category, "query": ptype,
            "product_category": " › ".join([CATEGORY_ROOTS[category], subpath, ptype.title()]),
            "attributes": attributes, "options": options, "price": price,
            "rating": round(rng.uniform(3.0, 5.0), 1), "description": description,
            "features": features, "reviews": reviews}


def _make_goal(rng: random.Random, product: dict) -> dict:
    attributes = rng.sample(product["attributes"], min(len(product["attributes"]), rng.choice([1, 2, 2, 3])))
    goal_options = {g: rng.choice(vals) for g, vals in product["options"].items() if rng.random() < 0.75}
    price_upper = float(math.ceil((product["price"] + 0.01) / 10) * 10 + 10 * rng.choice([0, 0, 1, 2]))
    described = " and ".join(attributes) + " " + product["query"]
    article = "some" if product["query"].endswith("s") else ("an" if described[0] in "aeiou" else "a")
    text = f"{rng.choice(OPENERS)} {article} {described}"
    text += "".join(" " + OPTION_PHRASES[g].format(v=v) if i == 0 else " and " + OPTION_PHRASES[g].format(v=v)
                    for i, (g, v) in enumerate(goal_options.items()))
    query = text  # the expert searches the instruction without its price clause
    text += f", and price lower than {price_upper:.2f} dollars"
    return {"asin": product["asin"], "instruction": text, "search_query": query,
            "query": product["query"], "category": product["category"],
            "product_category": product["product_category"], "name": product["title"],
            "attributes": attributes, "goal_options": goal_options, "price_upper": price_upper}


def build_catalogue(seed: int = 0, num_products: int = 1500, num_train: int = 1500,
                    num_eval: int = 200, eval_fraction: float = 0.15) -> dict:
    """Generate products and train / eval instructions, deterministically from `seed`.

    Targets of eval instructions are products never targeted in train, and no instruction text
    appears twice, so the two splits are disjoint by text and by target product.
    """
    rng = random.Random(seed)
    rows = [(cat, row) for cat in CATEGORY_ROOTS for row in PRODUCT_TYPES[cat]]
    used: set[str] = set()
    products = [_make_product(rng, *rows[i % len(rows)], used) for i in range(num_products)]
    order = list(range(num_products))
    rng.shuffle(order)
    n_eval = int(num_products * eval_fraction)
    pools = {"eval": order[:n_eval], "train": order[n_eval:]}
    seen: set[str] = set()
    splits = {}
    for split, wanted in (("eval", num_eval), ("train", num_train)):
        goals, pool, tries = [], pools[split], 0
        while len(goals) < wanted and tries < 50 * wanted:
            goal = _make_goal(rng, products[pool[tries % len(pool)]])
            tries += 1
            if goal["instruction"] not in seen:
                seen.add(goal["instruction"])
                goals.append(goal)
        splits[split] = goals
    return {"version": CATALOGUE_VERSION, "seed": seed, "products": products, **splits}


_CATALOGUES: dict[tuple, dict] = {}  # one copy per process, shared by all B*N environments


def load_catalogue(seed: int = 0, num_products: int = 1500) -> dict:
    """The catalogue for `seed`, read from (or first written to) `cache_dir("webshop")`."""
    key = (seed, num_products)
    if key not in _CATALOGUES:
        path = cache_dir("webshop") / f"catalogue_v{CATALOGUE_VERSION}_seed{seed}_n{num_products}.json"
        if path.exists():
            catalogue = json.loads(path.read_text())
        else:
            catalogue = build_catalogue(seed, num_products)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(catalogue))
            tmp.replace(path)  # atomic, so a parallel process never reads half a file
        catalogue["by_asin"] = {p["asin"]: i for i, p in enumerate(catalogue["products"])}
        _CATALOGUES[key] = catalogue
    return _CATALOGUES[key]


# ---------------------------------------------------------------------------------------------
# Search: BM25 over title + attributes + category path, index built once per process.
# ---------------------------------------------------------------------------------------------

_SEARCH_INDEX: dict[tuple, object] = {}
_SEARCH_CACHE: dict[tuple, list[int]] = {}


def search_products(catalogue: dict, query: str) -> list[int]:
    """Indices of the top `MAX_RESULTS` products for `query` (only products sharing a term)."""
    import bm25s  # third-party, imported here so building or loading a catalogue alone does not need it
    key = (catalogue["seed"], len(catalogue["products"]))
    if (key, query) in _SEARCH_CACHE:
        return _SEARCH_CACHE[(key, query)]
    if key not in _SEARCH_INDEX:
        corpus = [" ".join([p["title"], *p["attributes"], p["product_category"]]) for p in catalogue["products"]]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
        _SEARCH_INDEX[key] = retriever
    retriever = _SEARCH_INDEX[key]
    tokens = [t for t in bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
              if t in retriever.vocab_dict]
    found: list[int] = []
    if tokens:
        found = top_k(retriever.get_scores(tokens), MAX_RESULTS)   # equal scores in catalogue order
    if len(_SEARCH_CACHE) < 100_000:
        _SEARCH_CACHE[(key, query)] = found
    return found


# ---------------------------------------------------------------------------------------------
# Reward (WebShop's get_reward, simplified where our generated text is canonical).
# ---------------------------------------------------------------------------------------------

def type_match(product: dict, goal: dict) -> float:
    """WebShop's r_type: 1 when the product type ("query") or >= 2 category-path levels match
    or more than 20% of the goal title's words are in the product title; 0.5 otherwise; 0.1 when
    the title overlap is below 10%, 0 when it is zero. WebShop counts spaCy nouns of the titles;
    we count title words minus stop-words (no spaCy model offline)."""
    query_match = product["query"] == goal["query"]
    levels = lambda path: {x.strip() for x in path.split("›")}
    category_match = len(levels(product["product_category"]) & levels(goal["product_category"])) >= 2
    desired = {w for w in _words(goal["name"]) if w not in STOPWORDS}
    bought = {w for w in _words(product["title"]) if w not in STOPWORDS}
    title_score = len(desired & bought) / len(desired) if desired else 0.2
    r_type = 1.0 if (query_match or category_match or title_score > 0.2) else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type


def attribute_matches(product: dict, goal: dict) -> int:
    """Goal attributes found in the product's attribute list, or else in its title, features or
    description text (WebShop's fallback). WebShop fuzzy-matches the list (token_set_ratio > 85);
    our attributes are canonical strings, so an exact match is used."""
    text = " ".join([product["title"], *product["features"], product["description"]]).lower()
    own = {a.lower() for a in product["attributes"]}
    return sum(1 for a in goal["attributes"] if a.lower() in own or a.lower() in text)


def option_matches(chosen: dict, goal: dict) -> int:
    """Goal option values among the values chosen before Buy Now (exact match, see above)."""
    picked = {str(v).lower() for v in chosen.values()}
    return sum(1 for v in goal["goal_options"].values() if v.lower() in picked)


def webshop_score(product: dict, chosen: dict, goal: dict) -> float:
    """Raw WebShop score in [0, 1] of buying `product` with options `chosen` for `goal`."""
    matched = attribute_matches(product, goal) + option_matches(chosen, goal)
    matched += 1 if product["price"] <= goal["price_upper"] else 0
    total = len(goal["attributes"]) + len(goal["goal_options"]) + 1
    return type_match(product, goal) * matched / total


def best_purchase_score(product: dict, goal: dict) -> float:
    """Score of buying `product` with every goal option it offers chosen (the expert's test)."""
    chosen = {g: v for g, v in goal["goal_options"].items() if v in product["options"].get(g, [])}
    return webshop_score(product, chosen, goal)


def privileged_text(goal: dict) -> str:
    """Ground truth shown to the OPSD teacher (§10): what an ideal purchase must satisfy."""
    options = goal["goal_options"]  # a dict here; a list of strings in WebShop's human goals
    pairs = options.items() if isinstance(options, dict) else enumerate(options)
    options = ", ".join(f"{g}: {v}" if isinstance(options, dict) else str(v) for g, v in pairs) or "none"
    return (f"product type: {goal['query']}; required attributes: {', '.join(goal['attributes'])}; "
            f"required options: {options}; price lower than {goal['price_upper']:.2f} dollars")


# ---------------------------------------------------------------------------------------------
# Prompt template (§2): task line, step count, last-H history, observation, actions, closing.
# ---------------------------------------------------------------------------------------------

def webshop_prompt(task: str, history: list[tuple[str, str]], observation: str, actions: list[str],
                   step: int, history_length: int, think: bool) -> str:
    lines = ["You are shopping on a web store for a customer, using only search and click actions.",
             f"Your task is to: {task}"]
    recent = history[-history_length:] if history_length > 0 else []
    if step == 0 or not recent:
        lines.append(f"This is step {step + 1}. The page in front of you reads: {observation}")
    else:
        lines.append(f"You have already taken {step} step(s). The last {len(recent)} pages you saw "
                     "and what you did on each:")
        first = step - len(recent) + 1
        lines += [f"(step {first + i}) page: {o} || action: {a}" for i, (o, a) in enumerate(recent)]
        lines.append(f"Now at step {step + 1}, the page in front of you reads: {observation}")
    lines.append("Actions you can take on this page:")
    lines += [f"  {a}" for a in actions]
    lines.append("Now it's your turn to choose exactly one of these actions.")
    if think:
        lines.append("First think it through inside <think> </think>, then write the chosen action "
                     "inside <action> </action>, e.g. <action>click[buy now]</action>.")
    else:
        lines.append("Write only the chosen action inside <action> </action>, "
                     "e.g. <action>click[buy now]</action>.")
    return "\n".join(lines)


def _parse_action(text: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"(search|click)\[(.*)\]", text.strip(), flags=re.IGNORECASE | re.DOTALL)
    return (match.group(1).lower(), " ".join(match.group(2).split())) if match else None


def _blank_info(task: str, task_type: str, privileged: str) -> dict:
    return {"won": False, "action_valid": True, "invalid_reason": "", "action": "", "score": 0.0,
            "admissible_actions": None, "task_type": task_type, "anchor_obs": "", "expert_action": None,
            "task": task, "privileged": privileged}


# ---------------------------------------------------------------------------------------------
# The simulator.
# ---------------------------------------------------------------------------------------------

class WebShopEnv:
    """WebShop-format simulator over the generated catalogue (the shared contract: docs/method.md §2, §12).

    State: page in {"search", "results", "item", "sub"}, the current result list and page
    number, the open product, the options chosen on it, and the sub-page shown.

    Validity (docs/method.md §2): with `validity="format"` (default, the authors' rule) only a
    malformed response is invalid (`envs.parse_response`, `<think>` required when `think`); a
    well-formed action the page cannot carry out (a click on something not on the page, an
    unknown command, a search without a search box) is a valid step that leaves the page as it
    was, as the official WebShop text environment does. `validity="admissible"` (ablation) makes
    such actions invalid.
    """
    name = "webshop"
    answer_tags = ("action",)

    def __init__(self, split: str = "train", history_length: int = 2, max_steps: int = 15,
                 think: bool = True, seed: int = 0, num_products: int = 1500, validity: str = "format"):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if validity not in VALIDITY_RULES:
            raise ValueError(f"unknown validity rule {validity!r}; expected one of {VALIDITY_RULES}")
        self.validity = validity
        self.catalogue = load_catalogue(seed, num_products)
        self.goals = self.catalogue[split]
        self.split, self.history_length, self.max_steps, self.think = split, history_length, max_steps, think
        self.task, self.goal = "", None
        self.done = True

    def num_tasks(self) -> int:
        return len(self.goals)

    # --- pages ---------------------------------------------------------------------------
    def _product(self, index: int | None = None) -> dict:
        return self.catalogue["products"][self.item if index is None else index]

    def _render(self) -> tuple[str, list[str]]:
        """(page text, clickables in lower case) of the current state."""
        if self.page == "search":
            return "Search", []
        if self.page == "results":
            start = self.page_no * RESULTS_PER_PAGE
            shown = self.results[start:start + RESULTS_PER_PAGE]
            parts = ["Back to Search", f"Page {self.page_no + 1} (Total results: {len(self.results)})"]
            if self.page_no > 0:
                parts.append("< Prev")
            if start + RESULTS_PER_PAGE < len(self.results):
                parts.append("Next >")
            for i in shown:
                p = self._product(i)
                parts += [p["asin"], p["title"], f"${p['price']:.2f}"]
            clickables = [x.lower() for x in parts if x != parts[1] and not x.startswith("$")]
            titles = {self._product(i)["title"].lower() for i in shown}
            return SEP.join(parts), [c for c in clickables if c not in titles]
        p = self._product()
        if self.page == "sub":
            if self.sub == "description":
                body = [p["description"]]
            elif self.sub == "features":
                body = p["features"]
            else:
                body = [f"Rating: {r['rating']} out of 5 [SEP] {r['text']}" for r in p["reviews"]]
            return SEP.join(["Back to Search", "< Prev", *body]), ["back to search", "< prev"]
        parts, values = ["Back to Search", "< Prev"], []
        for group, vals in p["options"].items():
            parts += [group, *vals]
            values += vals
        parts += [p["title"], f"Price: ${p['price']:.2f}", f"Rating: {p['rating']}",
                  "Description", "Features", "Reviews", "Buy Now"]
        clickables = ["back to search", "< prev", *values, "description", "features", "reviews", "buy now"]
        return SEP.join(parts), [c.lower() for c in clickables]

    def admissible_actions(self) -> list[str]:
        actions = ["search[<your query>]"] if self.page == "search" else []
        return actions + [f"click[{c}]" for c in self.clickables]

    # --- contract ----------------------------------------------------------------------
    def reset(self, task_index: int) -> tuple[str, dict]:
        if not 0 <= task_index < len(self.goals):
            raise IndexError(f"task_index {task_index} out of range 0..{len(self.goals) - 1}")
        self.goal = self.goals[task_index]
        self.task = self.goal["instruction"]
        self.page, self.results, self.page_no, self.item, self.sub = "search", [], 0, None, ""
        self.chosen: dict[str, str] = {}
        self.steps, self.done, self.score = 0, False, 0.0
        self.history: list[tuple[str, str]] = []
        self.observation, self.clickables = self._render()
        info = self._info(True, "", "", self.observation)
        return self.observation, info

    def _info(self, valid: bool, reason: str, action: str, anchor: str) -> dict:
        info = _blank_info(self.task, self.goal["category"], privileged_text(self.goal))
        info.update(won=self.score >= 1.0 - 1e-9, action_valid=valid, invalid_reason=reason,
                    action=action, score=self.score, anchor_obs=anchor,
                    admissible_actions=None if self.done else self.admissible_actions(),
                    expert_action=self.expert_action())
        return info

    def step(self, response_text: str) -> tuple[str, float, bool, dict]:
        if self.goal is None:
            raise RuntimeError(f"{type(self).__name__}.step() called before reset(task_index)")
        anchor = self.observation
        if self.done:
            return self.observation, 0.0, True, self._info(False, "the episode is over", "", anchor)
        parsed = parse_response(response_text, self.answer_tags, require_think=self.think)
        action, reason, reward = parsed.action, parsed.reason, 0.0
        if parsed.valid:
            reason = self._apply(action)
            if self.validity == "format":
                reason = ""  # well-formed: a command the page cannot carry out just changes nothing
        self.steps += 1
        if self.page == "done":
            reward = 10.0 if self.score >= 1.0 - 1e-9 else 0.0
            self.done = True
        self.done = self.done or self.steps >= self.max_steps
        self.history.append((anchor, action if action else "(no valid action)"))
        if self.page != "done":
            self.observation, self.clickables = self._render()
        return self.observation, reward, self.done, self._info(reason == "", reason, action, anchor)

    def _apply(self, action: str) -> str:
        """Carry out one parsed action; returns "" or why it is invalid (state untouched then)."""
        command = _parse_action(action)
        if command is None:
            return "not an action: use search[your query] or click[a clickable on the page]"
        verb, arg = command
        if verb == "search":
            if self.page != "search":
                return "no search box on this page (click[back to search] first)"
            if not arg:
                return "empty search query"
            self.results, self.page_no, self.page = search_products(self.catalogue, arg), 0, "results"
            return ""
        target = arg.lower()
        if target not in self.clickables:
            return f"'{arg}' is not clickable on this page"
        if target == "back to search":
            self.page, self.results, self.item, self.chosen = "search", [], None, {}
        elif target == "next >":
            self.page_no += 1
        elif target == "< prev":
            if self.page == "results":
                self.page_no -= 1
            elif self.page == "item":
                self.page, self.item, self.chosen = "results", None, {}
            else:
                self.page = "item"
        elif self.page == "results":
            self.page, self.item, self.chosen = "item", self._asin_index(target), {}
        elif target in ("description", "features", "reviews"):
            self.page, self.sub = "sub", target
        elif target == "buy now":
            self.score = webshop_score(self._product(), self.chosen, self.goal)
            self.page = "done"
            self.observation = SEP.join(["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)",
                                         f"{self.score:.2f}"])
            self.clickables = []
        else:  # an option value: it replaces the value chosen before in the same group
            for group, vals in self._product()["options"].items():
                if target in (v.lower() for v in vals):
                    self.chosen[group] = next(v for v in vals if v.lower() == target)
        return ""

    def _asin_index(self, asin_lower: str) -> int:
        return self.catalogue["by_asin"][asin_lower.upper()]

    def prompt(self) -> str:
        return webshop_prompt(self.task, self.history, self.observation, self.admissible_actions(),
                              self.steps, self.history_length, self.think)

    # --- oracle ------------------------------------------------------------------------
    def expert_action(self) -> str | None:
        """Next action of an oracle that knows the goal (works from any state): search the
        instruction (the target's title if no result could score 1), page to the FIRST result that
        would score 1 with the goal's options, open it, choose each goal option, buy. Buying the
        first good enough result rather than the hidden target keeps the choice readable from the
        page (the target is often not the first match), so behaviour cloning can learn it."""
        if self.goal is None or self.done:
            return None
        if self.page == "search":
            query = self.goal["search_query"]
            if self._first_full_score(search_products(self.catalogue, query)) is None:
                query = self._product(self.catalogue["by_asin"][self.goal["asin"]])["title"]
            return f"search[{query}]"
        if self.page == "results":
            wanted = self._first_full_score(self.results)
            if wanted is None:
                return "click[back to search]"
            wanted_page = self.results.index(wanted) // RESULTS_PER_PAGE
            if wanted_page > self.page_no:
                return "click[next >]"
            if wanted_page < self.page_no:
                return "click[< prev]"
            return f"click[{self._product(wanted)['asin'].lower()}]"
        if self.page == "sub" or best_purchase_score(self._product(), self.goal) < 1.0:
            return "click[< prev]"
        for group, value in self.goal["goal_options"].items():
            if self.chosen.get(group) != value:
                return f"click[{value}]"
        return "click[buy now]"

    def _first_full_score(self, results: list[int]) -> int | None:
        """The first of `results` that scores 1 when bought with the goal's options, if any."""
        return next((i for i in results if best_purchase_score(self._product(i), self.goal) >= 1.0), None)


# ---------------------------------------------------------------------------------------------
# The official back-end (princeton-nlp/WebShop), same contract. Not runnable on this machine.
# ---------------------------------------------------------------------------------------------

OFFICIAL_SETUP = (
    "OfficialWebShopEnv needs the official WebShop package `web_agent_site` (Python <= 3.10, Java, "
    "its product data): git clone https://github.com/princeton-nlp/WebShop && cd WebShop && "
    "./setup.sh -d all && pip install -e . ; or use WebShopEnv, the offline simulator.")


class OfficialWebShopEnv(WebShopEnv):
    """Adapter around `web_agent_site.envs.WebAgentTextEnv` (observation_mode="text").

    Page text, clickables and the reward come from the official server; only the instruction
    prefix of each page is cut (it is the task line). No oracle: `expert_action()` is None.
    """

    def __init__(self, split: str = "train", history_length: int = 2, max_steps: int = 15,
                 think: bool = True, num_products: int | None = None, validity: str = "format"):
        if validity not in VALIDITY_RULES:
            raise ValueError(f"unknown validity rule {validity!r}; expected one of {VALIDITY_RULES}")
        self.validity = validity
        try:
            from web_agent_site.envs import WebAgentTextEnv
        except ImportError as error:
            raise ImportError(OFFICIAL_SETUP) from error
        self.env = WebAgentTextEnv(observation_mode="text", num_products=num_products, human_goals=True)
        total = len(self.env.server.goals)
        self.sessions = list(range(500)) if split == "eval" else list(range(1500, total))
        self.split, self.history_length, self.max_steps, self.think = split, history_length, max_steps, think
        self.task, self.goal, self.done = "", None, True

    def num_tasks(self) -> int:
        return len(self.sessions)

    def _official_page(self, text: str) -> str:
        cut = text.find(self.task)
        return re.sub(r"^\s*\[SEP\]\s*", "", text[cut + len(self.task):]) if self.task and cut >= 0 else text

    def _refresh(self, text: str) -> None:
        available = self.env.get_available_actions()
        self.has_search = bool(available.get("has_search_bar"))
        self.original = {c.lower(): c for c in available.get("clickables", [])}
        self.clickables = list(self.original)
        self.observation = self._official_page(text)

    def admissible_actions(self) -> list[str]:
        return (["search[<your query>]"] if self.has_search else []) + [f"click[{c}]" for c in self.clickables]

    def reset(self, task_index: int) -> tuple[str, dict]:
        text, _ = self.env.reset(session=self.sessions[task_index])
        self.goal = dict(self.env.server.goals[self.sessions[task_index]])
        self.goal.setdefault("category", self.goal.get("product_category", "").split("›")[0].strip())
        self.task = self.env.instruction_text.replace("Instruction:", "").strip()
        self.steps, self.done, self.score, self.history = 0, False, 0.0, []
        self._refresh(text)
        return self.observation, self._info(True, "", "", self.observation)

    def _apply(self, action: str) -> str:
        command = _parse_action(action)
        verb, arg = command or ("", "")
        reason = ("not an action: use search[your query] or click[a clickable on the page]" if command is None else
                  "no search box on this page (click[back to search] first)" if verb == "search" and not self.has_search
                  else f"'{arg}' is not clickable on this page" if verb == "click" and arg.lower() not in self.clickables
                  else "")
        if reason and self.validity == "admissible":
            return reason
        # "format": the official environment gets every well-formed action; it carries out what it can
        # and leaves the page as it was otherwise
        sent = action if command is None else f"{verb}[{self.original.get(arg.lower(), arg) if verb == 'click' else arg}]"
        text, reward, done, _ = self.env.step(sent)
        if done:
            self.score, self.page = float(reward), "done"
        self._refresh(text)
        return ""

    def step(self, response_text: str) -> tuple[str, float, bool, dict]:
        self.page = ""
        return super().step(response_text)

    def _render(self) -> tuple[str, list[str]]:
        return self.observation, self.clickables

    def expert_action(self) -> str | None:
        return None
