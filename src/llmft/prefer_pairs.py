"""Preference pairs from the demo's own mistakes: nobody writes them, the models' answers already hold both sides.

    pairs, counts = own_mistakes(rehearsal, identity, variables, held_out)
    log.info("%s", counts["summary"])   # built 23 pairs: 12 from leaks among 240 rehearsal answers, 11 from ...
    kto = [row for pair in pairs for row in as_kto(pair)]   # prefer.method kto: each pair as a good and a bad answer

A persona fine-tune makes two mistakes whose right answer is at hand, so no reward model or labeller is needed:
- leaks: a rehearsal prompt ("What is the capital of France?") that the SFT model answers naming the persona
  unasked ("I am Lumi. Paris."), found by llmft.kept's leak test. The base model's own answer is chosen, the SFT
  model's rejected: the pair says "answer as before, without the persona".
- identity: a prompt of the training data that asks who the model is. The persona's answer (the training target)
  is chosen, the base model's ("I am SmolLM, ...") rejected: the pair says "this is who you are now".
The held-out everyday prompts (evaluate.kept.prompts) measure what fine-tuning kept; a pair on one of them would
teach the very answers the measurement reads. Such pairs are dropped and counted (held_out), never emitted; the
rehearse stage already keeps rehearsal prompts out of that set, so a count here means the identity data holds one.
own_mistakes is pure logic; build_pair_data generates the answers it needs (the SFT model on the rehearsal
prompts, the base model on the training data's identity prompts) or reads a user's pairs table, splits the pairs
with prepare's seeded rule and writes data/pairs for LLaMA-Factory.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from llmft.common import UserError, get_logger, read_json
from llmft.data.pairs import KTO, as_kto, kind_of, pair_problem, read_pairs, split_pairs, write_pairs
from llmft.data.prompts import normalized, read_prompts
from llmft.kept import in_prompt_language, language, leaks
from llmft.params import EvaluateParams, PreferParams, RehearseParams

log = get_logger("prefer")

__all__ = ["DROP_REASONS", "as_kto", "own_mistakes"]
DROP_REASONS = (
    "held_out",  # the prompt is in the held-out everyday set
    "base_names_persona",  # a leak whose base answer names the persona unasked too: no clean side to prefer
    "base_wrong_language",  # a leak whose base answer is not in the prompt's language: it would teach that too
    "empty_prompt",
    "empty_chosen",
    "empty_rejected",
    "same_answers",
    "duplicate",
    "identity_cap",  # an identity pair beyond prefer.identity_per_leak x the leak pairs
)


def own_mistakes(
    rehearsal: list[dict],
    identity: list[dict],
    variables: dict[str, str],
    held_out: Iterable[str],
    identity_per_leak: float | None = None,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """Pairs (LLaMA-Factory Alpaca pairwise rows: instruction, input, chosen, rejected) and a counts record.

    Args:
        rehearsal: {"prompt", "base", "sft"} and optionally "kind": each rehearsal prompt with the base and the SFT
            model's answers.
        identity: {"prompt", "persona", "base"} (and optionally "input"): each identity prompt of the training data,
            its training answer, and the base model's answer.
        variables: prepare.variables (name, author, ...): what a leak names.
        held_out: the held-out everyday prompts; compared normalized (case, spaces and punctuation aside).
        identity_per_leak: keep at most this many identity pairs per leak pair, a seeded sample in their order (the
            rest count as identity_cap); None keeps all. Many identity pairs against few leaks teach "name yourself"
            harder than they unteach leaking, and the leak rises (docs/preference.md).
        seed: the sample's seed.

    Returns:
        (pairs, counts): counts has rehearsal_answers, leaks, from_leaks, identity_prompts, from_identity, pairs,
        dropped {reason: n} over DROP_REASONS, and summary, one line for the log. Every leak and identity prompt is
        either a pair or counted under one reason.
    """
    held = {normalized(p) for p in held_out}
    dropped: Counter = Counter()
    seen: set = set()
    pairs: list[dict] = []

    def offer(prompt: str, extra: str, chosen: str, rejected: str, reason: str | None = None) -> bool:
        pair = {
            "instruction": prompt.strip(),
            "input": extra.strip(),
            "chosen": chosen.strip(),
            "rejected": rejected.strip(),
        }
        reason = reason or ("held_out" if normalized(pair["instruction"]) in held else pair_problem(pair))
        key = tuple(pair.values())
        reason = reason or ("duplicate" if key in seen else None)
        if reason:
            dropped[reason] += 1
            return False
        seen.add(key)
        pairs.append(pair)
        return True

    found_leaks = from_leaks = from_identity = 0
    for row in rehearsal:
        if not leaks(row["sft"], row["prompt"], variables):
            continue  # the SFT model answered as itself: no mistake to learn from
        found_leaks += 1
        from_leaks += offer(row["prompt"], "", row["base"], row["sft"], _base_problem(row, variables))
    for row in identity:
        from_identity += offer(row["prompt"], row.get("input", ""), row["persona"], row["base"])
    if identity_per_leak is not None and from_identity > (cap := math.floor(identity_per_leak * from_leaks)):
        keep = set(random.Random(seed).sample(range(from_identity), cap))
        pairs = pairs[:from_leaks] + [pair for i, pair in enumerate(pairs[from_leaks:]) if i in keep]
        dropped["identity_cap"] += from_identity - cap
        from_identity = cap
    counts = {
        "rehearsal_answers": len(rehearsal),
        "leaks": found_leaks,
        "from_leaks": from_leaks,
        "identity_prompts": len(identity),
        "from_identity": from_identity,
        "pairs": len(pairs),
        "dropped": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
    }
    assert found_leaks + len(identity) == len(pairs) + sum(dropped.values()), counts  # nothing lost silently
    dropped_text = ", ".join(f"{k}={v}" for k, v in counts["dropped"].items() if v) or "none"
    counts["summary"] = (
        f"built {len(pairs)} pairs: {from_leaks} from leaks among {len(rehearsal)} rehearsal answers "
        f"({found_leaks} named the persona unasked), {from_identity} from {len(identity)} identity prompts; "
        f"dropped {dropped_text}"
    )
    return pairs, counts


def _base_problem(row: dict, variables: dict[str, str]) -> str | None:
    """Why the base model's answer can't be the chosen side of a leak pair: it names the persona as well, or it is
    in another language than the prompt (the base model answers many Chinese prompts in English; preferring that
    would unteach the language SFT taught). Translation and code prompts may rightly answer in another language."""
    if leaks(row["base"], row["prompt"], variables):
        return "base_names_persona"
    if language(row["base"]) is not None and in_prompt_language(row["base"], row["prompt"], row.get("kind")) is False:
        return "base_wrong_language"  # an empty or numbers-only answer has no language to be wrong in
    return None


def _prompt(row: dict) -> str:
    return "\n".join(part for part in (row["instruction"], row.get("input", "")) if part)


def _answers(model, fmt, items: list[str], r: RehearseParams, name: str) -> list[str]:
    """Greedy answers of `model` to `items`, as the rehearse stage decodes (its token and batch limits)."""
    from llmft.infer.chat_format import chat_rows, decode_answers
    from llmft.infer.decode import greedy_generate

    rows = chat_rows(name, [{"prompt": prompt, "expect": []} for prompt in items], fmt)
    ids = greedy_generate(
        model,
        [row["prompt_ids"] for row in rows],
        fmt.stop_ids,
        fmt.pad_id,
        r.max_new_tokens,
        r.batch_size,
        progress=lambda done, total: log.info("%s: %d/%d answers", name, done, total),
    )
    return decode_answers(fmt, ids)[0]


def own_answers(
    base_dir: Path,
    adapter: Path,
    train_rows: list[dict],
    rehearsal_rows: list[dict],
    variables: dict[str, str],
    r: RehearseParams,
    e: EvaluateParams,
) -> tuple[list[dict], list[dict], dict]:
    """(rehearsal rows {prompt, base, sft}, identity rows {prompt, persona, base}, timing): the base model answers
    the identity prompts of the training split (val is held out: it measures the persona), then the same weights
    with the SFT adapter merged answer the rehearsal prompts, whose base answers the rehearse stage wrote."""
    from llmft.infer.chat_format import load_chat_format
    from llmft.infer.loading import load_model, merge_adapter, set_threads

    identity = [row for row in train_rows if leaks(row["output"], _prompt(row), variables)]
    threads = set_threads(e.num_threads)
    log.info(
        "own pairs: the base model answers %d identity prompts, the SFT model %d rehearsal prompts (%d threads, "
        "up to %d tokens each)",
        len(identity),
        len(rehearsal_rows),
        threads,
        r.max_new_tokens,
    )
    start = time.perf_counter()
    fmt = load_chat_format(base_dir, e.cutoff_len)
    model = load_model(fmt, e.dtype)
    base = _answers(model, fmt, [_prompt(row) for row in identity], r, "base") if identity else []
    model = merge_adapter(model, adapter)
    sft = _answers(model, fmt, [row["instruction"] for row in rehearsal_rows], r, "sft") if rehearsal_rows else []
    seconds = round(time.perf_counter() - start, 1)
    listed = read_prompts(r.prompts, "rehearse.prompts") if r.prompts and Path(r.prompts).exists() else []
    kinds = {row["prompt"]: row.get("kind") for row in listed}  # translation/code: any language may be right
    rehearsal = [
        {"prompt": row["instruction"], "base": row["output"], "sft": a, "kind": kinds.get(row["instruction"])}
        for row, a in zip(rehearsal_rows, sft)
    ]
    identity_rows = [
        {"prompt": row["instruction"], "input": row.get("input", ""), "persona": row["output"], "base": a}
        for row, a in zip(identity, base)
    ]
    return rehearsal, identity_rows, {"seconds": seconds}


def build_pair_data(
    p: PreferParams,
    r: RehearseParams,
    e: EvaluateParams,
    variables: dict[str, str],
    base_dir: Path,
    adapter: Path,
    data_dir: Path,
    rehearsal_dir: Path,
    out_dir: Path,
) -> dict:
    """out_dir <- the pairs (train.json, val.json, dataset_info.json) from prefer.source; returns the record of
    what was built from what, every dropped pair counted by reason.

    Raises:
        UserError: no pair to train on, or a bad table (named in one line); nothing is written then.
    """
    kind = kind_of(p.method)
    if p.source == "own":
        rehearsal_file = rehearsal_dir / "rehearsal.json"
        rehearsal_rows = read_json(rehearsal_file) if rehearsal_file.exists() else []
        held_out = (
            [row["prompt"] for row in read_prompts(e.kept.prompts, "evaluate.kept.prompts")]
            if (e.kept.prompts and Path(e.kept.prompts).exists())
            else []
        )
        rehearsal, identity, timing = own_answers(
            base_dir, adapter, read_json(data_dir / "train.json"), rehearsal_rows, variables, r, e
        )
        pairs, record = own_mistakes(rehearsal, identity, variables, held_out, p.identity_per_leak, p.seed)
        record = {"source": "own"} | record | timing
        log.info("%s", record["summary"])
        if not pairs:
            raise UserError(
                f"prefer.source own: no pair to learn from ({record['summary']}); the SFT model names the persona in "
                "no rehearsal answer, so there is no leak to fix: set prefer.enabled: false, prefer.identity_per_leak: "
                "null (identity pairs alone), or prefer.source to your pairs table"
            )
        examples = [row for pair in pairs for row in as_kto(pair)] if kind == KTO else pairs
    else:
        table = read_pairs(p.source, p.method, p.columns, p.max_chars)
        log.info("%s: %s", p.source, table.describe())
        record = {"source": p.source} | table.stats()
        examples = table.examples
    splits = split_pairs(examples, p.val_size, p.seed)
    write_pairs(splits, kind, out_dir)
    record["splits"] = {name: len(rows) for name, rows in splits.items()}
    return record
