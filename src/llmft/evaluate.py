"""The evaluate stage's work: answer every val (and test) prompt with the base and the fine-tuned model; score both.

    metrics, predictions = evaluate(params.evaluate, Path("data/processed"), Path("models/base"), Path("models/lora"))

Both models get the same prompts, built by the LLaMA-Factory template the adapter was trained with, and the
same greedy decoding. metrics: base, tuned and delta = tuned - base, per split, and beside them paired intervals
over the same items (`paired`, and in `kept`, `persona`, `probes`; llmft.stats); predictions: one row per
example (split, index, prompt, label, base and tuned answers, each model's loss on it).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmft.common import UserError, get_logger
from llmft.data.prompts import read_prompts
from llmft.infer.chat_format import ChatFormat, chat_rows, decode_answers, load_chat_format
from llmft.infer.decode import answer_nll, greedy_generate
from llmft.infer.loading import check_adapter, load_model, merge_adapter, set_threads
from llmft.infer.vllm import require_vllm, vllm_generate
from llmft.kept import (
    forgot_warning,
    forgot_within_noise,
    kept_scores,
    language,
    mark,
    paired_loss,
    paired_pct,
    passes,
    persona_named,
)
from llmft.lf.encode import convert_rows, dataset_attr
from llmft.metrics import METHOD, llamafactory_metrics, text_metrics
from llmft.pair_scores import load_pairs, pair_logps, preference_block
from llmft.params import EvaluateParams, Probe
from llmft.predictions import KEPT, PROBE
from llmft.variables import fill

log = get_logger("evaluate")
SPLITS = ("val", "test")  # test is optional (prepare.test_size: 0 writes none)
NAMES = ("base", "tuned")  # the models, in the order they answer


def load_rows(data_dir: Path, name: str, max_examples: int | None) -> tuple[list, int]:
    """(The first `max_examples` rows of one split, how many it holds); UserError when the file is missing, broken
    or empty. The splits are shuffled by prepare, so the first rows are a random sample."""
    file = data_dir / f"{name}.json"
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file}: not found; run `dvc repro prepare` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file}: not valid UTF-8 JSON ({err}); rerun `dvc repro prepare`") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(
            f"{file}: expected a non-empty JSON list of examples; raise prepare.val_size "
            "(or prepare.test_size) and rerun `dvc repro prepare`"
        )
    return rows[:max_examples], len(rows)


def encode_split(data_dir: Path, name: str, rows: list, fmt: ChatFormat) -> list[dict]:
    """Convert rows with LLaMA-Factory's own Alpaca/ShareGPT converter (as in training), then encode them."""
    attr = dataset_attr(data_dir, name)
    examples = []
    for i, ex in enumerate(convert_rows(attr, fmt.data_args, rows)):
        prompt, response = (ex or {}).get("_prompt") or [], (ex or {}).get("_response") or []
        if len(prompt) % 2 != 1 or len(response) != 1 or not isinstance(response[0].get("content"), str):
            raise UserError(
                f"{data_dir / name}.json: example {i + 1} is not a valid {attr.formatting} example "
                "with a prompt and an answer; fix it in the source table and rerun `dvc repro prepare`"
            )
        prompt_ids, answer_ids = fmt.encode(prompt + response, ex["_system"], ex["_tools"])
        examples.append(
            {
                "split": name,
                "index": i,
                "prompt": prompt[-1]["content"],
                "label": response[0]["content"],
                "prompt_ids": prompt_ids,
                "answer_ids": answer_ids,
            }
        )
    return examples


def score(fmt: ChatFormat, examples: list[dict], answers: list[list[int]], nll: tuple[float, int]):
    """(metrics of one model on one split, clean answer texts)."""
    clean, as_lf = decode_answers(fmt, answers)
    lf_labels = fmt.tokenizer.batch_decode([ex["answer_ids"] for ex in examples], skip_special_tokens=True)
    loss = nll[0] / max(nll[1], 1)
    stops = set(fmt.stop_ids)
    # answers in the reference's language: what a table in another language than the base model's teaches first
    same = [language(a) == lang for a, ex in zip(clean, examples) if (lang := language(ex["label"]))]
    return {
        **text_metrics(clean, [ex["label"] for ex in examples]),
        **({"language": round(100 * sum(same) / len(same), 2)} if same else {}),
        "loss": round(loss, 6),
        "perplexity": round(math.exp(min(loss, 50)), 4),
        "answer_tokens": round(sum(map(len, answers)) / len(answers), 2),
        "stopped": round(100 * sum(bool(a) and a[-1] in stops for a in answers) / len(answers), 2),
        "llamafactory": llamafactory_metrics(as_lf, lf_labels),
    }, clean


def delta(tuned: dict, base: dict) -> dict:
    return {k: delta(v, base[k]) if isinstance(v, dict) else round(v - base[k], 6) for k, v in tuned.items()}


def probe_items(probes: list[Probe], variables: dict[str, str]) -> list[dict]:
    """evaluate.probes as prompt items, their expected strings filled from prepare.variables."""
    return [{"prompt": p.prompt, "expect": [fill(e, variables) for e in p.expect]} for p in probes]


def probe_scores(rows: list[dict]) -> dict:
    """Pass counts and rates of base and tuned over the probes that expect something."""
    scored = [r for r in rows if r["expect"]]
    out = {}
    for name in ("base", "tuned"):
        passed = sum(bool(r[f"{name}_pass"]) for r in scored)
        out[name] = {
            "passed": passed,
            "total": len(scored),
            "pass_rate": round(100 * passed / len(scored), 2) if scored else None,
        }
    if scored:
        out["paired"] = paired_pct(scored, "pass")
    return out


def _per_token(nll: tuple[float, int]) -> float | None:
    """One example's loss in nats per answer token (None for an empty answer): `make compare` pairs them."""
    return round(nll[0] / nll[1], 6) if nll[1] else None


def changed_rate(rows: list[dict]) -> float:
    """% of examples whose tuned answer differs from the base's (whitespace aside)."""
    same = sum(" ".join(r["base"].split()) == " ".join(r["tuned"].split()) for r in rows)
    return round(100 * (1 - same / len(rows)), 2) if rows else 0.0


def verdict(metrics: dict, p: EvaluateParams) -> dict:
    """Did the tuned model move (barely, when most val answers equal the base's and the eval loss hardly fell), and
    did it keep what it knew (evaluate.kept: persona leak and facts kept within their thresholds)?

    Each warning fires only when the data can tell: "stalled" when even the largest loss drop the paired interval
    allows (`metrics["paired"]["val"]["loss"]`) is under evaluate.stalled_loss_drop, "forgot" when the leak or the
    lost facts are beyond noise. Otherwise `noise` says "within noise, n too small" and what would settle it.
    Metrics without intervals (an older eval.json) are judged on the point values alone."""
    base, tuned = metrics["base"]["val"]["loss"], metrics["tuned"]["val"]["loss"]
    drop = round(100 * (base - tuned) / base, 2) if base > 0 else 0.0
    same = round(100 - metrics["changed"]["val"], 2)
    stalled = same >= p.stalled_same_answers and drop < p.stalled_loss_drop
    noise = []
    interval = ((metrics.get("paired") or {}).get("val") or {}).get("loss")
    if stalled and interval and base > 0:
        most = round(-100 * interval["low"] / base, 2)  # the largest drop the interval allows
        if most >= p.stalled_loss_drop:
            stalled = False
            noise.append(
                f"within noise, n too small: {same:g}% of val answers are the base model's and the eval loss fell "
                f"{drop:g}%, but over {interval['n']} val examples it may have fallen up to {most:g}% "
                f"(evaluate.stalled_loss_drop {p.stalled_loss_drop:g}%); more val examples (prepare.val_size, "
                "evaluate.max_examples: null) would settle whether it barely moved"
            )
    warning = (
        f"the fine-tuned model barely moved: {same:g}% of val answers are the base model's and the eval loss fell "
        f"{drop:g}% ({base:.3f} -> {tuned:.3f}). Train more: raise train.learning_rate (small models and CPU runs "
        "take 5e-4 to 1e-3 with LoRA), train.num_train_epochs or train.max_steps, train.max_samples (null = all), "
        "or lower per_device_train_batch_size x gradient_accumulation_steps for more optimizer steps"
        if stalled
        else None
    )
    kept = metrics.get("kept")
    forgot = forgot_warning(kept, p.kept.max_leak, p.kept.min_facts_kept) if kept else None
    if kept and (unsure := forgot_within_noise(kept, p.kept.max_leak, p.kept.min_facts_kept)):
        noise.append(unsure)
    return {
        "moved": not stalled,
        "same_answers_pct": same,
        "loss_drop_pct": drop,
        "warning": warning,
        "kept": None if kept is None else forgot is None,
        "forgot": forgot,
        "noise": "; ".join(noise) or None,
    }


def load_kept(p: EvaluateParams, variables: dict[str, str]) -> list[dict]:
    """evaluate.kept.prompts' items ([] when null), checked before any model loads."""
    if not p.kept.prompts:
        return []
    items = read_prompts(p.kept.prompts, "evaluate.kept.prompts")
    for item in items:
        if named := [v for v in variables.values() if v and v.casefold() in item["prompt"].casefold()]:
            log.info("evaluate.kept.prompts: %r names %s: an answer naming it is no leak", item["prompt"], named)
    return items


@dataclass
class Prompts:
    """What both models answer, in answer order: each split's examples, then the probes, then the everyday prompts
    (evaluate.kept). One generation call takes them all and its answers come back in this order, so the order is
    what every slice of the answers relies on."""

    splits: dict[str, list[dict]]
    probes: list[dict]
    kept: list[dict]
    pairs: list[dict] = field(default_factory=list)  # the prefer stage's held-out pairs, scored, never answered

    @property
    def examples(self) -> list[dict]:
        return [ex for split in self.splits.values() for ex in split]

    def ids(self) -> list[list[int]]:
        return [ex["prompt_ids"] for ex in self.examples + self.probes + self.kept]


@dataclass
class Answers:
    """Both models' outputs on the same Prompts, by model name ("base", "tuned")."""

    tokens: dict[str, list[list[int]]] = field(default_factory=dict)  # generated ids, in Prompts order
    nll: dict[str, dict] = field(default_factory=dict)  # split -> (loss sum, tokens) of the references
    per_example: dict[str, dict] = field(default_factory=dict)  # split -> [(loss sum, tokens)]: paired intervals
    speed: dict[str, float] = field(default_factory=dict)  # <model>_tokens_per_s, hf backend only
    drift: dict[str, tuple[float, int]] = field(default_factory=dict)  # the base's own everyday answers' loss
    drift_items: dict[str, list] = field(default_factory=dict)  # the same, per everyday prompt
    pairs: dict[str, list] = field(default_factory=dict)  # model -> [(log p(chosen), log p(rejected))] per pair


def evaluate(
    p: EvaluateParams,
    data_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    variables: dict[str, str] | None = None,
    pairs_dir: Path | None = None,
    sft_dir: Path | None = None,
) -> tuple[dict, list[dict]]:
    """Generate and score; return (metrics, prediction rows). `variables`: prepare.variables, for the probes and the
    persona leak. `pairs_dir`: the prefer stage's pairs; when it holds held-out pairs, base, the SFT model
    (`sft_dir`, the adapter under the preference update) and the tuned model are scored on them too."""
    variables = variables or {}
    check_adapter(adapter_dir)  # the cheap checks first: a mistake is reported in a second, not after loading
    if p.backend == "vllm":
        require_vllm()
    import torch

    rows, available = load_splits(data_dir, p, p.examples_cap(torch.cuda.is_available()))
    kept_items = load_kept(p, variables)
    fmt = load_chat_format(base_dir, p.cutoff_len)
    prompts = encode_prompts(data_dir, rows, probe_items(p.probes, variables), kept_items, fmt)
    prompts.pairs = load_pairs(pairs_dir, fmt)
    threads = set_threads(p.num_threads)
    log.info(
        "%s examples, %d probes, %d everyday prompts (evaluate.kept), %d threads, backend %s",
        {s: len(v) for s, v in prompts.splits.items()},
        len(prompts.probes),
        len(prompts.kept),
        threads,
        p.backend,
    )
    answers = answer_both(fmt, p, adapter_dir, prompts, sft_dir if prompts.pairs else None)
    return summarise(p, fmt, prompts, answers, available, threads, variables)


def load_splits(data_dir: Path, p: EvaluateParams, cap: int | None) -> tuple[dict[str, list], dict[str, int]]:
    """(Each split's first `cap` rows, how many it holds): val always, test when prepare wrote one. A cut split is
    logged, so that a CPU run answering a sample of val (evaluate.max_examples: auto) says so."""
    loaded = {
        name: load_rows(data_dir, name, cap) for name in SPLITS if name == "val" or (data_dir / f"{name}.json").exists()
    }
    rows = {name: split_rows for name, (split_rows, _) in loaded.items()}
    available = {name: n for name, (_, n) in loaded.items()}
    for name, n in available.items():
        if n > len(rows[name]):
            why = f"evaluate.max_examples {p.max_examples}" + (
                " on a CPU; null = all" if p.max_examples == "auto" else ""
            )
            log.info("%s: answering the first %d of %d examples (%s)", name, len(rows[name]), n, why)
    return rows, available


def encode_prompts(
    data_dir: Path, rows: dict[str, list], probes: list[dict], kept_items: list[dict], fmt: ChatFormat
) -> Prompts:
    """Every prompt both models answer, encoded with the chat template the adapter was trained with, before any
    model loads: a bad example fails here, in a second."""
    splits = {name: encode_split(data_dir, name, split_rows, fmt) for name, split_rows in rows.items()}
    return Prompts(splits, chat_rows(PROBE, probes, fmt), chat_rows(KEPT, kept_items, fmt))


def answer_both(
    fmt: ChatFormat, p: EvaluateParams, adapter_dir: Path, prompts: Prompts, sft_dir: Path | None = None
) -> Answers:
    """The base model, then the same weights with the adapter merged (one load for both): each scores the references
    (loss) and, with the hf backend, answers every prompt greedily and scores the base's everyday answers (drift).
    vLLM answers with both at once after the HF model is freed, so the drift needs the HF model loaded again.
    With preference pairs and the SFT adapter, the SFT model does all of that in between (what preference tuning
    changed is tuned against it), and the tuned model is the SFT model with the preference update
    (adapter_dir/delta) merged on top: the same sum, one load."""
    out = Answers()
    model = load_model(fmt, p.dtype)
    for name in NAMES:
        if name == "tuned":
            delta = adapter_dir / "delta"
            if sft_dir is not None and (delta / "adapter_config.json").exists():
                model = merge_adapter(model, sft_dir)
                answer_with(model, "sft", fmt, p, prompts, out)
                model = merge_adapter(model, delta)
            else:
                model = merge_adapter(model, adapter_dir)
        answer_with(model, name, fmt, p, prompts, out)
    if p.backend == "vllm":
        del model  # vLLM takes most of the GPU memory for itself
        out.tokens["base"], out.tokens["tuned"] = vllm_generate(fmt, adapter_dir, prompts.ids(), p.max_new_tokens)
        if prompts.kept:  # the drift needs the base's answers first: score them with both models now
            model = load_model(fmt, p.dtype)
            out.drift["base"], out.drift_items["base"] = drift_nll(model, fmt, p, prompts, out.tokens["base"])
            tuned = merge_adapter(model, adapter_dir)
            out.drift["tuned"], out.drift_items["tuned"] = drift_nll(tuned, fmt, p, prompts, out.tokens["base"])
    return out


def answer_with(model, name: str, fmt: ChatFormat, p: EvaluateParams, prompts: Prompts, out: Answers) -> None:
    """One model's share of `out`: the pairs' log-likelihoods, the references' loss, and with the hf backend its
    greedy answers and the drift on the base's everyday answers (the base answers first)."""
    if prompts.pairs:
        out.pairs[name] = pair_logps(model, fmt, prompts.pairs, p.batch_size)
    out.nll[name], out.per_example[name] = reference_nll(model, fmt, p, prompts.splits)
    if p.backend == "hf":
        out.tokens[name], out.speed[f"{name}_tokens_per_s"] = generate_hf(model, name, fmt, p, prompts.ids())
        if prompts.kept:
            out.drift[name], out.drift_items[name] = drift_nll(model, fmt, p, prompts, out.tokens["base"])


def reference_nll(model, fmt: ChatFormat, p: EvaluateParams, splits: dict[str, list[dict]]) -> tuple[dict, dict]:
    """The references' teacher-forced loss under `model`: (loss sum, tokens) per split for its loss, and per example
    for the paired base-vs-tuned interval over the same examples."""
    totals: dict = {}
    per_example: dict = {}
    for s, split in splits.items():
        per_example[s] = []
        totals[s] = answer_nll(
            model,
            [ex["prompt_ids"] for ex in split],
            [ex["answer_ids"] for ex in split],
            fmt.pad_id,
            p.batch_size,
            per_example=per_example[s],
        )
    return totals, per_example


def generate_hf(model, name: str, fmt: ChatFormat, p: EvaluateParams, prompts: list[list[int]]) -> tuple[list, float]:
    """(Greedy answers with transformers, generated tokens/s): timed around generation alone, the speed a user of
    this model waits at."""
    start = time.perf_counter()
    answers = greedy_generate(
        model,
        prompts,
        fmt.stop_ids,
        fmt.pad_id,
        p.max_new_tokens,
        p.batch_size,
        progress=lambda done, total: log.info("%s: %d/%d answers", name, done, total),
    )
    speed = round(sum(map(len, answers)) / (time.perf_counter() - start), 2)
    log.info("%s: %.1f generated tokens/s", name, speed)
    return answers, speed


def drift_nll(model, fmt: ChatFormat, p: EvaluateParams, prompts: Prompts, base_answers: list) -> tuple[tuple, list]:
    """The loss of the base model's own everyday answers (teacher-forced) under `model`, in all and per prompt:
    how far fine-tuning moved the model off what it said before, on prompts no training example asks."""
    per_example: list = []
    total = answer_nll(
        model,
        [r["prompt_ids"] for r in prompts.kept],
        base_answers[len(base_answers) - len(prompts.kept) :],  # the everyday prompts' answers come last
        fmt.pad_id,
        p.batch_size,
        per_example=per_example,
    )
    return total, per_example


def summarise(
    p: EvaluateParams,
    fmt: ChatFormat,
    prompts: Prompts,
    answers: Answers,
    available: dict[str, int],
    threads: int,
    variables: dict[str, str],
) -> tuple[dict, list[dict]]:
    """(eval.json's metrics, predictions.jsonl's rows) from both models' answers. The metrics' keys keep one order,
    so that eval.json diffs line by line between runs."""
    sft_view = copy.deepcopy(prompts) if "sft" in answers.tokens else None  # marked below: keep a clean copy
    metrics, texts = split_metrics(fmt, prompts.splits, answers)
    mark_prompts(fmt, prompts, answers, variables)
    splits = prompts.splits
    metrics["delta"] = delta(metrics["tuned"], metrics["base"])
    metrics["paired"] = {
        s: {"loss": paired_loss({name: answers.per_example[name][s] for name in NAMES})} for s in splits
    }
    metrics["examples"] = {s: len(split) for s, split in splits.items()}
    metrics["examples_available"] = available
    metrics["speed"] = {**answers.speed, "num_threads": threads}
    metrics["method"] = METHOD
    predictions = prediction_rows(prompts, texts, answers)
    metrics["changed"] = {s: changed_rate([r for r in predictions if r["split"] == s]) for s in splits}
    metrics["probes"] = probe_scores(prompts.probes)
    metrics["persona"] = persona_named([r for r in predictions if r["split"] == "val"], variables)
    if prompts.kept:
        metrics["changed"][KEPT] = changed_rate(prompts.kept)
        metrics["kept"] = kept_scores(prompts.kept, answers.drift, answers.drift_items)
    if answers.pairs:
        metrics["preference"] = preference_block(answers.pairs)
    if "sft" in answers.tokens:
        metrics["preference_tuning"] = against_sft(p, fmt, sft_view, answers, available, threads, variables)
    metrics["verdict"] = verdict(metrics, p)
    for row in prompts.probes + prompts.kept:
        del row["prompt_ids"]  # token ids are for the models, not for predictions.jsonl
    return metrics, predictions + prompts.probes + prompts.kept


def against_sft(
    p: EvaluateParams,
    fmt: ChatFormat,
    prompts: Prompts,
    answers: Answers,
    available: dict[str, int],
    threads: int,
    variables: dict[str, str],
) -> dict:
    """eval.json's `preference_tuning`: what preference tuning changed, measured as the main comparison measures
    fine-tuning, with the SFT model in the base's place (its answers, loss and drift), so every rate and paired
    interval reads "SFT -> SFT + preference tuning". The report draws it with the first screen's code."""
    keep = ("base", "sft", "tuned")
    view = Answers(
        tokens={"base": answers.tokens["sft"], "tuned": answers.tokens["tuned"]},
        nll={"base": answers.nll["sft"], "tuned": answers.nll["tuned"]},
        per_example={"base": answers.per_example["sft"], "tuned": answers.per_example["tuned"]},
        drift={k: answers.drift[k] for k in keep if k in answers.drift and k != "base"},
        drift_items={k: answers.drift_items[k] for k in keep if k in answers.drift_items and k != "base"},
    )
    if "sft" in view.drift:  # the drift stays on the base model's own everyday answers: SFT's against tuned's
        view.drift["base"], view.drift_items["base"] = view.drift.pop("sft"), view.drift_items.pop("sft")
    compared, _ = summarise(p, fmt, prompts, view, available, threads, variables)
    fields = ("base", "tuned", "delta", "paired", "changed", "probes", "persona", "kept")
    return {"compared": "base = the SFT model, tuned = SFT + preference tuning"} | {
        k: compared[k] for k in fields if k in compared
    }


def split_metrics(fmt: ChatFormat, splits: dict[str, list[dict]], answers: Answers) -> tuple[dict, dict]:
    """({model: {split: metrics}}, {model: clean answer texts in example order}): the examples' answers come
    first in Prompts order, split after split."""
    metrics: dict = {"base": {}, "tuned": {}}
    texts: dict = {"base": [], "tuned": []}
    for name in NAMES:
        offset = 0
        for s, split in splits.items():
            split_answers = answers.tokens[name][offset : offset + len(split)]
            offset += len(split)
            metrics[name][s], clean = score(fmt, split, split_answers, answers.nll[name][s])
            texts[name].extend(clean)
    return metrics, texts


def mark_prompts(fmt: ChatFormat, prompts: Prompts, answers: Answers, variables: dict[str, str]) -> None:
    """Put both models' answers on the probe and everyday rows, then mark them: a probe passes when its answer
    contains an expected string; an everyday answer is marked for leak, fact and language (llmft.kept.mark)."""
    for name in NAMES:  # the probes' and the everyday prompts' answers come after the examples'
        clean, _ = decode_answers(fmt, answers.tokens[name][len(prompts.examples) :])
        for row, answer in zip(prompts.probes + prompts.kept, clean):
            row[name] = answer
    for row in prompts.probes:
        row["base_pass"], row["tuned_pass"] = passes(row["base"], row["expect"]), passes(row["tuned"], row["expect"])
    for row in prompts.kept:
        mark(row, variables)


def prediction_rows(prompts: Prompts, texts: dict[str, list[str]], answers: Answers) -> list[dict]:
    """One predictions.jsonl row per example: both answers and both losses per token, which `make compare` pairs."""
    per_example = {name: [x for s in prompts.splits for x in answers.per_example[name][s]] for name in NAMES}
    return [
        {
            "split": ex["split"],
            "index": ex["index"],
            "prompt": ex["prompt"],
            "label": ex["label"],
            "base": base,
            "tuned": tuned,
            "base_loss": _per_token(base_nll),
            "tuned_loss": _per_token(tuned_nll),
        }
        for ex, base, tuned, base_nll, tuned_nll in zip(
            prompts.examples, texts["base"], texts["tuned"], per_example["base"], per_example["tuned"]
        )
    ]
