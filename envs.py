"""The environment contract every environment shares: the cache folder, response parsing, validity, ranking.

docs/method.md §12 (and §2 for parsing; arXiv 2606.26790). Every environment is a single-copy
class with the same small interface (`reset(task_index)`, `step(raw_response_text)`, `prompt()`,
`expert_action()`); the trainer keeps B*N copies in a list and steps them in lock-step. The
environments live in their own modules (`alfworld_env.py`, `webshop.py`, `searchqa.py`) and import
this one; `environments.make_env` picks one by name. This module imports no environment.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def cache_dir(*parts: str) -> Path:
    """Folder for generated games, catalogues, corpora and model caches (git-ignored).

    `$OPID_CACHE` overrides the default `<repo>/.cache/opid`.
    """
    root = Path(os.environ.get("OPID_CACHE", Path(__file__).resolve().parent / ".cache" / "opid"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the (at most) k highest positive scores, highest first, equal scores in index
    order. A plain top-k selection (bm25s's `retrieve`) orders equal scores differently from one
    numpy version to the next; a search page or a retrieved passage list must not."""
    k = min(k, len(scores))
    if k <= 0:
        return []
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]      # the k-th highest score
    candidates = np.flatnonzero((scores >= kth) & (scores > 0))         # every tie at the cut too
    ranked = candidates[np.lexsort((candidates, -scores[candidates]))]
    return [int(i) for i in ranked[:k]]


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
VALIDITY_RULES = ("format", "admissible")  # what makes a step invalid, see parse_response / each step()


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
