"""How many everyday facts (evaluate.kept.prompts) the base model gets right, and how long answering the set takes.

    python perf/everyday_base.py                                   # models/base, params.yaml's eval section
    python perf/everyday_base.py --prompts /tmp/more.jsonl --threads 1

The evaluate stage's own path: the chat template (load_chat_format + chat_rows), greedy_generate with
evaluate.max_new_tokens / batch_size / dtype, decode_answers, and kept.passes for the facts. It prints the facts
right per language, every wrong answer, and the seconds spent answering (model loading excluded): evaluate
answers the set twice (base and tuned), so its cost is about twice that.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

from llmft.data.prompts import read_prompts
from llmft.infer.chat_format import chat_rows, decode_answers, load_chat_format
from llmft.infer.decode import greedy_generate
from llmft.infer.loading import load_model, set_threads
from llmft.kept import passes, prompt_language
from llmft.params import load_params
from llmft.predictions import KEPT

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(ROOT / "models/base"))
    parser.add_argument("--prompts", default=None, help="default: evaluate.kept.prompts")
    parser.add_argument("--threads", type=int, default=None, help="default: evaluate.num_threads")
    args = parser.parse_args(argv)
    p = load_params(ROOT / "params.yaml").evaluateuate
    items = read_prompts(args.prompts or ROOT / p.kept.prompts, "evaluate.kept.prompts")
    fmt = load_chat_format(Path(args.base), p.cutoff_len)
    rows = chat_rows(KEPT, items, fmt)
    threads = set_threads(p.num_threads if args.threads is None else args.threads)
    model = load_model(fmt, p.dtype)
    start = time.perf_counter()
    ids = greedy_generate(
        model, [r["prompt_ids"] for r in rows], fmt.stop_ids, fmt.pad_id, p.max_new_tokens, p.batch_size
    )
    seconds = time.perf_counter() - start
    answers, _ = decode_answers(fmt, ids)
    right, total = collections.Counter(), collections.Counter()
    for row, answer in zip(rows, answers):
        ok = passes(answer, row["expect"])
        if ok is None:
            continue
        lang = prompt_language(row["prompt"])
        total[lang] += 1
        right[lang] += ok
        if not ok:
            print(f"WRONG [{lang}] {row['prompt']!r} -> {answer[:160]!r}  (expect {row['expect']})")
    for lang in sorted(total):
        print(f"{lang}: {right[lang]}/{total[lang]} facts right")
    print(f"all: {sum(right.values())}/{sum(total.values())} facts right, {len(rows)} prompts")
    print(f"answering: {seconds:.1f} s, {sum(map(len, ids))} tokens, {threads} threads, dtype {p.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
