"""Prompt lists: JSONL files of general prompts, one {"prompt": ..., "expect": [...], "kind": ...} per line.

    rows = read_prompts("data/prompts/everyday.jsonl", "evaluate.kept.prompts")   # [{"prompt", "expect", "kind"}]
    shared = overlap(rehearsal_rows, everyday_rows)                              # prompts in both lists

Two ship with the project: data/prompts/rehearsal.jsonl, which the base model answers for rehearsal
(rehearse.prompts), and data/prompts/everyday.jsonl, the held-out set the evaluate stage measures what
fine-tuning kept on (evaluate.kept.prompts). The two must share no prompt, or the held-out set would measure recall.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from llmft.common import UserError


def read_prompts(path: str | Path, key: str) -> list[dict]:
    """The prompts of a JSONL file; `key` is the params key that names it, for the error messages.

    Each line is an object with a non-empty "prompt"; "expect" (a string or a list of strings, any of which marks
    the answer right) and "kind" (fact, writing, code, ...) are optional. UserError when the file is missing,
    empty, or a line is broken.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{key}: {path} not found; point {key} at a JSONL file of prompts") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{key}: {path} is not UTF-8 ({err}); save it as UTF-8") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{key}: {path} line {number} is not JSON ({err.msg}); fix or remove the line") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f'{key}: {path} line {number} has no "prompt" text; each line is {{"prompt": "..."}}')
        expect = row.get("expect") or []
        expect = [expect] if isinstance(expect, str) else expect
        if not isinstance(expect, list) or not all(isinstance(e, str) and e for e in expect):
            raise UserError(f'{key}: {path} line {number}: "expect" must be a string or a list of strings')
        rows.append({"prompt": prompt.strip(), "expect": expect, "kind": str(row.get("kind") or "")})
    if not rows:
        raise UserError(f"{key}: {path} holds no prompts; add one JSON line per prompt")
    return rows


def normalized(text: str) -> str:
    """Lower case, without whitespace or punctuation: two prompts that differ only there are the same prompt."""
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if unicodedata.category(c)[0] in "LN")


def overlap(rows: list[dict], other: list[dict]) -> list[str]:
    """The prompts of `rows` that `other` also holds (compared normalized)."""
    seen = {normalized(r["prompt"]) for r in other}
    return [r["prompt"] for r in rows if normalized(r["prompt"]) in seen]
