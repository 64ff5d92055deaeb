"""llmft.gpu and `make doctor`: a GPU that torch cannot use stops training with the fix; the doctor says what it sees.

The GPU is a fake `nvidia-smi` on PATH; the torch is this venv's (PyPI's CUDA 13.0 build), which sees no GPU here.
"""

from __future__ import annotations

import pytest
import torch

from fake_smi import gpus, smi_fixture  # noqa: F401  (the smi fixture)
from llmft import gpu
from llmft.common import UserError
from llmft.params import TrainParams
from llmft.tools import doctor


@pytest.fixture
def cuda_build(monkeypatch):
    """cuda_build("12.8"): torch claims that CUDA build and sees no GPU, as it does on a too-old driver."""

    def make(version: str | None = "13.0", seen: bool = False):
        monkeypatch.setattr(torch.version, "cuda", version)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: seen)

    return make


def test_a_driver_too_old_for_torchs_cuda_stops_training_with_the_fix(smi, cuda_build):
    smi(gpus("550.54.15", "7.5", name="Tesla T4"))
    cuda_build("13.0")
    with pytest.raises(UserError) as err:
        gpu.check_driver()
    line = str(err.value)
    assert "\n" not in line
    for part in (
        "is built for CUDA 13.0",
        "needs NVIDIA driver >= 580.65.06",
        "driver is 550.54.15 (1 x Tesla T4)",
        "`make setup TORCH_CUDA=cu126`",
    ):
        assert part in line, line


def test_the_train_stage_runs_the_driver_check_first(smi, cuda_build):
    from llmft.train import device_checks

    smi(gpus("535.183.01", "8.0", "8.0"))
    cuda_build("13.0")
    with pytest.raises(UserError, match=r"driver is 535.183.01 \(2 x NVIDIA A100-SXM4-80GB\).*TORCH_CUDA=cu126"):
        device_checks(TrainParams())


def test_a_driver_too_old_for_any_build_says_so(smi, cuda_build):
    smi(gpus("520.61.05", "8.0"))
    cuda_build("12.6")
    with pytest.raises(UserError, match="needs NVIDIA driver >= 525.60.13.*older than any CUDA build.*TORCH_CUDA=cpu"):
        gpu.check_driver()


def test_a_cuda12_build_on_an_r535_driver_is_not_blamed_on_the_driver(smi, cuda_build, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    smi(gpus("535.183.01", "8.0"))
    cuda_build("12.8")  # minor version compatibility: 12.x runs from 525.60.13 on
    warning = gpu.check_driver()
    assert "torch sees no GPU: CUDA_VISIBLE_DEVICES='' hides it" in warning


@pytest.mark.parametrize(
    ("nvidia_smi", "build", "seen"),
    [
        (None, "13.0", False),  # no driver: a CPU machine
        ({"exit_code": 9, "stdout": "NVIDIA-SMI has failed"}, "13.0", False),  # a broken driver: nothing to name
        ({"stdout": "garbage\n"}, "13.0", False),
        ({"stdout": gpus("550.54.15", "7.5")}, None, False),  # the CPU build, chosen with TORCH_CUDA=cpu
        ({"stdout": gpus("590.44.01", "9.0")}, "13.0", True),  # torch sees the GPU
    ],
)
def test_nothing_to_stop_for(smi, cuda_build, nvidia_smi, build, seen):
    smi(**nvidia_smi) if nvidia_smi else smi(None)
    cuda_build(build, seen)
    assert gpu.driver_problem() is None and gpu.check_driver() is None


def test_doctor_on_a_machine_without_a_gpu_says_so(smi, capsys):
    smi(None)
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines()[:-1] if not line.startswith("NVIDIA driver"))
    assert lines["torch"].startswith(torch.__version__) and "CUDA seen" in out
    assert "NVIDIA driver  no nvidia-smi on PATH: no NVIDIA driver here" in out
    assert "CUDA seen      no" in out and "bf16           n/a (torch sees no GPU)" in out
    for dist in ("liger-kernel", "flash-attn", "bitsandbytes"):
        assert f"\n{dist} " in out
    assert out.splitlines()[-1].startswith("NO GPU (no nvidia-smi on PATH")


def test_doctor_names_the_fix_for_a_driver_too_old(smi, cuda_build, capsys):
    smi(gpus("550.54.15", "7.5", name="Tesla T4"))
    cuda_build("13.0")
    doctor.main([])
    out = capsys.readouterr().out
    assert "NVIDIA driver  550.54.15 (1 x Tesla T4)" in out
    assert f"build for it   cu126 (installed: {torch.__version__.partition('+')[2]})" in out
    assert out.splitlines()[-1].startswith("PROBLEM: torch") and "TORCH_CUDA=cu126" in out.splitlines()[-1]
