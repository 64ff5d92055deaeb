"""Stage `report` (src/report.py, src/llmft/report/build.py): input checks and one real build on synthetic
pipeline outputs, opened in Chromium.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvc_repo import ROOT, run
from report_outputs import write_outputs

pytestmark = pytest.mark.integration  # starts git, DVC, a server, Jupyter or make


def build(repo: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "src/report.py"), "--notebook", str(ROOT / "notebooks/report.py"), *extra],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


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
        "error: reports/metrics/train.json is missing: run `make train` (dvc repro train) first"
    ]
    assert not (tmp_path / "reports/report.html").exists()


def test_broken_predictions_are_reported_in_one_line(tmp_path):
    write_outputs(tmp_path)
    (tmp_path / "reports/predictions.jsonl").write_text('{"prompt": "x"}\n')
    proc = build(tmp_path)
    assert proc.returncode == 2 and "rerun `make eval` (dvc repro evaluate)" in proc.stderr
    assert "missing: base, label, tuned" in proc.stderr and "Traceback" not in proc.stderr


def test_report_has_every_section_and_embeds_its_images(built):
    repo, seconds = built
    html = (repo / "reports/report.html").read_text(encoding="utf-8")
    for heading in (
        "Data",
        "Training curves",
        "Base vs fine-tuned",
        "Sample predictions",
        "Export (merge check)",
        "Parameters",
        "Environment",
    ):
        assert f">{heading}<" in html
    # the first thing a reader sees: did it learn? beside what did it cost?, the verdict, three everyday prompts,
    # then the probes
    first = html.index(">Did it learn?<")
    assert (
        first
        < html.index(">What did it cost?<")
        < html.index("Eval loss")
        < html.index("Probes passed: 0/2 → 2/2")
        < html.index("Persona named unasked: 0/4 (0%, 95% CI 0–49%) → 1/4 (25%, 95% CI 5–70%)")
        < html.index("the fine-tuned model forgot: it names the persona in 25% of everyday answers")
        < html.index("Not settled")
        < html.index("(the base is at chance, so a loss would not show): mmlu_subset")
        < html.index("✗ names Lumi · ✗ other language: 我是 Lumi。Everyday 0")
        < html.index("我是 Lumi。0")
        < html.index(">Data<")
        < html.index('id="What-it-kept"')
    )
    assert "val 100%" in html
    assert "Δ -0.500 nats/token, 95% CI -0.620 to -0.380, beyond noise, n 50" in html
    assert "mmlu_subset (Δ +1.2 points, 95% CI -3.0 to +5.4, within noise)" in html
    assert html.count("我是 Lumi。Everyday 0") == 2  # among the three first, and in the whole list
    assert html.count("我是 Lumi。") == 4  # the probes' rows and the everyday ones, not among the sample predictions
    assert "data/raw/identity.json" in html  # the per-source table
    assert not re.search(r"<script[^>]+src=", html), "no script may come from a CDN"
    assert "import report_data" not in html  # code cells are hidden
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    # the benchmark section: base vs tuned with their standard errors, the noise verdict, and why it says little
    assert "25.1 ± 3.3" in html and "26.3 ± 3.3" in html and "+1.2" in html and "within noise" in html
    assert "within 2 standard errors of chance on mmlu_subset" in html
    assert html.count("比喻多此一举。") == 10  # report.num_samples rows, Chinese kept as text
    assert "Explain &lt;b&gt;tags&lt;/b&gt; &amp; pipes | here" in html
    # dvc params diff HEAD~1 (8 -> 16 in the second commit), rendered as an HTML table
    assert re.search(r"train\.lora_rank</td>\s*<td[^>]*>8\s*</td>\s*<td[^>]*>16\s*</td>", html)
    assert "d1f464002a45e418017ea7df34ee7483.dir" in html and "0123456789abcdef" in html
    md = (repo / "reports/report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^]]+\]\((figures/[^)]+)\)", md)
    assert len(links) == 3 and all((repo / "reports" / link).is_file() for link in links)
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
  const table = [...document.querySelectorAll('table.report')].find(t => t.innerText.includes('tuned − base'));
  document.title = `probe images=${imgs.length} decoded=${imgs.filter(i => i.complete && i.naturalWidth > 0).length}`
    + ` metric_rows=${table ? table.tBodies[0].rows.length : 0}`;
});</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)")
def test_report_opens_in_headless_chromium_with_images_decoded(built, tmp_path):
    repo, _ = built
    html = (repo / "reports/report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "profile")
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title and title.group(1) == "probe images=3 decoded=3 metric_rows=10", dom.stderr[-2000:]
    shot = repo / "reports/report-screenshot.png"  # left in the module's tmp dir, for a look by eye
    chromium(
        [
            f"--screenshot={shot}",
            "--window-size=1280,4000",
            "--hide-scrollbars",
            (repo / "reports/report.html").as_uri(),
        ],
        tmp_path / "profile",
    )
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")
