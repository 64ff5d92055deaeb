"""What ran, and where: the params changed since the previous commit, all of them, and the environment (device,
packages, git commit, DVC hashes of the data and models) the report ends with.

    from llmft.report import provenance
    display(Markdown(provenance.params_diff(".")))
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from llmft.common import read_json
from llmft.env import cpu_name, git_commit, package_version, run_dvc
from llmft.report.render import Table


def params_diff(root: str | Path = ".") -> str:
    """Markdown: `dvc params diff HEAD~1 --md` (the previous commit vs the workspace), or why there is none."""
    root = Path(root)
    head = _run(["git", "rev-parse", "--verify", "--quiet", "HEAD~1"], root)
    if head is None or head.returncode != 0:
        return "_No previous commit to compare with (not a git repository, or only one commit)._"
    try:
        diff = run_dvc("params", "diff", "HEAD~1", "--md", cwd=root, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        diff = None
    if diff is None or diff.returncode != 0:
        reason = (diff.stderr.strip().splitlines() or ["?"])[-1] if diff else "dvc not found"
        return f"_`dvc params diff HEAD~1` failed: {reason}_"
    table = diff.stdout.strip()
    if len(table.splitlines()) <= 2:  # the header alone
        return "_No params changed since the previous commit (`dvc params diff HEAD~1`)._"
    return table


def params_yaml(params: Any) -> str:
    """The validated params (defaults filled in) as YAML, without params.yaml's comments."""
    return yaml.safe_dump(params.model_dump(), sort_keys=False, allow_unicode=True, width=120).strip()


def environment(lock_file: str | Path, train_metrics: dict, env_file: str | Path = "") -> Table:
    """Where training ran (the train stage's manifest, reports/env/train.json; else this machine), package
    versions, git commit and the DVC hashes (dvc.lock) of the data and models."""
    manifest = read_json(env_file) if env_file and Path(env_file).exists() else {}
    if manifest:
        torch = manifest.get("torch") or {}
        rows = [
            ["device (training)", manifest["device"]],
            ["precision used in training", train_metrics.get("precision", "not recorded")],
            ["python", manifest["python"]],
            ["CUDA (torch build)", torch.get("cuda") or "none"],
        ]
        rows += [
            [pkg, manifest["packages"].get(pkg, "not installed")]
            for pkg in ("torch", "transformers", "peft", "llamafactory", "dvc")
        ]
        rows.append(["git commit (training)", manifest["git_commit"]])
    else:
        rows = [
            ["device (this machine)", device_name()],
            ["precision used in training", train_metrics.get("precision", "not recorded")],
            ["python", platform.python_version()],
        ]
        rows += [[pkg, package_version(pkg)] for pkg in ("torch", "transformers", "peft", "llamafactory", "dvc")]
    rows.append(["git commit (report)", git_commit()])
    lock = yaml.safe_load(Path(lock_file).read_text(encoding="utf-8")) if Path(lock_file).exists() else {}
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("md5") and str(out["path"]).startswith(("data/", "models/")):
                rows.append([f"dvc md5 {out['path']}", out["md5"]])
    return Table(rows, ["", ""], text_columns=2)


def device_name() -> str:
    """The GPU(s) or CPU of the machine that builds the report (nvidia-smi: importing torch takes seconds)."""
    gpus = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], Path("."))
    if gpus is not None and gpus.returncode == 0 and gpus.stdout.strip():
        names = gpus.stdout.strip().splitlines()
        return f"{names[0]} x{len(names)}"
    return f"CPU: {cpu_name()}"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
