"""ALFWorld behind the environment contract: `AlfWorldEnv` and its prompt template.

docs/method.md §12 (the contract) and §2 (parsing, validity); arXiv 2606.26790. The
games are those `worlds.py` generates, or the official ones under `$ALFWORLD_DATA`; they run on the
stock engine through `alfworld_engine.py`. Imports flow one way: alfworld_env -> worlds ->
alfworld_engine, and every environment module -> envs (the shared contract).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import worlds
from alfworld_engine import AlfredGame
from envs import VALIDITY_RULES, parse_response

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
    """One ALFWorld episode at a time on the real alfworld/TextWorld engine (docs/method.md §12).

    Data: by default the games `worlds.py` generates (`split` "train" or "eval", or "fresh": train-like
    games disjoint from both that the kept agent was never cloned on; `n_games` games,
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

    Arguments: `history_length` H (observation, action) pairs in the prompt; `max_steps` (default:
    the world's horizon, 20 small / 30 full; 50 in the GiGPO setting); `world` the generated games'
    size, "small" (default, the CPU testbed) or "full" (worlds.WORLDS; ignored for official data);
    `think` selects the template with <think> (required by the parser) or the short one; `n_games`
    the generated split's size (default 240 train / 60 eval; with official data, the first
    `n_games` games); `train_games` the train split an eval split is kept disjoint from (default
    240); `seed` of the expert's random draws (0 = the run checked at generation); `task_types`
    keeps only games of those types (e.g. ("pick_and_place",); empty: all six); `validity`
    "format" | "admissible" (see Steps).
    """

    name = "alfworld"
    answer_tags = ("action",)

    def __init__(self, split: str = "train", history_length: int = 5, max_steps: int | None = None,
                 think: bool = True, data_dir: str | os.PathLike | None = None,
                 n_games: int | None = None, train_games: int | None = None, seed: int = 0,
                 task_types: tuple[str, ...] = (), validity: str = "format", world: str | None = None):
        if validity not in VALIDITY_RULES:
            raise ValueError(f"unknown validity rule {validity!r}; expected one of {VALIDITY_RULES}")
        world = world or worlds.DEFAULT_WORLD
        if world not in worlds.WORLDS:
            raise ValueError(f"unknown ALFWorld world size {world!r}; expected one of {sorted(worlds.WORLDS)}")
        max_steps = max_steps or worlds.WORLDS[world]["max_steps"]
        folder = Path(data_dir) if data_dir else _official_folder(split)
        self.official = folder is not None
        if split == "fresh" and (data_dir or _official_folder("train")):
            raise ValueError("split 'fresh' exists only among the generated games, not in official or given data")
        if folder is None:
            # a fresh split is kept apart from the eval split of the same size (train.py sizes them alike)
            folder = worlds.ensure_split(split, n_games, train_games=train_games, world=world, eval_games=n_games)
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
        """The user message for the current step (docs/method.md §12, "Prompt template")."""
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
