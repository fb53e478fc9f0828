"""A training run on disk: every write atomic, every read checked, a cut save always recoverable.

    <out_dir>/<name>/
      config.json       the resolved Config (temp file + fsync + rename)
      metrics.jsonl     one JSON object per line, each appended and fsynced; rewritten atomically
                        on resume (lines after the checkpoint dropped, damaged lines kept aside in
                        metrics.jsonl.damaged)
      checkpoint/       model/ (Hugging Face format), trainer_state.pt (optimizer, RNG states),
                        state.json (updates, env steps, skill bank; written last)

`save_checkpoint` writes checkpoint.tmp/, fsyncs it, then rotates: checkpoint -> checkpoint.old,
checkpoint.tmp -> checkpoint, remove checkpoint.old. A kill at any point leaves at least one
complete folder among the three; `find_checkpoint` picks the newest complete one and
`finish_rotation` moves it back to checkpoint/, saying what it recovered. A damaged file (a cut
state.json, trainer_state.pt or model.safetensors, a missing config.json) is reported in one line.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

import policy

CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.jsonl.damaged", CHECKPOINT, CHECKPOINT_TMP,
             CHECKPOINT_OLD, "checkpoint.damaged")


class DamagedFile(ValueError):
    """A file of a run or model folder is missing, cut short or not what it should be."""


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk (before it is renamed into place)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def _rename(source: Path, target: Path) -> None:
    os.replace(source, target)


def _remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a kill leaves either the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _rename(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------

def holds_run(run_dir: Path) -> bool:
    """True when `run_dir` has a run's config, metrics or checkpoint."""
    return any((Path(run_dir) / name).exists() for name in ("config.json", "metrics.jsonl", CHECKPOINT,
                                                            CHECKPOINT_TMP, CHECKPOINT_OLD))


def clear_run(run_dir: Path) -> None:
    """Remove what a run wrote into `run_dir` (--overwrite); other files there are left alone."""
    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_dir():
            _remove_tree(path)
        elif path.exists():
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Checks of saved files (cheap: headers and sizes, not a full load)
# ---------------------------------------------------------------------------------------------

def check_safetensors(path: Path) -> None:
    """A safetensors file is whole: its header parses and the data it describes fits in the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or header_len > min(size - 8, 100 * 2 ** 20):
            raise DamagedFile(f"{path} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise DamagedFile(f"{path} has a damaged header ({type(err).__name__})") from None
    if 8 + header_len + end > size:
        raise DamagedFile(f"{path} is truncated ({size} of {8 + header_len + end} bytes)")


def check_torch_file(path: Path) -> None:
    """A torch.save file (a zip archive) is whole: its central directory, at the end, reads."""
    if not path.is_file():
        raise DamagedFile(f"{path} is missing")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise DamagedFile(f"{path} is truncated or not a torch file ({err})") from None


def check_model_folder(folder: Path) -> None:
    """A saved model folder (full model or LoRA adapter) has its config and whole weight files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DamagedFile(f"{folder} is not a folder")
    adapter = (folder / "adapter_config.json").exists()
    config = folder / ("adapter_config.json" if adapter else "config.json")
    if not config.exists():
        raise DamagedFile(f"{folder} has no config.json (not a saved model folder, or a cut save)")
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{config} is damaged ({type(err).__name__})") from None
    stem = "adapter_model" if adapter else "model"
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DamagedFile(f"{index} is damaged ({type(err).__name__})") from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise DamagedFile(f"{folder / shard} is missing")
            check_safetensors(folder / shard)
    elif (folder / f"{stem}.safetensors").is_file():
        check_safetensors(folder / f"{stem}.safetensors")
    elif (folder / ("adapter_model.bin" if adapter else "pytorch_model.bin")).is_file():
        check_torch_file(folder / ("adapter_model.bin" if adapter else "pytorch_model.bin"))
    else:
        raise DamagedFile(f"{folder} has no weights ({stem}.safetensors)")


def read_state(folder: Path) -> dict:
    """checkpoint/state.json as a dict with integer `updates` and `env_steps`."""
    path = Path(folder) / "state.json"
    if not path.is_file():
        raise DamagedFile(f"{path} is missing")
    try:
        state = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedFile(f"{path} is truncated or not JSON ({type(err).__name__})") from None
    if not (isinstance(state, dict) and isinstance(state.get("updates"), int) and state["updates"] >= 0
            and isinstance(state.get("env_steps"), int)):
        raise DamagedFile(f"{path} lacks integer 'updates' / 'env_steps'")
    return state


def check_checkpoint(folder: Path) -> dict:
    """The state of a complete checkpoint folder; DamagedFile names the first bad file."""
    state = read_state(folder)
    check_torch_file(Path(folder) / "trainer_state.pt")
    check_model_folder(Path(folder) / "model")
    return state


# ---------------------------------------------------------------------------------------------
# Checkpoints: save (atomic rotation), find after a kill, load
# ---------------------------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, state: dict, weights: dict | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Write checkpoint.tmp/ in full (state.json last), flush it, then rotate it into checkpoint/.
    `weights` and `optimizer_state` (FSDP: gathered whole) replace the model's and optimizer's own."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / CHECKPOINT_TMP, run_dir / CHECKPOINT, run_dir / CHECKPOINT_OLD
    _remove_tree(tmp)
    tmp.mkdir(parents=True)
    policy.save_policy(model, tokenizer, tmp / "model", weights)
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    _fsync_tree(tmp)
    if final.exists():
        _remove_tree(old)
        _rename(final, old)
    _rename(tmp, final)
    _fsync_dir(run_dir)
    _remove_tree(old)


def find_checkpoint(run_dir: Path) -> tuple[str, dict, list[str]]:
    """(name of the newest complete checkpoint folder, its state, notes on the others). Read-only.

    Candidates: checkpoint/, checkpoint.tmp/ (a save cut before or during its rotation),
    checkpoint.old/ (the previous one, while rotating). Ties go to checkpoint/. Raises
    SystemExit with one line when none is complete.
    """
    run_dir = Path(run_dir)
    found, problems = [], []
    for rank, name in enumerate((CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD)):
        if (run_dir / name).exists():
            try:
                found.append((check_checkpoint(run_dir / name)["updates"], -rank, name))
            except DamagedFile as err:
                problems.append(f"{name}/: {err}")
    if not found:
        why = "; ".join(problems) if problems else "no checkpoint/ folder"
        raise SystemExit(f"--resume {run_dir}: no complete checkpoint ({why})")
    _, _, best = max(found)
    notes = [f"ignored a damaged {p}" for p in problems]
    if best != CHECKPOINT:
        notes.append(f"recovered the checkpoint of update {max(found)[0]} from {best}/ (a save was cut short)")
    return best, read_state(run_dir / best), notes


def finish_rotation(run_dir: Path, best: str) -> Path:
    """Move the chosen checkpoint folder to checkpoint/. What was there goes to checkpoint.old/ when
    it is complete (the next save removes it), to checkpoint.damaged/ (kept for a look) when not."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    if best != CHECKPOINT:
        if final.exists():
            try:
                check_checkpoint(final)
                aside = run_dir / CHECKPOINT_OLD
            except DamagedFile:
                aside = run_dir / "checkpoint.damaged"
            if aside.name != best:
                _remove_tree(aside)
            _rename(final, aside)
        _rename(run_dir / best, final)
        _fsync_dir(run_dir)
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    """trainer_state.pt's optimizer and RNG states; one clear line when it cannot be read."""
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as err:  # a damaged archive raises RuntimeError, EOFError, pickle errors...
        raise SystemExit(f"cannot read {path}: {type(err).__name__}: {str(err)[:200]}") from None
    missing = {"optimizer", "torch_rng", "numpy_rng", "python_rng"} - set(saved if isinstance(saved, dict) else ())
    if missing:
        raise SystemExit(f"{path} lacks {sorted(missing)}")
    return saved


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def load_metrics(path: Path, completed_updates: int) -> tuple[list[dict], list[str]]:
    """(records up to the checkpoint, damaged lines). Lines written after the last checkpoint are
    dropped (the resumed run writes them again); a line cut by a kill, or one that is valid JSON
    but not a record object, is returned as damaged so the caller can keep it aside."""
    kept, damaged = [], []
    if Path(path).exists():
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            updates = record.get("updates", 0) if isinstance(record, dict) else None
            if not isinstance(updates, (int, float)) or isinstance(updates, bool):
                if line.strip():
                    damaged.append(line)
                continue
            if updates <= completed_updates:
                kept.append(record)
    return kept, damaged


def rewrite_metrics(path: Path, records: list[dict], damaged: list[str]) -> None:
    """metrics.jsonl := `records` (atomically); damaged lines are appended to metrics.jsonl.damaged."""
    path = Path(path)
    if damaged:
        with path.with_name(path.name + ".damaged").open("a") as f:
            f.write("".join(line + "\n" for line in damaged))
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(path: Path, record: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
