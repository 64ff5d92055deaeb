"""Loaders for the report notebook (notebooks/report.py): read the pipeline's outputs into tables.

    from llmft.report.data import curves, metrics_table, Table
    curves("dvclive/train/plots/metrics")    # {"loss": DataFrame(step, value), "eval/loss": ..., ...}

Nothing here computes a result of the pipeline; it only reads, flattens and formats what the stages wrote,
so the notebook stays a page of drawing code.
"""

from __future__ import annotations

import html
import io
import platform
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from llmft.common import read_json
from llmft.env import cpu_name, git_commit, package_version, run_dvc
from llmft.model import read_model_info
from llmft.predictions import KEPT, PROBE, PROMPT_SPLITS, read_predictions
from llmft.stats import proportion_interval

LOWER_IS_BETTER = ("loss", "perplexity")


class Table:
    """Rows shown as an HTML table in report.html and as a Markdown table in report.md (same cell text)."""

    def __init__(self, rows: Iterable[Iterable[Any]], header: Iterable[str], text_columns: int = 1, wrap: bool = False):
        self.header = list(header)
        self.rows = [["" if v is None else str(v) for v in row] for row in rows]
        self.text_columns = len(self.header) if wrap else text_columns  # left-aligned; the rest are numbers
        self.wrap = wrap  # long texts (predictions): wrap inside the cell, keep the answer's own line breaks

    def _repr_html_(self) -> str:
        def cells(tag: str, values: list[str]) -> str:
            return "".join(
                f'<{tag} class="{"text" if i < self.text_columns else "num"}">{html.escape(v)}</{tag}>'
                for i, v in enumerate(values)
            )

        body = "".join(f"<tr>{cells('td', row)}</tr>" for row in self.rows)
        css = "report wrap" if self.wrap else "report"
        return f'<table class="{css}"><thead><tr>{cells("th", self.header)}</tr></thead><tbody>{body}</tbody></table>'

    def _repr_markdown_(self) -> str:
        def cell(v: str) -> str:
            return html.escape(v, quote=False).replace("|", "\\|").replace("\n", "<br>") or " "

        lines = ["| " + " | ".join(map(cell, self.header)) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return self._repr_markdown_()


class Code:
    """A code block: <pre> in columns in report.html, a fenced block in report.md."""

    def __init__(self, text: str, lang: str = "", columns: int = 1):
        self.text, self.lang, self.columns = text, lang, columns

    def _repr_html_(self) -> str:
        return f'<pre class="code" style="column-count: {self.columns}">{html.escape(self.text)}</pre>'

    def _repr_markdown_(self) -> str:
        return f"```{self.lang}\n{self.text}\n```\n"


def fmt(value: Any, digits: int = 4) -> str:
    """A number short enough for a table cell: 4 significant digits, thousands separators for integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}g}" if abs(value) < 1e5 else f"{value:,.0f}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def kv_table(values: dict, header: list[str]) -> Table:
    """One row per key: name, then the value formatted by `fmt`."""
    return Table([[key, fmt(value)] for key, value in values.items()], header)


def sources_table(prep: dict) -> Table | None:
    """One row per input table of prepare.json: rows and examples in, kept, dropped by reason, per split."""
    sources = prep.get("sources") or {}
    if not sources:
        return None
    splits = list(prep.get("splits", {}))
    rows = []
    for name, src in sources.items():
        dropped = ", ".join(f"{reason} {n}" for reason, n in src["dropped"].items() if n) or "none"
        rows.append(
            [name, src["path"], fmt(src["rows_in"]), fmt(src["examples_in"]), fmt(src["kept"]), dropped]
            + [fmt(src.get("splits", {}).get(split, 0)) for split in splits]
        )
    return Table(rows, ["source", "file", "rows", "examples", "kept", "dropped"] + splits, text_columns=2)


def metrics_table(evals: dict) -> Table:
    """eval.json's base / tuned / delta (nested by split, then metric) as one row per split and metric."""
    base, tuned, delta = (flatten(evals.get(k) or {}) for k in ("base", "tuned", "delta"))
    rows = []
    for key, value in base.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        split, _, metric = key.partition(".") if "." in key else ("", "", key)
        arrow = "↓" if metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER else "↑"
        rows.append(
            [
                split,
                f"{metric} {arrow}",
                fmt(value),
                fmt(tuned.get(key)),
                f"{delta[key]:+.4g}" if isinstance(delta.get(key), (int, float)) else "",
            ]
        )
    return Table(rows, ["split", "metric (↑/↓ = better)", "base", "fine-tuned", "Δ (tuned − base)"], text_columns=2)


def curves(plots_dir: str | Path) -> dict[str, Any]:
    """Every DVCLive series under `plots_dir` (dvclive/train/plots/metrics), by name (loss, eval/loss, ...).

    Each is a DataFrame with columns step and value: DVCLive writes `timestamp step <name>` while training,
    train.py rewrites `step <name>` at the end; the value is the last column in both.
    """
    import pandas as pd

    root = Path(plots_dir)
    series = {}
    for tsv in sorted(root.rglob("*.tsv")):
        df = pd.read_csv(tsv, sep="\t")
        if "step" not in df.columns or len(df.columns) < 2:
            continue  # not a DVCLive series
        step, value = pd.to_numeric(df["step"], errors="coerce"), pd.to_numeric(df[df.columns[-1]], errors="coerce")
        if step.isna().any() or value.isna().any():
            raise ValueError(f"{tsv}: a step or {df.columns[-1]} value is not a number; rerun `make train`")
        series[tsv.relative_to(root).with_suffix("").as_posix()] = pd.DataFrame({"step": step, "value": value})
    return series


def example_lengths(train_file: str | Path, model_dir: str | Path) -> tuple[list[int], str]:
    """(length of each training example, unit): tokens of instruction+input+output with the base model's
    tokenizer when one is on disk (models/base, or the local directory its model_info.json points to),
    else characters. The chat template adds a few tokens more; cutoff_len counts those too."""
    rows = read_json(train_file)
    texts = [
        ("\n".join(str(r.get(k) or "") for k in ("system", "instruction", "input")), str(r.get("output") or ""))
        if isinstance(r, dict)
        else ("", "")
        for r in rows
    ]  # ShareGPT rows count as empty: rare, labelled below
    encode = _local_tokenizer(Path(model_dir))
    if encode is None:
        return [len(p) + len(o) for p, o in texts], "characters"
    return [len(p) + len(o) for p, o in zip(encode([p for p, _ in texts]), encode([o for _, o in texts]))], "tokens"


def _local_tokenizer(model_dir: Path) -> Callable[[list[str]], list[list[int]]] | None:
    """A batch encoder (no special tokens) from tokenizer.json via `tokenizers` (fast to import), else via
    transformers (slow tokenizers such as a bare SentencePiece model); None when no tokenizer is on disk."""
    candidates = [model_dir]
    if (model_dir / "model_info.json").exists():
        candidates.append(Path(read_model_info(model_dir)["path"]))
    for path in candidates:
        try:
            if (path / "tokenizer.json").exists():
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
                return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
            if (path / "tokenizer_config.json").exists():
                from transformers import AutoTokenizer

                auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                return lambda texts: auto(texts, add_special_tokens=False)["input_ids"]
        except Exception:  # any failure means "count characters instead", and the plot says so
            return None
    return None


def _answer(text: Any) -> str:
    return "(empty)" if text is None or not str(text).strip() else str(text)  # a blank cell reads as missing


def rate(pct: float | None, n: int | None) -> str:
    """A rate as its count and Wilson interval, "9/11 (82%, 95% CI 52–95%)", from eval.json's % of n items."""
    if pct is None or not n:
        return "n/a"
    hits = round(pct * n / 100)
    low, high = proportion_interval(hits, n)
    return f"{hits}/{n} ({pct:.0f}%, 95% CI {100 * low:.0f}–{100 * high:.0f}%)"


def change(paired: dict | None, unit: str = " points", digits: int = 0, scale: float = 1.0) -> str:
    """A paired difference with its interval, "Δ +25 points, 95% CI +8 to +42, beyond noise" ("" without one)."""
    if not paired:
        return ""
    d, low, high = (scale * paired[k] for k in ("diff", "low", "high"))
    if paired["beyond_noise"]:
        noise = "beyond noise"
    elif paired["low"] > 0 or paired["high"] < 0:  # llmft.stats.min_changed: a few unanimous items are no proof
        noise = "within noise: too few items changed to tell"
    else:
        noise = "within noise"
    return f"Δ {d:+.{digits}f}{unit}, 95% CI {low:+.{digits}f} to {high:+.{digits}f}, {noise}"


def _with(text: str, paired: dict | None, **kw) -> str:
    return f"{text} ({change(paired, **kw)})" if paired else text


def learned(evals: dict) -> list[str]:
    """Did it learn? Eval loss, probe pass rates and changed answers, one line each, each change with its interval
    (eval.json's paired blocks; an older eval.json without them gives the point values)."""
    base, tuned = evals["base"]["val"]["loss"], evals["tuned"]["val"]["loss"]
    loss = ((evals.get("paired") or {}).get("val") or {}).get("loss")
    lines = [
        f"Eval loss (val): {base:.3f} → {tuned:.3f} ({100 * (tuned - base) / base:+.1f}%"
        + (f"; {change(loss, ' nats/token', 3)}, n {loss['n']})" if loss else ")")
    ]
    probes = evals.get("probes") or {}
    if (probes.get("tuned") or {}).get("total"):
        b, t = probes["base"], probes["tuned"]
        lines.append(
            _with(f"Probes passed: {b['passed']}/{b['total']} → {t['passed']}/{t['total']}", probes.get("paired"))
        )
    val_base, val_tuned = evals["base"]["val"].get("language"), evals["tuned"]["val"].get("language")
    if val_base is not None and val_tuned is not None:
        lines.append(f"Answered in the reference's language (val): {val_base:g}% → {val_tuned:g}%")
    persona = evals.get("persona") or {}
    if persona.get("examples"):
        n = persona["examples"]
        lines.append(
            _with(
                f"Persona named in held-out answers that should: {rate(persona['base'], n)} → "
                f"{rate(persona['tuned'], n)}",
                persona.get("paired"),
            )
        )
    if evals.get("changed"):
        changed = ", ".join(f"{split} {rate:g}%" for split, rate in evals["changed"].items())
        lines.append(f"Answers changed (fine-tuned ≠ base): {changed}")
    return lines


def cost(evals: dict) -> list[str]:
    """What did it cost? Persona leak, facts kept, language kept and drift on the held-out everyday prompts."""
    kept = evals.get("kept")
    if not kept:
        return ["Not measured: evaluate.kept.prompts is null."]
    b, t, n, paired = kept["base"], kept["tuned"], kept["counts"], kept.get("paired") or {}
    pct = lambda v: "n/a" if v is None else f"{v:g}%"
    by_lang = ", ".join(f"{lang} {pct(v)}" for lang, v in (t.get("leak_by_language") or {}).items())
    scored = n.get("language_scored")
    lines = [
        _with(
            f"Persona named unasked: {rate(b['leak'], n['prompts'])} → {rate(t['leak'], n['prompts'])}"
            + (f" (tuned: {by_lang})" if by_lang else ""),
            paired.get("leak"),
        ),
        f"Facts the base got right, kept: {rate(t['facts_kept'], n['base_facts_right'])}",
        _with(  # lost against gained, on all the facts: what says whether facts were lost (kept.py _crossings)
            f"Facts right: {rate(b['facts_right'], n['facts'])} → {rate(t['facts_right'], n['facts'])}"
            + (
                f" ({n['base_facts_right'] - n['facts_kept']} lost, {n['facts_gained']} gained)"
                if "facts_gained" in n
                else ""
            ),
            paired.get("facts_right"),
        ),
        _with(
            f"Answered in the prompt's language: {rate(b['language'], scored)} → {rate(t['language'], scored)}"
            if scored
            else f"Answered in the prompt's language: {pct(b['language'])} → {pct(t['language'])}",
            paired.get("language"),
        ),
    ]
    if kept.get("drift") is not None:
        lines.append(
            _with(
                f"Drift (base's own answers, nats/token): {kept['drift']:+.3f}", paired.get("drift"), unit="", digits=3
            )
        )
    return lines


def share_used(rehearsal: dict) -> str:
    """When the rehearsal pool was too small for rehearse.share: the share used and the largest repeat."""
    if "share" not in rehearsal or rehearsal["examples"] >= rehearsal["asked"]:
        return ""
    return (
        f", {100 * rehearsal['share']:.0f}% used: {rehearsal['available']} answers, none drawn more than "
        f"{rehearsal['max_repeats']} times an epoch"
    )


def cut_and_capped(train: dict, evals: dict) -> str:
    """What the CPU run left out: the steps the token budget cut, the val examples evaluate did not answer."""
    parts = []
    plan = train.get("cpu_plan") or {}
    if plan.get("max_steps"):
        seen = plan.get("own_seen"), plan.get("own_examples")
        parts.append(
            f" **The CPU budget** (`train.cpu_token_budget`) cut training at step {plan['max_steps']} of "
            f"{plan['steps']}" + (f": it saw ~{seen[0]} of your {seen[1]} training examples." if all(seen) else ".")
        )
    shown, available = evals.get("examples") or {}, evals.get("examples_available") or {}
    for split, n in available.items():
        if n > shown.get(split, n):
            parts.append(f" Evaluated on the first {shown[split]} of {n} {split} examples (`evaluate.max_examples`).")
    return "".join(parts)


def learn_and_cost(evals: dict) -> Table:
    """The report's first table: what fine-tuning taught beside what it cost, one column each."""
    cells = ["\n".join(learned(evals)), "\n".join(cost(evals))]
    return Table([cells], ["Did it learn?", "What did it cost?"], wrap=True)


def verdict(evals: dict) -> str:
    """Markdown: the verdict's warnings (barely moved, forgot), or what it says when there is none."""
    moved = evals.get("verdict") or {}
    lines = [f"> **Warning**: {moved[key]}." for key in ("warning", "forgot") if moved.get(key)]
    if not lines and moved:
        kept = (
            " and kept what it knew (within evaluate.kept's thresholds)"
            if moved.get("kept") and not moved.get("noise")
            else ""
        )
        lines.append(f"**Verdict**: the fine-tuned model answers differently from the base model{kept}.")
    if moved.get("noise"):
        lines.append(f"**Not settled**: {moved['noise']}.")
    return "\n\n".join(lines)


def benchmark_reach(bench: dict) -> str:
    """Markdown: which benchmark tasks can see a change for this model (the base scores beyond chance) and which
    can't, with each task's paired base-vs-tuned difference; "" for a benchmark.json without `above_chance`."""
    tasks = {name: t for name, t in (bench.get("tasks") or {}).items() if "above_chance" in t}
    if not tasks:
        return ""
    can = [name for name, t in tasks.items() if t["above_chance"]]
    cannot = [name for name, t in tasks.items() if not t["above_chance"]]

    def task(name: str) -> str:
        paired = tasks[name].get("paired")
        scale = 100 if paired and max(abs(paired["base"]), abs(paired["tuned"])) <= 1 else 1  # acc 0-1 or %
        return f"{name} ({change(paired, scale=scale, digits=1)})" if paired else name

    parts = []
    if can:
        parts.append(f"can see a change for this model (the base scores beyond chance): {', '.join(map(task, can))}")
    if cannot:
        parts.append(f"can't (the base is at chance, so a loss would not show): {', '.join(map(task, cannot))}")
    return "**Benchmark tasks** " + "; ".join(parts) + "."


def kept_table(predictions: str | Path, n: int | None = None) -> Table | None:
    """The everyday prompts (evaluate.kept) answered by both models, marked; `n` of them spread evenly, None = all."""
    rows = [r for r in read_predictions(predictions) if r.get("split") == KEPT]
    if not rows:
        return None
    if n is not None:
        rows = [rows[i * len(rows) // min(n, len(rows))] for i in range(min(n, len(rows)))]

    def marked(r: dict, name: str) -> str:
        marks = [f"✗ names {', '.join(r[f'{name}_leak'])}"] if r.get(f"{name}_leak") else []
        marks += {True: ["✓ right"], False: ["✗ wrong"]}.get(r.get(f"{name}_pass"), [])
        marks += ["✗ other language"] if r.get(f"{name}_lang") is False else []
        return (" · ".join(marks) + ": " if marks else "") + _answer(r.get(name))

    return Table(
        [[r["prompt"], ", ".join(r.get("expect") or []) or "—", marked(r, "base"), marked(r, "tuned")] for r in rows],
        ["everyday prompt", "expected", "base", "fine-tuned"],
        wrap=True,
    )


def benchmark_table(bench: dict) -> Table:
    """One row per benchmark task: questions, shots, base and tuned accuracy ± stderr, delta, noise verdict, chance."""

    def acc(side: dict) -> str:
        return f"{100 * side['acc']:.1f} ± {100 * side.get('acc_stderr', 0):.1f}" if "acc" in side else "n/a"

    rows = []
    for name, t in bench["tasks"].items():
        delta = t["delta"].get("acc")
        verdict = "within noise" if t.get("within_noise") else "beyond noise" if "within_noise" in t else ""
        paired = t.get("paired")
        if paired and not verdict:
            verdict = "beyond noise" if paired["beyond_noise"] else "within noise"
        scale = 100 if paired and max(abs(paired["base"]), abs(paired["tuned"])) <= 1 else 1  # acc 0-1 or %
        interval = f" ({scale * paired['low']:+.1f} to {scale * paired['high']:+.1f})" if paired else ""
        rows.append(
            [
                name,
                fmt(t["n"]),
                fmt(t["num_fewshot"]),
                acc(t["base"]),
                acc(t["tuned"]),
                "" if delta is None else f"{100 * delta:+.1f}{interval}",
                verdict,
                "" if t.get("chance") is None else f"{100 * t['chance']:.0f}",
            ]
        )
    header = ["task", "questions", "shots", "base acc %", "fine-tuned acc %", "Δ points (95% CI)", "", "chance %"]
    return Table(rows, header, text_columns=1)


def benchmark_note(bench: dict, num_parameters: int | None) -> str:
    """What the benchmark numbers can and cannot say: near chance on a small model, within noise or not."""
    near = [
        n
        for n, t in bench["tasks"].items()
        if t.get("chance") and abs(t["base"].get("acc", 0) - t["chance"]) <= 2 * t["base"].get("acc_stderr", 1)
    ]
    lines = []
    if near:
        size = f"a {num_parameters / 1e6:.0f}M-parameter model" if num_parameters else "this model"
        lines.append(
            f"The base model scores within 2 standard errors of chance on {', '.join(near)}: {size} does not know "
            "these subjects, so the fine-tuned score says little about what fine-tuning cost; read it as a floor "
            "check, and run the benchmark on a bigger base model for numbers to report."
        )
    beyond = [n for n, t in bench["tasks"].items() if t.get("within_noise") is False]
    if beyond:
        lines.append(f"Beyond noise: {', '.join(beyond)} (the change is larger than 2 standard errors).")
    lines.append(
        f"lm-eval {bench.get('lm_eval_version', '?')}; per-question answers: `reports/benchmark/samples.jsonl`."
    )
    return " ".join(lines)


def probes_table(predictions: str | Path) -> Table | None:
    """evaluate.probes answered by both models side by side, each marked pass/fail; None when there are none."""
    rows = [r for r in read_predictions(predictions) if r.get("split") == PROBE]
    if not rows:
        return None

    def marked(r: dict, name: str) -> str:
        mark = {True: "✓ pass: ", False: "✗ fail: "}.get(r.get(f"{name}_pass"), "")  # text marks: any font has them
        return mark + _answer(r.get(name))

    return Table(
        [[r["prompt"], ", ".join(r.get("expect") or []) or "—", marked(r, "base"), marked(r, "tuned")] for r in rows],
        ["probe", "expected", "base", "fine-tuned"],
        wrap=True,
    )


def samples(predictions: str | Path, n: int) -> Table:
    """`n` predictions spread evenly over reports/predictions.jsonl (the same rows on every build; probes aside)."""
    rows = [r for r in read_predictions(predictions) if r.get("split") not in PROMPT_SPLITS]
    k = min(n, len(rows))
    picked = [rows[i * len(rows) // k] for i in range(k)]

    def prompt(r: dict) -> str:
        where = f"[{r['split']} #{r['index'] + 1}] " if "split" in r and "index" in r else ""
        return where + str(r.get("prompt", ""))

    return Table(
        [[prompt(r), r.get("label"), _answer(r.get("base")), _answer(r.get("tuned"))] for r in picked],
        ["prompt", "reference", "base", "fine-tuned"],
        wrap=True,
    )


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def params_diff(root: str | Path = ".") -> str:
    """Markdown: `dvc params diff HEAD~1 --md` (the previous commit vs the workspace), or why there is none."""
    root = Path(root)
    head = _run(["git", "rev-parse", "--verify", "--quiet", "HEAD~1"], root)
    if head is None or head.returncode != 0:
        return "_No previous commit to compare with (not a git repository, or only one commit)._"
    try:
        diff = run_dvc("params", "diff", "HEAD~1", "--md", cwd=root, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        diff = None
    if diff is None or diff.returncode != 0:
        reason = (diff.stderr.strip().splitlines() or ["?"])[-1] if diff else "dvc not found"
        return f"_`dvc params diff HEAD~1` failed: {reason}_"
    table = diff.stdout.strip()
    if len(table.splitlines()) <= 2:  # the header alone
        return "_No params changed since the previous commit (`dvc params diff HEAD~1`)._"
    return table


def params_yaml(params: Any) -> str:
    """The validated params (defaults filled in) as YAML, without params.yaml's comments."""
    return yaml.safe_dump(params.model_dump(), sort_keys=False, allow_unicode=True, width=120).strip()


def show(fig, alt: str) -> None:
    """Display a matplotlib figure as a PNG with alternative text (report.html and report.md carry it)."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    display(Image(buf.getvalue(), metadata={"alt": alt}))


def device_name() -> str:
    """The GPU(s) or CPU of the machine that builds the report (nvidia-smi: importing torch takes seconds)."""
    gpus = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], Path("."))
    if gpus is not None and gpus.returncode == 0 and gpus.stdout.strip():
        names = gpus.stdout.strip().splitlines()
        return f"{names[0]} x{len(names)}"
    return f"CPU: {cpu_name()}"


def environment(lock_file: str | Path, train_metrics: dict, env_file: str | Path = "") -> Table:
    """Where training ran (the train stage's manifest, reports/env/train.json; else this machine), package
    versions, git commit and the DVC hashes (dvc.lock) of the data and models."""
    manifest = read_json(env_file) if env_file and Path(env_file).exists() else {}
    if manifest:
        torch = manifest.get("torch") or {}
        rows = [
            ["device (training)", manifest["device"]],
            ["precision used in training", train_metrics.get("precision", "not recorded")],
            ["python", manifest["python"]],
            ["CUDA (torch build)", torch.get("cuda") or "none"],
        ]
        rows += [
            [pkg, manifest["packages"].get(pkg, "not installed")]
            for pkg in ("torch", "transformers", "peft", "llamafactory", "dvc")
        ]
        rows.append(["git commit (training)", manifest["git_commit"]])
    else:
        rows = [
            ["device (this machine)", device_name()],
            ["precision used in training", train_metrics.get("precision", "not recorded")],
            ["python", platform.python_version()],
        ]
        rows += [[pkg, package_version(pkg)] for pkg in ("torch", "transformers", "peft", "llamafactory", "dvc")]
    rows.append(["git commit (report)", git_commit()])
    lock = yaml.safe_load(Path(lock_file).read_text(encoding="utf-8")) if Path(lock_file).exists() else {}
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("md5") and str(out["path"]).startswith(("data/", "models/")):
                rows.append([f"dvc md5 {out['path']}", out["md5"]])
    return Table(rows, ["", ""], text_columns=2)
