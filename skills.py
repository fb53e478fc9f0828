"""Hindsight skills: from a finished trajectory to the skill text the teacher is conditioned on.

Reads top to bottom in the paper's order (OPID_SPEC §4, §5, §6):
  1. the trajectory text view the analyzer reads (`StepView`, `TrajectoryView`) and `Skills`;
  2. the analyzer prompt (JSON only) and its repair message (§4);
  3. `parse_skills_json`: lenient JSON extraction and clean-up (§4);
  4. analyzer back-ends, each one method `complete(messages) -> str`:
     `OpenAIChatAnalyzer` (any OpenAI-compatible endpoint), `LocalModelAnalyzer` (a generate
     function, e.g. a Hugging Face policy), `RuleBasedAnalyzer` (offline, deterministic);
     `analyze_trajectories` / `submit_analysis` run them in worker threads (§4);
  5. `statistical_critical_steps`: the optional statistics-based critical-step selector (§4);
  6. `route`: which skill scores which step (§5);
  7. `inject_skills`: the titled skill blocks placed into the user message (§6).

HTTP goes through `urllib` and threads through `concurrent.futures`: no extra dependency, and the
whole protocol is one POST to `/chat/completions`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

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


def discounted_returns(rewards: list[float], gamma: float = GAMMA) -> list[float]:
    """G_t = sum_{u>=t} gamma^(u-t) r_u (§2). Example: [0, 0, 10] -> [9.025, 9.5, 10]."""
    out, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


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
# 3. Parsing the analyzer's answer (§4)
# =============================================================================================

def extract_json_object(text: str) -> dict | None:
    """The first JSON object in `text`: bare, inside a ``` fence, or surrounded by prose."""
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    # raw_decode at every "{" finds the first complete object whatever surrounds it (fences, prose)
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _step_key(key) -> int | None:
    """3, "3", "step 3", "Step_3", "t=3" -> 3; anything without an integer -> None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    match = re.search(r"-?\d+", str(key))
    return int(match.group()) if match else None


def skills_from_object(obj: dict, k: int, num_steps: int) -> Skills | None:
    """Clean a decoded answer: None when `episode_skill` is missing or empty.

    Step skills: keys normalised to ints, indices outside [0, num_steps) and empty / non-text
    sentences dropped, a repeated index keeps its first sentence, and at most `k` are kept in
    the order the analyzer gave them (its order is its priority); the dict is returned sorted by index.
    A list of {"step": i, "skill": s} objects is accepted too.
    """
    episode = obj.get("episode_skill")
    if not isinstance(episode, str) or not episode.strip():
        return None
    raw = obj.get("step_skills") or {}
    if isinstance(raw, list):
        raw = {item.get("step", item.get("index")): item.get("skill", item.get("text"))
               for item in raw if isinstance(item, dict)}
    kept: dict[int, str] = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            index = _step_key(key)
            if index is None or not 0 <= index < num_steps or index in kept:
                continue
            if not isinstance(value, str) or not value.strip():
                continue
            if len(kept) == k:
                break
            kept[index] = " ".join(value.split())
    summary = obj.get("episode_summary")
    return Skills(episode.strip(), dict(sorted(kept.items())),
                  summary.strip() if isinstance(summary, str) else "")


def parse_skills_json(text: str, k: int, num_steps: int) -> Skills | None:
    """Analyzer text -> Skills, or None when no JSON object is found or episode_skill is empty."""
    obj = extract_json_object(text)
    return None if obj is None else skills_from_object(obj, k, num_steps)


# =============================================================================================
# 4a. Back-ends: OpenAI-compatible HTTP, a local generate function
# =============================================================================================

class AnalyzerTransportError(RuntimeError):
    """The analyzer could not be reached or answered with an HTTP error."""


class AnalyzerTimeout(AnalyzerTransportError):
    """The analyzer did not answer within the client timeout."""


class OpenAIChatAnalyzer:
    """POST {base_url}/chat/completions of any OpenAI-compatible server (vLLM, SGLang, Ollama, hosted).

    Defaults come from $OPID_ANALYZER_URL, $OPID_ANALYZER_MODEL and $OPENAI_API_KEY. HTTP 5xx,
    429, connection errors and timeouts are retried `max_retries` times with exponential backoff
    (`backoff * 2**attempt` seconds); then `AnalyzerTransportError` (or `AnalyzerTimeout`) is raised.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None,
                 api_key: str | None = None, timeout: float = 120.0, max_retries: int = 3,
                 temperature: float = 0.2, max_tokens: int = 1024, backoff: float = 1.0):
        self.base_url = (base_url or os.environ.get("OPID_ANALYZER_URL", "http://127.0.0.1:8000/v1")).rstrip("/")
        self.model = model or os.environ.get("OPID_ANALYZER_MODEL", "default")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens

    def _post_once(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body,
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as err:
            raise AnalyzerTransportError(f"malformed chat completion: {str(reply)[:200]}") from err

    def complete(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post_once(body)
            except urllib.error.HTTPError as err:  # a server answer: retry only when it may pass
                last = err
                if err.code < 500 and err.code != 429:
                    break
            except (TimeoutError, socket.timeout) as err:
                last = AnalyzerTimeout(f"no answer within {self.timeout}s")
            except urllib.error.URLError as err:
                is_timeout = isinstance(err.reason, (TimeoutError, socket.timeout))
                last = AnalyzerTimeout(f"no answer within {self.timeout}s") if is_timeout else err
            except (ConnectionError, json.JSONDecodeError, UnicodeDecodeError) as err:
                last = err
        if isinstance(last, AnalyzerTransportError):
            raise last
        raise AnalyzerTransportError(f"{self.base_url}: {last}") from last


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
# 4b. Rule-based analyzer (offline): reads only the trajectory text — observations, actions,
#     validity, rewards and returns — never hidden environment state. Deterministic.
#     The phrase builders are public: the same wording makes hint-following imitation data.
# =============================================================================================

NOTHING_HAPPENS = "nothing happens"
ALFWORLD_KEY_VERBS = ("take", "put", "move", "clean", "heat", "cool", "use", "slice", "toggle")
PROCESS_APPLIANCE = {"clean": "sinkbasin", "heat": "microwave", "cool": "fridge", "use": "desklamp"}
PROCESS_DONE = {"clean": "cleaned it", "heat": "heated it", "cool": "cooled it", "use": "turned on the lamp"}
WEBSHOP_NAVIGATION = ("next >", "< prev", "back to search", "description", "features", "reviews",
                      "attributes")
STOPWORDS = set("""a an the some two in on into onto at of to for and or with it them is are be i
need want would like find put look under using that which this my me please your from by as
than lower price dollars less up""".split())


def _split_action(action: str) -> tuple[str, str]:
    """'search[red mug]' -> ('search', 'red mug'); 'take mug 1 from table 1' -> ('take', 'mug 1 from table 1')."""
    bracket = re.fullmatch(r"\s*(\w+)\[(.*)\]\s*", action or "", flags=re.DOTALL)
    if bracket:
        return bracket.group(1).lower(), bracket.group(2).strip()
    words = (action or "").strip().split(maxsplit=1)
    if not words:
        return "", ""
    if words[0].lower() == "go" and len(words) > 1 and words[1].startswith("to "):
        return "go to", words[1][3:].strip()
    return words[0].lower(), words[1] if len(words) > 1 else ""


def step_hint_for_action(action: str) -> str:
    """One imperative sentence that names the action, e.g. 'Take the mug 1 from countertop 2 now.'"""
    verb, rest = _split_action(action)
    if verb == "take":
        return f"Take the {rest} now."
    if verb in ("put", "move"):
        match = re.fullmatch(r"(.+?) (?:in/on|in|on|to) (.+)", rest)
        return f"Put the {match.group(1)} in/on {match.group(2)} now." if match else f"Put the {rest} down now."
    if verb in ("clean", "heat", "cool", "slice"):
        return f"{verb.capitalize()} the {rest} now."
    if verb in ("use", "toggle"):
        return f"Use the {rest} now."
    if verb == "open":
        return f"Open the {rest} and check what is inside."
    if verb == "go to":
        return f"Go to {rest} next."
    if verb == "search":
        return f"Search for '{rest}'."
    if verb == "click":
        return ("Click 'Buy Now' to buy this product." if rest.lower() == "buy now"
                else f"Click '{rest}'.")
    if verb == "answer":
        return f"Answer '{rest}'."
    return f"Do '{action.strip()}' now." if action and action.strip() else "Give exactly one valid action."


def avoid_hint(action: str, alternative: str, why: str = "repeat") -> str:
    """An avoidance sentence: 'Do not repeat 'go to cabinet 1'; search a receptacle you have not opened yet.'

    why: "repeat" (a loop), "ineffective" (nothing changed), "invalid" (not admissible; with an empty
    action: no parsable answer), "wrong" (a wrong choice).
    """
    if not action:
        lead = "Do not reply without exactly one valid action tag"
    elif why == "invalid":
        lead = f"Do not send '{action}', it is not an admissible action"
    elif why == "ineffective":
        lead = f"Do not try '{action}' again, it changed nothing"
    elif why == "wrong":
        lead = f"Do not commit to '{action}' here"
    else:
        lead = f"Do not repeat '{action}'"
    return f"{lead}; {alternative.rstrip('.')}."


def task_keywords(task: str, limit: int = 8) -> list[str]:
    """Content words of a task or question, in order, without duplicates."""
    words = re.findall(r"[a-z0-9][a-z0-9\-']*", task.lower())
    out: list[str] = []
    for word in words:
        if word not in STOPWORDS and word not in out and not re.fullmatch(r"\d+(\.\d+)?", word):
            out.append(word)
    return out[:limit]


def alfworld_task_targets(task: str, task_type: str = "") -> tuple[str, str, str]:
    """(object, receptacle, process verb or "") named by an ALFWorld task sentence."""
    text = task.lower().strip().rstrip(".")
    process = next((v for v, names in (("clean", ("clean",)), ("heat", ("hot", "heat")),
                                       ("cool", ("cool", "cold"))) if any(n in text.split() for n in names)), "")
    for name, verb in (("clean", "clean"), ("heat", "heat"), ("cool", "cool"), ("look", "use")):
        if name in task_type:
            process = verb
    art, into = r"(?:a |an |the |some |two )?", r"(?:in/on|in|on|into|onto) (?:the |a |an )?"
    patterns = (  # look / "clean|heat|cool|find X and put it in Y" / "put a [clean|hot|cool] X in Y"
        rf"(?:look at|examine) {art}(?P<obj>[a-z ]+?) (?:under|with|using) (?:the |a |an )?(?P<rec>[a-z ]+)",
        rf"(?:clean|heat|cool|find) {art}(?P<obj>[a-z ]+?) and put (?:it|them) {into}(?P<rec>[a-z ]+)",
        rf"(?:put|place) {art}(?:clean |hot |heated |cool |cold |cooled )?(?P<obj>[a-z ]+?) {into}(?P<rec>[a-z ]+)",
    )
    for pattern in patterns:
        match = re.search(pattern, text)
        if match:
            if pattern.startswith("(?:look"):
                process = "use"
            return match.group("obj").strip(), match.group("rec").strip(), process
    words = task_keywords(text)
    return (words[0] if words else "", words[-1] if len(words) > 1 else "", process)


def _alfworld_sightings(observation: str) -> tuple[str | None, list[str]]:
    """(place the observation describes or None, items listed after 'you see')."""
    place = None
    for pattern in (r"You arrive at (?:the )?([a-z]+(?: [a-z]+)* \d+)", r"You open the ([a-z]+(?: [a-z]+)* \d+)",
                    r"(?:On|In) the ([a-z]+(?: [a-z]+)* \d+), you see"):
        match = re.search(pattern, observation)
        if match:
            place = match.group(1)
            break
    seen = observation.split("you see", 1)[1] if "you see" in observation else ""
    return place, re.findall(r"\b(?:a|an) ([a-z]+(?: [a-z]+)* \d+)", seen)


def _is_named(item: str, name: str) -> bool:
    """'mug 1' is a 'mug'; 'desklamp 1' is a 'desklamp'."""
    return bool(name) and re.sub(r" \d+$", "", item) in (name, name.replace(" ", ""))


class _AlfworldReading:
    """What the text of steps 0..t tells about the task: where the object was seen, held, processed."""

    def __init__(self, traj: TrajectoryView):
        self.obj, self.rec, self.process = alfworld_task_targets(traj.task, traj.task_type)
        first = traj.steps[0].observation if traj.steps else ""
        self.room = _alfworld_sightings(first)[1] if "Looking quickly around you" in first else []
        self.traj = traj

    def knowledge(self, upto: int) -> tuple[dict[str, str], set[str], bool, bool, int]:
        """(object seen -> place, places visited, holding the object, processed it, objects placed),
        from the observations of steps 0..upto (what the agent had seen when it chose step `upto`)."""
        seen, visited, holding, processed, placed = {}, set(), False, False, 0
        obj = re.escape(self.obj)
        for step in self.traj.steps[:upto + 1]:
            place, items = _alfworld_sightings(step.observation)
            if place:
                visited.add(place)
                for item in items:
                    if _is_named(item, self.obj):
                        seen.setdefault(item, place)
            low = step.observation.lower()
            picked = re.search(rf"you pick up the ({obj} \d+)", low)
            if picked:
                holding = True
                seen.pop(picked.group(1), None)  # it is no longer where it was seen
            elif re.search(rf"you (put|move) the {obj}", low):
                holding, placed = False, placed + 1  # pick-two: the next one is still to find
            if self.process and re.search(r"you (clean|heat|cool|turn on)", low):
                processed = True
        return seen, visited, holding, processed, placed

    def next_move(self, upto: int) -> str:
        """What to try instead at step `upto`, from the text seen so far."""
        seen, visited, holding, processed, _ = self.knowledge(upto)
        appliance = PROCESS_APPLIANCE.get(self.process, "")
        if self.process == "use" and (holding or not self.obj):
            return f"take the {self.obj} to the {self.rec or appliance} and use the {self.rec or appliance}"
        if holding and self.process and not processed:
            return f"{self.process} the {self.obj} with the {appliance}"
        if holding:
            return f"go to the {self.rec} and put the {self.obj} in/on it"
        if seen:
            item, place = next(iter(seen.items()))
            return f"go to {place} and take the {item} from it"
        fresh = [r for r in self.room if r not in visited and not _is_named(r, self.rec)][:3]
        where = f" (e.g. {', '.join(fresh)})" if fresh else ""
        return f"look for the {self.obj} in a place you have not searched yet{where}, opening closed ones"


def _effect(traj: TrajectoryView, t: int) -> str | None:
    """The observation that followed step t (None for the last step: not in the text)."""
    return traj.steps[t + 1].observation if t + 1 < len(traj.steps) else None


def _loop_starts(traj: TrajectoryView) -> list[int]:
    """First steps of loops. A step repeats when it takes the same action as the step before, or
    the same action in the same state as an earlier step, or an earlier action that gave the same
    observation again (nothing new learned). A run of consecutive repeats is one loop."""
    pairs, effects, starts, previous_repeat = set(), set(), [], False
    for t, step in enumerate(traj.steps):
        action, after = step.action.strip().lower(), _effect(traj, t)
        repeat = bool(action) and ((step.observation.strip(), action) in pairs
                                   or (t > 0 and traj.steps[t - 1].action.strip().lower() == action)
                                   or (after is not None and (action, after.strip()) in effects))
        if repeat and not previous_repeat:
            starts.append(t)
        previous_repeat = repeat
        pairs.add((step.observation.strip(), action))
        if after is not None:
            effects.add((action, after.strip()))
    return starts


def _ineffective(traj: TrajectoryView) -> list[int]:
    """Valid steps after which 'Nothing happens.' or the observation did not change at all."""
    out = []
    for t, step in enumerate(traj.steps):
        after = _effect(traj, t)
        if step.valid and after is not None and (after.strip().lower().startswith(NOTHING_HAPPENS)
                                                 or after.strip() == step.observation.strip()):
            out.append(t)
    return out


def _round_robin(*kinds: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Interleave candidate lists (first of each kind, then second of each...) so that K step
    skills cover every kind of mistake before repeating one kind."""
    out = []
    for rank in range(max((len(kind) for kind in kinds), default=0)):
        out += [kind[rank] for kind in kinds if rank < len(kind)]
    return out


def _pick(candidates: list[tuple[int, str]], k: int) -> dict[int, str]:
    """The first k distinct steps of a priority-ordered candidate list, returned sorted by index."""
    chosen: dict[int, str] = {}
    for index, text in candidates:
        if index not in chosen and len(chosen) < k:
            chosen[index] = text
    return dict(sorted(chosen.items()))


def _failure_summary(traj: TrajectoryView, loops, ineffective, invalid) -> tuple[str, list[str]]:
    """(core mistake, warning signs) from the counts of loops / ineffective / invalid steps."""
    signs = []
    if loops:
        signs.append(f"repeating '{traj.steps[loops[0]].action}' without new information")
    if ineffective:
        signs.append(f"actions that changed nothing, e.g. '{traj.steps[ineffective[0]].action}'")
    if invalid:
        signs.append(f"{len(invalid)} invalid response(s) (no valid action tag, or an action that is not allowed)")
    counts = [(len(loops), "it went in circles"), (len(ineffective), "it kept sending actions that had no effect"),
              (len(invalid), "it kept sending invalid responses")]
    core = max(counts, key=lambda c: c[0])[1] if any(c[0] for c in counts) else "it ran out of steps"
    return core, signs


def _alfworld_skills(traj: TrajectoryView, k: int) -> Skills:
    reading = _AlfworldReading(traj)
    obj, rec, process = reading.obj, reading.rec, reading.process
    if traj.won:
        key = [t for t, s in enumerate(traj.steps) if s.valid and _split_action(s.action)[0] in ALFWORLD_KEY_VERBS
               and not (_effect(traj, t) or "").lower().startswith(NOTHING_HAPPENS)]
        # the last opening of the receptacle a key action took from / put into was part of the path
        opens = []
        for t in key:
            place = re.split(r" (?:from|to|in/on|in|on|with) ", _split_action(traj.steps[t].action)[1])[-1]
            opened = [u for u in range(t) if traj.steps[u].valid and traj.steps[u].action.strip() == f"open {place}"]
            opens += opened[-1:]
        opens = sorted(set(opens))
        gotos = [t - 1 for t in key + opens if t > 0 and _split_action(traj.steps[t - 1].action)[0] == "go to"]
        order = sorted(set(key + opens + gotos))
        path = " -> ".join(traj.steps[t].action for t in order)
        middle = f", {process} it with the {PROCESS_APPLIANCE[process]}" if process and process != "use" else ""
        rule = (f"find the {obj} (check receptacles, open closed ones), take it{middle}, then go to the {rec} "
                + ("and use it." if process == "use" else "and put it in/on it."))
        if "two" in traj.task.lower():
            rule += f" Repeat for the second {obj}."
        episode = f"What worked for '{traj.task}': {path}. Decision rule: {rule}"
        candidates = [(t, step_hint_for_action(traj.steps[t].action)) for t in key + opens + gotos]
        summary = f"Solved in {len(traj.steps)} steps with {len(key)} key actions."
        return Skills(episode, _pick(candidates, k), summary)
    loops, ineffective = _loop_starts(traj), _ineffective(traj)
    invalid = [t for t, s in enumerate(traj.steps) if not s.valid]
    core, signs = _failure_summary(traj, loops, ineffective, invalid)
    seen, _, holding, processed, placed = reading.knowledge(len(traj.steps) - 1)
    stage = (f"it placed only one {obj}" if placed == 1 and "two" in traj.task.lower() and not holding else
             "it never found the " + obj if not seen and not holding else
             f"it found the {obj} but never picked it up" if not holding else
             f"it held the {obj} but never {PROCESS_DONE[process]}" if process and not processed else
             f"it held the {obj} but never put it in/on the {rec}")
    episode = (f"Avoid what failed on '{traj.task}': {core}, and {stage}. "
               f"Warning signs: {'; '.join(signs) or 'many steps without progress'}. "
               f"The task needs the {obj} and the {rec}: {reading.next_move(len(traj.steps) - 1)}.")
    candidates = _round_robin(
        [(t, avoid_hint(traj.steps[t].action, reading.next_move(t), "repeat")) for t in loops],
        [(t, avoid_hint(traj.steps[t].action, reading.next_move(t), "invalid")) for t in invalid],
        [(t, avoid_hint(traj.steps[t].action, reading.next_move(t), "ineffective")) for t in ineffective])
    summary = (f"Failed after {len(traj.steps)} steps: {len(loops)} loops, {len(ineffective)} no-effect, "
               f"{len(invalid)} invalid.")
    return Skills(episode, _pick(candidates, k), summary)


def _webshop_skills(traj: TrajectoryView, k: int) -> Skills:
    searches, product, options, buy = [], None, [], None
    for t, step in enumerate(traj.steps):
        verb, arg = _split_action(step.action)
        if not step.valid:
            continue
        if verb == "search":
            searches.append(t)
            product, options = None, []
        elif verb == "click" and arg.lower() == "buy now":
            buy = t
        elif verb == "click" and arg.lower() not in WEBSHOP_NAVIGATION:
            if product is None:
                product = t
            else:
                options.append(t)
    keywords = " ".join(task_keywords(traj.task))
    act = lambda t: _split_action(traj.steps[t].action)[1]  # noqa: E731 - tiny local accessor
    if traj.won and buy is not None:
        query = act(searches[-1]) if searches else ""
        parts = ([f"search '{query}'"] if query else []) + ([f"open '{act(product)}'"] if product is not None else []) \
            + [f"select '{act(t)}'" for t in options] + ["click 'Buy Now'"]
        episode = (f"What worked for '{traj.task}': {' -> '.join(parts)}. Decision rule: search with the key "
                   "attributes of the instruction, open a product that matches them, select every option the "
                   "instruction names, then buy.")
        order = [buy] + ([product] if product is not None else []) + searches[-1:] + options
        candidates = [(t, step_hint_for_action(traj.steps[t].action)) for t in order]
        return Skills(episode, _pick(candidates, k), f"Bought the right product in {len(traj.steps)} steps.")
    loops, ineffective = _loop_starts(traj), _ineffective(traj)
    invalid = [t for t, s in enumerate(traj.steps) if not s.valid]
    queries = [act(t).lower() for t in searches]
    repeated_search = [t for i, t in enumerate(searches) if queries[i] in queries[:i]]
    core, signs = _failure_summary(traj, loops + repeated_search, ineffective, invalid)
    alternative = f"search with the instruction's key words ('{keywords}') and compare titles, options and price"
    if buy is not None:
        core = "it bought a product that did not match every requirement"
        signs.append("clicking 'Buy Now' before the title, options and price were checked against the instruction")
    episode = (f"Avoid what failed on '{traj.task}': {core}. Warning signs: "
               f"{'; '.join(signs) or 'browsing without a focused search'}. Instead, {alternative}.")
    candidates = []
    if buy is not None:
        check = "first check that title, every requested option and price match the instruction"
        candidates.append((buy, avoid_hint(traj.steps[buy].action, check, "wrong")))
        if product is not None:
            candidates.append((product, avoid_hint(traj.steps[product].action, "open a product whose title "
                                                   f"matches '{keywords}'", "wrong")))
    candidates += _round_robin(
        [(t, avoid_hint(traj.steps[t].action, alternative, "repeat")) for t in sorted(set(loops + repeated_search))],
        [(t, avoid_hint(traj.steps[t].action, alternative, "invalid")) for t in invalid],
        [(t, avoid_hint(traj.steps[t].action, alternative, "ineffective")) for t in ineffective])
    return Skills(episode, _pick(candidates, k), f"Failed after {len(traj.steps)} steps.")


def _qa_kind(step: StepView) -> str:
    """'search' or 'answer' from the response's tag; '' when invalid."""
    if not step.valid:
        return ""
    match = re.search(r"<(search|answer)>", step.response)
    return match.group(1) if match else "search"


def _search_skills(traj: TrajectoryView, k: int) -> Skills:
    searches = [t for t, s in enumerate(traj.steps) if _qa_kind(s) == "search"]
    answers = [t for t, s in enumerate(traj.steps) if _qa_kind(s) == "answer"]
    invalid = [t for t, s in enumerate(traj.steps) if not s.valid]
    keywords = " ".join(task_keywords(traj.task))
    q = lambda t: traj.steps[t].action  # noqa: E731 - tiny local accessor
    if traj.won and answers:
        answer = q(answers[-1])
        found = [t for t in searches if answer.lower() in (_effect(traj, t) or "").lower()]
        useful = found[0] if found else (searches[-1] if searches else None)
        path = " -> ".join([f"search '{q(t)}'" for t in searches] + [f"answer '{answer}'"])
        where = f" The answer appeared in the results of '{q(useful)}'." if useful is not None else ""
        episode = (f"What worked for '{traj.task}': {path}.{where} Decision rule: search for the entities the "
                   "question names, read the retrieved passages, and answer with the short span they give.")
        order = [answers[-1]] + ([useful] if useful is not None else [])
        candidates = [(t, step_hint_for_action(f"{_qa_kind(traj.steps[t])}[{q(t)}]")) for t in order]
        return Skills(episode, _pick(candidates, k), f"Answered correctly after {len(searches)} search(es).")
    queries = [q(t).lower() for t in searches]
    repeated = [t for i, t in enumerate(searches) if queries[i] in queries[:i]]
    alternative = f"search for a different part of the question, e.g. '{keywords}'"
    signs, candidates = [], []
    if answers:
        wrong = answers[-1]
        signs.append(f"answering '{q(wrong)}' " + ("without any search" if not searches else
                                                    "before the passages stated the answer"))
        fix = ("search first and answer only with a span from the passages" if not searches else
               "search again for the missing fact before answering")
        candidates.append((wrong, avoid_hint(f"answer[{q(wrong)}]", fix, "wrong")))
    else:
        signs.append("running out of turns without an answer")
    if repeated:
        signs.append(f"repeating the search '{q(repeated[0])}'")
    if invalid:
        signs.append(f"{len(invalid)} response(s) without one valid <search> or <answer> tag")
    candidates += _round_robin(
        [(t, avoid_hint(f"search[{q(t)}]", alternative, "repeat")) for t in repeated],
        [(t, avoid_hint("", "use one <search> or one <answer> tag", "invalid")) for t in invalid])
    core = ("it gave a wrong answer" if answers else "it never answered")
    episode = (f"Avoid what failed on '{traj.task}': {core}. Warning signs: {'; '.join(signs)}. "
               f"Instead, {alternative}, then answer with the exact span from the passages.")
    return Skills(episode, _pick(candidates, k), f"Failed after {len(searches)} search(es).")


class RuleBasedAnalyzer:
    """Offline analyzer: reads the trajectory JSON out of its own prompt and answers JSON.

    Going through the prompt guarantees it sees exactly what an LLM analyzer sees — the
    trajectory text — and nothing of the environment's hidden state.
    """

    def analyze(self, traj: TrajectoryView, k: int) -> Skills:
        """Skills for one trajectory (dispatch on `env_name`)."""
        if not traj.steps:
            return Skills("", {}, "empty trajectory")
        builder = {"alfworld": _alfworld_skills, "webshop": _webshop_skills, "search": _search_skills}
        if traj.env_name not in builder:
            raise ValueError(f"unknown env_name {traj.env_name!r}")
        return builder[traj.env_name](traj, k)

    def complete(self, messages: list[dict]) -> str:
        text = messages[-1]["content"]
        if TRAJECTORY_MARKER not in text:  # a repair request: answer from the first user message
            text = next(m["content"] for m in messages if TRAJECTORY_MARKER in m.get("content", ""))
        payload = text.split(TRAJECTORY_MARKER, 1)[1]
        k = int(json.loads(payload)["max_step_skills"])
        skills = self.analyze(trajectory_from_json(payload), k)
        return json.dumps({"episode_skill": skills.episode_skill,
                           "step_skills": {str(i): s for i, s in skills.step_skills.items()},
                           "episode_summary": skills.episode_summary})


# =============================================================================================
# 4c. Running the analyzer over a batch, in worker threads (§4)
# =============================================================================================

STAT_KEYS = ("requests", "parse_failures", "repairs", "transport_errors", "timeouts", "no_skill")


def analyze_one(traj: TrajectoryView, analyzer, k: int) -> tuple[Skills | None, dict[str, int]]:
    """One trajectory: ask, repair once when no JSON object comes back; never raises.

    `transport_errors` counts every failed call, `timeouts` the subset that timed out; `no_skill`
    counts trajectories that end without skills (their Δ terms will be 0).
    """
    stats = dict.fromkeys(STAT_KEYS, 0)
    messages = build_analyzer_messages(traj, k)
    skills = None
    for attempt in range(2):
        stats["requests"] += 1
        try:
            reply = analyzer.complete(messages)
        except Exception as err:  # any back-end failure costs one trajectory's skills, not the run
            stats["transport_errors"] += 1
            stats["timeouts"] += isinstance(err, (AnalyzerTimeout, TimeoutError, socket.timeout))
            log.warning("analyzer call failed: %s", err)
            break
        obj = extract_json_object(reply)
        if obj is not None:
            skills = skills_from_object(obj, k, len(traj.steps))
            break
        stats["parse_failures"] += 1
        if attempt == 0:
            stats["repairs"] += 1
            messages = build_repair_messages(messages, reply)
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


def submit_analysis(trajs: list[TrajectoryView], analyzer, k: int, max_workers: int = 8) -> AnalysisHandle:
    """Start analysing in worker threads and return at once (overlap it with the old-log-prob pass)."""
    executor = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="analyzer")
    return AnalysisHandle(executor, [executor.submit(analyze_one, t, analyzer, k) for t in trajs])


def analyze_trajectories(trajs: list[TrajectoryView], analyzer, k: int,
                         max_workers: int = 8) -> tuple[list[Skills | None], dict[str, int]]:
    """Skills (or None) for every trajectory, in order, plus failure counts (§4)."""
    return submit_analysis(trajs, analyzer, k, max_workers).result()


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


def route(step_index: int, skills: Skills | None, mode: str = "step_priority") -> tuple[str | None, str | None]:
    """(episode skill to score this step with or None, step skill or None) (§5).

    step_priority: the step skill when this step has a non-empty one, else the episode skill;
    additive: the episode skill always, the step skill where present; episode_only; step_only.
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; choose from {ROUTING_MODES}")
    if skills is None:
        return None, None
    step = (skills.step_skills.get(step_index) or "").strip() or None
    episode = skills.episode_skill.strip() or None
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
    """Insert the episode block after the task line and the step block before the 'Now it's your
    turn' line (§6); a block whose anchor is missing is appended at the end of the prompt."""
    lines = prompt_text.splitlines(keepends=True)
    tail: list[str] = []
    if step_skill:
        block = skill_block(STEP_TITLE, STEP_NOTE, step_skill)
        at = next((i for i, line in enumerate(lines) if line.lstrip().startswith(TURN_ANCHOR)), None)
        if at is None:
            tail.append(block)
        else:
            lines.insert(at, block)
    if episode_skill:
        block = skill_block(EPISODE_TITLE, EPISODE_NOTE, episode_skill)
        at = next((i for i, line in enumerate(lines) if any(a in line for a in TASK_ANCHORS)), None)
        if at is None:
            tail.insert(0, block)
        else:
            if not lines[at].endswith("\n"):
                lines[at] += "\n"
            lines.insert(at + 1, block)
    text = "".join(lines)
    if tail:
        text = (text if text.endswith("\n") or not text else text + "\n") + "\n" + "".join(tail)
    return text
