"""Helpers for tests that drive real git + DVC commands in a temporary copy of this repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}
OUTPUTS = (
    "data/processed",
    "models/",
    "reports/metrics/",
    "reports/env/",
    "reports/predictions",
    "checkpoints/",
    "dvclive/",
)


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command with the venv on PATH; on failure show its output in the assertion."""
    full_env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"} | GIT_ENV | (env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_repo(dest: Path) -> Path:
    """A fresh-clone-like copy: the files git would check out (committed or not), no outputs, no cache."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], ROOT).stdout.splitlines()
    for name in files:
        src = ROOT / name
        if src.is_file() and not name.startswith(OUTPUTS):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")  # make targets in the copy reuse our environment
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    return dest


def edit_params(repo: Path, section: str, **values) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
