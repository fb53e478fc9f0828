"""Offline content for the environments: ALFRED-style ALFWorld games for the real alfworld engine.

When the official ALFWorld games are absent, `worlds.py` writes
ALFRED-style PDDL games that the stock `alfworld` / TextWorld engine plays unchanged. Each game is
a folder holding `game.tw-pddl` (JSON: alfworld's PDDL domain, its text grammar with the task
sentence filled in, our PDDL problem, `"solvable": true`) and `traj_data.json` (`task_type` and the
five `pddl_params` that alfworld's hand-coded expert reads), the same layout as the official data.

How a game is drawn (`draw_game`, all randomness from one `random.Random(seed)`):
  1. a task type and a room kind that has what the task needs (sink basin, microwave, fridge, a desk
     lamp on a desk / side table / dresser), 8-30 receptacles in ALFRED's classes (a "small" world
     then keeps 4-6 of them, what the task needs included, and 2-4 distractors: `WORLDS`);
  2. a goal from alfworld's goal library (`alfworld.gen.goal_library.gdict`) whose object and
     receptacle classes are compatible under ALFRED's `VAL_RECEPTACLE_OBJECTS`;
  3. the target object(s) plus distractors placed in receptacles that may hold them, the targets
     inside a closed receptacle about half of the time; no target starts where the goal wants it;
  4. the problem is loaded in the engine and the hand-coded expert must win within `EXPERT_STEPS`
     steps, otherwise the draw is discarded and the next seed of that game slot is tried.

Splits (`ensure_split`): game slot i of split s uses seeds derived from (s, i, attempt); train and
eval use different split salts, and eval games whose visible content (room, contents, task) equals a
train game are discarded. A split is written to a temporary folder and renamed into place, so an
interrupted or concurrent generation never leaves half a split behind.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import alfworld
import alfworld.gen.constants as alfred_constants
import alfworld.gen.goal_library as goal_library
from alfworld.agents.utils.misc import add_task_to_grammar
from tqdm.auto import tqdm

from alfworld_engine import load_game
from envs import cache_dir

ALFWORLD_DATA = Path(alfworld.__file__).resolve().parent / "data"
GENERATOR_VERSION = 1   # bump when the drawing procedure changes: the cache folder name holds it
EXPERT_STEPS = 30       # the expert must win within the default episode length (alfworld_env.AlfWorldEnv)
# World sizes. "full": ALFRED-like rooms (8-30 receptacles, 6-30 distractors, 30 steps), the setting of
# the README's earlier results. "small": the same engine, task types and goal library in a room cut to
# 4-6 receptacles (the task's appliance, goal receptacle and a start place of its object kept) with 2-4
# distractors and a shorter horizon, so that prompts are short and a tiny agent on a CPU wins some
# episodes of a group and loses others (README "Models").
WORLDS = {
    "full": dict(receptacles=(8, 30), distractors=None, max_steps=30),
    "small": dict(receptacles=(4, 6), distractors=(2, 4), max_steps=20),
}
DEFAULT_WORLD = "small"   # the CPU testbed's world; "full" reproduces the earlier results
APPLIANCE = {"pick_clean_then_place": "SinkBasin", "pick_heat_then_place": "Microwave",
             "pick_cool_then_place": "Fridge"}

# contract task-type name -> alfworld's name (traj_data.json, goal library, expert policies)
TASK_TYPES = {
    "pick_and_place": "pick_and_place_simple",
    "look_at_obj_in_light": "look_at_obj_in_light",
    "pick_clean_then_place": "pick_clean_then_place_in_recep",
    "pick_heat_then_place": "pick_heat_then_place_in_recep",
    "pick_cool_then_place": "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place": "pick_two_obj_and_place",
}
SHORT_TASK_TYPE = {v: k for k, v in TASK_TYPES.items()}
DEFAULT_SIZES = {"train": 240, "eval": 60, "fresh": 240}
# separate seed ranges per split; "fresh" holds train-like games the kept agent was never cloned on
SPLIT_SALT = {"train": 1, "eval": 2, "fresh": 4}
OPENABLE = set(alfred_constants.OPENABLE_CLASS_LIST)
CAN_HOLD = {r: set(objs) for r, objs in alfred_constants.VAL_RECEPTACLE_OBJECTS.items()}
ABILITIES = {"cleanable": "Cleanable", "heatable": "Heatable", "coolable": "Coolable"}

# Room kinds: receptacle class -> (min, max) count, and the small objects found there.
ROOMS = {
    "kitchen": {
        "receptacles": {"Cabinet": (3, 12), "Drawer": (1, 8), "CounterTop": (1, 3), "Fridge": (1, 1),
                        "Microwave": (1, 1), "SinkBasin": (1, 1), "StoveBurner": (2, 4),
                        "DiningTable": (0, 1), "GarbageCan": (1, 1), "CoffeeMachine": (0, 1),
                        "Toaster": (0, 1), "Shelf": (0, 3), "SideTable": (0, 1)},
        "objects": ["Apple", "Bread", "Egg", "Lettuce", "Potato", "Tomato", "Mug", "Cup", "Bowl",
                    "Plate", "Pan", "Pot", "Kettle", "Fork", "Knife", "ButterKnife", "Spoon",
                    "Spatula", "Ladle", "DishSponge", "SoapBottle", "PepperShaker", "SaltShaker",
                    "WineBottle", "CreditCard", "CellPhone"],
    },
    "bedroom": {
        "receptacles": {"Desk": (0, 1), "SideTable": (1, 2), "Drawer": (2, 8), "Shelf": (1, 5),
                        "Dresser": (0, 1), "Bed": (1, 1), "GarbageCan": (1, 1), "Safe": (0, 1),
                        "ArmChair": (0, 1), "Cabinet": (0, 4), "LaundryHamper": (0, 1)},
        "objects": ["Book", "CD", "CellPhone", "CreditCard", "KeyChain", "Pen", "Pencil",
                    "AlarmClock", "Laptop", "Pillow", "Watch", "Statue", "Vase", "TissueBox",
                    "Candle", "Bowl", "Mug", "Cloth", "RemoteControl", "Newspaper", "BasketBall",
                    "BaseballBat", "TennisRacket"],
    },
    "livingroom": {
        "receptacles": {"Sofa": (1, 1), "ArmChair": (0, 2), "CoffeeTable": (1, 1),
                        "SideTable": (1, 3), "Shelf": (1, 6), "Drawer": (1, 6), "Cabinet": (0, 5),
                        "GarbageCan": (1, 1), "TVStand": (0, 1), "DiningTable": (0, 1),
                        "Ottoman": (0, 1), "Dresser": (0, 1)},
        "objects": ["Book", "CellPhone", "CreditCard", "KeyChain", "Pen", "Pencil", "Watch",
                    "Statue", "Vase", "TissueBox", "Candle", "Bowl", "Box", "Newspaper", "Laptop",
                    "RemoteControl", "Pillow", "Plate", "WateringCan", "Cloth"],
    },
}
# which room kinds each task type may be set in (what the task needs must be in the room)
TASK_ROOMS = {
    "pick_and_place": ["kitchen", "bedroom", "livingroom"],
    "look_at_obj_in_light": ["bedroom", "livingroom"],
    "pick_clean_then_place": ["kitchen"],
    "pick_heat_then_place": ["kitchen"],
    "pick_cool_then_place": ["kitchen"],
    "pick_two_obj_and_place": ["kitchen", "bedroom", "livingroom"],
}
LAMP_HOLDERS = ["Desk", "SideTable", "Dresser"]   # where the desk lamp of a look task stands
# receptacles the goal may not name (the appliance of the task itself, single-purpose holders)
NOT_A_GOAL_RECEPTACLE = {"pick_clean_then_place": {"SinkBasin"}, "pick_heat_then_place": {"Microwave"},
                         "pick_cool_then_place": {"Fridge"}}
NEVER_GOAL = {"Toaster", "TVStand", "LaundryHamper", "Safe"}


# ---------------------------------------------------------------------------------------------
# ALFRED-style names
# ---------------------------------------------------------------------------------------------

def _coordinate(value: float) -> str:
    """ALFRED's mangled coordinate text: -1.25 -> `_minus_01_dot_25`, 0.5 -> `_plus_00_dot_50`."""
    sign = "_minus_" if value < 0 else "_plus_"
    whole, frac = f"{abs(value):05.2f}".split(".")
    return f"{sign}{whole}_dot_{frac}"


def _entity_id(cls: str, rng: random.Random, used: set) -> str:
    """A unique ALFRED-style object id, e.g. `Apple_bar__minus_01_dot_21_bar__plus_00_dot_96_bar_...`.

    Sink basins read `Sink_bar_..._bar_SinkBasin`, like ALFRED's `Sink|x|y|z|SinkBasin`, so that
    alfworld's demangler names them "sinkbasin" (it keeps the text before the first `_bar_`).
    """
    while True:
        xyz = "".join("_bar_" + _coordinate(rng.uniform(-3.0, 3.0)) for _ in range(3))
        ident = f"Sink{xyz}_bar_SinkBasin" if cls == "SinkBasin" else f"{cls}{xyz}"
        if ident not in used:
            used.add(ident)
            return ident


def _location_id(rng: random.Random, used: set) -> str:
    while True:
        a, b, c, d = rng.randint(-12, 12), rng.randint(-12, 12), rng.choice([0, 1, 2, 3]), rng.choice([0, 30, 45, 60])
        ident = "loc" + "".join("_bar_" + (f"_minus_{-v}" if v < 0 else str(v)) for v in (a, b, c, d))
        if ident not in used:
            used.add(ident)
            return ident


@contextmanager
def seeded_global_random(seed):
    """alfworld draws from the global `random` module (task sentence, expert choices): seed it for
    the duration of the block and give the caller its previous state back afterwards."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


# ---------------------------------------------------------------------------------------------
# Drawing one game
# ---------------------------------------------------------------------------------------------

def _draw_room(kind: str, task_type: str, rng: random.Random) -> list[str]:
    """Receptacle classes of a room (one entry per receptacle), 8-30 receptacles."""
    spec = ROOMS[kind]["receptacles"]
    while True:
        classes = []
        for cls, (low, high) in spec.items():
            classes += [cls] * rng.randint(low, high)
        if task_type == "look_at_obj_in_light" and not any(c in LAMP_HOLDERS for c in classes):
            classes.append(rng.choice(["Desk", "SideTable"]))
        if 8 <= len(classes) <= 30:
            return classes


def _goal_candidates(task_type: str, room: list[str], kind: str) -> list[tuple[str, str]]:
    """(object class, goal receptacle class) pairs the task type allows in this room."""
    objects = ROOMS[kind]["objects"]
    need = {"pick_clean_then_place": "Cleanable", "pick_heat_then_place": "Heatable",
            "pick_cool_then_place": "Coolable"}.get(task_type)
    pairs = []
    for obj in objects:
        if need and obj not in alfred_constants.VAL_ACTION_OBJECTS[need]:
            continue
        if task_type == "look_at_obj_in_light":
            pairs.append((obj, ""))
            continue
        for recep in sorted(set(room)):
            if recep in NEVER_GOAL or recep in NOT_A_GOAL_RECEPTACLE.get(task_type, ()):
                continue
            # the object must be able to start somewhere that is not the goal receptacle class
            elsewhere = any(obj in CAN_HOLD[r] for r in room if r != recep)
            if obj in CAN_HOLD[recep] and elsewhere:
                pairs.append((obj, recep))
    return pairs


def _cut_room(room: list[str], task_type: str, obj_cls: str, recep_cls: str, size: int,
              rng: random.Random) -> list[str]:
    """A small world's room: `size` of `room`'s receptacles (order kept), always including the goal
    receptacle, the task's appliance, a desk-lamp holder (look tasks) and a place other than the goal
    where the task's object may start."""
    index = list(range(len(room)))
    keep = set()
    for wanted in (recep_cls, APPLIANCE.get(task_type, "")):
        if wanted:
            keep.add(rng.choice([i for i in index if room[i] == wanted]))
    if task_type == "look_at_obj_in_light":
        keep.add(rng.choice([i for i in index if room[i] in LAMP_HOLDERS]))
    if not any(obj_cls in CAN_HOLD[room[i]] and room[i] != recep_cls for i in keep):
        keep.add(rng.choice([i for i in index if obj_cls in CAN_HOLD[room[i]] and room[i] != recep_cls]))
    rest = [i for i in index if i not in keep]
    keep |= set(rng.sample(rest, max(0, min(len(rest), size - len(keep)))))
    return [room[i] for i in sorted(keep)]


def draw_game(seed: int, task_type: str, world: str = "full") -> dict:
    """Draw one ALFRED-style problem (not yet checked by the expert). Deterministic in `seed`.

    `world` is a key of WORLDS; a "full" draw is the same as before small worlds existed.

    Returns a dict with `pddl_problem`, `traj_data` (task_type, pddl_params), `fingerprint`
    (a hash of what the agent can see: receptacles, their contents, the goal) and `meta`.
    """
    rng = random.Random(seed)
    kind = rng.choice(TASK_ROOMS[task_type])
    room = _draw_room(kind, task_type, rng)
    obj_cls, recep_cls = rng.choice(_goal_candidates(task_type, room, kind))
    n_targets = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    sizes = WORLDS[world]
    if world != "full":
        room = _cut_room(room, task_type, obj_cls, recep_cls, rng.randint(*sizes["receptacles"]), rng)

    used_ids, used_locs = set(), set()
    receptacles = [(cls, _entity_id(cls, rng, used_ids)) for cls in room]
    rec_loc = {rid: _location_id(rng, used_locs) for _, rid in receptacles}
    agent_loc = _location_id(rng, used_locs)  # a spot of its own: next to a receptacle the expert crashes

    objects = []  # (class, id, receptacle id)

    def place(cls: str, hide: bool) -> None:
        allowed = [(c, rid) for c, rid in receptacles if cls in CAN_HOLD[c]]
        if not allowed:
            return
        if cls == obj_cls:  # targets never start where the goal wants them
            allowed = [(c, rid) for c, rid in allowed if c != recep_cls]
        closed = [(c, rid) for c, rid in allowed if c in OPENABLE]
        pool = closed if hide and closed else allowed
        _, where = rng.choice(pool)
        objects.append((cls, _entity_id(cls, rng, used_ids), where))

    for _ in range(n_targets):
        place(obj_cls, hide=rng.random() < 0.5)
    lamp = None
    if task_type == "look_at_obj_in_light":
        holders = [(c, rid) for c, rid in receptacles if c in LAMP_HOLDERS]
        lamp = ("DeskLamp", _entity_id("DeskLamp", rng, used_ids), rng.choice(holders)[1])
    distractor_classes = [c for c in ROOMS[kind]["objects"] if c != obj_cls]
    if world != "full":   # in a cut room, only classes that have a place there (so none is dropped)
        distractor_classes = [c for c in distractor_classes if any(c in CAN_HOLD[r] for r in room)]
    low, high = sizes["distractors"] or (max(6, len(room) // 2), max(10, len(room)))
    for _ in range(rng.randint(low, high)):
        place(rng.choice(distractor_classes), hide=rng.random() < 0.3)

    alfred_type = TASK_TYPES[task_type]
    params = {"object_target": obj_cls, "parent_target": recep_cls, "mrecep_target": "",
              "toggle_target": "DeskLamp" if lamp else "", "object_sliced": False}
    generator = {"version": GENERATOR_VERSION, "seed": seed, "room": kind} | ({"world": world} if world != "full" else {})
    traj_data = {"task_type": alfred_type, "pddl_params": params, "task_id": f"opid_{seed}", "generator": generator}
    problem = _problem_text(seed, receptacles, rec_loc, agent_loc, objects, lamp, params, alfred_type)

    # what the agent can see, independent of coordinates: used to keep train and eval disjoint
    contents = sorted((c, sorted(o for o, _, w in objects if w == rid)) for c, rid in receptacles)
    visible = json.dumps([contents, lamp[0] if lamp else "", alfred_type, params], sort_keys=True)
    return {"pddl_problem": problem, "traj_data": traj_data, "room_kind": kind,
            "fingerprint": hashlib.sha256(visible.encode()).hexdigest()[:16],
            "n_receptacles": len(room), "n_objects": len(objects) + (1 if lamp else 0)}


def _problem_text(seed, receptacles, rec_loc, agent_loc, objects, lamp, params, alfred_type) -> str:
    """The PDDL problem in ALFRED's style (types `XType`, facts as ALFRED's generator writes them)."""
    all_objects = objects + ([lamp] if lamp else [])
    otypes = sorted({c for c, _, _ in all_objects} | {params["object_target"]})
    rtypes = sorted({c for c, _ in receptacles})
    lines = [f"(define (problem plan_opid_{seed})", "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"{c}Type - otype" for c in otypes] + [f"{c}Type - rtype" for c in rtypes]
    lines += [f"{oid} - object" for _, oid, _ in all_objects]
    lines += [f"{rid} - receptacle" for _, rid in receptacles]
    lines += [f"{loc} - location" for loc in list(rec_loc.values()) + [agent_loc]]
    lines += [")", "(:init", f"(atLocation agent1 {agent_loc})"]
    for cls, rid in receptacles:
        lines.append(f"(receptacleType {rid} {cls}Type)")
        lines.append(f"(receptacleAtLocation {rid} {rec_loc[rid]})")
        if cls in OPENABLE:
            lines.append(f"(openable {rid})")
    for r in rtypes:
        lines += [f"(canContain {r}Type {o}Type)" for o in otypes if o in CAN_HOLD[r]]
    for cls, oid, where in all_objects:
        lines += [f"(objectType {oid} {cls}Type)", f"(inReceptacle {oid} {where})",
                  f"(objectAtLocation {oid} {rec_loc[where]})"]
        if cls == "DeskLamp":
            lines.append(f"(toggleable {oid})")
            continue
        lines.append(f"(pickupable {oid})")
        if cls in alfred_constants.MOVABLE_RECEPTACLES_SET:
            lines.append(f"(isReceptacleObject {oid})")
        for predicate, group in ABILITIES.items():
            if cls in alfred_constants.VAL_ACTION_OBJECTS[group]:
                lines.append(f"({predicate} {oid})")
    lines.append(")")
    goal = goal_library.gdict[alfred_type]["pddl"].format(
        obj=params["object_target"], recep=params["parent_target"],
        toggle=params["toggle_target"], mrecep=params["mrecep_target"])
    # the library writes `?r # receptacle` (ALFRED's pre-mangling form) and closes `(define` itself
    return "\n".join(lines) + "\n" + goal.replace("#", "-").strip() + "\n"


def game_json(problem: str, traj_data: dict, seed: int) -> dict:
    """The `game.tw-pddl` content: domain, grammar with the task sentence, problem."""
    domain = (ALFWORLD_DATA / "alfred.pddl").read_text()
    grammar = (ALFWORLD_DATA / "alfred.twl2").read_text()
    with seeded_global_random(seed):   # the sentence template is drawn with `random.choice`
        grammar = add_task_to_grammar(grammar, traj_data)
    return {"pddl_domain": domain, "grammar": grammar, "pddl_problem": problem, "solvable": True}


# ---------------------------------------------------------------------------------------------
# Expert check and split generation
# ---------------------------------------------------------------------------------------------

def expert_solves(game_file: Path, max_steps: int = EXPERT_STEPS) -> int | None:
    """Play the game with alfworld's hand-coded expert (with the pick-two fix,
    `alfworld_engine.PutTrackingExpert`); the number of steps to win, or None when it does not win
    within `max_steps` (or crashes)."""
    try:
        game = load_game(str(game_file))
        state = game.reset()
        if state["won"]:
            return None           # a goal that is already true is no task
        for step in range(1, max_steps + 1):
            action = game.expert_next_action()
            if action is None:
                return None
            state, _, done = game.step(action)
            if state["won"]:
                return step
        return None
    except Exception:              # the engine or the expert rejected the draw
        return None


def _make_game(job: tuple) -> dict:
    """Fill game slot `index` of a split: try seeds until the expert wins within the world's horizon.
    Runs in a worker. `job` is (split salt, index, task type, folder[, world]; default "full")."""
    split, index, task_type, folder, world = job if len(job) == 5 else (*job, "full")
    for attempt in range(200):
        seed = int(hashlib.sha256(f"{split}/{index}/{attempt}".encode()).hexdigest()[:12], 16)
        game = draw_game(seed, task_type, world)
        game_dir = Path(folder) / f"{index:04d}_{task_type}"
        game_dir.mkdir(parents=True, exist_ok=True)
        (game_dir / "traj_data.json").write_text(json.dumps(game["traj_data"], indent=1))
        (game_dir / "game.tw-pddl").write_text(json.dumps(game_json(game["pddl_problem"], game["traj_data"], seed)))
        steps = expert_solves(game_dir / "game.tw-pddl", WORLDS[world]["max_steps"])
        if steps is not None:
            return {"index": index, "dir": game_dir.name, "seed": seed, "task_type": task_type,
                    "fingerprint": game["fingerprint"], "expert_steps": steps, "attempts": attempt + 1,
                    "n_receptacles": game["n_receptacles"], "n_objects": game["n_objects"]}
        shutil.rmtree(game_dir)   # unsolvable draw: discarded, never shipped
    raise RuntimeError(f"no solvable game for {split} slot {index} ({task_type}) in 200 draws")


def split_dir_name(split: str, n_games: int, world: str = "full", kept_apart_from: str = "") -> str:
    """Cache folder name of a split; full-world names are those from before small worlds existed.
    `kept_apart_from` names the splits it was checked against (e.g. "_vs240")."""
    return f"{split}{'' if world == 'full' else '_' + world}_n{n_games}{kept_apart_from}_v{GENERATOR_VERSION}"


def generate_split(split: str, n_games: int, out_dir: Path, exclude: set[str] = frozenset(),
                   workers: int | None = None, progress: bool = True, world: str = "full") -> list[dict]:
    """Write `n_games` expert-solvable games of `world` size to `out_dir` (which must not exist yet).

    Task types cycle in slot order (slot i has type i mod 6), so any prefix of the split covers
    the types evenly. Games whose fingerprint is in `exclude` (another split's) are redrawn.
    """
    salt = SPLIT_SALT.get(split, 3)
    types = list(TASK_TYPES)
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    start, records = time.time(), []
    try:
        jobs = [(f"{salt}", i, types[i % len(types)], str(tmp), world) for i in range(n_games)]
        workers = workers or min(len(jobs), os.cpu_count() or 1, 8)
        # worker processes: a crashed worker raises (BrokenProcessPool) instead of hanging
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
        results = pool.map(_make_game, jobs) if pool else map(_make_game, jobs)
        try:
            for record in tqdm(results, total=n_games, desc=f"{split} games ({world} world)",
                               disable=None if progress else True):  # None: no bar in a pipe or a log file
                records.append(record)
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
        # disjointness: redraw (serially, with fresh attempts) any game seen in `exclude`
        for record in records:
            clash = 0
            while record["fingerprint"] in exclude:
                clash += 1
                shutil.rmtree(tmp / record["dir"])
                job = (f"{salt}/clash{clash}", record["index"], record["task_type"], str(tmp), world)
                record.update(_make_game(job))
        fingerprints = [r["fingerprint"] for r in records]
        manifest = {"split": split, "n_games": n_games, "version": GENERATOR_VERSION, "world": world,
                    "seconds": round(time.time() - start, 1), "games": records,
                    "duplicates_within_split": len(fingerprints) - len(set(fingerprints))}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if progress:  # one whole line also when the bar is off (a pipe or a log file)
            print(f"[worlds] generated {n_games} {split} games ({world} world) in {manifest['seconds']:.0f}s",
                  file=sys.stderr, flush=True)
        try:
            os.rename(tmp, out_dir)        # atomic: readers see all of the split or none of it
        except OSError:
            if not (out_dir / "manifest.json").exists():
                raise
            shutil.rmtree(tmp)             # another process finished the same split first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return records


def ensure_split(split: str, n_games: int | None = None, train_games: int | None = None,
                 workers: int | None = None, world: str = DEFAULT_WORLD, eval_games: int | None = None) -> Path:
    """Folder of the generated `split` ("train", "eval" or "fresh") of `world` size, generating it on first use.

    The eval split is drawn from its own seed range and checked against the train split of
    `train_games` games (default size 240), so that no game (room, contents, goal) is in both.
    The fresh split (games for RL rollouts that the warm start never cloned on) has a third seed
    range and is checked against that train split and the eval split of `eval_games` games (default
    60). Slot i does not depend on the split size, so a smaller split is a prefix of a larger one.
    """
    if split not in DEFAULT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(DEFAULT_SIZES)}")
    if world not in WORLDS:
        raise ValueError(f"unknown ALFWorld world size {world!r}; expected one of {sorted(WORLDS)}")
    n_games = n_games or DEFAULT_SIZES[split]
    train_games = train_games or DEFAULT_SIZES["train"]
    eval_games = eval_games or DEFAULT_SIZES["eval"]
    kept_apart_from = {"train": "", "eval": f"_vs{train_games}", "fresh": f"_vs{train_games}_ve{eval_games}"}[split]
    out_dir = cache_dir("alfworld") / split_dir_name(split, n_games, world, kept_apart_from)
    if (out_dir / "manifest.json").exists():
        return out_dir
    exclude: set[str] = set()
    if split in ("eval", "fresh"):
        exclude |= set(split_fingerprints(ensure_split("train", train_games, workers=workers, world=world)))
    if split == "fresh":
        exclude |= set(split_fingerprints(ensure_split("eval", eval_games, train_games=train_games,
                                                       workers=workers, world=world)))
    generate_split(split, n_games, out_dir, exclude=exclude, workers=workers, world=world)
    return out_dir


def split_fingerprints(folder: Path) -> list[str]:
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    return [g["fingerprint"] for g in manifest["games"]]


def game_files(folder: Path) -> list[Path]:
    """All `game.tw-pddl` files under `folder` (generated or official layout), in a stable order.

    Like alfworld's own loader, official games of the movable-receptacle and sliced variants are
    skipped (the text engine does not support them) and games not marked solvable are dropped.
    """
    found = []
    for path in sorted(Path(folder).rglob("game.tw-pddl")):
        if "movable" in str(path.parent) or "Sliced" in str(path.parent):
            continue
        if not (path.parent / "traj_data.json").exists():
            continue
        if not json.loads(path.read_text()).get("solvable", False):
            continue
        found.append(path)
    return found


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Generate the offline ALFWorld splits.")
    parser.add_argument("--split", choices=["train", "eval", "fresh", "both"], default="both",
                        help="both: train and eval (fresh: RL games the kept agent was not cloned on)")
    parser.add_argument("--games", type=int, default=None, help="games per split (default 240 / 60)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--world", choices=sorted(WORLDS), default=DEFAULT_WORLD, help="world size (default small)")
    args = parser.parse_args()
    for name in (["train", "eval"] if args.split == "both" else [args.split]):
        print(ensure_split(name, args.games, workers=args.workers, world=args.world))
