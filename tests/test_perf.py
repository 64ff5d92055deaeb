"""perf/perf_train.py: the CPU smoke test of the whole benchmark (CI runs it), its data design, the FLOPs
count, and the README table. The GPU figures come from perf/gpu/run.sh on an H100/H200."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from scripts import ROOT, load_script

perf_flops = load_script("perf/perf_train_flops.py")
perf_report = load_script("perf/perf_train_report.py")
perf_setup = load_script("perf/perf_train_setup.py")


@pytest.fixture(scope="module")
def perf(smol_tokenizer_dir, tmp_path_factory) -> dict:
    """One tiny CPU run: plain and fast, 3 steps each (1 warm-up)."""
    tmp = tmp_path_factory.mktemp("perf")
    cmd = [
        sys.executable,
        str(ROOT / "perf/perf_train.py"),
        "--shape",
        "tiny",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--arms",
        "plain,fast",
        "--cutoff-len",
        "256",
        "--accum",
        "4",
        "--tokenizer",
        str(smol_tokenizer_dir),
        "--work-dir",
        str(tmp / "work"),
        "--out-dir",
        str(tmp / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    files = list((tmp / "out").glob("*.json"))
    assert [f.name for f in files] == [f"{perf_report.slug(perf_report.device_name(False))}-tiny.json"]
    return {"result": json.loads(files[0].read_text()), "out": tmp / "out", "stdout": proc.stdout}


@pytest.mark.integration
@pytest.mark.slow
def test_cpu_smoke_run_measures_both_arms_on_equal_work(perf):
    r = perf["result"]
    plain, fast = r["arms"]["plain"], r["arms"]["fast"]
    assert r["steps"] == {"total": 3, "warmup": 1, "timed": 2}
    for arm in (plain, fast):
        assert arm["tokens_per_s"] > 0 and arm["step_s"] > 0 and arm["peak_mem_gib"] > 0
        assert 0 < arm["mfu_vs_peak"] <= 1 and 0 < arm["mfu_vs_ceiling"] <= 1
        assert all(math.isfinite(x) for x in arm["losses"]) and arm["grad_norms_ok"] and not arm["token_mismatches"]
        assert arm["real_tokens_per_step"] == [r["data"]["real_tokens_per_step"]] * 3 == [4 * 255] * 3
    assert plain["real_tokens_per_step"] == fast["real_tokens_per_step"]
    assert plain["label_tokens_per_step"] == fast["label_tokens_per_step"]  # the same examples in every step
    # same examples, same loss: the CPU profile only rearranges the arithmetic (bf16 where the CPU has a unit)
    from llmft.cpu import detect_cpu

    bf16 = detect_cpu().bf16
    assert r["dtypes"] == {"plain": "fp32", "fast": "bf16" if bf16 else "fp32"}
    assert fast["learning_guard_ok"] and fast["max_step_loss_rel_diff"] < (1e-2 if bf16 else 1e-3)
    assert plain["config"].get("neat_packing") is None and plain["gradient_checkpointing"] is True
    assert fast["config"].get("neat_packing") is None and fast["gradient_checkpointing"] is False
    assert fast["attn_implementation"] == ("eager" if bf16 else "sdpa") and fast["config"]["use_cpu"] is True
    assert fast["config"]["model_name_or_path"].endswith("model-bfloat16") == bf16  # the base loaded in bf16
    assert (fast["micro_batch"], fast["accumulation"]) == (plain["micro_batch"], plain["accumulation"]) == (4, 4)
    assert r["goals"] is None and r["notes"][0].startswith("CPU (")
    assert "fast " in perf["stdout"] and "guard ok" in perf["stdout"]


@pytest.mark.integration
@pytest.mark.slow
def test_readme_table_from_the_smoke_run(perf, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{perf_report.README_START}\nold table\n{perf_report.README_END}\nafter\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "perf/perf_train.py"),
            "--out-dir",
            str(perf["out"]),
            "--readme",
            str(readme),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n<!-- perf:start -->\n| device | model | run |")
    assert text.endswith("<!-- perf:end -->\nafter\n") and "old table" not in text
    assert "| CPU (" in text and "| tiny | plain |" in text and "| tiny | fast |" in text
    assert proc.stdout in text


def fake_result(device: str, speedup: float) -> dict:
    arm = {
        "tokens_per_s": 1000.0,
        "speedup_vs_plain": 1.0,
        "mfu_vs_peak": 0.2,
        "mfu_vs_ceiling": 0.25,
        "peak_mem_gib": 20.0,
        "memory_vs_plain": 1.0,
        "final_loss": 9.5,
        "timed_steps": 30,
    }
    fast = arm | {"tokens_per_s": 1000.0 * speedup, "speedup_vs_plain": speedup, "memory_vs_plain": 0.6}
    return {"kind": "train", "device": device, "shape": "llama2-7b", "arms": {"plain": arm, "fast": fast}}


def test_table_has_one_row_per_arm_and_the_eval_rows_apart(tmp_path):
    (tmp_path / "h100-llama2-7b.json").write_text(json.dumps(fake_result("NVIDIA H100 80GB HBM3", 2.5)))
    (tmp_path / "h100-eval.json").write_text(
        json.dumps(
            {
                "kind": "eval",
                "device": "NVIDIA H100 80GB HBM3",
                "model": "llama2-7b random-init + fast LoRA",
                "examples": 32,
                "max_new_tokens": 64,
                "batch_size": 16,
                "ours_tokens_per_s": 900.0,
                "lf_tokens_per_s": 300.0,
                "speedup": 3.0,
            }
        )
    )
    table = perf_report.render_table(sorted(tmp_path.glob("*.json")))
    lines = table.splitlines()
    assert lines[2] == (
        "| NVIDIA H100 80GB HBM3 | llama2-7b | plain | 1,000 | 1.00x | 20.0% | 25.0% | 20.0 GiB | 1.00x | 9.5000 | 30 |"
    )
    assert lines[3].startswith("| NVIDIA H100 80GB HBM3 | llama2-7b | fast | 2,500 | 2.50x |") and "0.60x" in lines[3]
    assert lines[-1] == (
        "| NVIDIA H100 80GB HBM3 | llama2-7b random-init + fast LoRA | 32 prompts x 64 new tokens, "
        "batch 16 | 900 | 300 | 3.00x |"
    )


def test_readme_without_markers_is_a_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="add the lines <!-- perf:start --> and <!-- perf:end -->"):
        perf_report.write_readme(readme, "| table |\n")
    assert readme.read_text() == "# no markers\n"


def test_model_flops_of_llama2_7b_follow_the_lora_formula():
    shape = {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "vocab_size": 32000,
    }
    linear, lora = perf_flops.linear_params(shape, 8)
    assert linear == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000  # 6.61 B: all but embeddings and norms
    assert lora == 32 * 8 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # ~20 M
    flops = perf_flops.flops_per_example(shape, 8, 2048)
    assert flops == pytest.approx((4 * linear + 6 * lora) * 2048 + 12 * 32 * 4096 * 2048 * 2049 / 2)
    assert 4 * linear * 2048 / flops > 0.9  # attention is < 10% at 2048 tokens


def test_data_blocks_fill_one_pack_each_with_exact_llamafactory_lengths(smol_tokenizer_dir, tmp_path):
    enc = perf_setup.Encoder(smol_tokenizer_dir, 512)
    lengths = perf_setup.make_data(
        enc, tmp_path, steps=2, per_step=8, per_pack=4, cutoff_len=512, seed=1, val_examples=4
    )
    rows = json.loads((tmp_path / "train.json").read_text())
    assert len(rows) == len(lengths) == 16 and len(json.loads((tmp_path / "val.json").read_text())) == 4
    assert [sum(lengths[i : i + 4]) for i in range(0, 16, 4)] == [511] * 4  # cutoff_len - 1: one full pack
    assert [enc.length(r["instruction"], r["output"]) for r in rows] == lengths
    assert min(lengths) >= enc.overhead + 8 and max(lengths) <= 511 * 3 // 4
    assert (
        perf_setup.make_data(
            enc, tmp_path / "again", steps=2, per_step=8, per_pack=4, cutoff_len=512, seed=1, val_examples=4
        )
        == lengths
    )  # seeded
