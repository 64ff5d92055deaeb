"""The report's first screen: did it learn, what did it cost, and the verdict, from eval.json and benchmark.json.

    from llmft.report import summary
    display(summary.learn_and_cost(evals)); display(Markdown(summary.verdict(evals)))

Each rate carries its count and Wilson interval, each base-vs-tuned change its paired interval and whether it is
beyond noise (llmft.stats): the intervals are the evaluate stage's, only worded here.
"""

from __future__ import annotations

from llmft.report.render import Table
from llmft.stats import proportion_interval


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


def learn_and_cost(evals: dict) -> Table:
    """The report's first table: what fine-tuning taught beside what it cost, one column each."""
    cells = ["\n".join(learned(evals)), "\n".join(cost(evals))]
    return Table([cells], ["Did it learn?", "What did it cost?"], wrap=True)


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


def preference(evals: dict) -> str:
    """ "Did preference tuning help?": how base, SFT and tuned rank the prefer stage's held-out pairs, and the tuned
    model's change against the SFT model with its interval; "" when the stage was off (no pairs)."""
    block = evals.get("preference")
    if not block:
        return ""
    models = " → ".join(
        f"{name} {rate(block[name]['accuracy'], block['n'])}" for name in ("base", "sft", "tuned") if name in block
    )
    paired = block.get("paired", {})
    ref = "sft" if "tuned_vs_sft" in paired else "base"
    vs = paired.get(f"tuned_vs_{ref}", {})
    margin = block["tuned"]["margin"]
    return (
        f"**Did preference tuning help?** Held-out pairs ranked right (chosen more likely than rejected): {models}"
        + (f" ({change(vs['accuracy'])} against {ref.upper() if ref == 'sft' else ref})" if vs else "")
        + f"; log-likelihood margin of the tuned model {margin:+.2f} nats"
        + (f" ({change(vs['margin'], ' nats', 2)})" if vs else "")
        + ". The first table compares the tuned model (SFT + preference tuning) with the base; the next one with SFT."
    )


def against_sft(evals: dict) -> Table | None:
    """The first screen's two columns again for eval.json's `preference_tuning`: the SFT model in the base's place,
    so each line reads "SFT → SFT + preference tuning" with its interval; None when the stage was off."""
    block = evals.get("preference_tuning")
    if not block:
        return None
    cells = ["\n".join(learned(block)), "\n".join(cost(block))]
    return Table([cells], ["Learned: SFT → + preference tuning", "Kept: SFT → + preference tuning"], wrap=True)


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
