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

# Measured: LoRA on SmolLM2-135M in fp32 trains at 76-99 tokens/s on a 2-core x86 CPU (Xeon and EPYC). A step's
# cost grows about linearly with the parameters, so other models are scaled from it; a rough guide, not a promise.
REFERENCE_TOKENS_PER_S = 90.0
REFERENCE_PARAMETERS = 134_515_008


@dataclasses.dataclass
class CpuPlan:
    steps: int  # optimizer steps params.train asks for
    tokens: int  # tokens those steps process (examples as LLaMA-Factory encodes them, cut at cutoff_len)
    minutes: float  # at the estimated tokens/s
    tokens_per_s: float
    max_steps: int | None = None  # the cap to apply, None = within budget
    notes: list[str] = dataclasses.field(default_factory=list)


def plan_cpu_run(
    t,
    example_tokens: tuple[int, ...],
    num_parameters: int | None,
    rehearsal_tokens: tuple[int, ...] = (),
    world_size: int = 1,
) -> CpuPlan | None:
    """The steps, tokens and minutes params.train (`t`) asks for on this data; None when the lengths are unknown.

    LLaMA-Factory takes the first max_samples examples; an optimizer step takes batch x accumulation x world_size
    of them (every process its own share). Tokens and minutes count all processes together: processes that share
    a CPU's cores share its tokens/s too.
    `rehearsal_tokens`: the lengths of the rehearsal examples mixed into each epoch (lf/mixing.py). With them, a
    budget that leaves no room for one epoch is a UserError: a cut would drop some of the user's own examples.
    """
    own = [min(n, t.cutoff_len) for n in (example_tokens[: t.max_samples] if t.max_samples else example_tokens)]
    if not own:
        return None
    lengths = own + [min(n, t.cutoff_len) for n in rehearsal_tokens]
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(len(lengths) / per_step)
    steps = t.max_steps or max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
    tokens = round(sum(lengths) / steps_per_epoch * steps)  # the average step's tokens, times the steps
    rate = REFERENCE_TOKENS_PER_S * REFERENCE_PARAMETERS / (num_parameters or REFERENCE_PARAMETERS)
    plan = CpuPlan(steps, tokens, tokens / rate / 60, rate)
    procs = f" ({world_size} processes)" if world_size > 1 else ""
    plan.notes.append(
        f"CPU run: {steps} optimizer steps of {per_step} examples{procs} ({len(lengths)} examples, "
        f"{sum(lengths):,} tokens per epoch) = ~{tokens:,} tokens, ~{plan.minutes:.1f} min at ~{rate:.0f} tokens/s "
        f"(a rough estimate: SmolLM2-135M measured 76-99 tokens/s on a 2-core CPU)"
    )
    budget = t.cpu_token_budget
    if budget and rehearsal_tokens and budget < sum(lengths):
        raise UserError(
            f"train.cpu_token_budget={budget:,} leaves no room for rehearsal: one epoch is {sum(lengths):,} tokens "
            f"({sum(own):,} of your {len(own)} examples + {sum(lengths) - sum(own):,} of {len(rehearsal_tokens)} "
            "rehearsal examples), and a cut would drop some of your own; raise train.cpu_token_budget, lower "
            "rehearsal.share, or set rehearsal.enabled: false"
        )
    if budget and tokens > budget:
        plan.max_steps = max(1, math.floor(steps * budget / tokens))
        plan.notes.append(
            f"over train.cpu_token_budget={budget:,}: training stops at step {plan.max_steps} of {steps} "
            f"(~{budget:,} tokens, ~{budget / rate / 60:.1f} min) and the learning-rate schedule ends there; "
            "raise the budget, or set it to null to train all of it"
        )
    return plan
