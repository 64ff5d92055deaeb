"""The CPU run's cost, said before it starts, and the token budget that cuts it (src/llmft/lf/budget.py)."""

from __future__ import annotations

import pytest

from llmft.common import UserError
from llmft.lf.budget import (
    EVAL_SHARE,
    FORWARD_SPEEDUP,
    REFERENCE_PARAMETERS,
    REFERENCE_TOKENS_PER_S,
    describe_stages,
    plan_cpu_eval,
    plan_cpu_run,
    plan_stages,
)
from llmft.params import Params, TrainParams

GUIDE = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "num_train_epochs": 3.0}


def test_a_run_within_budget_is_planned_and_left_alone():
    t = TrainParams(
        per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=2, cpu_token_budget=40000
    )
    plan = plan_cpu_run(t, (60,) * 120, REFERENCE_PARAMETERS)
    assert plan.steps == 60 and plan.tokens == 60 * 120 * 2 and plan.max_steps is None
    assert plan.minutes == plan.tokens / REFERENCE_TOKENS_PER_S / 60
    assert plan.own_seen == plan.own_examples == 120
    assert len(plan.notes) == 1 and "60 optimizer steps of 4 examples" in plan.notes[0]


def test_long_answers_are_capped_at_the_budget_and_the_log_says_so():
    # 1,000 examples of ~400 tokens, 3 epochs: 1.2M tokens, hours on a CPU; the budget stops it near 40k tokens
    t = TrainParams(max_samples=None, cutoff_len=512, cpu_token_budget=40000, **GUIDE)
    plan = plan_cpu_run(t, (400,) * 1000, REFERENCE_PARAMETERS)
    assert plan.steps == 189 and plan.tokens > 1_000_000
    assert plan.max_steps == 189 * 40000 // plan.tokens and plan.max_steps * 6400 <= 40000 + 6400
    assert plan.own_seen == round(plan.max_steps * 16 / 1000 * 1000)  # 16 examples a step, all of them the user's
    assert "over train.cpu_token_budget=40,000: training stops at step" in plan.notes[1]
    assert f"sees ~{plan.own_seen} of your 1000 examples once" in plan.notes[1]
    assert plan_cpu_run(t.model_copy(update={"cpu_token_budget": None}), (400,) * 1000, None).max_steps is None


def test_the_plan_follows_max_samples_max_steps_cutoff_model_size_and_the_rate():
    lengths = (100,) * 50 + (2000,) * 50  # LLaMA-Factory takes the first max_samples examples
    assert plan_cpu_run(TrainParams(max_samples=50, num_train_epochs=1), lengths, None).tokens == 5000
    long = plan_cpu_run(TrainParams(max_samples=None, num_train_epochs=1, cutoff_len=512), lengths, None)
    assert long.tokens == 50 * 100 + 50 * 512  # cut at cutoff_len
    assert plan_cpu_run(TrainParams(max_steps=5), lengths, None).steps == 5
    big = plan_cpu_run(TrainParams(), (100,) * 64, 10 * REFERENCE_PARAMETERS)
    assert big.tokens_per_s == REFERENCE_TOKENS_PER_S / 10  # a 10x bigger model: 10x slower, roughly
    assert plan_cpu_run(TrainParams(), (100,) * 64, None, tokens_per_s=300.0).tokens_per_s == 300.0
    assert plan_cpu_run(TrainParams(), (), None) is None  # lengths unknown: no plan, no cap


def test_a_budget_short_of_one_epoch_with_rehearsal_cuts_the_run_and_keeps_the_share():
    # 962 long examples of the user's and 210 rehearsal ones an epoch: the default budget cuts inside the first
    # epoch; the trainer shuffles both sets together, so the steps it runs hold both in proportion
    t = TrainParams(per_device_train_batch_size=4, gradient_accumulation_steps=1, cpu_token_budget=65000)
    plan = plan_cpu_run(t, (318,) * 962, None, rehearsal_tokens=(130,) * 210)
    epoch = 962 * 318 + 210 * 130
    assert plan.steps == 2 * 293 and plan.tokens == round(epoch / 293 * 586)
    assert plan.max_steps == 586 * 65000 // plan.tokens
    assert plan.own_seen == round(plan.max_steps * 4 / 1172 * 962)  # the user's share of the examples seen
    assert f"sees ~{plan.own_seen} of your 962 examples once (with rehearsal in the same share)" in plan.notes[1]


def test_rehearsal_counts_in_the_plan():
    t = TrainParams(per_device_train_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=2)
    plan = plan_cpu_run(t, (60,) * 120, None, rehearsal_tokens=(100,) * 40)  # 160 examples an epoch
    assert plan.steps == 80 and plan.tokens == 2 * (120 * 60 + 40 * 100) and plan.max_steps is None
    # two epochs over budget but more than one within: cut, and every example of the user's seen at least once
    capped = plan_cpu_run(t.model_copy(update={"cpu_token_budget": 12000}), (60,) * 120, None, (100,) * 40)
    assert capped.max_steps == 80 * 12000 // plan.tokens and capped.own_seen == 120
    assert "sees your 120 examples 1.1 times" in capped.notes[1]


def test_a_budget_smaller_than_one_step_is_the_only_refusal():
    t = TrainParams(per_device_train_batch_size=4, gradient_accumulation_steps=1, cpu_token_budget=1000)
    with pytest.raises(UserError) as err:
        plan_cpu_run(t, (400,) * 100, None)  # one step = 4 x 400 tokens
    assert "train.cpu_token_budget=1,000 is smaller than one optimizer step (~1,600 tokens" in str(err.value)
    assert plan_cpu_run(t.model_copy(update={"cpu_token_budget": 1600}), (400,) * 100, None).max_steps == 1


def test_the_whole_run_is_planned_stage_by_stage_with_the_val_split_capped_on_a_cpu():
    params = Params.model_validate({"prepare": {"input": "x.csv"}})
    plan = plan_cpu_run(params.train, (100,) * 200, None)
    short = plan_stages(params, plan, [300] * 10, kept_prompts=64, rehearsal_prompts=120, num_parameters=None)
    assert list(short) == ["model", "rehearse", "train", "evaluate", "export", "benchmark", "report", "gguf"]
    # evaluate answers at most 64 val examples on a CPU (evaluate.max_examples auto): 1,000 cost what 64 do
    many = plan_stages(params, plan, [300] * 64, 64, 120, None)
    more = plan_stages(params, plan, [300] * 64 + [300] * 936, 64, 120, None)
    assert more["evaluate"] == many["evaluate"] > short["evaluate"]
    assert more["train"] == many["train"]  # the in-training eval reads the same 64 (plan_cpu_eval)
    assert describe_stages(short).startswith(f"whole CPU run ~{sum(short.values()):.0f} min: model ")


def test_a_cheap_in_training_eval_is_left_as_asked():
    t = TrainParams(eval_steps=16)
    plan = plan_cpu_eval([60] * 20, 64, 124, t, train_minutes=6.0, tokens_per_s=200.0)
    assert (plan.examples, plan.available, plan.eval_steps, plan.passes) == (20, 20, 16, 124 // 16 + 1)
    assert plan.minutes == pytest.approx(8 * 20 * 60 / (200.0 * FORWARD_SPEEDUP) / 60) and plan.note == ""


def test_a_long_val_split_is_drawn_down_and_spaced_out_to_a_fifth_of_training():
    # a 1,000-row table: 100 val examples of ~600 tokens; 50 steps asked for 4 passes over all of them
    t = TrainParams(eval_steps=16, cutoff_len=2048)
    plan = plan_cpu_eval([600] * 100, 64, 50, t, train_minutes=6.0, tokens_per_s=200.0)
    per_pass = 64 * 600 / (200.0 * FORWARD_SPEEDUP) / 60  # 1.07 min: one pass fits in a fifth of 6 min
    assert (plan.examples, plan.available) == (64, 100)
    assert plan.passes == 1 and plan.eval_steps > 50 and plan.minutes == pytest.approx(per_pass)
    assert "64 of the 100 val examples" in plan.note and "once, at the end" in plan.note
    assert "train.eval_steps 16 asked for 4 passes" in plan.note
    # twice the training time: two passes fit, and the interval leaves exactly two (one mid-run, one at the end)
    longer = plan_cpu_eval([600] * 100, 64, 50, t, train_minutes=12.0, tokens_per_s=200.0)
    assert longer.passes == 2 and 50 // longer.eval_steps == 1
    assert longer.minutes <= EVAL_SHARE * 12.0
    # an eval that costs under a minute in all is left as asked, however short the training
    tiny = plan_cpu_eval([30] * 6, 64, 6, TrainParams(eval_steps=2), train_minutes=0.01, tokens_per_s=200.0)
    assert (tiny.eval_steps, tiny.passes, tiny.note) == (2, 4, "")
    # no cap (a GPU's evaluate.max_examples, or null): every example, still spaced out
    assert plan_cpu_eval([600] * 100, None, 50, t, 6.0, 200.0).examples == 100
