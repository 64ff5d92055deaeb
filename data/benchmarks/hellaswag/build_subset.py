"""Build the shipped HellaSwag subset (test.jsonl, dev.jsonl here) from klosax/hellaswag_text_data.

    git clone https://github.com/klosax/hellaswag_text_data /tmp/hs
    git -C /tmp/hs checkout 1105d370f8340eac3c63a91fd1fa58e8999f9505
    python data/benchmarks/hellaswag/build_subset.py --source /tmp/hs/hellaswag_val_full.txt.bz2   # from the repo root

The source (sha256 50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b) is the 10,042 questions of
HellaSwag's validation split (rowanz/hellaswag data/hellaswag_val.jsonl, MIT licence; see NOTICE.md) as text,
6 lines per question: "activity label: context", the gold ending (0-3), then the 4 endings. Its extraction already
removed the WikiHow markup ([title], [step]...), as lm-eval's hellaswag task does.

The draw is deterministic and needs no seed: questions whose context occurs more than once, or whose context and
endings together are longer than --max-chars (cost: each ending is a forward pass over the whole context), are left
out, and the rest are ordered by the sha256 of their context and endings; the first --size go to test.jsonl, the
next --dev-size to dev.jsonl, the few-shot pool (lm-eval's hellaswag takes its examples from the train split, which
the source lacks).
Rows: query ("activity label: context"), endings (4 strings), label (0-3), split ("test" or "dev").
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

SOURCE_SHA256 = "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b"
QUESTIONS = 10_042  # HellaSwag's validation split


def read_source(path: Path) -> list[dict]:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"error: {path}: sha256 {digest}, expected {SOURCE_SHA256} (klosax/hellaswag_text_data@1105d37)")
    lines = bz2.decompress(raw).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != 6 * QUESTIONS:
        sys.exit(f"error: {path}: {len(lines)} lines, expected 6 per question x {QUESTIONS}")
    rows = []
    for i in range(0, len(lines), 6):
        query, label, *endings = lines[i : i + 6]
        if label not in ("0", "1", "2", "3") or not query.strip() or not all(e.strip() for e in endings):
            sys.exit(
                f"error: {path} line {i + 1}: expected a context, a label 0-3 and 4 endings, got {lines[i : i + 6]}"
            )
        rows.append({"query": query.strip(), "endings": [e.strip() for e in endings], "label": int(label)})
    return rows


def draw(rows: list[dict], size: int, dev_size: int, max_chars: int) -> tuple[list[dict], list[dict], Counter]:
    """(test rows, dev rows, dropped rows by reason), ordered by content hash; no context in both files."""
    contexts = Counter(r["query"] for r in rows)
    unique, dropped = [], Counter()
    for r in rows:
        if contexts[r["query"]] > 1:
            dropped["context repeated"] += 1
        elif len(r["query"]) + sum(len(e) for e in r["endings"]) > max_chars:
            dropped[f"longer than {max_chars} characters"] += 1
        else:
            unique.append(r)
    ranked = sorted(unique, key=lambda r: hashlib.sha256(json.dumps([r["query"], r["endings"]]).encode()).hexdigest())
    if len(ranked) < size + dev_size:
        sys.exit(f"error: only {len(ranked)} questions with a unique context; lower --size")
    test = [{**r, "split": "test"} for r in ranked[:size]]
    dev = [{**r, "split": "dev"} for r in ranked[size : size + dev_size]]
    return test, dev, dropped


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="hellaswag_val_full.txt.bz2 (klosax, 1105d37)")
    parser.add_argument("--out-dir", default=Path(__file__).parent, type=Path)
    parser.add_argument(
        "--size",
        type=int,
        default=400,
        help="test questions; 400 = stderr 2.4 points at SmolLM2-135M's ~40%%, more = tighter and slower",
    )
    parser.add_argument("--dev-size", type=int, default=10, help="few-shot pool (benchmark.num_fewshot <= this)")
    parser.add_argument(
        "--max-chars",
        type=int,
        default=400,
        help="longest context + 4 endings kept; 400 keeps the shortest fifth (2,023), a third of the median's cost",
    )
    args = parser.parse_args(argv)

    rows = read_source(args.source)
    test, dev, dropped = draw(rows, args.size, args.dev_size, args.max_chars)
    write_jsonl(args.out_dir / "test.jsonl", test)
    write_jsonl(args.out_dir / "dev.jsonl", dev)
    print(f"{len(rows)} questions (dropped: {dict(dropped)}); wrote {len(test)} test and {len(dev)} dev rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
