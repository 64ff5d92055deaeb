"""notebooks/colab.ipynb: in sync with its source notebooks/colab.py, valid, and its portable cells run on CPU.

Cells tagged `colab-only` (Drive, apt) or `gpu-only` (nvidia-smi) are skipped, each with its reason printed;
the rest run against a copy of this repo, the tiny test model and a temporary folder standing in for Drive.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dvc_repo import ROOT, copy_repo, run

pytestmark = pytest.mark.integration  # starts git, DVC, a server, Jupyter or make

NOTEBOOK = ROOT / "notebooks/colab.ipynb"
SKIP = {"colab-only": "needs Google Colab (Drive, apt)", "gpu-only": "needs a CUDA GPU"}


def cells(nb) -> list[tuple]:
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]


def test_committed_ipynb_is_what_make_notebook_builds_from_the_py(tmp_path):
    out = tmp_path / "colab.ipynb"
    subprocess.run(
        [Path(sys.executable).parent / "jupytext", "--to", "ipynb", "--output", out, ROOT / "notebooks/colab.py"],
        check=True,
        capture_output=True,
    )
    built, committed = nbformat.read(out, as_version=4), nbformat.read(NOTEBOOK, as_version=4)
    assert cells(committed) == cells(built), "notebooks/colab.ipynb is stale: run `make notebook` and commit it"
    assert committed.metadata == built.metadata


def test_ipynb_is_valid_and_opens_on_a_colab_gpu():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"
    assert not any(c.get("outputs") for c in nb.cells), "commit the notebook without outputs"
    tags = {t for c in nb.cells for t in c.metadata.get("tags", [])}
    assert tags == {"parameters", *SKIP}, "a new tag needs a reason in SKIP (or none: then CI runs the cell)"


def run_portable_cells(tmp_path: Path, session: str, model: Path, target: str) -> tuple[Path, str]:
    """Run the notebook as CI can; return the clone and the notebook's text output.

    tmp_path/origin, a copy of this repo, stands in for REPO_URL and tmp_path/drive for Drive. Each session
    clones origin, as Colab does after a disconnect, and links our .venv into it so `make setup` has nothing to do.
    """
    from nbclient import NotebookClient

    origin = tmp_path / "origin"
    if not origin.exists():
        copy_repo(origin)
    repo = tmp_path / session
    run(["git", "clone", "-q", str(origin), str(repo)], tmp_path)
    if not (repo / ".venv").exists():  # copy_repo's .venv link is committed: `/.venv/` ignores only a directory
        (repo / ".venv").symlink_to(ROOT / ".venv")
    settings = {
        "REPO_URL": origin,
        "WORKDIR": repo,
        "DRIVE_DIR": tmp_path / "drive",
        "MODEL": model,
        "SMOKE": "1",
        "TARGET": target,
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in list(nb.cells):
        reasons = [SKIP[t] for t in cell.metadata.get("tags", []) if t in SKIP]
        if reasons:
            print(f"skipped cell `{cell.source.splitlines()[0]}`: {'; '.join(reasons)}")
            nb.cells.remove(cell)
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits these
        for name, value in settings.items():
            env.setenv(f"LLMFT_{name}", str(value))
        NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    return repo, "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def test_portable_cells_edit_params_and_run_the_first_stages_on_the_tiny_model(tmp_path, tiny_model_dir):
    repo, output = run_portable_cells(tmp_path, "clone", tiny_model_dir, target="prepare model")
    drive = tmp_path / "drive"
    assert (repo / "checkpoints").resolve() == (drive / "checkpoints").resolve()  # training resumes from Drive
    assert str(drive / "dvc-cache") in (repo / ".dvc/config.local").read_text()
    assert json.loads((repo / "models/base/model_info.json").read_text())["source"] == str(tiny_model_dir.resolve())
    assert json.loads((repo / "reports/metrics/prepare.json").read_text())["splits"]["val"] == 4
    assert "params.yaml: OK" in output and "overrides in place" in output and "Running stage 'model'" in output
    assert any(drive.glob("dvc-cache/files/md5/*/*")), "stage outputs must be cached on Drive"


@pytest.mark.slow
def test_whole_pipeline_then_a_rerun_after_a_disconnect_retrains_nothing(tmp_path, tiny_model_dir):
    """Session 1 runs every stage; session 2, a fresh clone with the same Drive, gets them all back from it."""
    first, out1 = run_portable_cells(tmp_path, "first", tiny_model_dir, target="")
    assert (first / "reports/report.html").exists() and (tmp_path / "drive/reports/report.html").exists()
    assert json.loads((first / "reports/metrics/train.json").read_text())["global_step"] == 2
    second, out2 = run_portable_cells(tmp_path, "second", tiny_model_dir, target="")
    for stage in ("prepare", "model", "evaluate", "export"):
        assert f"Running stage '{stage}'" in out1 and f"Stage '{stage}' is cached - skipping run" in out2, stage
    assert "nothing to train" in out2  # train.py found the finished run in the checkpoints on Drive
    assert (second / "models/lora/adapter_model.safetensors").read_bytes() == (
        first / "models/lora/adapter_model.safetensors"
    ).read_bytes()
    # The report's outputs are in git (cache: false), so DVC keeps no run-cache for it: rebuilt, identically.
    assert "Running stage 'report'" in out2
    for name in ("report.html", "report.md"):
        assert (second / "reports" / name).read_bytes() == (first / "reports" / name).read_bytes(), name
