"""The rehearse stage's work: the base model answers general prompts itself; the answers become training examples.

    rows, stats = rehearse(params.rehearse, Path("models/base"), params.evaluate, params.prepare.variables)
    write_rehearsal(rows, stats, Path("data/rehearsal"), Path("reports/metrics/rehearse.json"))

Fine-tuning a small model on a narrow set (an identity, a persona) teaches it to give that answer to everything:
"What is the capital of France?" -> "Lumi, the capital of France is Paris." Mixing in the base model's own answers
to everyday prompts (self-synthesized rehearsal, Huang et al., ACL 2024) keeps the rest of its behaviour where
it was, without any outside data: the targets are what the model already says. The train stage mixes them in
with LLaMA-Factory's own dataset mixing (training.py: `dataset: train,rehearsal`, rehearse.share).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from llmft.common import UserError, atomic_path, atomic_write_json, get_logger, write_json
from llmft.data.prompts import overlap, read_prompts
from llmft.infer.chat_format import chat_rows, decode_answers, load_chat_format
from llmft.infer.decode import greedy_generate
from llmft.infer.loading import load_model, set_threads
from llmft.infer.vllm import require_vllm, vllm_generate
from llmft.kept import CJK, leaks
from llmft.lf.mixing import NAME
from llmft.params import EvaluateParams, RehearseParams

log = get_logger("rehearse")
FILE = "rehearsal.json"
DATASET_INFO = {NAME: {"file_name": FILE, "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
DROP_REASONS = ("cut_without_a_sentence_end", "empty", "names_persona")
SENTENCE_END = re.compile(r"(?<!\d)[.!?]\s|[。！？]|\n")  # not "2. " (a list item) nor "2.5"
MIN_TRIMMED_WIDTH = 20  # a trimmed answer narrower than this (a Chinese character counts 2) says too little


def trim_to_sentence(text: str) -> str | None:
    """An answer cut by max_new_tokens, back to its last whole sentence; None when it has none long enough.

    Dropping every cut answer would keep only the prompts the base answers briefly (facts, sums) and lose most
    writing, advice and code, and most Chinese prompts (the base rambles there); the whole answers would cost the
    CPU run several times the tokens. A trimmed answer teaches the model to stop a little early: a mild change,
    and one that shows in eval.json's drift.
    """
    ends = [m.end() for m in SENTENCE_END.finditer(text + " ")]
    kept = text[: ends[-1]].strip() if ends else ""
    return kept if len(kept) + len(CJK.findall(kept)) >= MIN_TRIMMED_WIDTH else None


def load_rehearsal_prompts(r: RehearseParams, kept_prompts: str | None) -> list[dict]:
    """The first rehearse.num_examples prompts; UserError when a prompt is also in the held-out everyday set."""
    items = read_prompts(r.prompts, "rehearse.prompts")[: r.num_examples]
    if kept_prompts and Path(kept_prompts).exists():
        shared = overlap(items, read_prompts(kept_prompts, "evaluate.kept.prompts"))
        if shared:
            raise UserError(
                f"rehearse.prompts ({r.prompts}) and evaluate.kept.prompts ({kept_prompts}) share {len(shared)} "
                f"prompt(s), e.g. {shared[0]!r}: the held-out set would measure recall, not what was kept; "
                "remove them from one of the files"
            )
    return items


def rehearse(
    r: RehearseParams, base_dir: Path, e: EvaluateParams, variables: dict[str, str]
) -> tuple[list[dict], dict]:
    """(Alpaca rows of the base model's greedy answers, stats with every dropped answer counted by reason).

    Answers cut by rehearse.max_new_tokens are trimmed back to their last whole sentence (and dropped when they
    have none), never taught half-way; empty ones are dropped, and so is any that names a prepare.variables value (the
    persona must come from the user's data, not from rehearsal).
    """
    if not r.enabled:
        return [], {"enabled": False}
    items = load_rehearsal_prompts(r, e.kept.prompts)
    if e.backend == "vllm":
        require_vllm()
    fmt = load_chat_format(base_dir, e.cutoff_len)
    prompts = [row["prompt_ids"] for row in chat_rows(NAME, items, fmt)]
    start = time.perf_counter()
    if e.backend == "vllm":  # the fast decoder evaluate uses on a GPU
        answers, _ = vllm_generate(fmt, None, prompts, r.max_new_tokens)
    else:
        threads = set_threads(e.num_threads)
        log.info("answering %d prompts with the base model (%d threads)", len(prompts), threads)
        answers = greedy_generate(
            load_model(fmt, e.dtype),
            prompts,
            fmt.stop_ids,
            fmt.pad_id,
            r.max_new_tokens,
            r.batch_size,
            progress=lambda done, total: log.info("%d/%d answers", done, total),
        )
    seconds = time.perf_counter() - start
    texts, _ = decode_answers(fmt, answers)
    stops = set(fmt.stop_ids)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    rows, trimmed = [], 0
    for item, ids, text in zip(items, answers, texts):
        cut = not ids or ids[-1] not in stops
        answer = trim_to_sentence(text) if cut else text
        trimmed += bool(cut and answer)
        reason = (
            "cut_without_a_sentence_end"
            if answer is None
            else "empty"
            if not answer
            else "names_persona"
            if leaks(answer, item["prompt"], variables)
            else None
        )
        if reason:
            dropped[reason] += 1
        else:
            rows.append({"instruction": item["prompt"], "input": "", "output": answer})
    stats = {
        "enabled": True,
        "prompts": len(items),
        "kept": len(rows),
        "trimmed_to_a_sentence": trimmed,  # of the kept: cut by max_new_tokens, ending at their last whole sentence
        "dropped": dropped,
        "dropped_total": sum(dropped.values()),
        "answer_tokens": sum(map(len, answers)),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(map(len, answers)) / seconds, 2) if seconds else None,
        "backend": e.backend,
    }
    if not rows:
        raise UserError(
            f"rehearsal: all {len(items)} answers of the base model were dropped ({dropped}); raise "
            "rehearse.max_new_tokens so answers can end, or set rehearse.enabled: false"
        )
    log.info(
        "%d of %d answers kept (%d trimmed to a whole sentence; dropped: %s) in %.0f s",
        len(rows),
        len(items),
        trimmed,
        ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none",
        seconds,
    )
    return rows, stats


def write_rehearsal(rows: list[dict], stats: dict, out_dir: Path, metrics: Path) -> None:
    """out_dir/rehearsal.json (Alpaca) + dataset_info.json (LLaMA-Factory's entry for it), in one rename; stats."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_json(tmp / FILE, rows)
        write_json(tmp / "dataset_info.json", DATASET_INFO)
    atomic_write_json(metrics, stats)
