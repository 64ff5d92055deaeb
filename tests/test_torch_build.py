"""src/llmft/torch_build.py: the torch build `make setup` picks from what a fake `nvidia-smi` on PATH reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fake_smi import fake_smi, gpus, smi_fixture  # noqa: F401  (the smi fixture)
from llmft import torch_build

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "src/llmft/torch_build.py"


# The decision table (docs/gpu.md, GPU set-up): driver and GPUs -> build, and the words that say why.
TABLE = [
    ("595.45.04", ["9.0"], "cu130", "as locked"),
    ("580.65.06", ["8.0"], "cu130", "as locked"),
    ("580.65.05", ["8.0"], "cu128", "needs driver >= 580.65.06"),
    ("575.57.08", ["8.9"], "cu128", "CUDA 12.8"),
    ("570.26", ["7.5"], "cu128", "CUDA 12.8"),
    ("570.25", ["7.5"], "cu126", "CUDA 12.6"),
    ("560.28.03", ["8.6"], "cu126", "CUDA 12.6"),
    ("550.54.15", ["7.5"], "cu126", "minor version compatibility"),  # Colab's T4 in 2024-25
    ("535.183.01", ["8.0", "8.0"], "cu126", "minor version compatibility"),  # r535 LTS clusters
    ("525.60.13", ["8.0"], "cu126", "minor version compatibility"),
    ("580.95.05", ["7.0"], "cu126", "compute capability 7.0 has no kernels"),  # V100: only cu126 has Volta
    ("550.54.15", ["6.0"], "cu126", "minor version compatibility"),  # P100
    ("580.95.05", ["7.0", "9.0"], "cu126", "compute capability 7.0"),  # mixed V100 + H100: the oldest decides
    ("580.95.05", ["10.0"], "cu130", "as locked"),  # B200
    ("575.57.08", ["12.0"], "cu128", "CUDA 12.8"),  # RTX 5090 on r575
]


@pytest.mark.parametrize(("driver", "caps", "build", "why"), TABLE)
def test_driver_and_gpu_pick_the_build(smi, driver, caps, build, why):
    smi(gpus(driver, *caps))
    got, reason = torch_build.choose("auto", torch_build.query_smi())
    assert (got, why in reason) == (build, True), reason
    assert f"driver {driver}" in reason


@pytest.mark.parametrize(
    ("driver", "caps", "says"),
    [
        ("520.61.05", ["8.0"], "older than any CUDA build"),
        ("470.82.01", ["3.7"], "older than any CUDA build"),  # the driver is the first thing to fix
        ("550.54.15", ["3.7"], "has kernels for compute capability 3.7"),
    ],
)
def test_a_driver_or_gpu_no_build_supports_stops_with_the_fix(smi, driver, caps, says):
    smi(gpus(driver, *caps, name="Tesla K80"))
    with pytest.raises(torch_build.Unsupported, match=says) as err:
        torch_build.choose("auto", torch_build.query_smi())
    assert "TORCH_CUDA=cpu" in str(err.value) and "Tesla K80" in str(err.value)


def test_an_old_nvidia_smi_without_compute_cap_still_gives_the_driver(smi):
    smi("470.82.01, Tesla K80\n", old=True)
    got = torch_build.query_smi()
    assert got.driver == (470, 82, 1) and got.gpus == [("Tesla K80", None)]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({}, "no nvidia-smi on PATH"),
        (
            {"exit_code": 9, "stdout": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."},
            "nvidia-smi failed (exit 9: NVIDIA-SMI has failed",
        ),
        ({"exit_code": 6, "stdout": "No devices were found"}, "nvidia-smi failed (exit 6: No devices were found)"),
        ({"stdout": "Segmentation fault\n"}, "unreadable"),
        ({"stdout": "garbage, 1, 2\n"}, "unreadable"),
        ({"stdout": ""}, "lists no GPU"),
    ],
)
def test_no_or_a_broken_nvidia_smi_installs_the_locked_build_and_says_why(smi, kwargs, problem):
    smi(**kwargs) if kwargs else smi(None)
    got, reason = torch_build.choose("auto", torch_build.query_smi())
    assert got == "cu130" and problem in reason and "TORCH_CUDA=" in reason, reason


def test_a_hanging_nvidia_smi_times_out(smi):
    smi(gpus("580.65.06", "9.0"), sleep=5)
    assert "did not answer" in torch_build.query_smi(timeout=0.5).problem


@pytest.mark.parametrize("forced", ["cpu", "cu126", "cu128", "cu130", "CPU"])
def test_torch_cuda_forces_the_build(smi, forced):
    smi(gpus("595.45.04", "9.0"))
    assert torch_build.choose(forced, torch_build.query_smi())[0] == forced.lower()


def test_forcing_a_build_the_driver_cannot_run_warns(smi):
    smi(gpus("550.54.15", "7.5", name="Tesla T4"))
    got, reason = torch_build.choose("cu130", torch_build.query_smi())
    assert got == "cu130" and "warning: driver 550.54.15 is older than CUDA 13.0 needs (580.65.06)" in reason


def test_an_unknown_build_is_rejected():
    with pytest.raises(ValueError, match="TORCH_CUDA=cu118 is not a torch build: use one of cu130, cu128, cu126, cpu"):
        torch_build.choose("cu118", torch_build.Smi())


def run_script(*args: str, path: str) -> subprocess.CompletedProcess:
    """The script as make runs it: by file path, with the system python, no llmft on sys.path."""
    return subprocess.run(
        ["/usr/bin/env", "-i", f"PATH={path}", sys.executable, "-S", str(SCRIPT), *args], capture_output=True, text=True
    )


def test_cli_prints_the_build_and_one_line_why(tmp_path):
    proc = run_script(path=f"{fake_smi(tmp_path, gpus('535.183.01', '8.0'))}:/usr/bin:/bin")
    assert proc.returncode == 0 and proc.stdout == "cu126\n"
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("torch build cu126: driver 535.183.01")


def test_cli_quiet_prints_only_the_build_and_errors_exit_2(tmp_path):
    assert run_script("--quiet", path="/nonexistent").stdout == "cu130\n"
    proc = run_script(path=f"{fake_smi(tmp_path, gpus('470.82.01', '3.7'))}:/usr/bin:/bin")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith("error: NVIDIA driver 470.82.01")
    assert run_script("cu999", path="/nonexistent").returncode == 2


def test_a_recorded_choice_says_where_it_came_from(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / ".torch-cuda").write_text("cu126\n")
    proc = run_script("cu126", "--python", str(tmp_path / "bin/python"), path="/nonexistent")
    assert proc.stdout == "cu126\n" and f"TORCH_CUDA=cu126, as recorded in {tmp_path}/.torch-cuda" in proc.stderr


def test_constraints_drop_the_cuda13_lines_only():
    lock = ROOT / "requirements-lock.txt"
    lines = set(lock.read_text().splitlines())
    for build in ("cu126", "cpu"):
        kept = set(torch_build.constraints(lock, build).splitlines())
        names = {ln.split("==")[0] for ln in lines - kept}
        assert names and all(
            n.startswith(("nvidia-", "cuda-")) or n in ("torch", "torchvision", "torchaudio", "triton") for n in names
        ), names
        assert "torchdata==0.11.0" in kept and any(ln.startswith("nvidia-ml-py==") for ln in kept)
        assert not any(ln.startswith(("torch==", "nvidia-cublas", "cuda-toolkit")) for ln in kept)
    assert any(ln.startswith("triton==") for ln in torch_build.constraints(lock, "cpu").splitlines())
    assert not any(ln.startswith("triton==") for ln in torch_build.constraints(lock, "cu126").splitlines())


def fake_venv_python(tmp_path: Path, torch_version: str) -> Path:
    """A stand-in for .venv/bin/python that reports an installed torch and a few packages, and does nothing else."""
    py = tmp_path / "venv/bin/python"
    py.parent.mkdir(parents=True)
    py.write_text(f"""#!/bin/sh
case "$*" in
  *importlib*) [ -n "{torch_version}" ] && echo {torch_version} || exit 1;;
  *"pip index"*) echo "torch ({torch_version or "2.11.0"})"; echo "Available versions: 2.11.0+cpu, 2.11.0+cu126";;
  *"pip list"*) printf 'torch=={torch_version}\\nnvidia-cublas==13.1.0.3\\nnvidia-ml-py==13.615.71\\npandas==2.3.3\\n';;
esac
""")
    py.chmod(0o755)
    return py


def test_install_plan_for_an_older_driver_takes_torch_from_the_pytorch_index_first(tmp_path, capsys):
    py = fake_venv_python(tmp_path, "")
    torch_build.install("cu126", str(py), ROOT, dry_run=True)
    first, second = capsys.readouterr().out.splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cu126" in first and "--index-url" not in first.split()
    assert first.endswith("torch==2.11.0+cu126 torchvision==0.26.0+cu126 torchaudio==2.11.0+cu126")
    assert "-r" in second.split() and "constraints-torch.txt" in second and "requirements-lock.txt" not in second


def test_install_plan_switching_builds_uninstalls_the_old_cuda_wheels(tmp_path, capsys):
    py = fake_venv_python(tmp_path, "2.11.0+cu130")
    torch_build.install("cpu", str(py), ROOT, dry_run=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("switching torch from cu130 to cpu")
    assert out[1].endswith("uninstall -q -y torch nvidia-cublas")  # never nvidia-ml-py or pandas
    assert "whl/cpu" in out[2]


def test_an_unreachable_index_changes_nothing(tmp_path, capsys):
    py = fake_venv_python(tmp_path, "2.11.0+cu130")
    with pytest.raises(torch_build.Unsupported, match=r"whl/cu128 does not answer here.*nothing was changed"):
        torch_build.install("cu128", str(py), ROOT, dry_run=True)  # the fake index lists cpu and cu126 only
    assert capsys.readouterr().out == ""


def test_install_plan_for_the_locked_build_is_the_lock_as_is(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    py = fake_venv_python(tmp_path, "2.11.0+cu130")
    torch_build.install("cu130", str(py), ROOT, dry_run=True)
    (only,) = capsys.readouterr().out.splitlines()
    assert only.endswith("-r requirements.txt -c requirements-lock.txt")


def make_setup_dry_run(*args: str, path: str) -> str:
    env = {"PATH": path, "HOME": "/nonexistent"}
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "setup", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return proc.stdout + proc.stderr


@pytest.mark.integration
def test_make_setup_keys_its_stamp_by_the_build_and_passes_the_choice_on(tmp_path):
    path = f"{fake_smi(tmp_path, gpus('550.54.15', '7.5'))}:{Path(sys.executable).parent}:/usr/bin:/bin"
    forced = make_setup_dry_run("TORCH_CUDA=cpu", path=path)
    assert "torch_build.py cpu --install" in forced and re.search(r"touch \.venv/\.pins-[0-9a-f]{16}-cpu\n", forced)
    auto = make_setup_dry_run("TORCH_CUDA=auto", "PINS=changed", path=path)
    assert "torch_build.py auto --install" in auto and "touch .venv/.pins-changed-cu126" in auto, auto
