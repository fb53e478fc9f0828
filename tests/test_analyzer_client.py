"""The analyzer's HTTP client against scripted faults on 127.0.0.1: a whole-call deadline, retries
for every transport error, the key never sent to another origin or over plain http to a remote
host; each fault ends as a counted failure of `submit_analysis`, never as an exception."""
import json
import time

import pytest

import json_http
import searchqa
import skills as S
import train
from fake_server import (FakeServer, answer, bad_status_line, completion, header, incomplete_body, redirect_to, reset,
                         silent, trickle, trickle_status_line)

GOOD = {"episode_skill": "Open the fridge before looking elsewhere.", "step_skills": {"0": "Go to the fridge 1."}}
MESSAGES = [{"role": "user", "content": "hi"}]


def client(server, **kw) -> S.OpenAIChatAnalyzer:
    args = dict(base_url=server.url, model="m", api_key="sk-secret", timeout=0.4, max_retries=2, backoff=0.0)
    return S.OpenAIChatAnalyzer(**{**args, **kw})


def trajectory() -> S.TrajectoryView:
    return S.make_trajectory_view("alfworld", "put a cool apple in the fridge", "cool", False,
                                  ["You are in the kitchen.", "The fridge 1 is closed."],
                                  ["<action>go to fridge 1</action>", "<action>look</action>"],
                                  ["go to fridge 1", "look"], [True, True], [0.0, 0.0])


def analysis_of(analyzer) -> tuple[list, dict]:
    """What the trainer does with one batch: submit, then collect (skills, counts)."""
    return S.submit_analysis([trajectory()], analyzer, k=2, max_workers=2).result()


# --- the whole-call deadline --------------------------------------------------------------------

@pytest.mark.parametrize("fault", [trickle, trickle_status_line, silent])
def test_a_trickling_or_silent_server_is_cut_at_the_deadline(fault):
    with FakeServer(fault) as server:
        start = time.perf_counter()
        with pytest.raises(S.AnalyzerTimeout):
            client(server, timeout=0.5, max_retries=0).complete(MESSAGES)
        assert time.perf_counter() - start < 1.2  # urllib kept a 0.5 s-timeout call for 6 s and more
        skills, stats = analysis_of(client(server, timeout=0.3, max_retries=1))
        assert skills == [None]
        assert (stats["requests"], stats["transport_errors"], stats["timeouts"], stats["no_skill"]) == (1, 1, 1, 1)
        assert len(server.requests) == 1 + 2  # one call, then one call retried once


def test_the_retrieval_client_keeps_the_deadline_too():
    with FakeServer(trickle) as server:
        retriever = searchqa.ServerRetriever(f"http://127.0.0.1:{server.port}/retrieve", timeout=0.5)
        start = time.perf_counter()
        assert retriever.search("who founded it", 3) is None
        assert time.perf_counter() - start < 1.2 and retriever.failures == 1


# --- every transport error is retried, then counted ----------------------------------------------

def not_json(conn, head, body):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!")


@pytest.mark.parametrize("fault", [bad_status_line, incomplete_body, reset, not_json],
                         ids=["BadStatusLine", "IncompleteRead", "ConnectionReset", "body-not-JSON"])
def test_transport_faults_are_retried_then_counted(fault):
    with FakeServer(fault) as server:
        with pytest.raises(S.AnalyzerTransportError):
            client(server).complete(MESSAGES)
        assert len(server.requests) == 3  # max_retries=2: every fault kind is retried
        skills, stats = analysis_of(client(server, max_retries=0))
        assert skills == [None]
        assert (stats["transport_errors"], stats["timeouts"], stats["no_skill"]) == (1, 0, 1)


def test_a_fault_then_an_answer_gives_skills():
    calls = []

    def flaky(conn, head, body):
        calls.append(1)
        if len(calls) == 1:
            return reset(conn, head, body)
        conn.sendall(completion(json.dumps(GOOD)))

    with FakeServer(flaky) as server:
        skills, stats = analysis_of(client(server, max_retries=1))
    assert skills[0].episode_skill == GOOD["episode_skill"] and skills[0].step_skills == {0: "Go to the fridge 1."}
    assert stats["transport_errors"] == 0 and stats["no_skill"] == 0 and len(calls) == 2


@pytest.mark.parametrize("status,retried", [(500, True), (503, True), (429, True), (400, False), (401, False),
                                            (404, False)])
def test_http_errors_retried_only_when_they_may_pass(status, retried):
    def reply(conn, head, body):
        conn.sendall(b"HTTP/1.1 %d Oops\r\nContent-Length: 2\r\n\r\n{}" % status)

    with FakeServer(reply) as server:
        with pytest.raises(S.AnalyzerTransportError, match=f"HTTP {status}"):
            client(server).complete(MESSAGES)
        assert len(server.requests) == (3 if retried else 1)


# --- the key ------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_never_carries_the_key(status):
    with FakeServer(answer(json.dumps(GOOD))) as other:
        target = f"http://localhost:{other.port}/v1/chat/completions"  # another origin: localhost, not 127.0.0.1
        with FakeServer(redirect_to(target, status)) as server:
            with pytest.raises(S.AnalyzerTransportError, match="redirect"):
                client(server).complete(MESSAGES)
            assert len(server.requests) == 1  # a redirect is an answer, not a fault to retry
            assert header(server.requests[0][0], "Authorization") == "Bearer sk-secret"
            skills, stats = analysis_of(client(server))
        assert other.requests == []  # nothing, key or not, reached the other host
    assert skills == [None] and stats["transport_errors"] == 1


def test_a_same_origin_307_is_followed_with_the_key():
    def reply(conn, head, body):
        if head.startswith("POST /v1/"):
            return redirect_to("/v2/chat/completions")(conn, head, body)
        conn.sendall(completion(json.dumps(GOOD)))

    with FakeServer(reply) as server:
        assert json.loads(client(server).complete(MESSAGES)) == GOOD
        (first, _), (second, body) = server.requests
    assert second.startswith("POST /v2/chat/completions") and header(second, "Authorization") == "Bearer sk-secret"
    assert json.loads(body)["messages"] == MESSAGES  # the body went along (307 keeps method and body)


@pytest.mark.parametrize("url,key,allowed", [
    ("http://analyzer.example.com/v1", "sk", False), ("https://analyzer.example.com/v1", "sk", True),
    ("http://analyzer.example.com/v1", "", True), ("http://localhost:8000/v1", "sk", True),
    ("http://127.0.0.5:8000/v1", "sk", True), ("http://[::1]:8000/v1", "sk", True),
    ("http://10.0.0.7:8000/v1", "sk", False), ("ftp://analyzer.example.com/v1", "", False),
    ("http://:8000/v1", "", False), ("http://host:port/v1", "", False)])
def test_plain_http_with_a_key_to_a_remote_host_is_refused(url, key, allowed):
    if allowed:
        S.OpenAIChatAnalyzer(base_url=url, api_key=key)
    else:
        with pytest.raises(ValueError, match="plain http|not an http|bad port"):
            S.OpenAIChatAnalyzer(base_url=url, api_key=key)
    if url.startswith("http://") and key and not allowed:
        S.OpenAIChatAnalyzer(base_url=url, api_key=key, allow_insecure_http=True)  # the explicit opt-in


def test_the_cli_refuses_it_too_and_passes_the_client_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    argv = ["--analyzer", "openai", "--analyzer-url", "http://analyzer.example.com/v1", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="plain http to a non-local host"):
        train.main(train.parse_config(argv))
    assert list(tmp_path.iterdir()) == []  # refused before any file
    cfg = train.resolve_defaults(train.parse_config(argv + [
        "--analyzer-allow-insecure-http", "--analyzer-timeout", "7.5", "--analyzer-retries", "1",
        "--analyzer-backoff", "0.25"]))
    analyzer = train.build_analyzer(cfg, None, None)
    assert (analyzer.timeout, analyzer.max_retries, analyzer.backoff) == (7.5, 1, 0.25)
    for bad, message in [("--analyzer-timeout=0", "--analyzer-timeout must be > 0"),
                         ("--analyzer-retries=-1", "--analyzer-retries must be in"),
                         ("--analyzer-backoff=-2", "--analyzer-backoff must be in")]:
        with pytest.raises(SystemExit, match=message):
            train.resolve_defaults(train.parse_config(argv + ["--analyzer-allow-insecure-http", bad]))


def test_post_json_raises_only_transport_errors():
    with pytest.raises(json_http.TransportError, match="not an http"):
        json_http.post_json("file:///etc/passwd", {}, timeout=1)
    with pytest.raises(json_http.TransportError):
        json_http.post_json("http://127.0.0.1:9/x", {}, timeout=1)  # nothing listens on the discard port
    with FakeServer(lambda conn, head, body: conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n{}")) as server:
        with pytest.raises(json_http.TransportError, match="over the"):
            json_http.post_json(server.url, {}, timeout=1, max_bytes=1000)


def test_chunked_replies_whole_and_cut():
    content = json.dumps({"choices": [{"message": {"content": json.dumps(GOOD)}}]}).encode()

    def chunked(cut: bool):
        def reply(conn, head, body):
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            half = len(content) // 2
            conn.sendall(b"%x\r\n%s\r\n" % (half, content[:half]))
            if not cut:
                conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(content) - half, content[half:]))
        return reply

    with FakeServer(chunked(cut=False)) as server:
        assert json.loads(client(server).complete(MESSAGES)) == GOOD
    with FakeServer(chunked(cut=True)) as server:
        with pytest.raises(S.AnalyzerTransportError):
            client(server).complete(MESSAGES)
        assert len(server.requests) == 3  # a cut chunked body is retried like any cut reply
