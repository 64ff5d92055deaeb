"""Stage `evaluate`: answer every val (and test) prompt with the base and the fine-tuned model; score both.

    dvc repro evaluate           # or: make eval
    python src/evaluate.py --params params.yaml --data-dir data/processed --base models/base \
        --adapter models/lora --metrics reports/metrics/eval.json --predictions reports/predictions.jsonl

Reads `eval:` in params.yaml. Both models get the same prompts, built by the LLaMA-Factory template the
adapter was trained with, and the same greedy decoding. Writes reports/metrics/eval.json (base, tuned and
delta = tuned - base, per split; `dvc metrics diff` compares runs) and reports/predictions.jsonl (one line
per example: split, index, prompt, label, base and tuned answers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation as gen  # noqa: E402
from common import UserError, atomic_path, atomic_write_json, get_logger, run_main, write_environment  # noqa: E402
from metrics import METHOD, llamafactory_metrics, text_metrics  # noqa: E402
from params import EvalParams, load_params  # noqa: E402

log = get_logger("evaluate")
SPLITS = ("val", "test")  # test is optional (data.test_size: 0 writes none)


def load_rows(data_dir: Path, name: str, max_examples: int | None) -> list:
    """The first `max_examples` rows of one split; UserError when the file is missing, broken or empty."""
    file = data_dir / f"{name}.json"
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: not found; run `dvc repro prepare` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: not valid UTF-8 JSON ({err}); rerun `dvc repro prepare`") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{file}: expected a non-empty JSON list of examples; raise data.val_size "
                        "(or data.test_size) and rerun `dvc repro prepare`")
    return rows[:max_examples]


def encode_split(data_dir: Path, name: str, rows: list, fmt: gen.ChatFormat) -> list[dict]:
    """Convert rows with LLaMA-Factory's own Alpaca/ShareGPT converter (as in training), then encode them."""
    from llamafactory.data.converter import get_dataset_converter
    from llamafactory.data.parser import get_dataset_list

    try:
        attr = get_dataset_list([name], str(data_dir))[0]
    except ValueError as err:  # no dataset_info.json, or no entry for this split
        raise UserError(f"{data_dir}/dataset_info.json: {err} Rerun `dvc repro prepare`") from None
    convert = get_dataset_converter(attr.formatting, attr, fmt.data_args)
    examples = []
    for i, row in enumerate(rows):
        try:
            ex = convert(defaultdict(lambda: None, row)) if isinstance(row, dict) else {}
        except (TypeError, ValueError, KeyError, AttributeError):
            ex = {}
        prompt, response = ex.get("_prompt") or [], ex.get("_response") or []
        if len(prompt) % 2 != 1 or len(response) != 1 or not isinstance(response[0].get("content"), str):
            raise UserError(f"{data_dir / name}.json: example {i + 1} is not a valid {attr.formatting} example "
                            "with a prompt and an answer; fix it in the source table and rerun `dvc repro prepare`")
        prompt_ids, answer_ids = fmt.encode(prompt + response, ex["_system"], ex["_tools"])
        examples.append({"split": name, "index": i, "prompt": prompt[-1]["content"],
                         "label": response[0]["content"], "prompt_ids": prompt_ids, "answer_ids": answer_ids})
    return examples


def decode_answers(fmt: gen.ChatFormat, answers: list[list[int]]) -> tuple[list[str], list[str]]:
    """(clean answers without the stop token, answers decoded as LLaMA-Factory decodes its predictions)."""
    tok, stops = fmt.tokenizer, set(fmt.stop_ids)
    clean = [tok.decode(a[:-1] if a and a[-1] in stops else a, skip_special_tokens=True).strip() for a in answers]
    return clean, tok.batch_decode(answers, skip_special_tokens=True)


def score(fmt: gen.ChatFormat, examples: list[dict], answers: list[list[int]], nll: tuple[float, int]):
    """(metrics of one model on one split, clean answer texts)."""
    clean, as_lf = decode_answers(fmt, answers)
    lf_labels = fmt.tokenizer.batch_decode([ex["answer_ids"] for ex in examples], skip_special_tokens=True)
    loss = nll[0] / max(nll[1], 1)
    stops = set(fmt.stop_ids)
    return {
        **text_metrics(clean, [ex["label"] for ex in examples]),
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50)), 4),
        "answer_tokens": round(sum(map(len, answers)) / len(answers), 2),
        "stopped": round(100 * sum(bool(a) and a[-1] in stops for a in answers) / len(answers), 2),
        "llamafactory": llamafactory_metrics(as_lf, lf_labels),
    }, clean


def delta(tuned: dict, base: dict) -> dict:
    return {k: delta(v, base[k]) if isinstance(v, dict) else round(v - base[k], 6) for k, v in tuned.items()}


def evaluate(p: EvalParams, data_dir: Path, base_dir: Path, adapter_dir: Path) -> tuple[dict, list[dict]]:
    """Generate and score; return (metrics, prediction rows)."""
    gen.check_adapter(adapter_dir)  # the cheap checks first: a mistake is reported in a second, not after loading
    if p.backend == "vllm":
        gen.require_vllm()
    rows = {name: load_rows(data_dir, name, p.max_examples)
            for name in SPLITS if name == "val" or (data_dir / f"{name}.json").exists()}
    fmt = gen.load_chat_format(base_dir, p.cutoff_len)
    splits = {name: encode_split(data_dir, name, split_rows, fmt) for name, split_rows in rows.items()}
    examples = [ex for split in splits.values() for ex in split]
    prompts = [ex["prompt_ids"] for ex in examples]
    threads = gen.set_threads(p.num_threads)
    log.info("%s examples, %d threads, backend %s", {s: len(v) for s, v in splits.items()}, threads, p.backend)

    model = gen.load_model(fmt, p.dtype)
    answers, nll, speed = {}, {}, {}
    for name in ("base", "tuned"):
        if name == "tuned":
            model = gen.merge_adapter(model, adapter_dir)
        nll[name] = {s: gen.answer_nll(model, [ex["prompt_ids"] for ex in split], [ex["answer_ids"] for ex in split],
                                       fmt.pad_id, p.batch_size) for s, split in splits.items()}
        if p.backend == "hf":
            start = time.perf_counter()
            answers[name] = gen.greedy_generate(
                model, prompts, fmt.stop_ids, fmt.pad_id, p.max_new_tokens, p.batch_size,
                progress=lambda done, total, name=name: log.info("%s: %d/%d answers", name, done, total))
            speed[f"{name}_tokens_per_s"] = round(sum(map(len, answers[name])) / (time.perf_counter() - start), 2)
            log.info("%s: %.1f generated tokens/s", name, speed[f"{name}_tokens_per_s"])
    if p.backend == "vllm":
        del model  # vLLM takes most of the GPU memory for itself
        answers["base"], answers["tuned"] = gen.vllm_generate(fmt, adapter_dir, prompts, p.max_new_tokens)

    metrics: dict = {"base": {}, "tuned": {}}
    texts: dict = {"base": [], "tuned": []}
    for name in ("base", "tuned"):
        offset = 0
        for s, split in splits.items():
            split_answers = answers[name][offset:offset + len(split)]
            offset += len(split)
            metrics[name][s], clean = score(fmt, split, split_answers, nll[name][s])
            texts[name].extend(clean)
    metrics["delta"] = delta(metrics["tuned"], metrics["base"])
    metrics["examples"] = {s: len(split) for s, split in splits.items()}
    metrics["speed"] = {**speed, "num_threads": threads}
    metrics["method"] = METHOD
    predictions = [{"split": ex["split"], "index": ex["index"], "prompt": ex["prompt"], "label": ex["label"],
                    "base": base, "tuned": tuned} for ex, base, tuned in zip(examples, texts["base"], texts["tuned"])]
    return metrics, predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="reads the eval section")
    parser.add_argument("--data-dir", default="data/processed", type=Path, help="val.json, test.json, dataset_info")
    parser.add_argument("--base", default="models/base", type=Path, help="directory with model_info.json")
    parser.add_argument("--adapter", default="models/lora", type=Path, help="the LoRA adapter to evaluate")
    parser.add_argument("--metrics", default="reports/metrics/eval.json", type=Path)
    parser.add_argument("--predictions", default="reports/predictions.jsonl", type=Path)
    parser.add_argument("--env", default="reports/env/evaluate.json", type=Path, help="environment manifest")
    args = parser.parse_args(argv)

    p = load_params(args.params).eval
    metrics, predictions = evaluate(p, args.data_dir, args.base, args.adapter)
    with atomic_path(args.predictions) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions), encoding="utf-8")
    atomic_write_json(args.metrics, metrics)
    write_environment(args.env, "evaluate")
    for s in metrics["examples"]:
        log.info("%s: %s", s, ", ".join(f"{k} {metrics['base'][s][k]:.2f} -> {metrics['tuned'][s][k]:.2f}"
                                         for k in ("bleu4", "rougeL", "exact_match", "loss")))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
