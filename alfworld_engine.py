"""The ALFWorld engine: textworld's PddlEnv and alfworld's wrappers, sped up and with one fix.

`load_game(game_file)` gives one game on the stock alfworld / TextWorld engine with alfworld's
hand-coded expert. What differs from the stock code (checked against it in tests/test_alfworld.py):
the PDDL translation and the parsed grammar are shared by the copies of a game, the text of each
admissible command is cached per game (`CachedPddlEnv`, identical strings), and the expert tracks
what it holds after a `move X to Y` (`PutTrackingExpert`, the pick-two fix). The game generator
(`worlds.py`) checks every drawn game on this engine and the environment (`alfworld_env.py`) plays
on it; this module imports neither.
"""
from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter, defaultdict

import fast_downward
import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
from alfworld.agents.expert import HandCodedTWAgent
from textworld.core import GameState
from textworld.envs.pddl import PddlEnv
from textworld.envs.pddl import logic as pddl_logic
from textworld.logic import Proposition, Variable


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
    holds it and fails (4/20 wins measured without the fix). The command is rewritten to `put ...`
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
    """One game file on the engine, its expert's random draws seeded with `seed`."""
    return AlfredGame(game_file, seed)
