"""Text environments for agentic RL: the shared contract, response parsing, and ALFWorld.

OPID_SPEC §2. Every environment is a single-copy class with the same small interface
(`reset(task_index)`, `step(raw_response_text)`, `prompt()`, `expert_action()`); the trainer
keeps B*N copies in a list and steps them in lock-step.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import fast_downward
import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
from alfworld.agents.expert import HandCodedTWAgent
from textworld.core import GameState
from textworld.envs.pddl import PddlEnv
from textworld.envs.pddl import logic as pddl_logic
from textworld.logic import Proposition, Variable


def cache_dir(*parts: str) -> Path:
    """Folder for generated games, catalogues, corpora and model caches (git-ignored).

    `$OPID_CACHE` overrides the default `<repo>/.cache/opid`.
    """
    root = Path(os.environ.get("OPID_CACHE", Path(__file__).resolve().parent / ".cache" / "opid"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Response parsing (§2): `<think>…</think>` reasoning, then exactly one answer tag.
# ---------------------------------------------------------------------------------------------

@dataclass
class ParsedResponse:
    tag: str      # which answer tag was used ("action", "search", "answer"), "" when invalid
    action: str   # stripped tag content, "" when invalid
    valid: bool
    reason: str   # why the response is invalid, "" when valid


MAX_ACTION_CHARS = 300  # no legitimate action/query/answer is longer; longer content is garbage


def _count(text: str, tag: str) -> tuple[int, int]:
    return text.count(f"<{tag}>"), text.count(f"</{tag}>")


CHINESE_CHARACTERS = re.compile(r"[\u4e00-\u9fff]")  # the CJK range the authors' projections reject
VALIDITY_RULES = ("format", "admissible")  # what makes a step invalid, see parse_response / AlfWorldEnv


def parse_response(text: str, answer_tags: tuple[str, ...] = ("action",),
                   require_think: bool = False) -> ParsedResponse:
    """Extract the single answer of a model response; never raises (docs/method.md §2).

    Validity is about the format only (as in the authors' projections, arXiv 2606.26790): invalid
    when the text is not a string, holds Chinese characters, an answer tag is missing or repeated,
    more than one kind of answer tag is used, the content is empty, too long or contains control
    characters, or — with `require_think` — the `<think>…</think>` block is missing, repeated, or
    does not close before the answer tag opens (`<think>… <action>look</action></think>` is
    invalid: the action must follow the reasoning). Whether the action is one the environment
    accepts is the environment's business.
    """
    def bad(reason: str) -> ParsedResponse:
        return ParsedResponse("", "", False, reason)

    if not isinstance(text, str):
        return bad(f"response is {type(text).__name__}, not text")
    if CHINESE_CHARACTERS.search(text):
        return bad("Chinese characters in the response")
    if require_think:
        opens, closes = _count(text, "think")
        if opens != 1 or closes != 1:
            return bad("missing or repeated <think>...</think> block")
        if text.index("</think>") < text.index("<think>"):
            return bad("</think> comes before <think>")
    used = [t for t in answer_tags if any(_count(text, t))]
    if not used:
        return bad("no " + " or ".join(f"<{t}>" for t in answer_tags) + " tag")
    if len(used) > 1:
        return bad("more than one kind of answer tag: " + ", ".join(used))
    tag = used[0]
    opens, closes = _count(text, tag)
    if opens != 1 or closes != 1:
        return bad(f"<{tag}> tag missing its pair or repeated ({opens} open, {closes} close)")
    match = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    if match is None:
        return bad(f"</{tag}> comes before <{tag}>")
    if require_think and match.start() < text.index("</think>"):
        return bad(f"<{tag}> opens before </think> closes the reasoning")
    content = match.group(1).strip()
    if not content:
        return bad(f"empty <{tag}>")
    if len(content) > MAX_ACTION_CHARS:
        return bad(f"<{tag}> content longer than {MAX_ACTION_CHARS} characters")
    if any((not ch.isprintable()) and ch not in " \t" for ch in content):
        return bad(f"<{tag}> content holds control or non-printable characters")
    return ParsedResponse(tag, " ".join(content.split()), True, "")


# ---------------------------------------------------------------------------------------------
# The ALFWorld engine: textworld's PddlEnv + alfworld's wrappers, with two small fixes
# ---------------------------------------------------------------------------------------------

_TRANSLATIONS: dict = {}   # (domain, problem) -> fast-downward translation, shared by all copies


def _translate(domain: str, problem: str):
    """fast-downward's PDDL -> SAS translation (0.3-1 s) done once per problem in this process;
    the B*N copies of a group and every later reset of the same game reuse it."""
    key = (hash(domain), problem)
    if key not in _TRANSLATIONS:
        if len(_TRANSLATIONS) >= 64:
            _TRANSLATIONS.pop(next(iter(_TRANSLATIONS)))
        saved_argv = sys.argv[:]  # fast-downward's translator overwrites sys.argv; give it back
        try:
            _TRANSLATIONS[key] = fast_downward.pddl2sas(domain, problem, verbose=False)
        finally:
            sys.argv[:] = saved_argv
    return _TRANSLATIONS[key]


_LOGICS: dict = {}


def _game_logic(domain: str, grammar: str):
    """Parsed domain + grammar (0.5 s of tatsu parsing), shared by the copies of one game: the
    engine only reads it (adding types it already has is a no-op)."""
    key = (hash(domain), grammar)
    if key not in _LOGICS:
        if len(_LOGICS) >= 64:
            _LOGICS.pop(next(iter(_LOGICS)))
        _LOGICS[key] = pddl_logic.GameLogic(domain=domain, grammar=grammar)
    return _LOGICS[key]


class CachedPddlState(pddl_logic.PddlState):
    """textworld's PddlState built from a cached translation. The stock one translates the
    problem twice (once more, optimised, for the planner's `replan`); the hand-coded expert never
    replans, so the planner gets the same translation."""

    def __init__(self, downward_lib, pddl_problem: str, logic):
        self._facts = defaultdict(set)
        self._vars_by_name = {}
        self._vars_by_type = defaultdict(set)
        self._var_counts = Counter()
        self._logic = logic
        self.downward_lib = downward_lib
        self.pddl_problem = pddl_problem
        self.task, self.sas = _translate(logic.domain, pddl_problem)
        self.sas_replan = self.sas
        self._actions = {a.name: a for a in self.task.actions}
        for type_ in self.task.types:
            try:
                self._logic.types.add(textworld.logic.Type(type_.name, type_.supertype_names))
            except ValueError:
                pass
        self.downward_lib.load_sas(self.sas.encode("utf-8"))
        self.downward_lib.load_sas_replan(self.sas_replan.encode("utf-8"))
        self.name2type = {o.name: o.type_name for o in self.task.objects}

        def _atom2proposition(atom):
            if isinstance(atom, fast_downward.translate.pddl.conditions.Atom):
                if atom.predicate == "=":
                    return None
                return Proposition(atom.predicate, [Variable(arg, self.name2type[arg]) for arg in atom.args])
            elif isinstance(atom, fast_downward.translate.pddl.f_expression.Assign):
                if atom.fluent.symbol == "total-cost":
                    return None
                name = "{}".format(atom.expression.value)
                if str.isdigit(name):  # distance relations
                    return None
                return Proposition(name, [Variable(arg, self.name2type[arg]) for arg in atom.fluent.args])

        self.add_facts(list(filter(None, map(_atom2proposition, self.task.init))))
        atoms = (pddl_logic.Atom * self.downward_lib.get_state_size())()
        self.downward_lib.get_state(atoms)
        facts = [atom.get_fact(self.name2type) for atom in atoms]
        self.add_facts([fact for fact in facts if not fact.is_negation])


class CachedPddlEnv(PddlEnv):
    """textworld's PddlEnv with the text of each admissible command cached per game.

    Stock `_gather_infos` re-derives the command text of every applicable action from the grammar
    at every step (about 90% of a step's time). That text depends only on the action, its
    arguments and facts that never change (receptacle locations, names), so it is computed once
    per (action, arguments) and reused; the strings are identical to the stock ones.
    """

    def load(self, filename_or_data) -> None:
        with open(filename_or_data) as f:
            data = json.load(f)
        self._game_file = filename_or_data
        self._game_data = data
        self.walkthrough = data.get("walkthrough", None)
        self._logic = _game_logic(data["pddl_domain"], data["grammar"])
        self._pddl_state = CachedPddlState(self.downward_lib, data["pddl_problem"], self._logic)
        self._entity_infos = self._get_entity_infos()
        self._command_cache = {}
        self._template_names_cache = {}

    def reset(self):
        self._pddl_state = CachedPddlState(self.downward_lib, self._game_data["pddl_problem"], self._logic)
        self.prev_state = None
        self.state = GameState()
        self._last_action = None
        self._moves = 0
        context = {"state": self._pddl_state, "facts": list(self._pddl_state.facts), "variables": {},
                   "mapping": {}, "entity_infos": self._entity_infos}
        self.state.feedback = self._logic.grammar.derive("#intro#", context)
        self.state.raw = self.state.feedback
        self._gather_infos()
        return self.state

    def _template_names(self, action) -> frozenset:
        names = self._template_names_cache.get(action.name)
        if names is None:
            words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", action.command_template))
            names = frozenset(ph.name for ph in action.mapping if ph.name in words)
            self._template_names_cache[action.name] = names
        return names

    def _gather_infos(self):
        self.state["command_templates"] = sorted(set(a.template for a in self._logic.actions.values()))
        self.state["won"] = self._pddl_state.check_goal()
        self.state["lost"] = False
        self.state["_entity_infos"] = dict(self._entity_infos)
        self.state["_facts"] = list(self._pddl_state.facts)
        if self.request_infos.facts:
            self.state["facts"] = list(map(self._get_human_readable_fact, self.state["_facts"]))
        self.state["last_action"] = None
        self.state["_last_action"] = self._last_action
        self.state["_valid_actions"] = list(self._pddl_state.all_applicable_actions())

        mapping = None
        commands = []
        for action in self.state["_valid_actions"]:
            # key: the arguments the template names (GotoLocation's text depends on where the
            # agent goes, not where it stands, so it is shared across starting points)
            named = self._template_names(action)
            key = (action.name, tuple((ph.name, var.name) for ph, var in action.mapping.items() if ph.name in named))
            command = self._command_cache.get(key)
            if command is None:
                if mapping is None:
                    mapping = {k: info.name for k, info in self._entity_infos.items()}
                context = {
                    "state": self._pddl_state,
                    "facts": list(self._pddl_state.facts),
                    "variables": {ph.name: self._entity_infos[var.name] for ph, var in action.mapping.items()},
                    "mapping": action.mapping,
                    "entity_infos": self._entity_infos,
                }
                action.command_template = self._logic.grammar.derive(action.command_template, context)
                command = self._command_cache[key] = action.format_command(mapping)
            commands.append(command)
        self.state["_valid_commands"] = commands
        self.state["admissible_commands"] = sorted(set(commands))
        if self.request_infos.moves:
            self.state["moves"] = self._moves
        if self.request_infos.policy_commands:
            self.state["policy_commands"] = self._pddl_state.replan(self._entity_infos)


class PutTrackingExpert(HandCodedTWAgent):
    """alfworld's hand-coded expert with the pick-two fix.

    The game's put command reads `move X to Y`, but the expert updates its inventory only on
    commands containing "put"; after the first object of a pick-two task it still believes it
    holds it and fails (4/20 wins measured, DESIGN.md). The command is rewritten to `put ...`
    for the expert's state tracking only.
    """

    def act(self, game_state, reward, done, last_action=""):
        tracked = "put " + last_action[len("move "):] if last_action.startswith("move ") else last_action
        action = self.policy.act(game_state, tracked)
        if action == last_action or (last_action == "look" and action not in game_state["admissible_commands"]):
            return random.choice(game_state["admissible_commands"])
        return action


class FixedAlfredExpert(AlfredExpert):
    """AlfredExpert(handcoded) using `PutTrackingExpert`; an expert that gives up or crashes
    leaves an empty plan instead of raising out of `step`."""

    def load(self, gamefile):
        super().load(gamefile)
        self._handcoded_expert = PutTrackingExpert(max_steps=200)

    def _gather_infos(self):
        try:
            super()._gather_infos()
        except Exception:  # HandCodedAgentFailed / Timeout / a parsing slip of the expert
            self.state["extra.expert_plan"] = []


class AlfredGame:
    """One ALFWorld game file on the engine, the expert's random draws kept per game.

    alfworld's expert uses the global `random` module; copies stepped in lock-step would share
    it, so each game keeps its own generator state and swaps it in around engine calls.
    """

    def __init__(self, game_file: str, seed: int = 0):
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True,
                                   extras=["gamefile", "expert_plan"])
        env = CachedPddlEnv(infos)
        env = AlfredDemangler(env, shuffle=False)
        env = AlfredInfos(env)
        self.env = FixedAlfredExpert(env, expert_type="handcoded")
        self.game_file = game_file
        self.env.load(game_file)
        self.seed = seed
        self.state = None
        self._random_state = None

    def _call(self, fn, *args):
        saved = random.getstate()
        random.setstate(self._random_state)
        try:
            return fn(*args)
        finally:
            self._random_state = random.getstate()
            random.setstate(saved)

    def reset(self):
        random_state = random.getstate()
        random.seed(self.seed)
        self._random_state = random.getstate()
        random.setstate(random_state)
        self.state = self._call(self.env.reset)
        return self.state

    def step(self, command: str):
        self.state, score, done = self._call(self.env.step, command)
        return self.state, score, done

    def expert_next_action(self) -> str | None:
        plan = self.state.get("extra.expert_plan") or []
        return plan[0] if plan else None


def load_game(game_file: str, seed: int = 0) -> AlfredGame:
    return AlfredGame(game_file, seed)


# ---------------------------------------------------------------------------------------------
# AlfWorldEnv: the contract over the engine, with its prompt template (§2)
# ---------------------------------------------------------------------------------------------

NOTHING_HAPPENS = "Nothing happens."   # the engine's answer to a command it does not know

ALFWORLD_INTRO = ("You are a household agent in a text world run by the ALFWorld engine. Each step "
                  "you send one command and the world answers with what you observe.")
ALFWORLD_THINK = ("Reason step by step about what you see and what the task still needs inside "
                  "<think> </think> tags, then write exactly one admissible action inside "
                  "<action> </action> tags, e.g. <think>...</think><action>go to cabinet 1</action>.")
ALFWORLD_NO_THINK = ("Reply with exactly one admissible action inside <action> </action> tags and "
                     "nothing else, e.g. <action>go to cabinet 1</action>.")


def _official_folder(split: str) -> Path | None:
    """`$ALFWORLD_DATA/json_2.1.1/{train,valid_unseen}` when the official games are installed."""
    root = os.environ.get("ALFWORLD_DATA")
    if not root:
        return None
    folder = Path(root) / "json_2.1.1" / {"train": "train", "eval": "valid_unseen"}.get(split, split)
    return folder if folder.is_dir() else None


def _split_task(feedback: str) -> tuple[str, str]:
    """(observation without the intro banner and task sentence, task) of the engine's intro."""
    text, _, task = feedback.partition("Your task is to: ")
    text = text.replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
    return text, task.strip().rstrip(".")


class AlfWorldEnv:
    """One ALFWorld episode at a time on the real alfworld/TextWorld engine (CONTRACT.md).

    Data: by default the games `worlds.py` generates (`split` "train" or "eval", `n_games` games,
    written once under `cache_dir("alfworld")`). With `data_dir` given, or when `$ALFWORLD_DATA`
    holds the official games (`alfworld-download`), the same code path loads every
    `game.tw-pddl` below `data_dir` or below `$ALFWORLD_DATA/json_2.1.1/train` (split "train") /
    `.../valid_unseen` (split "eval"); movable-receptacle and sliced games are skipped as in
    alfworld's own loader.

    Steps: `step` parses the raw response (`parse_response`) and lower-cases the action (as the
    authors' projection does). With `validity="format"` (default, the authors' rule) only a
    malformed response is invalid; a well-formed action that is not admissible is a valid step the
    engine answers with "Nothing happens." With `validity="admissible"` (ablation) such an action
    is invalid too. Either way an action outside the admissible list leaves the world as it was —
    the engine matches commands exactly against its admissible ones and otherwise only answers
    "Nothing happens." — so that answer is given without stepping the engine, which keeps the
    hand-coded expert's tracking (OPSD's privileged text) from counting a command that did
    nothing. The step counts and the episode goes on. Reward 10 on the winning step, else 0;
    `done` on a win or after `max_steps`.

    Arguments: `history_length` H (observation, action) pairs in the prompt; `max_steps` (default: the
    world's horizon, 20 small / 30 full; 50 in the GiGPO setting); `world` the generated games' size,
    "small" (default, the CPU testbed) or "full" (worlds.WORLDS; ignored for official data); `think` selects the template with <think> (required by the parser) or the
    short one; `n_games` the generated split's size (default 240 train / 60 eval; with official
    data, the first `n_games` games); `train_games` the train split an eval split is kept disjoint
    from (default 240); `seed` of the expert's random draws (0 = the run checked at generation);
    `task_types` keeps only games of those types (e.g. ("pick_and_place",); empty: all six);
    `validity` "format" | "admissible" (see Steps).
    """

    name = "alfworld"
    answer_tags = ("action",)

    def __init__(self, split: str = "train", history_length: int = 5, max_steps: int | None = None,
                 think: bool = True, data_dir: str | os.PathLike | None = None,
                 n_games: int | None = None, train_games: int | None = None, seed: int = 0,
                 task_types: tuple[str, ...] = (), validity: str = "format", world: str | None = None):
        if validity not in VALIDITY_RULES:
            raise ValueError(f"unknown validity rule {validity!r}; expected one of {VALIDITY_RULES}")
        import worlds   # generator of the offline games; imports envs for the engine
        world = world or worlds.DEFAULT_WORLD
        if world not in worlds.WORLDS:
            raise ValueError(f"unknown ALFWorld world size {world!r}; expected one of {sorted(worlds.WORLDS)}")
        max_steps = max_steps or worlds.WORLDS[world]["max_steps"]
        folder = Path(data_dir) if data_dir else _official_folder(split)
        self.official = folder is not None
        if folder is None:
            folder = worlds.ensure_split(split, n_games, train_games=train_games, world=world)
        self.game_files = [str(p) for p in worlds.game_files(folder)]
        if n_games and self.official:
            self.game_files = self.game_files[:n_games]
        if not self.game_files:
            raise FileNotFoundError(f"no ALFWorld games (game.tw-pddl + traj_data.json) under {folder}")
        if task_types:
            unknown = set(task_types) - set(ALFWORLD_TASK_TYPES)
            if unknown:
                raise ValueError(f"unknown ALFWorld task type(s) {sorted(unknown)}; expected {ALFWORLD_TASK_TYPES}")
            self.game_files = [f for f in self.game_files if _game_task_type(f) in task_types]
            if not self.game_files:
                raise FileNotFoundError(f"no ALFWorld games of type {sorted(task_types)} under {folder}")
        self.split, self.history_length, self.max_steps, self.think = split, history_length, max_steps, think
        self.seed, self.validity = seed, validity
        self._game: AlfredGame | None = None
        self.task, self.task_type, self.task_index = "", "", -1
        self.done = True

    def num_tasks(self) -> int:
        return len(self.game_files)

    # ---- episode -------------------------------------------------------------------------
    def reset(self, task_index: int) -> tuple[str, dict]:
        game_file = self.game_files[task_index % len(self.game_files)]
        if self._game is None or self._game.game_file != game_file:
            # the same expert seed as the solvability check in worlds.py, so its verified run replays
            self._game = AlfredGame(game_file, seed=self.seed)
        state = self._game.reset()
        self.task_index = task_index
        self.observation, self.task = _split_task(state["feedback"])
        with open(Path(game_file).parent / "traj_data.json") as f:
            traj = json.load(f)
        self.task_type = _short_task_type(traj["task_type"])
        self._targets = traj["pddl_params"]
        self.history: list[tuple[str, str]] = []   # (observation, action) of past steps
        self.steps, self.won, self.done = 0, False, False
        return self.observation, self._info(self.observation, "", True, "")

    def step(self, response_text: str) -> tuple[str, float, bool, dict]:
        if self._game is None:
            raise RuntimeError("AlfWorldEnv.step() called before reset(task_index)")
        anchor = self.observation
        if self.done:
            info = self._info(anchor, "", False, "the episode is over; call reset()")
            return self.observation, 0.0, True, info
        parsed = parse_response(response_text, self.answer_tags, require_think=self.think)
        action, reason = parsed.action.lower(), parsed.reason
        admissible = parsed.valid and action in self.admissible_actions()
        if parsed.valid and not admissible and self.validity == "admissible":
            reason = f"'{action}' is not one of the admissible actions"
        if not admissible:
            observation = NOTHING_HAPPENS   # the engine's answer; its state (and the expert's) is untouched
        else:
            state, _, _ = self._game.step(action)
            observation = state["feedback"]
            self.won = bool(state["won"])
        self.history.append((anchor, action if action else "(no valid action)"))
        self.steps += 1
        self.observation = observation
        self.done = self.won or self.steps >= self.max_steps
        reward = 10.0 if self.won else 0.0
        return observation, reward, self.done, self._info(anchor, action, not reason, reason)

    def _info(self, anchor: str, action: str, valid: bool, reason: str) -> dict:
        expert = self.expert_action()
        return {"won": self.won, "action_valid": valid, "invalid_reason": reason, "action": action,
                "admissible_actions": self.admissible_actions(), "task_type": self.task_type,
                "anchor_obs": anchor, "expert_action": expert, "task": self.task,
                "score": float(self.won), "privileged": self._privileged(expert)}

    def admissible_actions(self) -> list[str]:
        # "help" only prints the command list: it is left out, as in common ALFWorld agent setups
        return [a for a in self._game.state["admissible_commands"] if a != "help"]

    def expert_action(self) -> str | None:
        """alfworld's hand-coded expert's next action from the current state (None when done)."""
        return None if self.done else self._game.expert_next_action()

    def _privileged(self, expert: str | None) -> str:
        """Ground truth the agent cannot see: where the task's objects are, and the expert's move."""
        wanted = {self._targets.get("object_target", "").lower(), self._targets.get("toggle_target", "").lower()}
        places = []
        for fact in self._game.state.get("facts", []):
            if fact.name == "inreceptacle":
                obj, recep = (v.name.strip() for v in fact.arguments)
                if obj.split(" ")[0] in wanted:
                    places.append(f"{obj} is in {recep}")
        text = "Task objects: " + ("; ".join(sorted(places)) or "held or placed") + "."
        return text + (f" Expert's next action: {expert}." if expert else "")

    # ---- prompt ---------------------------------------------------------------------------
    def prompt(self) -> str:
        """The user message for the current step (CONTRACT.md "Prompt templates")."""
        lines = [ALFWORLD_INTRO, f"Your task is to: {self.task}"]
        recent = self.history[-self.history_length:] if self.history_length > 0 else []
        if not self.history:
            lines.append("This is your first step, so there is no history yet.")
        else:
            first = len(self.history) - len(recent) + 1
            lines.append(f"You have taken {len(self.history)} step(s) so far. Your last {len(recent)} "
                         "observation(s) and the action you took after each:")
            for i, (obs, act) in enumerate(recent, start=first):
                lines.append(f"[Step {i}] Observation: {_one_line(obs)} | Action: {act}")
        lines.append(f"Now you are at step {len(self.history) + 1}. Current observation: "
                     f"{_one_line(self.observation)}")
        lines.append("Admissible actions: [" + ", ".join(f"'{a}'" for a in self.admissible_actions()) + "]")
        lines.append("Now it's your turn to choose the next action.")
        lines.append(ALFWORLD_THINK if self.think else ALFWORLD_NO_THINK)
        return "\n".join(lines)


def _game_task_type(game_file: str) -> str:
    with open(Path(game_file).parent / "traj_data.json") as f:
        return _short_task_type(json.load(f)["task_type"])


def _one_line(text: str) -> str:
    return " ".join(text.split())


# the contract's task type names, each with the prefix of alfworld's name for that type
_TASK_TYPE_PREFIXES = (("pick_two_obj_and_place", "pick_two_obj"), ("look_at_obj_in_light", "look_at_obj"),
                       ("pick_clean_then_place", "pick_clean"), ("pick_heat_then_place", "pick_heat"),
                       ("pick_cool_then_place", "pick_cool"), ("pick_and_place", "pick_and_place"))
ALFWORLD_TASK_TYPES = tuple(short for short, _ in _TASK_TYPE_PREFIXES)


def _short_task_type(alfworld_type: str) -> str:
    """alfworld's task type name -> the contract's (`pick_and_place_simple` -> `pick_and_place`)."""
    for short, prefix in _TASK_TYPE_PREFIXES:
        if alfworld_type.startswith(prefix):
            return short
    return alfworld_type


def make_env(name: str, **kwargs):
    """One environment copy by name: "alfworld", "webshop" or "search"."""
    if name == "alfworld":
        return AlfWorldEnv(**kwargs)
    if name == "webshop":
        from webshop import OfficialWebShopEnv, WebShopEnv
        backend = kwargs.pop("backend", "sim")
        if backend not in ("sim", "official"):
            raise ValueError(f"unknown WebShop backend {backend!r}; expected 'sim' or 'official'")
        return (OfficialWebShopEnv if backend == "official" else WebShopEnv)(**kwargs)
    if name == "search":
        from searchqa import SearchQAEnv
        return SearchQAEnv(**kwargs)
    raise ValueError(f"unknown environment {name!r}; expected 'alfworld', 'webshop' or 'search'")
