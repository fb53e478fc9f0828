"""Hindsight skills: from a finished trajectory to the skill text the teacher is conditioned on.

Reads top to bottom in the paper's order (docs/method.md §4, §5, §6):
  1. the trajectory text view the analyzer reads (`StepView`, `TrajectoryView`) and `Skills`;
  2. the analyzer prompt (JSON only) and its repair message (§4);
  3. `parse_skills_json`: lenient JSON extraction and clean-up (§4);
  4. analyzer back-ends, each one method `complete(messages) -> str`:
     `OpenAIChatAnalyzer` (any OpenAI-compatible endpoint), `LocalModelAnalyzer` (a generate
     function, e.g. a Hugging Face policy); the offline, deterministic `RuleBasedAnalyzer` speaks
     the same protocol and lives in rule_analyzer.py (it imports this module, not the reverse);
     `analyze_trajectories` / `submit_analysis` run any of them in worker threads (§4);
  5. `statistical_critical_steps`: the optional statistics-based critical-step selector (§4);
  6. `route`: which skill scores which step (§5);
  7. `inject_skills`: the titled skill blocks placed into the user message (§6).

HTTP goes through `json_http` (a stdlib POST with a whole-call deadline and same-origin redirects)
and threads through `concurrent.futures`: no extra dependency, and the whole protocol is one POST
to `/chat/completions`. The analyzer's reply is untrusted text: parsing is bounded and linear, and
`analyze_one` turns every failure into a counted kind, so no reply can stop training.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import json_http
from opid import discounted_returns  # G_t (§2), shared with the trainer

log = logging.getLogger(__name__)

GAMMA = 0.95  # discount of the step return G_t shown to the analyzer (§2)


# =============================================================================================
# 1. Data: the trajectory text view and the skills (§4)
# =============================================================================================

@dataclass
class StepView:
    """One step as the analyzer sees it.

    `observation` is the raw text the agent saw when it chose this step's action (the env's
    `info["anchor_obs"]`); the effect of the action is therefore the NEXT step's observation.
    `action` is the parsed action text ("" when the response was unparsable), `valid` the parse result.
    """
    index: int
    observation: str
    response: str
    action: str
    valid: bool
    reward: float
    discounted_return: float  # G_t, gamma 0.95


@dataclass
class TrajectoryView:
    env_name: str   # "alfworld" | "webshop" | "search"
    task: str
    task_type: str
    won: bool       # the success label: the episode reward reached its maximum
    episode_reward: float
    steps: list[StepView]


@dataclass
class Skills:
    episode_skill: str
    step_skills: dict[int, str] = field(default_factory=dict)  # step index -> one imperative sentence
    episode_summary: str = ""                                   # logging only


def make_trajectory_view(env_name: str, task: str, task_type: str, won: bool,
                         observations: list[str], responses: list[str], actions: list[str],
                         valids: list[bool], rewards: list[float],
                         gamma: float = GAMMA) -> TrajectoryView:
    """Build a view from per-step lists (observation = the state the action was taken in)."""
    returns = discounted_returns(rewards, gamma)
    steps = [StepView(i, o, r, a, v, float(rw), g) for i, (o, r, a, v, rw, g)
             in enumerate(zip(observations, responses, actions, valids, rewards, returns))]
    return TrajectoryView(env_name, task, task_type, won, float(sum(rewards)), steps)


# =============================================================================================
# 2. Analyzer prompt (§4). The trajectory travels as one JSON object so that an LLM and the
#    rule-based analyzer read exactly the same text.
# =============================================================================================

MAX_FIELD_CHARS = 3000  # a longer observation/response is cut (keeps one request bounded)
TRAJECTORY_MARKER = "TRAJECTORY (JSON):"

ANALYZER_SYSTEM = (
    "You review one finished episode of a text agent and turn it into short, reusable lessons "
    "for the same agent. Reply with one JSON object and nothing else."
)

SUCCESS_INSTRUCTIONS = (
    "The episode SUCCEEDED. Write the workflow that made it work: the decision rule the agent "
    "followed and the order of the actions that moved it toward the goal, naming the objects, "
    "places or queries involved, so that it can be repeated on this task."
)

FAILURE_INSTRUCTIONS = (
    "The episode FAILED. Write avoidance rules: the core mistake that made it fail and the "
    "warning signs that show the agent is making it again (loops, actions that changed nothing, "
    "invalid answers, wrong choices), and what to do instead."
)

OUTPUT_INSTRUCTIONS = """Answer with JSON only, in this form:
{{"episode_skill": "<2-4 sentences for the whole episode>",
  "step_skills": {{"<step index>": "<one short imperative sentence for that step>"}},
  "episode_summary": "<one sentence on what happened>"}}
Pick at most {k} critical steps from the candidate step indices: the decisions that mattered most
for the outcome. Each step skill is advice the agent can act on at that exact step."""

REPAIR_INSTRUCTIONS = (
    "Your previous reply could not be read as the requested JSON object. Reply again with only "
    "the JSON object (keys episode_skill, step_skills, episode_summary), no code fence, no other text."
)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS] + " [...]"


def trajectory_to_json(traj: TrajectoryView, k: int) -> str:
    """The analyzer's input (§4): task, success label, per-step observation/response/G_t, candidates, K."""
    payload = {
        "env": traj.env_name, "task": traj.task, "task_type": traj.task_type,
        "success": bool(traj.won), "episode_reward": traj.episode_reward,
        "candidate_steps": [s.index for s in traj.steps], "max_step_skills": k,
        "steps": [{"index": s.index, "observation": _cut(s.observation), "response": _cut(s.response),
                   "action": s.action, "valid": s.valid, "reward": s.reward,
                   "discounted_return": round(s.discounted_return, 4)} for s in traj.steps],
    }
    return json.dumps(payload, ensure_ascii=False, indent=1)


def trajectory_from_json(text: str) -> TrajectoryView:
    """Inverse of `trajectory_to_json` (the rule-based analyzer reads its prompt through this)."""
    d = json.loads(text)
    steps = [StepView(int(s["index"]), s["observation"], s["response"], s["action"], bool(s["valid"]),
                      float(s["reward"]), float(s["discounted_return"])) for s in d["steps"]]
    return TrajectoryView(d["env"], d["task"], d["task_type"], bool(d["success"]),
                          float(d["episode_reward"]), steps)


def build_analyzer_messages(traj: TrajectoryView, k: int) -> list[dict]:
    """Chat messages asking for the JSON skills of one trajectory (§4)."""
    case = SUCCESS_INSTRUCTIONS if traj.won else FAILURE_INSTRUCTIONS
    user = "\n\n".join([case, OUTPUT_INSTRUCTIONS.format(k=k),
                        f"{TRAJECTORY_MARKER}\n{trajectory_to_json(traj, k)}"])
    return [{"role": "system", "content": ANALYZER_SYSTEM}, {"role": "user", "content": user}]


def build_repair_messages(messages: list[dict], bad_reply: str) -> list[dict]:
    """The second try (§4): the first exchange, then a request for the JSON object only."""
    return messages + [{"role": "assistant", "content": bad_reply},
                       {"role": "user", "content": REPAIR_INSTRUCTIONS}]


# =============================================================================================
# 3. Parsing the analyzer's answer (§4). The reply is untrusted text: every step below is
#    bounded (length, nesting depth, number of candidates, skill length) and linear in its size.
# =============================================================================================

MAX_REPLY_CHARS = 100_000       # a longer reply is cut before parsing (a real one is a few KB)
MAX_JSON_DEPTH = 16             # deeper nesting is not a skills object (and would recurse in json)
MAX_JSON_CANDIDATES = 32        # balanced {...} spans tried per reply
MAX_EPISODE_SKILL_CHARS = 1200  # "2-4 sentences"; longer text is cut at a word boundary
MAX_STEP_SKILL_CHARS = 300      # "one short imperative sentence"
MAX_SKILL_TOKENS = 256          # per skill, where a tokenizer is at hand (teacher prompts stay bounded)
EXPECTED_KEYS = ("episode_skill", "step_skills")


_STRUCTURE = re.compile(r'["{}\[\]]')                # the characters that matter outside a JSON string
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # rest of a string after its opening quote


def _balanced_spans(text: str):
    """(start, end) of each top-level balanced {...} span, in one left-to-right pass.

    Quotes are tracked only inside a span (prose may hold stray quotes); a span nested deeper
    than MAX_JSON_DEPTH or closed by the wrong bracket is abandoned and the scan restarts just
    after its opening brace, so an object behind a stray "{" is still found. Restarts are bounded
    by MAX_JSON_CANDIDATES, so the scan is O(MAX_JSON_CANDIDATES * len(text)), with regex jumps
    over plain text.
    """
    i, found = 0, 0
    while found < MAX_JSON_CANDIDATES:
        begin = text.find("{", i)
        if begin < 0:
            return
        found += 1
        stack, j, closed = ["}"], begin + 1, False
        while stack:
            match = _STRUCTURE.search(text, j)
            if match is None:
                break
            ch, j = match.group(), match.end()
            if ch == '"':
                rest = _STRING_REST.match(text, j)  # one C-level match per string, escapes included
                if rest is None:
                    break  # the string never ends: neither does the span
                j = rest.end()
            elif ch in "{[":
                stack.append("}" if ch == "{" else "]")
                if len(stack) > MAX_JSON_DEPTH:
                    break
            elif stack.pop() != ch:
                break
            else:
                closed = not stack
        if closed:
            yield begin, j
            i = j
        else:
            i = begin + 1


def extract_json_object(text: str) -> dict | None:
    """The analyzer's JSON object in `text`: bare, inside a ``` fence, or surrounded by prose.

    Of the objects found, the first holding `episode_skill` or `step_skills` (at the top or one
    level down, e.g. {"result": {...}}) wins; otherwise the first object. None when there is none.
    Linear in len(text); never raises.
    """
    if not isinstance(text, str):
        return None
    text = text[:MAX_REPLY_CHARS]
    first = None
    for begin, end in _balanced_spans(text):
        try:
            obj = json.loads(text[begin:end])
        except (ValueError, RecursionError):  # JSONDecodeError, huge ints, too deep
            continue
        if not isinstance(obj, dict):
            continue
        if any(key in obj for key in EXPECTED_KEYS):
            return obj
        inner = next((v for v in obj.values() if isinstance(v, dict) and any(k in v for k in EXPECTED_KEYS)), None)
        if inner is not None:
            return inner
        first = first if first is not None else obj
    return first


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff]")


def clean_skill_text(value, max_chars: int) -> str:
    """Text an analyzer gave -> one line safe to tokenise: "" for non-text; lone surrogates and
    control characters removed, whitespace collapsed, cut to `max_chars` at a word boundary."""
    if not isinstance(value, str):
        return ""
    value = value[:4 * max_chars]  # bound the work before cleaning
    value = value.encode("utf-8", "ignore").decode("utf-8")  # drops lone surrogates (\ud800)
    value = " ".join(_CONTROL.sub(" ", value).split())
    if len(value) > max_chars:
        cut = value[:max_chars]
        value = (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip() + " ..."
    return value


def _step_key(key) -> int | None:
    """3, 3.0, "3", "step 3", "Step_3", "t=3" -> 3; anything without one small integer -> None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, float):
        return int(key) if math.isfinite(key) and key.is_integer() and abs(key) < 1e9 else None
    if not isinstance(key, str):
        return None  # a list, dict or null is no step index
    match = re.search(r"-?\d{1,9}", key[:64])
    return int(match.group()) if match else None


def skills_from_object(obj: dict, k: int, num_steps: int) -> Skills | None:
    """Clean a decoded answer: None when `episode_skill` is missing or empty.

    Step skills: keys normalised to ints, indices outside [0, num_steps) and empty / non-text
    sentences dropped, a repeated index keeps its first sentence, and at most `k` are kept in
    the order the analyzer gave them (its order is its priority); the dict is returned sorted by index.
    A list of {"step": i, "skill": s} objects is accepted too. Every text is cleaned and cut by
    `clean_skill_text`. Never raises on any JSON value.
    """
    if not isinstance(obj, dict):
        return None
    episode = clean_skill_text(obj.get("episode_skill"), MAX_EPISODE_SKILL_CHARS)
    if not episode:
        return None
    raw = obj.get("step_skills") or {}
    if isinstance(raw, dict):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = [(item.get("step", item.get("index")), item.get("skill", item.get("text")))
                 for item in raw if isinstance(item, dict)]
    else:
        pairs = []
    kept: dict[int, str] = {}
    for key, value in pairs:
        if len(kept) >= k:
            break
        index = _step_key(key)
        if index is None or not 0 <= index < num_steps or index in kept:
            continue
        text = clean_skill_text(value, MAX_STEP_SKILL_CHARS)
        if text:
            kept[index] = text
    summary = clean_skill_text(obj.get("episode_summary"), MAX_EPISODE_SKILL_CHARS)
    return Skills(episode, dict(sorted(kept.items())), summary)


def parse_skills_json(text: str, k: int, num_steps: int) -> Skills | None:
    """Analyzer text -> Skills, or None when no JSON object is found or episode_skill is empty."""
    obj = extract_json_object(text)
    return None if obj is None else skills_from_object(obj, k, num_steps)


def fit_to_tokenizer(skills: Skills, tokenizer, max_tokens: int = MAX_SKILL_TOKENS) -> Skills:
    """Cut each skill to at most `max_tokens` tokens and remove the tokenizer's special-token strings
    (a skill must not open or close a chat turn inside the teacher prompt). Raises if the
    tokenizer cannot encode the text; the caller counts that as an invalid reply."""
    specials = sorted((t for t in getattr(tokenizer, "all_special_tokens", []) if t), key=len, reverse=True)

    def fit(text: str) -> str:
        for token in specials:
            text = text.replace(token, " ")
        text = " ".join(text.split())
        ids = tokenizer.encode(text, add_special_tokens=False)
        keep = max_tokens
        for _ in range(8):  # a cut can split a character, and re-encoding may then take more tokens
            if len(ids) <= max_tokens:
                return text
            text = tokenizer.decode(ids[:keep], skip_special_tokens=True).replace("\ufffd", "").strip() + " ..."
            keep -= len(tokenizer.encode(text, add_special_tokens=False)) - max_tokens + 1
            ids = tokenizer.encode(text, add_special_tokens=False)
        return ""  # could not be fitted: no skill rather than an over-long one

    step_skills = {i: fitted for i, s in skills.step_skills.items() if (fitted := fit(s))}
    return Skills(fit(skills.episode_skill), step_skills, skills.episode_summary)


# =============================================================================================
# 4a. Back-ends: OpenAI-compatible HTTP, a local generate function (the offline rule-based
#     back-end is rule_analyzer.RuleBasedAnalyzer)
# =============================================================================================

class AnalyzerTransportError(RuntimeError):
    """The analyzer could not be reached or answered with an HTTP error."""


class AnalyzerTimeout(AnalyzerTransportError):
    """The analyzer did not answer within the client timeout."""


class OpenAIChatAnalyzer:
    """POST {base_url}/chat/completions of any OpenAI-compatible server (vLLM, SGLang, Ollama, hosted).

    Defaults come from $OPID_ANALYZER_URL, $OPID_ANALYZER_MODEL and $OPENAI_API_KEY. Each HTTP
    call ends within `timeout` seconds whatever the server does (json_http's whole-call
    deadline). Every transport failure that may pass (connection refused or reset, a timeout, a
    cut or garbled reply, HTTP 5xx or 429) is retried `max_retries` times with exponential backoff
    (`backoff * 2**attempt` seconds); then `AnalyzerTransportError` (or `AnalyzerTimeout`) is
    raised. So one `complete` takes at most (max_retries + 1) * timeout + the backoff sleeps.
    The key is sent only to `base_url`'s origin (cross-origin redirects are refused), and plain
    http to a non-local host with a key is refused unless `allow_insecure_http`.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None,
                 api_key: str | None = None, timeout: float = 120.0, max_retries: int = 3,
                 temperature: float = 0.2, max_tokens: int = 1024, backoff: float = 1.0,
                 allow_insecure_http: bool = False):
        self.base_url = (base_url or os.environ.get("OPID_ANALYZER_URL", "http://127.0.0.1:8000/v1")).rstrip("/")
        self.model = model or os.environ.get("OPID_ANALYZER_MODEL", "default")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        json_http.check_url(self.base_url, sends_key=bool(self.api_key), allow_insecure_http=allow_insecure_http,
                            what="analyzer URL")  # ValueError: refuse before the first call

    def _post_once(self, payload: dict) -> str:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        reply = json_http.post_json(f"{self.base_url}/chat/completions", payload, timeout=self.timeout,
                                    headers=headers)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise AnalyzerTransportError(f"malformed chat completion: {str(reply)[:200]}") from err
        if content is not None and not isinstance(content, str):
            raise AnalyzerTransportError(f"chat completion content is {type(content).__name__}, not text")
        return content or ""

    def complete(self, messages: list[dict]) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post_once(payload)
            except json_http.DeadlineExceeded as err:
                last = AnalyzerTimeout(f"{self.base_url}: no answer within {self.timeout}s ({err})")
            except json_http.TransportError as err:
                last = AnalyzerTransportError(f"{self.base_url}: {err}")
                if not err.retryable:
                    break
            except AnalyzerTransportError as err:  # a malformed completion: the next try may be fine
                last = err
        raise last


class LocalModelAnalyzer:
    """Wrap `generate_fn(list_of_message_lists) -> list[str]` (e.g. policy generation with a HF model).

    Calls are serialised with a lock: one model on one device is not safe to drive from several
    worker threads at once.
    """

    def __init__(self, generate_fn: Callable[[list[list[dict]]], list[str]]):
        self.generate_fn = generate_fn
        self._lock = threading.Lock()

    def complete(self, messages: list[dict]) -> str:
        with self._lock:
            return self.generate_fn([messages])[0]


# =============================================================================================
# 4b. Running the analyzer over a batch, in worker threads (§4)
# =============================================================================================

STAT_KEYS = ("requests", "parse_failures", "repairs", "transport_errors", "timeouts", "invalid_replies",
             "no_skill")


def _usable_skills(reply, k: int, num_steps: int, tokenizer) -> tuple[dict | None, Skills | None]:
    """(the JSON object found or None, the cleaned skills or None) of one reply."""
    obj = extract_json_object(reply)
    if obj is None:
        return None, None
    skills = skills_from_object(obj, k, num_steps)
    if skills is not None and tokenizer is not None:
        skills = fit_to_tokenizer(skills, tokenizer)
        if not skills.episode_skill:
            skills = None
    return obj, skills


def analyze_one(traj: TrajectoryView, analyzer, k: int, tokenizer=None) -> tuple[Skills | None, dict[str, int]]:
    """One trajectory: ask, repair once when no JSON object comes back; never raises.

    Counts (summed over a batch they become the `analyzer/*` metrics): `requests`;
    `transport_errors`, every failed call (`timeouts` the subset that timed out); `parse_failures`,
    replies without a JSON object (the first one triggers a `repairs` request); `invalid_replies`,
    an object without a usable episode skill, or any other failure while reading a reply (it is
    logged); `no_skill`, trajectories that end without skills (their Δ terms will be 0). With a
    `tokenizer`, each skill is cut to MAX_SKILL_TOKENS tokens and checked to encode.
    """
    stats = dict.fromkeys(STAT_KEYS, 0)
    skills = None
    try:
        messages = build_analyzer_messages(traj, k)
        for attempt in range(2):
            stats["requests"] += 1
            try:
                reply = analyzer.complete(messages)
            except Exception as err:  # any back-end failure costs one trajectory's skills, not the run
                stats["transport_errors"] += 1
                stats["timeouts"] += isinstance(err, (AnalyzerTimeout, TimeoutError))
                log.warning("analyzer call failed: %s", err)
                break
            obj, skills = _usable_skills(reply, k, len(traj.steps), tokenizer)
            if obj is not None:
                stats["invalid_replies"] += skills is None
                break
            stats["parse_failures"] += 1
            if attempt == 0:
                stats["repairs"] += 1
                messages = build_repair_messages(messages, reply if isinstance(reply, str) else str(reply))
    except Exception as err:  # a reply that breaks the reader is one invalid reply, never a crash
        skills = None
        stats["invalid_replies"] += 1
        log.warning("analyzer reply could not be used (%s: %s)", type(err).__name__, str(err)[:200])
    stats["no_skill"] += skills is None
    return skills, stats


class AnalysisHandle:
    """Pending analysis of a batch; `.result()` -> (skills per trajectory, summed stats)."""

    def __init__(self, executor: ThreadPoolExecutor, futures: list[Future]):
        self._executor, self._futures = executor, futures

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def result(self) -> tuple[list[Skills | None], dict[str, int]]:
        results = [f.result() for f in self._futures]  # analyze_one never raises
        self._executor.shutdown(wait=False)
        stats = dict.fromkeys(STAT_KEYS, 0)
        for _, one in results:
            for key in STAT_KEYS:
                stats[key] += one[key]
        return [skills for skills, _ in results], stats


def submit_analysis(trajs: list[TrajectoryView], analyzer, k: int, max_workers: int = 8,
                    tokenizer=None) -> AnalysisHandle:
    """Start analysing in worker threads and return at once (overlap it with the old-log-prob pass)."""
    executor = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="analyzer")
    return AnalysisHandle(executor, [executor.submit(analyze_one, t, analyzer, k, tokenizer) for t in trajs])


def analyze_trajectories(trajs: list[TrajectoryView], analyzer, k: int, max_workers: int = 8,
                         tokenizer=None) -> tuple[list[Skills | None], dict[str, int]]:
    """Skills (or None) for every trajectory, in order, plus failure counts (§4)."""
    return submit_analysis(trajs, analyzer, k, max_workers, tokenizer).result()


# =============================================================================================
# 5. Statistics-based critical steps (§4, optional; not used in the paper's runs)
# =============================================================================================

class StepSample(NamedTuple):
    uid: str                 # task group id
    traj_id: str
    step_index: int
    anchor_obs: str          # the observation the action was taken in
    discounted_return: float


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def statistical_critical_steps(samples: list, k: int) -> dict[str, list[int]]:
    """Steps that fall most below their state group's mean return (§4).

    1. group rows by (uid, identical anchor observation); keep groups of size >= 2;
    2. keep the groups whose return variance (population) is in the top quartile of those
       groups' variances across the whole input, and strictly positive;
    3. in each trajectory, rank its steps in kept groups by G_t - mean(group) and take the
       k most negative ones (ties: lower step index).
    Returns {traj_id: sorted step indices} for every trajectory in the input (possibly []).
    """
    rows = [StepSample(*row) for row in samples]
    groups: dict[tuple[str, str], list[StepSample]] = {}
    for row in rows:
        groups.setdefault((row.uid, row.anchor_obs), []).append(row)
    stats = {}
    for key, members in groups.items():
        if len(members) >= 2:
            mean = sum(r.discounted_return for r in members) / len(members)
            var = sum((r.discounted_return - mean) ** 2 for r in members) / len(members)
            stats[key] = (mean, var)
    threshold = _quantile([v for _, v in stats.values()], 0.75) if stats else 0.0
    below: dict[str, list[tuple[float, int]]] = {row.traj_id: [] for row in rows}
    for row in rows:
        key = (row.uid, row.anchor_obs)
        if key in stats and stats[key][1] >= threshold and stats[key][1] > 0:
            gap = row.discounted_return - stats[key][0]
            if gap < 0:
                below[row.traj_id].append((gap, row.step_index))
    return {traj: sorted(i for _, i in sorted(gaps)[:k]) for traj, gaps in below.items()}


def restrict_to_selected_steps(skills: Skills | None, selected: list[int]) -> Skills | None:
    """Re-key step skills on the statistically selected steps.

    An analyzer step skill at a selected step is kept; a selected step without one gets the
    episode skill as its step skill; analyzer step skills at unselected steps are dropped.
    """
    if skills is None:
        return None
    step_skills = {i: skills.step_skills.get(i) or skills.episode_skill for i in sorted(selected)}
    return Skills(skills.episode_skill, step_skills, skills.episode_summary)


# =============================================================================================
# 6. Critical-first routing (§5)
# =============================================================================================

ROUTING_MODES = ("step_priority", "additive", "episode_only", "step_only")


def route(step_index: int, skills: Skills | None, mode: str = "step_priority", *,
          use_episode: bool = True, use_step: bool = True) -> tuple[str | None, str | None]:
    """(episode skill to score this step with or None, step skill or None) (docs/method.md §5).

    step_priority: the step skill when this step has a non-empty one, else the episode skill;
    additive: the episode skill always, the step skill where present; episode_only; step_only.
    `use_episode` / `use_step` say whether that kind of skill has a teacher at all (the trainer
    passes w_ep > 0 / w_step > 0, as the authors' `select_skill_teacher_sources`, arXiv
    2606.26790): with the step kind off, step_priority falls back to the episode skill on a
    critical step instead of routing it to a zero-weighted term.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; choose from {ROUTING_MODES}")
    if skills is None:
        return None, None
    step = (skills.step_skills.get(step_index) or "").strip() or None if use_step else None
    episode = skills.episode_skill.strip() or None if use_episode else None
    if mode == "step_priority":
        return (None, step) if step else (episode, None)
    if mode == "additive":
        return episode, step
    if mode == "episode_only":
        return episode, None
    return None, step


# =============================================================================================
# 7. Injection into the user message (§6): text only; the caller re-applies the chat template
#    and appends the ORIGINAL response token ids.
# =============================================================================================

EPISODE_TITLE = "Episode-Level Skill"
EPISODE_NOTE = "(A lesson from a finished attempt at this task; keep it in mind for the whole episode.)"
STEP_TITLE = "Critical-Step Skill"
STEP_NOTE = "(Advice for the decision you are about to make; apply it to this step only.)"
TASK_ANCHORS = ("Your task is to:", "Your question:")
TURN_ANCHOR = "Now it's your turn"


def skill_block(title: str, note: str, skill: str) -> str:
    return f"{title}:\n{note}\n{skill.strip()}\n\n"


def inject_skills(prompt_text: str, episode_skill: str | None = None, step_skill: str | None = None) -> str:
    """Insert the skill blocks into the user message (docs/method.md §6, arXiv 2606.26790).

    The episode block goes right after the task line ("Your task is to:" / "Your question:"); the
    step block right before the "Now it's your turn" line. As in the authors' code, an episode
    block without a task line goes before the "Now it's your turn" line (ahead of the step block),
    and a block whose anchors are all missing is appended at the end (episode block first).
    """
    lines = prompt_text.splitlines(keepends=True)
    tail: list[str] = []

    def turn_line() -> int | None:
        return next((i for i, line in enumerate(lines) if line.lstrip().startswith(TURN_ANCHOR)), None)

    if episode_skill:
        block = skill_block(EPISODE_TITLE, EPISODE_NOTE, episode_skill)
        at = next((i for i, line in enumerate(lines) if any(a in line for a in TASK_ANCHORS)), None)
        if at is not None:
            if not lines[at].endswith("\n"):
                lines[at] += "\n"
            lines.insert(at + 1, block)
        elif turn_line() is not None:
            lines.insert(turn_line(), block)
        else:
            tail.append(block)
    if step_skill:
        block = skill_block(STEP_TITLE, STEP_NOTE, step_skill)
        at = turn_line()
        if at is None:
            tail.append(block)
        else:
            lines.insert(at, block)
    text = "".join(lines)
    if tail:
        text = (text if text.endswith("\n") or not text else text + "\n") + "\n" + "".join(tail)
    return text
