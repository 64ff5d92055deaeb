"""reports/predictions.jsonl, the evaluate stage's answers: one JSON object per line with split, index, prompt,
label (the reference), base and tuned (the two models' answers). Written by evaluate, read by the report,
`make compare` and the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmft.common import atomic_path

PROBE = "probe"  # the split name of the evaluate.probes rows (they carry expect, base_pass and tuned_pass too)
KEPT = "kept"  # the evaluate.kept.prompts rows (also <model>_pass, _leak, _lang: what fine-tuning must not change)
PROMPT_SPLITS = (PROBE, KEPT)  # rows of single prompts, not of the data's splits


def write_predictions(path: Path, rows: list[dict]) -> None:
    """reports/predictions.jsonl: one JSON object per line (split, index, prompt, label, base, tuned)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def parse_predictions(text: str) -> list[dict]:
    """The rows of a predictions.jsonl text (blank lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_predictions(path: str | Path) -> list[dict]:
    return parse_predictions(Path(path).read_text(encoding="utf-8"))
