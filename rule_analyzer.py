"""Rule-based analyzer (docs/method.md §4, offline back-end): from a finished trajectory's text to skills.

It reads only the trajectory text — observations, actions, validity, rewards and returns — never
hidden environment state, and it is deterministic. It speaks the same protocol as the LLM
back-ends in skills.py (`complete(messages) -> str`, JSON out) and reads the trajectory out of
its own prompt, so it sees exactly what an LLM analyzer sees.

Reads top to bottom:
  1. phrase builders (`step_hint_for_action`, `avoid_hint`, `task_keywords`,
     `alfworld_task_targets`): public, because the same wording makes hint-following imitation data;
  2. reading ALFWorld text: where the task object was seen, held, processed;
  3. mistakes read off any trajectory: loops, steps with no effect, and how to pick K of them;
  4. one skill writer per environment (`_alfworld_skills`, `_webshop_skills`, `_search_skills`);
  5. `RuleBasedAnalyzer`: dispatch on the environment, and the JSON protocol.
"""
from __future__ import annotations

import json
import re

from skills import TRAJECTORY_MARKER, Skills, StepView, TrajectoryView, trajectory_from_json

# =============================================================================================
# 1. Phrase builders: one wording for skills and for hint-following imitation data
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


# =============================================================================================
# 2. Reading ALFWorld text: where the task object was seen, held, processed
# =============================================================================================

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


# =============================================================================================
# 3. Mistakes read off any trajectory: loops, steps with no effect; picking K of them
# =============================================================================================

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


# =============================================================================================
# 4. One skill writer per environment
# =============================================================================================

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


# =============================================================================================
# 5. The analyzer: dispatch on the environment, JSON in and out (§4)
# =============================================================================================

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
