"""configs/sky/train.yaml, the SkyPilot task that trains on a rented spot GPU.

Two halves. The run section is executed by bash as SkyPilot would run it on each node, with `make`, `dvc` and
`python` replaced by stubs that log their arguments: what it links, pulls, trains and pushes on one node, on node 0
and node 1 of two, and where it stops. Then SkyPilot's own loader (the one `sky jobs launch` calls) reads the file
in a venv of its own built from requirements-sky.txt (integration: it builds that venv when missing, ~30 s): the
schema, resources, bucket mount, overrides, and a broken copy it must refuse.

    .venv/bin/python -m pytest tests/test_sky.py
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmft.common import ROOT

TASK = ROOT / "configs" / "sky" / "train.yaml"
PINS = ROOT / "requirements-sky.txt"
SKY_VENV = ROOT / ".venv" / "skypilot-venv"
BUCKET = "s3://my-bucket/llm-finetune"
MOUNT = "/checkpoint-bucket"
INPUTS = "prepare model rehearse"  # the stages whose outputs train reads: pulled, never checkpoints/
RECOVERY_KEYS = {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}

# ---------------------------------------------------------------- the run section, as bash runs it on a node

STUBS = {
    # make, dvc and python log their arguments; dvc answers `remote list` / `remote default` from the environment.
    "make": 'echo "make $*" >> "$LOG"',
    "dvc": """echo "dvc $*" >> "$LOG"
case "$1 $2" in
  "remote list") printf '%b\\n' "$STUB_REMOTES" ;;
  "remote default") [ -n "$STUB_DEFAULT" ] && echo "$STUB_DEFAULT" || exit 1 ;;
esac""",
    "python": """echo "python $*" >> "$LOG"
if [ "${STUB_PULL_FAILS:-0}" = 1 ] && [ "$3" = pull ]; then exit 1; fi""",
    "python3": "echo /opt/python3.11/bin/python3.11",  # `python3 -m uv python find 3.11`
}


@pytest.fixture(scope="module")
def task_yaml() -> dict:
    return yaml.safe_load(TASK.read_text(encoding="utf-8"))


def run_node(task_yaml: dict, tmp_path: Path, rank: int = 0, nodes: int = 1, cloned: bool = False, **env: str):
    """The run section on node `rank` of `nodes`, in a workdir under tmp_path, the bucket mounted at tmp_path/mount.

    The workdir arrives without .git, as a managed job's does, unless `cloned` (launched with --git-url).
    Returns (exit code, output, the logged make/dvc/python calls, the workdir)."""
    work, stubs, mount = tmp_path / "sky_workdir", tmp_path / "stubs", tmp_path / "mount"
    for d in (work / "reports" / "metrics", work / "dvclive" / "train", stubs, mount):
        d.mkdir(parents=True, exist_ok=True)
    for f in ("dvc.lock", "params.yaml", "reports/metrics/train.json", "dvclive/train/metrics.json"):
        (work / f).write_text("{}\n")
    if cloned:
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod((stubs / name).stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    log.write_text("")
    full_env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LOG": str(log),
        "STUB_REMOTES": f"sky\\t{BUCKET}/dvc",
        "STUB_DEFAULT": "",
        **{k: v for k, v in task_yaml["envs"].items() if v is not None},
        "CHECKPOINT_BUCKET": BUCKET,
        "DVC_REMOTE": f"{BUCKET}/dvc",
        "SKYPILOT_NUM_NODES": str(nodes),
        "SKYPILOT_NODE_RANK": str(rank),
        "SKYPILOT_NODE_IPS": "\n".join(f"10.0.0.{i + 1}" for i in range(nodes)),
        "SKYPILOT_NUM_GPUS_PER_NODE": "1",
        "SKYPILOT_TASK_ID": "sky-managed-2026-12-02-10-00-00-000000_llm-finetune-train_1-0",
        **env,
    }
    script = task_yaml["run"].replace(MOUNT, str(mount))
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=full_env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, log.read_text().splitlines(), work


def test_run_mounts_a_bucket_named_by_checkpoint_bucket_in_mount_mode(task_yaml):
    assert task_yaml["file_mounts"][MOUNT] == {"source": "${CHECKPOINT_BUCKET}", "mode": "MOUNT"}
    assert task_yaml["envs"]["CHECKPOINT_BUCKET"] is None  # required: SkyPilot refuses a launch without it
    assert "make setup" in task_yaml["setup"]


def test_one_node_links_checkpoints_to_the_bucket_pulls_inputs_trains_and_pushes(task_yaml, tmp_path):
    code, out, calls, work = run_node(task_yaml, tmp_path)
    assert code == 0, out
    assert os.readlink(work / "checkpoints") == str(tmp_path / "mount" / "checkpoints")
    assert calls == [
        f"dvc remote add --local --force sky {BUCKET}/dvc",
        "dvc remote list",
        f"python -m llmft.tools.remote pull -r sky {INPUTS}",
        "make train",  # one node: no NNODES/NODE_RANK, one process per GPU
        f"python -m llmft.tools.remote push -r sky {INPUTS} train",
    ]
    lineage = tmp_path / "mount" / "lineage"
    assert (lineage / "dvc.lock").exists() and (lineage / "reports" / "metrics" / "train.json").exists()


def test_a_workdir_without_git_gets_a_throwaway_repo_for_dvc_without_the_checkpoints_link(task_yaml, tmp_path):
    code, out, _, work = run_node(task_yaml, tmp_path)
    assert code == 0, out
    git = lambda *args: subprocess.run(["git", *args], cwd=work, capture_output=True, text=True).stdout.split()
    assert git("log", "--format=%s") == [
        "sky",
        "workdir",
        "sky-managed-2026-12-02-10-00-00-000000_llm-finetune-train_1-0",
    ]
    assert "dvc.lock" in git("ls-files") and "checkpoints" not in git("ls-files")


def test_git_push_without_the_repo_history_stops_before_any_work(task_yaml, tmp_path):
    code, out, calls, work = run_node(task_yaml, tmp_path, GIT_PUSH="1")
    assert code == 1 and "launch with --git-url <repo URL> --git-ref <commit>" in out
    assert calls == [] and not (work / ".git").exists()


def test_two_nodes_pass_rank_and_master_to_make_train_and_only_node_0_pushes(task_yaml, tmp_path):
    made = {}
    for rank in (0, 1):
        code, out, calls, _ = run_node(task_yaml, tmp_path / str(rank), rank=rank, nodes=2, NPROC="4")
        assert code == 0, out
        assert f"python -m llmft.tools.remote pull -r sky {INPUTS}" in calls  # every node needs the inputs
        made[rank] = [c for c in calls if c.startswith("make ")]
        pushes = [c for c in calls if " push " in f" {c} "]
        assert pushes == ([f"python -m llmft.tools.remote push -r sky {INPUTS} train"] if rank == 0 else [])
    for rank in (0, 1):
        assert made[rank] == [f"make train NPROC=4 NNODES=2 NODE_RANK={rank} MASTER_ADDR=10.0.0.1 MASTER_PORT=29500"]


def test_a_recovered_node_resumes_from_the_checkpoints_already_in_the_bucket(task_yaml, tmp_path):
    (tmp_path / "mount" / "checkpoints" / "checkpoint-50").mkdir(parents=True)
    code, out, calls, work = run_node(task_yaml, tmp_path)
    assert code == 0, out
    assert "checkpoints -> s3://my-bucket/llm-finetune/checkpoints: 1 checkpoint(s) to resume from" in out
    assert (work / "checkpoints" / "checkpoint-50").is_dir() and "make train" in calls
    assert not any("checkpoints" in c for c in calls)  # nothing pulled over them


def test_a_checkpoints_folder_in_the_workdir_stops_the_run_before_any_work(task_yaml, tmp_path):
    (tmp_path / "sky_workdir" / "checkpoints").mkdir(parents=True)
    code, out, calls, _ = run_node(task_yaml, tmp_path)
    assert code == 1 and "checkpoints/ is a folder here, not the link to the bucket" in out
    assert calls == []


def test_the_local_default_remote_stops_the_run_with_the_fix(task_yaml, tmp_path):
    remotes = "local\\t/home/me/dvc-storage\\t(default)"  # as `dvc remote list` prints the repo's default
    code, out, calls, _ = run_node(task_yaml, tmp_path, DVC_REMOTE="", STUB_DEFAULT="local", STUB_REMOTES=remotes)
    assert code == 1
    assert "DVC remote 'local' is '/home/me/dvc-storage', which this VM cannot reach" in out
    assert "--env DVC_REMOTE=s3://" in out and not any(c.startswith(("make", "python")) for c in calls)


def test_a_named_url_remote_is_used_as_it_is(task_yaml, tmp_path):
    code, out, calls, _ = run_node(task_yaml, tmp_path, DVC_REMOTE="s3", STUB_REMOTES=f"s3\\t{BUCKET}/dvc")
    assert code == 0, out
    assert f"python -m llmft.tools.remote push -r s3 {INPUTS} train" in calls
    assert not any("remote add" in c for c in calls)


def test_missing_inputs_are_built_and_pushed_before_training_on_one_node_but_stop_two_nodes(task_yaml, tmp_path):
    code, out, calls, _ = run_node(task_yaml, tmp_path / "one", STUB_PULL_FAILS="1")
    assert code == 0, out
    # Built and pushed before training, so that a recovery resumes on the same inputs (the same fingerprint).
    assert calls[2:] == [
        f"python -m llmft.tools.remote pull -r sky {INPUTS}",
        "make rehearse",
        f"python -m llmft.tools.remote push -r sky {INPUTS}",
        "make train",
        f"python -m llmft.tools.remote push -r sky {INPUTS} train",
    ]
    code, out, calls, _ = run_node(task_yaml, tmp_path / "two", nodes=2, STUB_PULL_FAILS="1")
    assert code == 1 and "several nodes need train's inputs on DVC remote 'sky'" in out
    assert not any(c.startswith("make") for c in calls)


def test_git_push_saves_the_experiment_under_the_task_id_and_pushes_it_to_origin(task_yaml, tmp_path):
    code, out, calls, _ = run_node(task_yaml, tmp_path, cloned=True, GIT_PUSH="1")
    assert code == 0, out
    name = "sky-managed-2026-12-02-10-00-00-000000_llm-finetune-train_1-0"  # SKYPILOT_TASK_ID: kept across recoveries
    assert calls[-2:] == [f"dvc exp save -f -n {name}", f"dvc exp push -f --no-cache origin {name}"]


# ---------------------------------------------------------------- SkyPilot's own loader, in its own venv


@pytest.fixture(scope="module")
def sky_python() -> Path:
    """The Python of .venv/skypilot-venv, built from requirements-sky.txt when missing or when its pins changed.

    Not .venv: skypilot 0.14.1 requires click<8.2.0 and uvicorn<0.36.0 against the lock's (requirements-sky.txt).
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("requirements-sky.txt holds the hashes of Linux x86_64 wheels: install skypilot==0.14.1 by hand")
    python = SKY_VENV / "bin" / "python"
    stamp = SKY_VENV / f".pins-{hashlib.sha256(PINS.read_bytes()).hexdigest()[:16]}"
    if not stamp.exists():
        shutil.rmtree(SKY_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(SKY_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--require-hashes"]
        proc = subprocess.run([*pip, "-r", str(PINS)], capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"building {SKY_VENV} from requirements-sky.txt failed (it needs PyPI): {proc.stderr[-3000:]}")
        stamp.touch()  # last: a half-built venv has no stamp and is built again
    return python


# Loads each case as `sky jobs launch <yaml> --env K=V [--gpus G] [--num-nodes N]` does (dag_utils is its loader:
# duplicate keys, task schema, resources, storage mounts), and reports what it made of it, or the error.
PROBE = """
import json, sys
from sky.utils import dag_utils

results = {}
for name, case in json.load(sys.stdin).items():
    try:
        task = dag_utils.load_chain_dag_from_yaml(case["path"], env_overrides=list(case["env"].items())).tasks[0]
        task.set_resources_override(case.get("resources", {}))
        if case.get("num_nodes"):
            task.num_nodes = case["num_nodes"]
        results[name] = {
            "num_nodes": task.num_nodes,
            "envs": dict(task.envs),
            "setup": task.setup,
            "run": task.run,
            "resources": [
                {"accelerators": r.accelerators, "use_spot": r.use_spot, "job_recovery": r.job_recovery}
                for r in task.resources
            ],
            "mounts": {p: {"source": s.source, "mode": s.mode.value} for p, s in task.storage_mounts.items()},
        }
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(results))
"""

BROKEN = {  # a misspelled key at each level the loader checks
    "num_node": lambda c: c.update(num_node=c.pop("num_nodes")),
    "use_spott": lambda c: c["resources"].update(use_spott=c["resources"].pop("use_spot")),
    "mode_MOUNTED": lambda c: c["file_mounts"][MOUNT].update(mode="MOUNTED"),
}


@pytest.fixture(scope="module")
def loaded(sky_python, task_yaml, tmp_path_factory) -> dict:
    """Every case, loaded in one process of the SkyPilot venv (importing sky takes ~1.5 s)."""
    tmp = tmp_path_factory.mktemp("sky")
    env = {"CHECKPOINT_BUCKET": BUCKET, "DVC_REMOTE": f"{BUCKET}/dvc"}
    cases = {
        "launch": {"path": str(TASK), "env": env},
        "no_bucket": {"path": str(TASK), "env": {}},
        "two_nodes_l4": {"path": str(TASK), "env": env, "num_nodes": 2, "resources": {"accelerators": "L4:1"}},
    }
    two_nodes = copy.deepcopy(task_yaml)
    two_nodes["num_nodes"] = 2
    variants = {"num_nodes_2_in_yaml": two_nodes}
    for name, breaks in BROKEN.items():
        variants[name] = copy.deepcopy(task_yaml)
        breaks(variants[name])
    for name, config in variants.items():
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        cases[name] = {"path": str(tmp / f"{name}.yaml"), "env": env}
    run_env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    probe = [str(sky_python), "-c", PROBE]
    proc = subprocess.run(probe, input=json.dumps(cases), capture_output=True, text=True, env=run_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_skypilot_loads_the_task_as_sky_jobs_launch_would(loaded, task_yaml):
    task = loaded["launch"]
    assert "error" not in task, task.get("error")
    assert task["num_nodes"] == 1 and task["setup"] == task_yaml["setup"] and task["run"] == task_yaml["run"]
    assert task["envs"]["CHECKPOINT_BUCKET"] == BUCKET and task["envs"]["MASTER_PORT"] == "29500"
    assert task["mounts"] == {MOUNT: {"source": BUCKET, "mode": "MOUNT"}}  # ${CHECKPOINT_BUCKET} filled in
    assert sorted(next(iter(r["accelerators"])) for r in task["resources"]) == ["A100", "A100-80GB"]
    for r in task["resources"]:
        assert r["use_spot"] is True and r["job_recovery"]["strategy"] == "EAGER_NEXT_REGION"
        # The client lets unknown job_recovery keys through (its server validates them): check them here.
        assert set(r["job_recovery"]) <= RECOVERY_KEYS


@pytest.mark.integration
def test_two_nodes_and_another_gpu_load_from_the_command_line_or_the_yaml(loaded):
    overridden, edited = loaded["two_nodes_l4"], loaded["num_nodes_2_in_yaml"]
    assert overridden["num_nodes"] == 2 and all(r["accelerators"] == {"L4": 1} for r in overridden["resources"])
    assert edited["num_nodes"] == 2 and "error" not in edited


@pytest.mark.integration
def test_skypilot_refuses_a_launch_without_checkpoint_bucket(loaded):
    assert "Environment variable 'CHECKPOINT_BUCKET' is None" in loaded["no_bucket"]["error"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "name, message",
    [
        ("num_node", "Invalid task YAML: Instead of 'num_node', did you mean 'num_nodes'?"),
        ("use_spott", "Invalid resources YAML: Instead of 'use_spott', did you mean 'use_spot'?"),
        ("mode_MOUNTED", "Invalid storage YAML: 'MOUNTED' is not one of ['MOUNT', 'COPY', 'MOUNT_CACHED']"),
    ],
)
def test_skypilot_rejects_a_broken_copy(loaded, name, message):
    assert message in loaded[name].get("error", "accepted"), loaded[name]
