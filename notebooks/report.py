# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fine-tuning report
#
# Built by `make report` (stage `report` in dvc.yaml, script `src/report.py`) from what the pipeline wrote:
# it only reads metrics, predictions and logs, and draws them. Each rate carries its count and 95% Wilson interval,
# each base → fine-tuned change its paired 95% interval over the same items (`src/llmft/stats.py`).
#
# ## Did it learn, and what did it cost?
#
# A fine-tune is judged on what it learned (the val split, the probes) *and* on what it kept: held-out everyday
# prompts that no training example asks (`evaluate.kept`), answered by both models.

# %% tags=["parameters"]
# Inputs, as in dvc.yaml. src/report.py puts its own arguments in a cell right after this one.
PARAMS = "params.yaml"
PREPARE = "reports/metrics/prepare.json"
TRAIN = "reports/metrics/train.json"
EVAL = "reports/metrics/eval.json"
EXPORT = "reports/metrics/export.json"  # optional: the report says when the model was not exported yet
REHEARSE = "reports/metrics/rehearse.json"  # optional: the rehearse stage's counts
BENCHMARK = "reports/metrics/benchmark.json"  # optional: standard benchmarks, base vs tuned
PREDICTIONS = "reports/predictions.jsonl"
PLOTS = "dvclive/train/plots/metrics"  # DVCLive series of the train stage
DATA_DIR = "data/processed"
MODEL_DIR = "models/base"
LOCK = "dvc.lock"
ENV = "reports/env/train.json"  # optional: the train stage's environment manifest

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from llmft.common import read_json
from llmft.model import read_model_info
from llmft.params import load_params
from llmft.report import figures, provenance, sections, summary
from llmft.report.render import Code, flatten, fmt, kv_table, show

if not Path("dvc.yaml").exists() and Path("../dvc.yaml").exists():
    os.chdir("..")  # opened from notebooks/ in Jupyter: run from the repo root, like the stage

plt.rcParams.update({"axes.grid": True, "grid.alpha": 0.3})
params = load_params(PARAMS)
prep, train, evals = read_json(PREPARE), read_json(TRAIN), read_json(EVAL)
info = read_model_info(MODEL_DIR) if (Path(MODEL_DIR) / "model_info.json").exists() else {}
t = params.train
display(summary.learn_and_cost(evals))
display(Markdown(summary.verdict(evals)))
if summary.preference(evals):
    display(Markdown(summary.preference(evals)))
if summary.against_sft(evals):
    display(summary.against_sft(evals))
reach = summary.benchmark_reach(read_json(BENCHMARK)) if Path(BENCHMARK).exists() else ""
if reach:
    display(Markdown(reach))
everyday = sections.kept_table(PREDICTIONS, 3)
if everyday is not None:
    display(Markdown("Three of the everyday prompts (`evaluate.kept.prompts`; all of them under *What it kept*):"))
    display(everyday)
probes = sections.probes_table(PREDICTIONS)
if probes is not None:
    display(Markdown("Probes (`evaluate.probes`), answered greedily by both models:"))
    display(probes)
display(
    Markdown(
        f"**Model** `{info.get('source', params.model.name_or_path)}` (template `{info.get('template', '?')}`), "
        f"**data** {', '.join(f'`{table.path}`' for table in params.prepare.tables())}, **method** {t.finetuning_type}"
        + (f" (rank {t.lora_rank}, alpha {t.lora_alpha})" if t.finetuning_type == "lora" else "")
        + f", {train.get('global_step', '?')} optimizer steps in {fmt(train.get('train_runtime_s'))} s "
        f"at {fmt(train.get('tokens_per_sec'))} tokens/s, precision {train.get('precision', '?')}"
        + (
            f"; rehearsal: {train['rehearsal']['examples']} of the base model's own answers mixed with "
            f"{train['rehearsal']['train_examples']} training examples an epoch "
            f"(`rehearse.share` {params.rehearse.share}{summary.share_used(train['rehearsal'])})."
            if train.get("rehearsal")
            else "; no rehearsal (`rehearse.enabled` false)."
        )
        + summary.cut_and_capped(train, evals)
    )
)

# %% [markdown]
# ## Data

# %%
display(
    kv_table(
        {
            "source rows": prep["rows_in"],
            "examples built": prep["examples_in"],
            "kept": prep["kept"],
            **{f"dropped: {reason}": n for reason, n in prep.get("dropped", {}).items()},
            "dropped in total": prep["dropped_total"],
            **{f"split: {name}": n for name, n in prep["splits"].items()},
        },
        [PREPARE, "count"],
    )
)
if Path(REHEARSE).exists() and read_json(REHEARSE).get("enabled"):
    rehearse = read_json(REHEARSE)
    dropped = ", ".join(f"{reason} {n}" for reason, n in rehearse["dropped"].items() if n) or "none"
    display(
        Markdown(
            f"**Rehearsal** (stage `rehearse`, `{params.rehearse.prompts}`): the base model answered "
            f"{rehearse['prompts']} general prompts itself; {rehearse['kept']} answers kept, dropped: {dropped}."
        )
    )
by_source = sections.sources_table(prep)
if by_source is not None and len(prep["sources"]) > 1:
    display(Markdown("Per input table (`prepare.sources`); every example is kept or counted under one reason:"))
    display(by_source)

# %%
lengths, unit = figures.example_lengths(Path(DATA_DIR) / "train.json", MODEL_DIR)
cutoff, longest = t.cutoff_len, max(lengths)
over = sum(n > cutoff for n in lengths)
fig, ax = plt.subplots(figsize=(9, 3.6))
ax.hist(lengths, bins=min(50, max(10, len(set(lengths)))), color="#4C72B0")
ax.set_xlabel(f"length of instruction + input + output ({unit})")
ax.set_ylabel("training examples (count)")
if unit == "tokens" and cutoff <= 2 * longest:
    ax.axvline(cutoff, color="#C44E52", linestyle="--", label=f"train.cutoff_len = {cutoff} tokens")
    ax.legend()
else:
    ax.set_title(
        f"train.cutoff_len = {cutoff} tokens" + (" (off the right edge)" if unit == "tokens" else ""),
        loc="right",
        fontsize=10,
    )
ax.set_title(f"Train split: {len(lengths)} examples, longest {longest} {unit}", loc="left", fontsize=10)
show(fig, f"Histogram of the lengths of {len(lengths)} training examples in {unit}; cutoff_len {cutoff}")
display(
    Markdown(
        f"{over} of {len(lengths)} training examples ({100 * over / len(lengths):.1f}%) are longer than "
        f"`train.cutoff_len` = {cutoff} tokens and get truncated; the chat template adds a few tokens per example."
        if unit == "tokens"
        else f"No tokenizer on disk in `{MODEL_DIR}`, so lengths are in characters; `train.cutoff_len` = {cutoff} "
        "counts tokens (for Chinese, roughly one token per 1-1.5 characters)."
    )
)

# %% [markdown]
# ## Training curves

# %%
series = figures.curves(PLOTS)
train_loss = series.get("loss", series.get("train/loss"))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
if train_loss is not None:
    ax1.plot(train_loss.step, train_loss.value, marker=".", label="train loss")
if "eval/loss" in series:
    ax1.plot(series["eval/loss"].step, series["eval/loss"].value, marker="o", label="eval loss (val split)")
ax1.set_xlabel("optimizer step")
ax1.set_ylabel("loss (cross-entropy, nats/token)")
ax1.legend()
if "learning_rate" in series:
    ax2.plot(series["learning_rate"].step, series["learning_rate"].value, color="#55A868")
ax2.set_xlabel("optimizer step")
ax2.set_ylabel("learning rate")
ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
fig.tight_layout()
show(fig, "Train and eval loss, and learning rate, against the optimizer step")
display(kv_table(train, [TRAIN, ""]))

# %% [markdown]
# ## Base vs fine-tuned
#
# Same prompts, same greedy decoding; scores in percent, loss in nats per answer token.

# %%
display(sections.metrics_table(evals))
if evals.get("method"):
    display(Markdown(f"<small>Method: {evals['method']}</small>"))

# %% [markdown]
# ## What it kept
#
# Every held-out everyday prompt (`evaluate.kept.prompts`), answered by both models. ✗ names: the answer names a
# `prepare.variables` value the prompt did not ask for (persona leak); ✓/✗ right: a fact with an `expect` string;
# ✗ other language: not in the prompt's language (translation and code prompts aside).

# %%
everyday = sections.kept_table(PREDICTIONS)
if everyday is not None:
    display(kv_table(flatten({k: v for k, v in evals["kept"].items() if k != "paired"}), [EVAL + ": kept", ""]))
    display(everyday)
else:
    display(Markdown("Not measured: `evaluate.kept.prompts` is null."))

# %% [markdown]
# ## Standard benchmarks
#
# lm-eval on the tasks of `benchmark.tasks`, base and fine-tuned with the same settings; bars are accuracy with
# ± 1 standard error, the dashed line is chance. A difference within 2 standard errors of the difference is
# marked *within noise*.

# %%
bench = read_json(BENCHMARK) if Path(BENCHMARK).exists() else {}
if bench.get("tasks"):
    table = sections.benchmark_table(bench)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(table.rows) + 2), 3.4))
    for offset, (name, color) in zip((-0.2, 0.2), (("base", "#8C8C8C"), ("tuned", "#4C72B0"))):
        tasks = list(bench["tasks"].values())
        ax.bar(
            [i + offset for i in range(len(tasks))],
            [100 * t[name].get("acc", 0) for t in tasks],
            0.4,
            yerr=[100 * t[name].get("acc_stderr", 0) for t in tasks],
            color=color,
            label="base" if name == "base" else "fine-tuned",
            capsize=3,
        )
    for i, t in enumerate(bench["tasks"].values()):
        if t.get("chance"):
            ax.hlines(100 * t["chance"], i - 0.45, i + 0.45, colors="#C44E52", linestyles="--")
    ax.set_xticks(range(len(bench["tasks"])), list(bench["tasks"]))
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    show(fig, "Benchmark accuracy, base vs fine-tuned, per task, with standard errors and chance")
    display(table)
    display(Markdown(sections.benchmark_note(bench, info.get("num_parameters"))))
else:
    display(Markdown(f"`{BENCHMARK}` is missing or `benchmark.enabled` is false: no benchmark ran (`make benchmark`)."))

# %% [markdown]
# ## Sample predictions

# %%
display(sections.samples(PREDICTIONS, params.report.num_samples))

# %% [markdown]
# ## Export (merge check)

# %%
if Path(EXPORT).exists():
    display(kv_table(flatten(read_json(EXPORT)), [EXPORT, ""]))
else:
    display(Markdown(f"`{EXPORT}` is missing: the model was not merged yet (`make export`)."))

# %% [markdown]
# ## Parameters
#
# Changed since the previous commit (`dvc params diff HEAD~1`; the workspace counts as the new side):

# %%
display(Markdown(provenance.params_diff(".")))
display(Markdown(f"All of them (`{PARAMS}` with the defaults filled in):"))
display(Code(provenance.params_yaml(params), "yaml", columns=3))

# %% [markdown]
# ## Environment

# %%
display(provenance.environment(LOCK, train, ENV))
