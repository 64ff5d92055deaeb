"""Stage `report`: input checks, the loaders, and one real build on synthetic pipeline outputs, opened in Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvc_repo import ROOT, run

import report_data as rd
from common import write_json

PROMPTS = ["解释成语「画蛇添足」的意思。", "成语「守株待兔」怎么读？请给出拼音。", "Explain <b>tags</b> & pipes | here"]


def write_outputs(repo: Path, steps: int = 30) -> None:
    """Small stand-ins for what prepare, model, train, evaluate and export write, in their formats."""
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    m = repo / "reports/metrics"
    m.mkdir(parents=True)
    write_json(m / "prepare.json", {
        "rows_in": 500, "examples_in": 1000, "kept": 990, "dropped": {"empty_output": 4, "duplicate": 6},
        "dropped_total": 10, "splits": {"train": 940, "val": 50},
        "prompt_chars": {"p50": 18, "p90": 18, "p99": 21, "max": 22},
        "output_chars": {"p50": 16, "p90": 29, "p99": 47, "max": 58}})
    write_json(m / "train.json", {"train_loss": 1.23, "eval_loss": 1.45, "global_step": steps, "epoch": 3.0,
                                  "train_runtime_s": 321.5, "tokens_per_sec": 456.7, "resumed_from_step": 0,
                                  "oom_retries": 0, "precision": "fp32", "per_device_train_batch_size": 4,
                                  "gradient_accumulation_steps": 4})

    def scores(shift: float) -> dict:
        return {"val": {"bleu4": 10.0 + shift, "rouge1": 30.0 + shift, "rougeL": 28.0 + shift,
                        "exact_match": 2.0 + shift, "loss": 2.5 - shift / 10, "perplexity": 12.2 - shift,
                        "answer_tokens": 20.5, "stopped": 98.0,
                        "llamafactory": {"bleu-4": 11.0 + shift, "rouge-l": 27.0 + shift}}}

    base, tuned = scores(0), scores(5)
    write_json(m / "eval.json", {"base": base, "tuned": tuned,
                                 "delta": {"val": {k: (v - base["val"][k] if not isinstance(v, dict) else
                                                       {kk: vv - base["val"][k][kk] for kk, vv in v.items()})
                                                   for k, v in tuned["val"].items()}},
                                 "examples": {"val": 50}, "method": "tokens: jieba words; all scores in percent"})
    write_json(m / "export.json", {"merge_check": {"max_abs_diff": 3.1e-6, "atol": 1e-4, "greedy_match": True,
                                                   "prompts": 2, "tokens": 40}, "dtype": "float32", "seconds": 12.3})
    rows = [{"split": "val", "index": i, "prompt": PROMPTS[i % 3], "label": f"比喻做了多余的事，反而不恰当。{i}",
             "base": "I am not sure.\nSecond line", "tuned": f"比喻多此一举。{i}"} for i in range(50)]
    (repo / "reports/predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    live = repo / "dvclive/train/plots/metrics"
    (live / "eval").mkdir(parents=True)
    (live / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{3 / s ** 0.3:.4f}\n" for s in range(1, steps + 1)))
    (live / "eval/loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{3.2 / s ** 0.25:.4f}\n"
                                                                 for s in range(10, steps + 1, 10)))
    (live / "learning_rate.tsv").write_text("timestamp\tstep\tlearning_rate\n" + "".join(
        f"{1700000000 + s}\t{s}\t{5e-5 * (1 - s / steps):.3e}\n" for s in range(1, steps + 1)))
    (repo / "data/processed").mkdir(parents=True)
    write_json(repo / "data/processed/train.json",
               [{"instruction": PROMPTS[i % 3], "input": "", "output": "答" * (5 + i % 40)} for i in range(120)])
    (repo / "models/base").mkdir(parents=True)
    write_json(repo / "models/base/model_info.json", {"source": "embedded:smollm2.gguf", "template": "smollm2",
                                                      "path": "models/base"})
    (repo / "dvc.yaml").write_text("stages:\n" + "".join(
        f"  {stage}:\n    cmd: 'true'\n    params: [{section}]\n" for stage, section in
        (("prepare", "data"), ("model", "model"), ("train", "train"))))
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: 'true'\n    outs:\n    - path: data/processed\n"
        "      hash: md5\n      md5: d1f464002a45e418017ea7df34ee7483.dir\n      size: 155018\n      nfiles: 3\n"
        "    - path: reports/metrics/prepare.json\n      hash: md5\n      md5: 36d5dd503e15398de660635e6e770914\n"
        "      size: 492\n  model:\n    cmd: 'true'\n    outs:\n    - path: models/base\n      hash: md5\n"
        "      md5: 0123456789abcdef0123456789abcdef.dir\n      size: 1000\n      nfiles: 2\n")


def build(repo: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "src/report.py"), "--notebook", str(ROOT / "notebooks/report.py"),
                           *extra], cwd=repo, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, float]:
    """A git repo with two commits (lora_rank 8 -> 16), the synthetic outputs, and one report build."""
    repo = tmp_path_factory.mktemp("report_repo")
    write_outputs(repo)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "one"]):
        run(cmd, repo)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("lora_rank: 8 ", "lora_rank: 16"))
    run(["git", "commit", "-qam", "rank 16"], repo)
    start = time.perf_counter()
    proc = build(repo)
    assert proc.returncode == 0, proc.stderr
    return repo, time.perf_counter() - start


def test_report_before_train_names_the_stage_to_run(tmp_path):
    write_outputs(tmp_path)
    (tmp_path / "reports/metrics/train.json").unlink()
    proc = build(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: reports/metrics/train.json is missing: run `make train` (dvc repro train) first"]
    assert not (tmp_path / "reports/report.html").exists()


def test_broken_predictions_are_reported_in_one_line(tmp_path):
    write_outputs(tmp_path)
    (tmp_path / "reports/predictions.jsonl").write_text('{"prompt": "x"}\n')
    proc = build(tmp_path)
    assert proc.returncode == 2 and "rerun `make eval` (dvc repro evaluate)" in proc.stderr
    assert "missing: base, label, tuned" in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_table_flattens_splits_and_marks_direction():
    evals = {"base": {"val": {"bleu4": 10.0, "loss": 2.0, "llamafactory": {"rouge-l": 5.0}}},
             "tuned": {"val": {"bleu4": 15.0, "loss": 1.5, "llamafactory": {"rouge-l": 7.0}}},
             "delta": {"val": {"bleu4": 5.0, "loss": -0.5, "llamafactory": {"rouge-l": 2.0}}}}
    rows = rd.metrics_table(evals).rows
    assert rows == [["val", "bleu4 ↑", "10", "15", "+5"], ["val", "loss ↓", "2", "1.5", "-0.5"],
                    ["val", "llamafactory.rouge-l ↑", "5", "7", "+2"]]


def test_table_escapes_html_and_markdown():
    table = rd.Table([["<b>x</b> | y\nz", None]], ["a", "b"])
    assert "&lt;b&gt;x&lt;/b&gt;" in table._repr_html_()
    assert "| &lt;b&gt;x&lt;/b&gt; \\| y<br>z |   |" in table._repr_markdown_()


def test_curves_read_dvclive_and_train_layouts(tmp_path):
    write_outputs(tmp_path)
    series = rd.curves(tmp_path / "dvclive/train/plots/metrics")
    assert set(series) == {"loss", "eval/loss", "learning_rate"}
    assert list(series["learning_rate"].columns) == ["step", "value"]
    assert series["eval/loss"].step.tolist() == [10, 20, 30]


def test_lengths_use_the_tokenizer_when_one_is_on_disk(tmp_path, smol_tokenizer_dir):
    write_json(tmp_path / "train.json", [{"instruction": "Hello world", "input": "", "output": "Hi"}])
    assert rd.example_lengths(tmp_path / "train.json", tmp_path)[1] == "characters"
    write_json(tmp_path / "model_info.json", {"path": str(smol_tokenizer_dir)})  # a pointer, as for a hub model
    lengths, unit = rd.example_lengths(tmp_path / "train.json", tmp_path)
    assert unit == "tokens" and 3 <= lengths[0] <= 6


def test_samples_are_spread_evenly_and_never_repeated(tmp_path):
    rows = [{"split": "val", "index": i, "prompt": f"q{i}", "label": "a", "base": "", "tuned": "b"} for i in range(3)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r[0] for r in rd.samples(tmp_path / "p.jsonl", 10).rows] == ["[val #1] q0", "[val #2] q1", "[val #3] q2"]
    assert [r[0] for r in rd.samples(tmp_path / "p.jsonl", 2).rows] == ["[val #1] q0", "[val #2] q1"]
    assert rd.samples(tmp_path / "p.jsonl", 1).rows[0][2] == "(empty)"
    assert rd.samples(tmp_path / "p.jsonl", 0).rows == []


def test_params_diff_without_a_previous_commit_says_so(tmp_path):
    assert "No previous commit" in rd.params_diff(tmp_path)


def test_report_has_every_section_and_embeds_its_images(built):
    repo, seconds = built
    html = (repo / "reports/report.html").read_text(encoding="utf-8")
    for heading in ("Data", "Training curves", "Base vs fine-tuned", "Sample predictions", "Export (merge check)",
                    "Parameters", "Environment"):
        assert f">{heading}<" in html
    assert not re.search(r"<script[^>]+src=", html), "no script may come from a CDN"
    assert "import report_data" not in html  # code cells are hidden
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert html.count("比喻多此一举。") == 10  # report.num_samples rows, Chinese kept as text
    assert "Explain &lt;b&gt;tags&lt;/b&gt; &amp; pipes | here" in html
    # dvc params diff HEAD~1 (8 -> 16 in the second commit), rendered as an HTML table
    assert re.search(r"train\.lora_rank</td>\s*<td[^>]*>8\s*</td>\s*<td[^>]*>16\s*</td>", html)
    assert "d1f464002a45e418017ea7df34ee7483.dir" in html and "0123456789abcdef" in html
    md = (repo / "reports/report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^]]+\]\((figures/[^)]+)\)", md)
    assert len(links) == 2 and all((repo / "reports" / link).is_file() for link in links)
    assert "| val | loss ↓ | 2.5 | 2 | -0.5 |" in md and "比喻多此一举。" in md
    print(f"report build: {seconds:.1f} s")


def test_a_failed_build_keeps_the_previous_report(built, tmp_path):
    repo, _ = built
    before = (repo / "reports/report.html").read_bytes()
    shutil.copytree(repo / "dvclive", tmp_path / "live")
    (tmp_path / "live/train/plots/metrics/loss.tsv").write_text("step\tloss\n1\tnot-a-number\n")
    proc = build(repo, "--plots", str(tmp_path / "live/train/plots/metrics"))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ")
    assert "loss.tsv: a step or loss value is not a number" in last
    assert (repo / "reports/report.html").read_bytes() == before
    assert not list((repo / "reports").glob(".*.tmp"))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# Runs after the page loaded: counts the images that decoded (naturalWidth > 0) and the metrics table's rows.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const table = [...document.querySelectorAll('table.report')].find(t => t.innerText.includes('fine-tuned'));
  document.title = `probe images=${imgs.length} decoded=${imgs.filter(i => i.complete && i.naturalWidth > 0).length}`
    + ` metric_rows=${table ? table.tBodies[0].rows.length : 0}`;
});</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_report_opens_in_headless_chromium_with_images_decoded(built, tmp_path):
    repo, _ = built
    html = (repo / "reports/report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "profile")
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title and title.group(1) == "probe images=2 decoded=2 metric_rows=10", dom.stderr[-2000:]
    shot = repo / "reports/report-screenshot.png"  # left in the module's tmp dir, for a look by eye
    chromium([f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars",
              (repo / "reports/report.html").as_uri()], tmp_path / "profile")
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")
