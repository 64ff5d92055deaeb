"""What a training run will cost on a CPU, said before it starts, and a cap that keeps it inside a token budget.

    plan = plan_cpu_run(params.train, example_tokens, num_parameters=134_515_008)
    plan.max_steps   # None when the run fits train.cpu_token_budget, else the step to stop at
    plan.notes       # what the log says: steps, tokens, minutes, and the cap if any

On a CPU the time of a step grows with the tokens in it, so a budget counted in steps does not hold once a user's
answers are long: a 1,000-row table of long Chinese answers took 60 s a step where the default took 19 s. Tokens
track the cost; the budget (train.cpu_token_budget) caps the optimizer steps so the run stays near it.
"""

from __future__ import annotations

import dataclasses
import math

from llmft.common import UserError

# Measured: LoRA on SmolLM2-135M trains at 76-124 tokens/s in fp32 on a 2-core x86 CPU (Xeon and EPYC), and at
# ~215 in bf16 with the fast profile (2-core EPYC, AVX512-BF16; lf/profile.py). A step's cost grows about linearly
# with the parameters, so other models are scaled from it; a rough guide, not a promise.
REFERENCE_TOKENS_PER_S = 90.0
REFERENCE_BF16_TOKENS_PER_S = 200.0
REFERENCE_PARAMETERS = 134_515_008


def reference_rate(precision: str, num_parameters: int | None) -> float:
    """The tokens/s to plan a CPU run with: the reference for this precision, scaled by model size."""
    rate = REFERENCE_BF16_TOKENS_PER_S if precision == "bf16" else REFERENCE_TOKENS_PER_S
    return rate * REFERENCE_PARAMETERS / (num_parameters or REFERENCE_PARAMETERS)


@dataclasses.dataclass
class CpuPlan:
    steps: int  # optimizer steps params.train asks for
    tokens: int  # tokens those steps process (examples as LLaMA-Factory encodes them, cut at cutoff_len)
    minutes: float  # at the estimated tokens/s
    tokens_per_s: float
    max_steps: int | None = None  # the cap to apply, None = within budget
    own_examples: int = 0  # the user's examples in an epoch
    own_seen: int = 0  # how many of them the run sees (all, when it is not cut inside its first epoch)
    eval: CpuEval | None = None  # the in-training eval loss, kept near EVAL_SHARE of the run (plan_cpu_eval)
    notes: list[str] = dataclasses.field(default_factory=list)


def plan_cpu_run(
    t,
    example_tokens: tuple[int, ...],
    num_parameters: int | None,
    rehearsal_tokens: tuple[int, ...] = (),
    world_size: int = 1,
    tokens_per_s: float | None = None,
) -> CpuPlan | None:
    """The steps, tokens and minutes params.train (`t`) asks for on this data; None when the lengths are unknown.

    LLaMA-Factory takes the first max_samples examples; an optimizer step takes batch x accumulation x world_size
    of them (every process its own share). Tokens and minutes count all processes together: processes that share
    a CPU's cores share its tokens/s too. `tokens_per_s`: the rate expected for this model on this machine (the
    reference scaled by model size when None).
    `rehearsal_tokens`: the lengths of the rehearsal examples mixed into each epoch (lf/mixing.py). The trainer
    shuffles them in with the user's, so a run cut short keeps the share in every step: it sees fewer of both.
    A budget smaller than one optimizer step is a UserError: no run fits it.
    """
    own = [min(n, t.cutoff_len) for n in (example_tokens[: t.max_samples] if t.max_samples else example_tokens)]
    if not own:
        return None
    lengths = own + [min(n, t.cutoff_len) for n in rehearsal_tokens]
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(len(lengths) / per_step)
    steps = t.max_steps or max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
    step_tokens = sum(lengths) / steps_per_epoch  # the average step's tokens
    tokens = round(step_tokens * steps)
    rate = tokens_per_s or reference_rate("fp32", num_parameters)
    plan = CpuPlan(steps, tokens, tokens / rate / 60, rate, own_examples=len(own))
    procs = f" ({world_size} processes)" if world_size > 1 else ""
    plan.notes.append(
        f"CPU run: {steps} optimizer steps of {per_step} examples{procs} ({len(lengths)} examples, "
        f"{sum(lengths):,} tokens per epoch) = ~{tokens:,} tokens, ~{plan.minutes:.1f} min at ~{rate:.0f} tokens/s "
        "(an estimate from 2-core CPUs, scaled by model size)"
    )
    budget = t.cpu_token_budget
    if budget and budget < step_tokens:
        raise UserError(
            f"train.cpu_token_budget={budget:,} is smaller than one optimizer step (~{step_tokens:,.0f} tokens: "
            f"{per_step} examples of ~{sum(lengths) / len(lengths):.0f} tokens): raise it to at least "
            f"{math.ceil(step_tokens):,}, lower train.per_device_train_batch_size, or set it to null"
        )
    if budget and tokens > budget:
        plan.max_steps = max(1, math.floor(steps * budget / tokens))
    run_steps = plan.max_steps or steps
    passes = run_steps * per_step / len(lengths)  # epochs the run goes through, a fraction when cut inside one
    plan.own_seen = len(own) if passes >= 1 else round(passes * len(own))
    if plan.max_steps:
        seen = (
            f"sees ~{plan.own_seen} of your {len(own)} examples once"
            if passes < 1
            else f"sees your {len(own)} examples {passes:.1f} times"
        ) + (" (with rehearsal in the same share)" if rehearsal_tokens else "")
        plan.notes.append(
            f"over train.cpu_token_budget={budget:,}: training stops at step {plan.max_steps} of {steps} "
            f"(~{budget:,} tokens, ~{budget / rate / 60:.1f} min) and {seen}; the learning-rate schedule ends "
            "there. Raise the budget, or set it to null, to train all of it"
        )
    return plan


# The other stages of a CPU run, for the whole run's estimate; measured on 2-core CPUs with SmolLM2-135M in
# `make all` (reports/metrics/*.json) and scaled by model size like training: a rough guide, not a promise.
DECODE_TOKENS_PER_S = 130.0  # greedy answers, batch 16 (rehearse, evaluate)
FORWARD_SPEEDUP = 3.0  # a teacher-forced forward pass (eval loss) against a training step's forward + backward
SECONDS_PER_QUESTION = 0.35  # lm-eval, one multiple-choice question, both models (mmlu_subset 0.35, hellaswag 0.32)
TASK_QUESTIONS = {"hellaswag_subset": 400, "mmlu_subset": 171}  # the shipped tasks; another counts as 200
SECONDS_PER_GGUF = 32.0  # convert one GGUF type and check it
SECONDS_FIXED = {"model": 16.0, "export": 12.0, "report": 10.0}


EVAL_SHARE = 0.2  # of training's minutes the in-training eval may take on a CPU ...
EVAL_FLOOR_MINUTES = 1.0  # ... or this long in all, whichever is more: a cheap eval is left as asked


@dataclasses.dataclass
class CpuEval:
    """The in-training eval of a CPU run: how many val examples each pass reads, and how often it runs."""

    examples: int  # val examples each pass reads (LLaMA-Factory's num_samples on the val entry when fewer)
    available: int  # the val split's examples
    eval_steps: int  # every this many steps, and once at the end
    passes: int
    minutes: float  # all passes together
    note: str = ""


def plan_cpu_eval(
    val_tokens: list[int], cap: int | None, run_steps: int, t, train_minutes: float, tokens_per_s: float
) -> CpuEval | None:
    """Keep the eval loss during training to about EVAL_SHARE of training's time on a CPU.

    Each pass reads the whole val split, so a user's long val split cost as much as the training it watched: a
    1,000-row table's 100 long val examples, four passes, took half of a 13-minute train stage on 2 cores. Each pass
    reads at most `cap` examples (evaluate.max_examples, the set evaluate answers on a CPU), and passes are spaced out
    (train.eval_steps raised) until they fit; the final eval always runs, so the curve keeps its last point.
    """
    if not val_tokens or not run_steps:
        return None
    lengths = [min(n, t.cutoff_len) for n in val_tokens]
    examples = min(len(lengths), cap or len(lengths))
    per_pass = sum(lengths) / len(lengths) * examples / (tokens_per_s * FORWARD_SPEEDUP) / 60
    eval_steps, passes = t.eval_steps, run_steps // t.eval_steps + 1
    allowed = max(EVAL_SHARE * train_minutes, EVAL_FLOOR_MINUTES)
    fit = max(1, math.floor(allowed / per_pass)) if per_pass else passes
    if passes > fit:  # the largest interval that leaves `fit` passes, the final one included
        eval_steps = math.ceil((run_steps + 1) / fit)
        passes = run_steps // eval_steps + 1
    plan = CpuEval(examples, len(lengths), eval_steps, passes, passes * per_pass)
    if examples < len(lengths) or eval_steps != t.eval_steps:
        drawn = f"{examples} of the {len(lengths)} val examples (drawn with the seed)"
        when = f"every {eval_steps} steps and at the end ({passes} passes, " if passes > 1 else "once, at the end ("
        plan.note = (
            f"in-training eval loss on a CPU: {drawn}, {when}~{plan.minutes:.1f} min; train.eval_steps "
            f"{t.eval_steps} asked for {run_steps // t.eval_steps + 1} passes), so it stays near {EVAL_SHARE:.0%} of "
            "training; evaluate measures the tuned model after"
        )
    return plan


def plan_stages(
    params,
    train_plan: CpuPlan,
    val_tokens: list[int],
    kept_prompts: int,
    rehearsal_prompts: int,
    num_parameters: int | None,
) -> dict[str, float]:
    """Minutes of each stage of a CPU `make all` with these params: the plan the train stage prints first.

    `val_tokens`: the val split's example lengths (its in-training eval and evaluate's loss); `kept_prompts`,
    `rehearsal_prompts`: the sizes of evaluate.kept.prompts and rehearse.prompts. Answers are counted at 70% of their
    max_new_tokens (many stop early).
    """
    scale = REFERENCE_PARAMETERS / (num_parameters or REFERENCE_PARAMETERS)
    decode, e, t = DECODE_TOKENS_PER_S * scale, params.evaluate, params.train
    cap = e.examples_cap(cuda=False)
    answered = val_tokens[:cap] if cap else val_tokens
    run_steps = train_plan.max_steps or train_plan.steps
    forward = train_plan.tokens_per_s * FORWARD_SPEEDUP
    minutes = {"model": SECONDS_FIXED["model"] / 60}
    if params.rehearse.enabled:
        minutes["rehearse"] = rehearsal_prompts * 0.7 * params.rehearse.max_new_tokens / decode / 60
    minutes["train"] = run_steps / train_plan.steps * train_plan.minutes
    in_training = plan_cpu_eval(val_tokens, cap, run_steps, t, minutes["train"], train_plan.tokens_per_s)
    minutes["train"] += in_training.minutes if in_training else 0.0
    prompts = len(answered) + len(e.probes) + kept_prompts
    minutes["evaluate"] = 2 * (prompts * 0.7 * e.max_new_tokens / decode + sum(answered) / forward) / 60
    minutes["export"] = SECONDS_FIXED["export"] / scale / 60
    if params.benchmark.enabled:
        limit = params.benchmark.limit or float("inf")
        questions = sum(min(TASK_QUESTIONS.get(task, 200), limit) for task in params.benchmark.tasks)
        minutes["benchmark"] = questions * SECONDS_PER_QUESTION / scale / 60
    minutes["report"] = SECONDS_FIXED["report"] / 60
    minutes["gguf"] = len(params.gguf.types) * SECONDS_PER_GGUF / scale / 60
    return minutes


def describe_stages(minutes: dict[str, float]) -> str:
    return f"whole CPU run ~{sum(minutes.values()):.0f} min: " + ", ".join(
        f"{stage} {m:.1f}" for stage, m in minutes.items()
    )
