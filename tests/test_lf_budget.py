"""The CPU run's cost, said before it starts, and the token budget (src/llmft/lf/budget.py)."""

from __future__ import annotations

from llmft.lf.budget import REFERENCE_PARAMETERS, REFERENCE_TOKENS_PER_S, plan_cpu_run
from llmft.params import TrainParams


def test_a_run_within_budget_is_planned_and_left_alone():
    t = TrainParams(
        per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=2, cpu_token_budget=40000
    )
    plan = plan_cpu_run(t, (60,) * 120, REFERENCE_PARAMETERS)
    assert plan.steps == 60 and plan.tokens == 60 * 120 * 2 and plan.max_steps is None
    assert plan.minutes == plan.tokens / REFERENCE_TOKENS_PER_S / 60
    assert len(plan.notes) == 1 and "60 optimizer steps of 4 examples" in plan.notes[0]


def test_long_answers_are_capped_at_the_budget_and_the_log_says_so():
    # 1,000 examples of ~400 tokens, 3 epochs: 1.2M tokens, hours on a CPU; the budget stops it near 40k tokens
    t = TrainParams(max_samples=None, cutoff_len=512, cpu_token_budget=40000)
    plan = plan_cpu_run(t, (400,) * 1000, REFERENCE_PARAMETERS)
    assert plan.steps == 189 and plan.tokens > 1_000_000
    assert plan.max_steps == 189 * 40000 // plan.tokens and plan.max_steps * 6400 <= 40000 + 6400
    assert "over train.cpu_token_budget=40,000: training stops at step" in plan.notes[1]
    assert plan_cpu_run(t.model_copy(update={"cpu_token_budget": None}), (400,) * 1000, None).max_steps is None


def test_the_plan_follows_max_samples_max_steps_cutoff_and_model_size():
    lengths = (100,) * 50 + (2000,) * 50  # LLaMA-Factory takes the first max_samples examples
    assert plan_cpu_run(TrainParams(max_samples=50, num_train_epochs=1), lengths, None).tokens == 5000
    long = plan_cpu_run(TrainParams(max_samples=None, num_train_epochs=1, cutoff_len=512), lengths, None)
    assert long.tokens == 50 * 100 + 50 * 512  # cut at cutoff_len
    assert plan_cpu_run(TrainParams(max_steps=5), lengths, None).steps == 5
    big = plan_cpu_run(TrainParams(), (100,) * 64, 10 * REFERENCE_PARAMETERS)
    assert big.tokens_per_s == REFERENCE_TOKENS_PER_S / 10  # a 10x bigger model: 10x slower, roughly
    assert plan_cpu_run(TrainParams(), (), None) is None  # lengths unknown: no plan, no cap


def test_rehearsal_counts_in_the_plan_and_a_budget_without_room_for_it_is_an_error():
    import pytest

    from llmft.common import UserError

    t = TrainParams(per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=2)
    plan = plan_cpu_run(t, (60,) * 120, None, rehearsal_tokens=(100,) * 40)  # 160 examples an epoch
    assert plan.steps == 80 and plan.tokens == 2 * (120 * 60 + 40 * 100) and plan.max_steps is None
    # a cut inside the first epoch would train on some rehearsal rows in place of some of the user's own
    with pytest.raises(UserError) as err:
        plan_cpu_run(t.model_copy(update={"cpu_token_budget": 10000}), (60,) * 120, None, (100,) * 40)
    message = str(err.value)
    assert "train.cpu_token_budget=10,000 leaves no room for rehearsal: one epoch is 11,200 tokens" in message
    assert "rehearsal.share" in message and "rehearsal.enabled: false" in message
    # two epochs over budget but one within: capped as without rehearsal
    assert plan_cpu_run(t.model_copy(update={"cpu_token_budget": 12000}), (60,) * 120, None, (100,) * 40).max_steps
