"""Map table columns to Alpaca fields (directly, by alias, or by templates) or pass ShareGPT through; clean.

Every example that is not kept is counted under one reason in DROP_REASONS.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from dataclasses import dataclass, field

from common import UserError
from params import DataParams

ALIASES = {
    "instruction": ("instruction", "prompt", "question", "query", "指令", "问题"),
    "input": ("input", "context", "输入", "上下文"),
    "output": ("output", "response", "answer", "completion", "target", "回答", "答案", "输出"),
    "system": ("system", "system_prompt"),
    "history": ("history",),
    "messages": ("conversations", "messages"),
}
DROP_REASONS = ("empty_instruction", "empty_output", "bad_history", "bad_conversation", "prompt_too_long",
                "output_too_long", "duplicate")
SHAREGPT_TAGS = {
    ("from", "value"): {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    ("role", "content"): {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant", "observation_tag": "observation",
                          "function_tag": "function_call", "system_tag": "system"},
}


@dataclass
class Built:
    kind: str  # "alpaca" or "sharegpt"
    examples_in: int = 0
    examples: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the prompt of each example: the split's no-leak unit
    fields: set[str] = field(default_factory=set)
    tags: dict[str, str] = field(default_factory=dict)
    dropped: Counter = field(default_factory=Counter)
    prompt_chars: list[int] = field(default_factory=list)
    output_chars: list[int] = field(default_factory=list)


def text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value.strip() if isinstance(value, str) else str(value).strip()


def resolve_columns(names: list[str], explicit: dict[str, str]) -> dict[str, str]:
    """Return {alpaca field: column}, from data.columns first, then from ALIASES (case-insensitive)."""
    for fld, col in explicit.items():
        if col not in names:
            raise UserError(f"data.columns.{fld} names column {col!r}, which is not in the table; columns found: {', '.join(names)}")
    lower = {n.strip().lower(): n for n in names}
    found = dict(explicit)
    for fld, aliases in ALIASES.items():
        if fld not in found:
            col = next((lower[a] for a in aliases if a in lower), None)
            if col is not None:
                found[fld] = col
    if "messages" in found and not {"instruction", "output"} <= found.keys():
        return found
    missing = [f for f in ("instruction", "output") if f not in found]
    if missing:
        tried = "; ".join(f"{f} <- {'/'.join(ALIASES[f])}" for f in missing)
        raise UserError(f"cannot map columns to {' and '.join(missing)}: columns found: {', '.join(names)}; aliases "
                        f"tried: {tried}; set data.columns (e.g. {{instruction: my_col}}) or data.templates")
    return found


def _check_templates(p: DataParams, names: list[str]) -> list[dict[str, str]]:
    templates = []
    for n, tpl in enumerate(p.templates, start=1):
        fields = {k: v for k, v in tpl.model_dump().items() if v}
        for fld, fmt in fields.items():
            try:
                used = [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
            except ValueError as exc:
                raise UserError(f"data.templates[{n}].{fld}: bad template {fmt!r}: {exc}") from None
            for name in used:
                if name not in names:
                    raise UserError(f"data.templates[{n}].{fld} uses column {{{name}}}, which is not in the table; "
                                    f"columns found: {', '.join(names)}")
        templates.append(fields)
    return templates


def _history(value):
    """History as [[user, assistant], ...]; JSON text from CSV cells is parsed. None when malformed."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    ok = isinstance(value, list) and all(isinstance(t, (list, tuple)) and len(t) == 2 for t in value)
    return [[text(a), text(b)] for a, b in value] if ok else None


def _keep(built: Built, p: DataParams, seen: set, example: dict, key: str, prompt_len: int, output_len: int) -> None:
    if p.max_prompt_chars and prompt_len > p.max_prompt_chars:
        built.dropped["prompt_too_long"] += 1
        return
    if p.max_output_chars and output_len > p.max_output_chars:
        built.dropped["output_too_long"] += 1
        return
    if p.dedup:
        ident = json.dumps(example, ensure_ascii=False, sort_keys=True)
        if ident in seen:
            built.dropped["duplicate"] += 1
            return
        seen.add(ident)
    built.examples.append(example)
    built.keys.append(key)
    built.prompt_chars.append(prompt_len)
    built.output_chars.append(output_len)


def _alpaca(columns: dict[str, list], p: DataParams, built: Built) -> None:
    names = list(columns)
    templates = _check_templates(p, names) if p.templates else None
    mapping = None if templates else resolve_columns(names, p.columns)
    rows = zip(*columns.values())
    built.fields = {f for f in ("system", "history") if any(f in t for t in templates or [mapping])}
    seen: set[str] = set()
    for values in rows:
        row = dict(zip(names, values))
        if templates:
            cells = {k: text(v) for k, v in row.items()}
            candidates = [{f: fmt.format_map(cells).strip() for f, fmt in t.items()} for t in templates]
        else:
            candidates = [{f: row[c] for f, c in mapping.items() if f in ALIASES and f != "messages"}]
        for cand in candidates:
            built.examples_in += 1
            ex = {"instruction": text(cand.get("instruction")), "input": text(cand.get("input")),
                  "output": text(cand.get("output"))}
            if "system" in built.fields:
                ex["system"] = text(cand.get("system"))
            if "history" in built.fields:
                ex["history"] = _history(cand.get("history"))
            reason = ("empty_instruction" if not ex["instruction"] else "empty_output" if not ex["output"]
                      else "bad_history" if ex.get("history", []) is None else None)
            if reason:
                built.dropped[reason] += 1
                continue
            key = ex["instruction"] + "\x1f" + ex["input"]
            _keep(built, p, seen, ex, key, len(ex["instruction"]) + len(ex["input"]), len(ex["output"]))


def _sharegpt(columns: dict[str, list], p: DataParams, built: Built, found: dict[str, str]) -> None:
    system = columns[found["system"]] if "system" in found else None
    seen: set[str] = set()
    for i, conv in enumerate(columns[found["messages"]]):
        built.examples_in += 1
        if isinstance(conv, str):
            try:
                conv = json.loads(conv)
            except json.JSONDecodeError:
                conv = None
        style = next((s for s in SHAREGPT_TAGS if conv and isinstance(conv[0], dict) and set(s) <= conv[0].keys()), None)
        if not isinstance(conv, list) or style is None or any(not isinstance(m, dict) or not set(style) <= m.keys() for m in conv):
            built.dropped["bad_conversation"] += 1
            continue
        tags = built.tags = built.tags or SHAREGPT_TAGS[style]
        role, content = style
        turns = [{role: text(m[role]), content: text(m[content])} for m in conv]
        if tuple(style) != (tags["role_tag"], tags["content_tag"]) or not any(t[role] == tags["assistant_tag"] for t in turns):
            built.dropped["bad_conversation"] += 1
            continue
        if any(not t[content] for t in turns):
            built.dropped["empty_output"] += 1
            continue
        ex = {"conversations": turns}
        if system is not None:
            ex["system"] = text(system[i])
            built.fields.add("system")
        users = [t[content] for t in turns if t[role] != tags["assistant_tag"]]
        answers = [t[content] for t in turns if t[role] == tags["assistant_tag"]]
        _keep(built, p, seen, ex, "\x1f".join(users[:1]), sum(map(len, users)), sum(map(len, answers)))


def build_examples(columns: dict[str, list], p: DataParams) -> Built:
    """Turn table columns into examples, per data.templates, data.columns or the aliases."""
    if not p.templates:
        found = resolve_columns(list(columns), p.columns)
        if "messages" in found and not {"instruction", "output"} <= found.keys():
            built = Built("sharegpt")
            _sharegpt(columns, p, built, found)
            return built
    built = Built("alpaca")
    _alpaca(columns, p, built)
    return built
