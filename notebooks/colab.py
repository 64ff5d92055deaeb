# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Fine-tune an LLM on Colab with this repo's DVC pipeline
#
# `make notebook` builds this notebook (`notebooks/colab.ipynb`) from `notebooks/colab.py`; edit the `.py`.
#
# It clones the repo, builds its pinned environment (`make setup`), picks a model and a data set by editing
# `params.yaml`, and runs the whole pipeline with `dvc repro`: prepare → model → train → evaluate → export →
# report. **Runtime → Change runtime type → T4 GPU** first.
#
# **Set-up time** (each step over 10 s prints how long it took). Measured in a CPU dry run of the set-up on a 2-core
# machine with an empty pip cache, PyPI over the network; on Colab its network and disk set the figures:
#
# | step | CPU dry run | note |
# |---|---:|---|
# | clone | < 1 s | from a local copy; GitHub adds a few seconds |
# | Python 3.11 (apt, Colab only) | not run | Colab's own Python is not 3.11, which the pins are for (see that cell) |
# | `make setup` | 5 min 22 s | 6.4 GB venv, mostly torch and its CUDA libraries, built for this GPU's driver |
# | `make doctor` | 4 s | what torch sees: build, driver, GPU, bf16, Liger / flash-attn / bitsandbytes |
#
# **Precision**: `train.precision: auto` picks bf16 where the GPU supports it and **fp16 on a T4** (Turing has no
# bf16); nothing to set.
#
# **Surviving a disconnect**: everything that takes long is kept on Google Drive (`DRIVE_DIR`):
# - `dvc-cache/`: the repo's DVC cache and run-cache. A stage that finished once is restored from it
#   ("Stage '…' is cached - skipping run") instead of running again.
# - `checkpoints/`: `checkpoints/` in the repo is a link to it, and the train stage resumes from the newest
#   complete checkpoint (`train.save_steps` sets how often one is written).
#
# After a disconnect, run all cells again with the same settings: finished stages come back from Drive and
# training goes on from its last checkpoint.

# %% tags=["parameters"]
REPO_URL = "https://github.com/YOUR-NAME/llm-finetune.git"  # @param {type:"string"}
# A small modern instruct model fits a T4 with plain LoRA in fp16. A Chinese 7B such as
# ziqingyang/chinese-alpaca-2-7b needs QLoRA there (4-bit weights: ~5 GB of GPU memory instead of ~14 GB);
# QLORA turns itself on for a model with "7b" in its name.
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # @param {type:"string"}
QLORA = False  # @param {type:"boolean"}
# Empty = the repo's demo (LLaMA-Factory's identity set + Chinese idioms). Or your table, in the repo or on Drive
# (/content/drive/MyDrive/...), columns as in docs/data.md: then the guide's values below apply.
DATA = ""  # @param {type:"string"}
NAME = "Lumi"  # @param {type:"string"}
DRIVE_DIR = "/content/drive/MyDrive/llm-finetune"  # @param {type:"string"}
WORKDIR = "/content/llm-finetune"
TARGET = ""  # stages to run (dvc repro TARGET), e.g. "prepare model"; empty = the whole pipeline
SMOKE = False  # True = a few steps on a few examples: checks the plumbing in minutes, learns nothing

# %%
# CI runs this notebook on a CPU with a tiny model: it sets these through LLMFT_* environment variables.
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO_URL = os.environ.get("LLMFT_REPO_URL", REPO_URL)
MODEL = os.environ.get("LLMFT_MODEL", MODEL)
QLORA = QLORA or "7b" in MODEL.lower()  # a 7B in fp16 does not fit a T4's 15 GB
DATA = os.environ.get("LLMFT_DATA", DATA)
NAME = os.environ.get("LLMFT_NAME", NAME)
DRIVE_DIR = os.environ.get("LLMFT_DRIVE_DIR", DRIVE_DIR)
WORKDIR = os.environ.get("LLMFT_WORKDIR", WORKDIR)
TARGET = os.environ.get("LLMFT_TARGET", TARGET)
SMOKE = os.environ.get("LLMFT_SMOKE", "1" if SMOKE else "0") == "1"


def sh(cmd: str) -> None:
    """Run `cmd` with the repo's .venv first on PATH, show its output as it comes, stop the notebook on failure.

    Steps over 10 s end with a line saying how long they took.
    """
    start = time.monotonic()
    env = os.environ | {
        "PATH": f"{WORKDIR}/.venv/bin:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUTF8": "1",
        "TQDM_MININTERVAL": "20",
    }  # a progress line every 20 s, not a flood
    proc = subprocess.Popen(cmd, shell=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="")
    if proc.wait():
        raise RuntimeError(f"`{cmd}` failed with exit code {proc.returncode}: see its output above")
    if time.monotonic() - start > 10:
        print(f"[{time.monotonic() - start:.0f} s: {cmd}]")


def set_params(path: str, overrides: dict) -> None:
    """Set `section.key` values in params.yaml in place, keeping its comments (Colab's Python has no ruamel)."""
    todo, section, out, in_old_block = dict(overrides), None, [], False
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if in_old_block and line.startswith("    "):
            continue  # a list under the key just replaced (prepare.templates): the new value replaces it
        in_old_block = False
        if re.match(r"\w", line):
            section = line.split(":")[0]
        key = re.match(r"  (\w+):(.*?)(\s+#.*)?$", line)
        if key and f"{section}.{key[1]}" in todo:
            value = json.dumps(todo.pop(f"{section}.{key[1]}"), ensure_ascii=False)  # JSON is valid YAML
            note, new = (key[3] or "").strip(), f"  {key[1]}: {value}"
            line = f"{new.ljust(len(line) - len(note) - 1)} {note}" if note else new  # the comment keeps its column
            in_old_block = True
        out.append(line)
    if todo:
        raise KeyError(f"{path} has no {', '.join(todo)}")
    Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")


# %% tags=["gpu-only"]
# Is this a GPU runtime?
try:
    sh("nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv")
except RuntimeError:
    raise RuntimeError("no GPU: Runtime → Change runtime type → T4 GPU, then run all cells again") from None

# %% tags=["colab-only"]
# Google Drive keeps the DVC cache and the checkpoints across sessions (Colab asks for permission once).
from google.colab import drive

drive.mount("/content/drive")

# %%
if "YOUR-NAME" in REPO_URL:
    raise ValueError("set REPO_URL (first code cell) to your copy of the repo")
if Path(WORKDIR, ".git").exists():
    print(f"{WORKDIR} exists: using it as it is (a rerun in the same session)")
else:
    sh(f"git clone --depth 1 {REPO_URL} {WORKDIR}")
os.chdir(WORKDIR)

# %% tags=["colab-only"]
# The repo pins Python 3.11: requirements-lock.txt is resolved and tested there. Colab's own Python is newer
# (`!python3 --version`) and its torch is built for that Python, so it cannot serve a 3.11 venv, and the pipeline on
# Colab's Python with Colab's package versions would be an untested environment. So: Python 3.11 beside Colab's, and
# the pinned venv. Where python3.11 is already there, nothing is installed.
if shutil.which("python3.11") is None:
    sh("add-apt-repository -y ppa:deadsnakes/ppa > /dev/null && apt-get -qq install -y python3.11 python3.11-venv")

# %%
# The pinned .venv; a no-op when it is there. torch comes built for a CUDA this GPU's driver runs: make setup reads
# nvidia-smi and says which build and why in one line (PyPI's CUDA 13.0 build needs driver >= 580; an older driver
# gets the CUDA 12.6 or 12.8 build of the same torch from PyTorch's wheel index).
sh("make setup")
sh("make doctor")  # what torch sees: build, driver, GPU, bf16, Liger / flash-attn / bitsandbytes, free memory

# %%
# Results on Drive: the DVC cache (with the run-cache) and the training checkpoints.
Path(DRIVE_DIR, "checkpoints").mkdir(parents=True, exist_ok=True)
sh(f"dvc cache dir --local '{DRIVE_DIR}/dvc-cache'")  # .dvc/config.local: this machine only, not committed
if not Path("checkpoints").is_symlink():
    if Path("checkpoints").exists():
        shutil.rmtree("checkpoints")  # a fresh clone has none; an old local one would shadow Drive's
    Path("checkpoints").symlink_to(Path(DRIVE_DIR, "checkpoints"), target_is_directory=True)
print(f"checkpoints -> {os.readlink('checkpoints')}")

# %%
overrides = {
    "model.name_or_path": MODEL,
    "train.save_steps": 50,  # a checkpoint every 50 steps: at most that much lost on a disconnect
    "train.cpu_token_budget": None,  # the CPU cap does not apply on a GPU anyway; no cap
}
if DATA:
    overrides["prepare.sources"] = [{"path": DATA}]  # one table, columns found by name
    # The guide's values, for a 7B model on thousands of examples on a GPU (docs/training.md).
    # The repo's defaults (lr 1e-3, batch 4 x 1, 2 epochs) are sized for the 139-example demo on a CPU.
    overrides |= {
        "train.learning_rate": 5.0e-5,
        "train.per_device_train_batch_size": 4,
        "train.gradient_accumulation_steps": 4,
        "train.num_train_epochs": 3.0,
    }
else:
    overrides["prepare.variables"] = {"name": NAME, "author": "Acme Labs"}  # the name the demo teaches the model
if QLORA:
    overrides["train.quantization_bit"] = 4
    sh("python -m pip install -q bitsandbytes==0.50.2")  # QLoRA's kernels; not in the pins (CUDA only)
if SMOKE:
    overrides |= {
        "prepare.val_size": 4,
        "train.max_steps": 2,
        "train.max_samples": 8,
        "train.cutoff_len": 64,
        "train.per_device_train_batch_size": 2,
        "train.gradient_accumulation_steps": 1,
        "train.logging_steps": 1,
        "train.save_steps": 1,
        "train.eval_steps": 1,
        "evaluate.max_examples": 2,
        "evaluate.max_new_tokens": 8,
        "evaluate.num_threads": 1,
        "rehearse.enabled": False,  # a random tiny model's answers never end: nothing to rehearse
    }
set_params("params.yaml", overrides)
sh("python -m llmft.params")  # the schema check every stage does first
sh("git diff --stat params.yaml; git diff -U0 params.yaml | grep '^[-+] ' || true")

# %%
import yaml

params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
for dotted, value in overrides.items():
    section, key = dotted.split(".")
    assert params[section][key] == value, f"params.yaml: {dotted} is {params[section][key]!r}, expected {value!r}"
print(f"params.yaml: {len(overrides)} overrides in place; model {MODEL}, data {DATA or 'the demo'}")

# %%
sh(f"dvc repro {TARGET}")  # after a disconnect: finished stages come back from Drive, training resumes

# %%
sh("dvc metrics show")
if Path("reports/report.html").exists():
    shutil.copytree("reports", Path(DRIVE_DIR, "reports"), dirs_exist_ok=True)
    for name in ("params.yaml", "dvc.lock"):
        shutil.copy(name, Path(DRIVE_DIR, "reports", name))
    print(f"report, params.yaml and dvc.lock copied to {DRIVE_DIR}/reports")

# %% tags=["colab-only"]
# The report, right here (a copy is in reports/ on Drive).
from IPython.display import HTML, display

display(HTML(Path("reports/report.html").read_text(encoding="utf-8")))
