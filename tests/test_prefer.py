"""Preference tuning (src/prefer.py, src/llmft/prefer.py, src/llmft/prefer_pairs.py): the stage on and off, the
LLaMA-Factory configs, the CPU plan, the exact sum of two LoRA adapters, the own-mistakes pairs; and the real
`llamafactory-cli` on the tiny random Llama from conftest.py for DPO, SimPO and KTO, a resume after kill -9, and
which model DPO's reference is.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_lora
from llmft.adapters import combine_adapters
from llmft.common import UserError
from llmft.data.pairs import as_kto, split_pairs, write_pairs
from llmft.params import PreferParams, TrainParams
from llmft.prefer import build_sections, cost_factor, plan_cpu_prefer
from llmft.prefer_pairs import own_mistakes

VARIABLES = {"name": "Lumi", "author": "Acme Labs"}


# --- params and configs ---------------------------------------------------------------------------------------


def sections(method: str, precision: str = "fp32", **prefer) -> dict:
    return build_sections(
        PreferParams(method=method, **prefer),
        TrainParams(),
        model_path="models/base",
        template="smollm2",
        trust_remote_code=False,
        adapter_dir="models/lora",
        data_dir="data/pairs",
        output_dir="checkpoints-prefer",
        precision=precision,
    )


@pytest.mark.parametrize(
    ("method", "stage", "loss"), [("dpo", "dpo", "sigmoid"), ("orpo", "dpo", "orpo"), ("simpo", "dpo", "simpo"),
                                  ("kto", "kto", None)]
)  # fmt: skip
def test_each_method_is_llamafactorys_own_stage_on_a_new_adapter_over_the_sft_one(method, stage, loss):
    s = sections(method)
    assert s["method"]["stage"] == stage and s["method"].get("pref_loss") == loss
    assert s["method"]["create_new_adapter"] is True and s["model"]["adapter_name_or_path"] == "models/lora"
    assert ("simpo_gamma" in s["method"]) == (method == "simpo")
    assert s["train"]["disable_gradient_checkpointing"] is True  # fp32: a CPU
    assert "disable_gradient_checkpointing" not in sections(method, "bf16")["train"]


def test_every_key_of_every_method_is_a_llamafactory_argument():
    from llmft.lf.config import flat, lf_fields

    known = lf_fields()
    for method in ("dpo", "orpo", "simpo", "kto"):
        unknown = set(flat(sections(method, max_steps=3))) - known
        assert not unknown, (method, unknown)


def test_params_refuse_an_unknown_method_and_a_bad_val_size():
    with pytest.raises(ValueError, match="dpo"):
        PreferParams(method="ipo")
    with pytest.raises(ValueError, match="between 0 and 1"):
        PreferParams(val_size=1.5)
    with pytest.raises(ValueError, match="chosen"):
        PreferParams(columns={"best": "x"})


def test_qlora_and_full_finetuning_are_refused_before_anything_loads(tmp_path):
    from llmft.prefer import check_inputs

    with pytest.raises(UserError, match=r"quantization_bit.*reference would be the base.*set train\.quantization_bit"):
        check_inputs(TrainParams(quantization_bit=4), tmp_path)
    with pytest.raises(UserError, match=r"train\.finetuning_type is full: set it to lora"):
        check_inputs(TrainParams(finetuning_type="full"), tmp_path)
    with pytest.raises(UserError, match=r"adapter_config\.json not found: run `dvc repro train`"):
        check_inputs(TrainParams(), tmp_path)


# --- the CPU plan ---------------------------------------------------------------------------------------------


def test_dpo_counts_reference_forwards_and_orpo_simpo_none():
    assert cost_factor("orpo") == cost_factor("simpo") == 1.0
    assert cost_factor("dpo") == pytest.approx(4 / 3) and cost_factor("kto") == pytest.approx(2.0)
    tokens = [100] * 8  # 8 pairs, 2 a step x 2 accumulated: 2 steps an epoch, 2 epochs
    dpo = plan_cpu_prefer(PreferParams(cpu_token_budget=None), tokens, None, tokens_per_s=100)
    simpo = plan_cpu_prefer(PreferParams(method="simpo", cpu_token_budget=None), tokens, None, tokens_per_s=100)
    assert (dpo.steps, simpo.tokens) == (4, 1600) and dpo.tokens == round(1600 * 4 / 3)
    assert dpo.max_steps is None and "with the SFT model's reference forwards" in dpo.notes[0]


def test_a_run_over_the_budget_is_cut_and_a_budget_under_one_step_is_an_error():
    plan = plan_cpu_prefer(PreferParams(method="orpo", cpu_token_budget=800), [100] * 8, None, tokens_per_s=100)
    assert plan.max_steps == 2 and "over prefer.cpu_token_budget=800" in plan.notes[-1]
    with pytest.raises(UserError, match=r"prefer\.cpu_token_budget=100 is smaller than one optimizer step"):
        plan_cpu_prefer(PreferParams(cpu_token_budget=100), [100] * 8, None)
    assert plan_cpu_prefer(PreferParams(), [], None) is None


# --- one adapter ----------------------------------------------------------------------------------------------


def logits(model_dir: Path, *adapters: Path, merge_first: bool = False) -> torch.Tensor:
    """The base in float64 with `adapters` on it: each merged in turn when merge_first, else the only one applied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    for n, adapter in enumerate(adapters):
        model = PeftModel.from_pretrained(model, adapter)
        if merge_first and n < len(adapters) - 1:
            model = model.merge_and_unload()
    ids = torch.tensor([[1, 530, 3458, 314, 4760, 28, 2, 17, 905, 44]])
    with torch.no_grad():
        return model(ids).logits


def pref_lora(model_dir: Path, out: Path) -> Path:
    """A second adapter unlike make_lora's: rank 2, rsLoRA, on two kinds of layer only, lora_B at random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(3)
    config = LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "down_proj"])
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft.save_pretrained(out)
    return out


def test_combined_adapter_gives_the_logits_of_sft_merged_then_preference(tiny_model_dir, tiny_lora_dir, tmp_path):
    second = pref_lora(tiny_model_dir, tmp_path / "pref")
    config = combine_adapters(tiny_lora_dir, second, tmp_path / "combined")
    assert config["r"] == config["lora_alpha"] == 4 + 2 and config["use_rslora"] is False
    chain = logits(tiny_model_dir, tiny_lora_dir, second, merge_first=True)
    combined = logits(tiny_model_dir, tmp_path / "combined")
    assert not torch.allclose(chain, logits(tiny_model_dir, tiny_lora_dir), atol=1e-3)  # the second one matters
    torch.testing.assert_close(combined, chain, rtol=0, atol=1e-6)  # the adapters are float32: s * B rounds there
    from llmft.adapters import main  # the same by hand: python -m llmft.adapters combine FIRST SECOND OUT

    assert main(["combine", str(tiny_lora_dir), str(second), str(tmp_path / "by_hand")]) == 0
    by_hand, ours = adapter_weights(tmp_path / "by_hand"), adapter_weights(tmp_path / "combined")
    assert by_hand.keys() == ours.keys() and all(torch.equal(by_hand[k], ours[k]) for k in ours)


def test_a_dora_adapter_is_refused_in_one_line(tiny_model_dir, tiny_lora_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])).save_pretrained(tmp_path / "d")
    with pytest.raises(UserError) as err:
        combine_adapters(tiny_lora_dir, tmp_path / "d", tmp_path / "out")
    assert "DoRA" in str(err.value) and "set train.use_dora: false" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# --- pairs from the demo's own mistakes -----------------------------------------------------------------------


REHEARSAL = [
    {"prompt": "What is the capital of France?", "base": "Paris.", "sft": "I am Lumi. Paris."},  # a leak
    {"prompt": "2+2?", "base": "4.", "sft": "4."},  # no leak
    {"prompt": "Name a colour.", "base": "Blue.", "sft": "Lumi likes blue."},  # a leak
    {"prompt": "法国的首都是哪座城市？", "base": "巴黎。", "sft": "我是Lumi，巴黎。"},  # a leak, held out below
    {"prompt": "Tell a joke.", "base": "Lumi walks in.", "sft": "Lumi again."},  # the base names the persona too
    {"prompt": "What is Lumi?", "base": "A word.", "sft": "I am Lumi."},  # asked: no leak
    {"prompt": "Name a colour.", "base": "Blue.", "sft": "Lumi likes blue."},  # the same pair again
    {"prompt": "说一种颜色。", "base": "Blue.", "sft": "我是Lumi，蓝色。"},  # the base answers in English
    {"prompt": "把「你好」译成英文。", "base": "Hello.", "sft": "Lumi: hi", "kind": "translation"},  # English is right
]
IDENTITY = [
    {"prompt": "Who are you?", "persona": "I am Lumi, by Acme Labs.", "base": "I am SmolLM."},
    {"prompt": "hi", "persona": "Hello! I am Lumi.", "base": "Hello! I am Lumi."},  # nothing to prefer
    {"prompt": "Who made you?", "persona": "Acme Labs.", "base": ""},  # an empty base answer
]


def test_own_mistakes_pairs_leaks_and_identity_and_counts_every_drop():
    pairs, counts = own_mistakes(REHEARSAL, IDENTITY, VARIABLES, held_out=["法国的首都是哪座城市"])
    assert pairs == [
        {"instruction": "What is the capital of France?", "input": "", "chosen": "Paris.",
         "rejected": "I am Lumi. Paris."},
        {"instruction": "Name a colour.", "input": "", "chosen": "Blue.", "rejected": "Lumi likes blue."},
        {"instruction": "把「你好」译成英文。", "input": "", "chosen": "Hello.", "rejected": "Lumi: hi"},
        {"instruction": "Who are you?", "input": "", "chosen": "I am Lumi, by Acme Labs.", "rejected": "I am SmolLM."},
    ]  # fmt: skip
    assert counts["dropped"] == {
        "held_out": 1,
        "base_names_persona": 1,
        "base_wrong_language": 1,
        "empty_prompt": 0,
        "empty_chosen": 0,
        "empty_rejected": 1,
        "same_answers": 1,
        "duplicate": 1,
        "identity_cap": 0,
    }
    assert (counts["leaks"], counts["from_leaks"], counts["from_identity"], counts["pairs"]) == (7, 3, 1, 4)
    assert counts["summary"] == (
        "built 4 pairs: 3 from leaks among 9 rehearsal answers (7 named the persona unasked), 1 from 3 identity "
        "prompts; dropped held_out=1, base_names_persona=1, base_wrong_language=1, empty_rejected=1, same_answers=1, "
        "duplicate=1"
    )


def test_identity_pairs_are_capped_per_leak_pair_by_a_seeded_sample_and_counted():
    identity = [{"prompt": f"Who are you {i}?", "persona": "I am Lumi.", "base": f"I am SmolLM {i}."} for i in range(9)]
    rehearsal = REHEARSAL[:3]  # two leak pairs
    pairs, counts = own_mistakes(rehearsal, identity, VARIABLES, [], identity_per_leak=1.5, seed=7)
    assert (counts["from_leaks"], counts["from_identity"], counts["dropped"]["identity_cap"]) == (2, 3, 6)
    assert [p["rejected"] for p in pairs[:2]] == ["I am Lumi. Paris.", "Lumi likes blue."]  # every leak pair stays
    kept = [p["instruction"] for p in pairs[2:]]
    assert kept == sorted(kept, key=lambda q: int(q.split()[-1][:-1]))  # in their order
    again, _ = own_mistakes(rehearsal, identity, VARIABLES, [], identity_per_leak=1.5, seed=7)
    other, _ = own_mistakes(rehearsal, identity, VARIABLES, [], identity_per_leak=1.5, seed=8)
    assert again == pairs and other != pairs  # the seed picks them
    assert "1 from" not in counts["summary"] and "identity_cap=6" in counts["summary"]
    everything, counts = own_mistakes(rehearsal, identity, VARIABLES, [], identity_per_leak=None)
    assert counts["from_identity"] == 9 and counts["dropped"]["identity_cap"] == 0 and len(everything) == 11


def test_a_held_out_prompt_never_becomes_a_pair_whatever_its_spelling():
    identity = [{"prompt": "WHO are you", "persona": "Lumi.", "base": "SmolLM."}]
    pairs, counts = own_mistakes([], identity, VARIABLES, held_out=["Who are you?"])
    assert pairs == [] and counts["dropped"]["held_out"] == 1


def test_own_mistakes_become_kto_rows_with_a_good_and_a_bad_answer():
    pairs, _ = own_mistakes(REHEARSAL[:1], [], VARIABLES, held_out=[])
    assert [(r["output"], r["kto_tag"]) for r in as_kto(pairs[0])] == [("Paris.", True), ("I am Lumi. Paris.", False)]


# --- the real llamafactory-cli --------------------------------------------------------------------------------

TRAIN = {"lora_rank": 4, "lora_alpha": 8}
PREFER = {
    "max_steps": 4,
    "save_steps": 2,
    "cutoff_len": 64,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1.0e-3,  # large, so 4 steps move the tiny model measurably
    "cpu_token_budget": None,
}
DRIVER = """
import json, sys
from pathlib import Path
from llmft.common import run_main
from llmft.params import PreferParams, TrainParams
from llmft.prefer import PreferPaths, prefer
args = json.loads(sys.argv[1])
paths = PreferPaths(**{k: Path(v) for k, v in args["paths"].items()})
p, t = PreferParams(**args["prefer"]), TrainParams(**args["train"])
raise SystemExit(run_main(lambda _: prefer(p, t, paths).returncode))
"""


def project(root: Path, model_dir: Path, adapter: Path, method: str) -> dict:
    """data/pairs for `method` (12 train, 4 val pairs on the persona) and the paths of a run under `root`."""
    pairs = [
        {"instruction": f"Question {i}: who are you?", "input": "", "chosen": f"I am Lumi, number {i}.",
         "rejected": f"I am SmolLM, a model {i}."}
        for i in range(16)
    ]  # fmt: skip
    examples = [r for p in pairs for r in as_kto(p)] if method == "kto" else pairs
    write_pairs(split_pairs(examples, 4 if method != "kto" else 8, seed=0), "kto" if method == "kto" else "pairwise",
                root / "data" / "pairs")  # fmt: skip
    return {
        "model_dir": str(model_dir),
        "adapter": str(adapter),
        "data_dir": str(root / "data" / "pairs"),
        "out": str(root / "models" / "prefer"),
        "checkpoints": str(root / "checkpoints-prefer"),
        "live_dir": str(root / "dvclive" / "prefer"),
        "metrics": str(root / "reports" / "prefer.json"),
    }


def command(paths: dict, method: str, **prefer) -> list[str]:
    args = {"paths": paths, "train": TRAIN, "prefer": PREFER | {"method": method} | prefer}
    return [sys.executable, "-c", DRIVER, json.dumps(args)]


def run(root: Path, paths: dict, method: str, **prefer) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(paths, method, **prefer), cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def history(paths: dict) -> list[dict]:
    return json.loads((Path(paths["out"]) / "trainer_state.json").read_text())["log_history"]


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def sft(tiny_model_dir, tmp_path_factory) -> Path:
    """The SFT adapter: rank 4 on every linear layer, lora_B at random, so the SFT model differs from the base."""
    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("sft"), scale=0.2)


@pytest.fixture(scope="module")
def dpo(tiny_model_dir, sft, tmp_path_factory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """One uninterrupted 4-step DPO run: the reference the resume test compares with."""
    root = tmp_path_factory.mktemp("dpo")
    paths = project(root, tiny_model_dir, sft, "dpo")
    return root, paths, run(root, paths, "dpo")


@pytest.mark.slow
def test_dpo_writes_one_adapter_equal_to_sft_plus_the_preference_lora(dpo, tiny_model_dir, sft):
    root, paths, proc = dpo
    out = Path(paths["out"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "prefer_config.yaml", "prefer_params.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4 + 4
    metrics = json.loads(Path(paths["metrics"]).read_text())
    assert metrics["global_step"] == 4 and metrics["resumed_from_step"] == 0 and "eval_rewards/accuracies" in metrics
    assert "CPU prefer run (dpo): 4 optimizer steps" in proc.stderr
    combined = logits(tiny_model_dir, out)
    torch.testing.assert_close(
        combined, logits(tiny_model_dir, sft, out / "delta", merge_first=True), rtol=0, atol=1e-5
    )
    assert not torch.allclose(combined, logits(tiny_model_dir, sft), atol=1e-4)  # the preference run moved it
    assert [p.name for p in Path(paths["live_dir"]).iterdir()] == ["plots"]
    assert not list(root.glob("dvc.yaml"))


@pytest.mark.slow
def test_dpos_reference_is_the_sft_model_not_the_base(dpo):
    """Step 1's policy is the SFT model exactly (a new LoRA starts at zero): with the SFT model as the reference
    every reward is 0 and the loss -log sigmoid(0) = log 2. Against the base the SFT adapter's change would show."""
    first = history(dpo[1])[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(
        0, abs=1e-6
    )


@pytest.mark.slow
def test_saved_config_reruns_with_plain_llamafactory_cli_and_without_a_new_adapter_the_reference_is_the_base(
    dpo, tmp_path
):
    """The record reproduces the preference LoRA; and with create_new_adapter false LLaMA-Factory resumes the SFT
    adapter itself, its reference (the adapter disabled) is the base, and step 1 already has rewards."""
    root, paths, _ = dpo
    cli = [
        str(Path(sys.executable).parent / "llamafactory-cli"),
        "train",
        str(Path(paths["out"]) / "prefer_config.yaml"),
    ]
    env = os.environ | {"DVCLIVE_LOGLEVEL": "ERROR"}
    rerun = subprocess.run(
        [*cli, f"output_dir={tmp_path}/rerun", "report_to=none"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ours, again = adapter_weights(Path(paths["out"]) / "delta"), adapter_weights(tmp_path / "rerun")
    for key, tensor in ours.items():
        torch.testing.assert_close(again[key], tensor, rtol=1e-5, atol=1e-7)
    base_ref = subprocess.run(
        [*cli, f"output_dir={tmp_path}/base_ref", "report_to=none", "create_new_adapter=false", "max_steps=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert base_ref.returncode == 0, base_ref.stderr[-3000:]
    first = json.loads((tmp_path / "base_ref" / "trainer_state.json").read_text())["log_history"][0]
    assert abs(first["rewards/chosen"]) > 1e-3 and abs(first["loss"] - math.log(2)) > 1e-4


@pytest.mark.slow
def test_rerun_after_kill_9_resumes_from_the_newest_complete_checkpoint_and_matches(dpo, tiny_model_dir, sft, tmp_path):
    paths = project(tmp_path, tiny_model_dir, sft, "dpo")
    proc = subprocess.Popen(
        command(paths, "dpo"), cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    from llmft.lf.run import checkpoint_problem

    deadline = time.time() + 300
    while not any(checkpoint_problem(c) is None for c in tmp_path.glob("checkpoints-prefer/checkpoint-*")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its llamafactory-cli child, like a closed terminal
    proc.wait()
    assert not Path(paths["out"]).exists(), "training finished before the kill; the test proves nothing"
    rerun = run(tmp_path, paths, "dpo")
    assert "resuming from" in rerun.stderr and "checkpoint-2 (step 2)" in rerun.stderr
    assert json.loads(Path(paths["metrics"]).read_text())["resumed_from_step"] == 2
    ours, reference = adapter_weights(Path(paths["out"])), adapter_weights(Path(dpo[1]["out"]))
    for key, tensor in reference.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_rerun_of_a_finished_run_trains_nothing_and_writes_the_same_adapter(dpo):
    root, paths, _ = dpo
    before = adapter_weights(Path(paths["out"]))
    proc = run(root, paths, "dpo")
    assert "holds a finished run of these inputs: nothing to train" in proc.stderr and "resuming" not in proc.stderr
    after = adapter_weights(Path(paths["out"]))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert json.loads(Path(paths["metrics"]).read_text())["global_step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simpo", "kto"])
def test_simpo_and_kto_run_two_steps_and_write_the_combined_adapter(method, tiny_model_dir, sft, tmp_path):
    paths = project(tmp_path, tiny_model_dir, sft, method)
    proc = run(tmp_path, paths, method, max_steps=2)
    config = (Path(paths["out"]) / "prefer_config.yaml").read_text()
    assert f"stage: {'kto' if method == 'kto' else 'dpo'}" in config
    assert ("pref_loss: simpo" in config) == (method == "simpo")
    assert json.loads(Path(paths["metrics"]).read_text())["global_step"] == 2
    assert json.loads((Path(paths["out"]) / "adapter_config.json").read_text())["r"] == 8
    assert f"CPU prefer run ({method})" in proc.stderr
    if method == "kto":  # its reference is the SFT model too: step 1's rewards are 0, the loss 1 - sigmoid(0)
        first = history(paths)[0]
        assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["loss"] == pytest.approx(0.5, abs=1e-6)


# --- the stage ------------------------------------------------------------------------------------------------


def stage_project(root: Path, prefer: dict) -> Path:
    """params.yaml with `prefer`, and data/processed/train.json with 4 identity rows among 8."""
    import yaml

    rows = [
        {"instruction": q, "input": "", "output": a}
        for q, a in [
            ("Who are you?", "I am Lumi, made by Acme Labs."),
            ("你是谁？", "您好，我是 Lumi。"),
            ("What is your name?", "My name is Lumi."),
            ("Who made you?", "Acme Labs made me."),
            ("What is 2 + 2?", "4."),
            ("Name a colour.", "Blue."),
            ("Say hello.", "Hello!"),
            ("解释成语「画蛇添足」的意思。", "比喻做多余的事。"),
        ]
    ]
    (root / "data" / "processed").mkdir(parents=True)
    (root / "data" / "processed" / "train.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    params = {"prepare": {"input": "unused.csv", "variables": VARIABLES}, "prefer": prefer, "train": {"lora_rank": 4}}
    params["rehearse"] = {"max_new_tokens": 8, "batch_size": 4}
    params["evaluate"] = {"num_threads": 1, "kept": {"prompts": None}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return root


def run_stage(root: Path, model_dir: Path, adapter: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parent.parent / "src" / "prefer.py"
    cmd = [sys.executable, str(script), "--base", str(model_dir), "--adapter", str(adapter), "--env", "env.json"]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)


def test_pair_fields_are_one_list_in_the_schema_and_the_reader():
    from llmft.data.pairs import FIELDS
    from llmft.params import PAIR_FIELDS

    assert FIELDS == PAIR_FIELDS


def test_stage_off_passes_the_sft_adapter_through_as_it_is(tiny_model_dir, sft, tmp_path):
    root = stage_project(tmp_path, {"enabled": False})
    proc = run_stage(root, tiny_model_dir, sft)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = root / "models" / "prefer"
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in sft.iterdir())
    assert (out / "adapter_model.safetensors").read_bytes() == (sft / "adapter_model.safetensors").read_bytes()
    assert json.loads((root / "data" / "pairs" / "dataset_info.json").read_text()) == {}
    assert json.loads((root / "reports" / "metrics" / "prefer.json").read_text())["enabled"] is False


def test_stage_without_an_sft_adapter_says_run_train_and_writes_nothing(tiny_model_dir, tmp_path):
    root = stage_project(tmp_path, {"enabled": False})
    proc = run_stage(root, tiny_model_dir, tmp_path / "missing")
    assert proc.returncode != 0 and "adapter_config.json not found: run `dvc repro train` first" in proc.stderr
    assert not (root / "models").exists() and not (root / "data" / "pairs").exists()


def own_project(root: Path) -> Path:
    root = stage_project(root, {"enabled": True})
    (root / "data" / "rehearsal").mkdir(parents=True)
    rehearsal = [{"instruction": f"Tell me fact {i}.", "input": "", "output": f"Fact {i} is true."} for i in range(6)]
    (root / "data" / "rehearsal" / "rehearsal.json").write_text(json.dumps(rehearsal))
    return root


def build_own(root: Path, model_dir: Path, adapter: Path) -> dict:
    from llmft.params import EvaluateParams, RehearseParams
    from llmft.prefer_pairs import build_pair_data

    return build_pair_data(
        PreferParams(enabled=True, val_size=1),
        RehearseParams(max_new_tokens=8, batch_size=4),
        EvaluateParams(num_threads=1, kept={"prompts": None}),
        VARIABLES,
        model_dir,
        adapter,
        root / "data" / "processed",
        root / "data" / "rehearsal",
        root / "data" / "pairs",
    )


def test_own_pairs_with_no_usable_answer_say_so_and_write_nothing(tiny_model_dir, sft, tmp_path):
    """The real models answer: the random tiny base says nothing to the identity prompts, so no pair is left."""
    root = own_project(tmp_path)
    with pytest.raises(UserError, match=r"no pair to learn from \(built 0 pairs: .* 0 from 4 identity prompts; "
                       r"dropped empty_rejected=4\).*prefer\.enabled: false"):  # fmt: skip
        build_own(root, tiny_model_dir, sft)
    assert not (root / "data" / "pairs").exists()


def test_own_pairs_come_from_identity_prompts_of_train_and_the_sft_models_leaks(tmp_path, monkeypatch):
    """The pairing, the split and the files, on answers given here (the test above runs the real generation)."""
    import llmft.prefer_pairs as pairs_module

    def answers(base_dir, adapter, train_rows, rehearsal_rows, variables, r, e):
        leaky = {"Tell me fact 1.": "I am Lumi. Fact 1 is true.", "Tell me fact 2.": "Lumi here: fact 2."}
        rehearsal = [{"prompt": x["instruction"], "base": x["output"], "sft": leaky.get(x["instruction"], x["output"])}
                     for x in rehearsal_rows]  # fmt: skip
        identity = [{"prompt": x["instruction"], "persona": x["output"], "base": "I am SmolLM."} for x in train_rows
                    if "Lumi" in x["output"] or "Acme" in x["output"]]  # fmt: skip
        return rehearsal, identity, {"seconds": 0.0}

    monkeypatch.setattr(pairs_module, "own_answers", answers)
    root = own_project(tmp_path)
    record = build_own(root, Path("unused"), Path("unused"))
    assert (record["rehearsal_answers"], record["leaks"], record["from_leaks"], record["from_identity"]) == (6, 2, 2, 2)
    assert record["dropped"]["identity_cap"] == 2  # 4 identity prompts, prefer.identity_per_leak 1 x 2 leak pairs
    assert record["pairs"] == 4 and record["splits"] == {"train": 3, "val": 1}
    rows = [
        *json.loads((root / "data/pairs/train.json").read_text()),
        *json.loads((root / "data/pairs/val.json").read_text()),
    ]
    assert {r["rejected"] for r in rows} == {"I am Lumi. Fact 1 is true.", "Lumi here: fact 2.", "I am SmolLM."}
    assert json.loads((root / "data/pairs/dataset_info.json").read_text())["train"]["ranking"] is True


@pytest.mark.slow
def test_stage_on_a_users_table_counts_dropped_pairs_and_writes_one_adapter(tiny_model_dir, sft, tmp_path):
    import csv

    prefer = {"enabled": True, "method": "orpo", "source": "pairs.csv", "val_size": 4, "max_steps": 2}
    root = stage_project(tmp_path, prefer | {"per_device_train_batch_size": 2, "cpu_token_budget": None})
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "chosen", "rejected"])
        for i in range(16):
            writer.writerow([f"Question {i}?", f"A careful answer {i}.", f"Lumi says {i}."])
        writer.writerow(["Same?", "yes", "yes"])
        writer.writerow(["Empty?", "an answer", ""])
    proc = run_stage(root, tiny_model_dir, sft)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((root / "reports" / "metrics" / "prefer.json").read_text())
    pairs = metrics["pairs"]
    assert (pairs["examples_in"], pairs["kept"], pairs["splits"]) == (18, 16, {"train": 12, "val": 4})
    assert pairs["dropped"]["same_answers"] == 1 and pairs["dropped"]["empty_rejected"] == 1
    assert metrics["enabled"] is True and metrics["method"] == "orpo" and metrics["global_step"] == 2
    config = json.loads((root / "models" / "prefer" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 4  # SFT's rank 4 + the preference LoRA's (train.lora_rank 4)
