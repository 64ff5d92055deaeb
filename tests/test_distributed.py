"""Training as several processes and nodes, for real: `llamafactory-cli train` started by the train stage under
torchrun, DDP over gloo on the CPU, on the tiny random Llama from conftest.py. Two processes against one with twice
the accumulation; one rank killed mid-run, then resumed; a change of world size; two "nodes" over loopback; the
bad inputs that must stop at once with one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmft.lf import config as lf_config
from llmft.lf import run as lf_run
from llmft.params import TrainParams
from scripts import ROOT
from train_project import adapter, make_project, no_weights, set_train, stage_cmd, start_stage, wait_for_checkpoint

CORES = len(os.sched_getaffinity(0))
TWO = {"nproc": 2, "gradient_accumulation_steps": 1, "lora_dropout": 0.0}  # effective batch 2 x 1 x 2 = 4
ONE = {"nproc": 1, "gradient_accumulation_steps": 2, "lora_dropout": 0.0}  # the same effective batch, 2 x 2 x 1


# No rendezvous settings from the shell; LLaMA-Factory's INFO lines (its "world size" line among them) shown.
CLEAN = {"NODE_RANK": "", "NNODES": "", "MASTER_ADDR": "", "MASTER_PORT": "", "LLAMAFACTORY_VERBOSITY": "INFO"}


def run(root: Path, model_dir: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | CLEAN | (env or {})
    return subprocess.run(
        stage_cmd(model_dir), cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def train_json(root: Path) -> dict:
    return json.loads((root / "reports" / "metrics" / "train.json").read_text())


def losses(root: Path, key: str) -> list[tuple[int, float]]:
    history = json.loads((root / "checkpoints" / "trainer_state.json").read_text())["log_history"]
    return [(e["step"], e[key]) for e in history if key in e]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def two_procs(tiny_model_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = make_project(tmp_path_factory.mktemp("two_procs"), **TWO)
    proc = run(root, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


@pytest.mark.slow
def test_two_processes_train_one_adapter_and_record_the_world(two_procs):
    root, proc = two_procs
    logs = proc.stdout + proc.stderr  # LLaMA-Factory logs to stdout
    assert "Process rank: 0, world size: 2" in logs and "Process rank: 1, world size: 2" in logs
    assert "world size 2 (2 processes, " in proc.stderr  # the stage's own line, with the threads each
    m = train_json(root)
    assert (m["world_size"], m["nnodes"], m["nproc_per_node"], m["effective_batch"]) == (2, 1, 2, 4)
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"]) and m["global_step"] == 6
    assert m["tokens_per_sec"] == pytest.approx(2 * m["tokens_per_sec_per_process"], abs=0.2)
    assert m["cpu_plan"]["steps"] == 6  # 16 examples, 4 a step across both processes, as max_steps says
    assert sorted(p.name for p in (root / "models").iterdir()) == ["lora"]
    assert (root / "models" / "lora" / "adapter_model.safetensors").exists()
    # each rank saved its own RNG state, so a resume at this world size restores both
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (root / "checkpoints" / "checkpoint-6").iterdir()}


@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_accumulation(two_procs, tiny_model_dir, tmp_path):
    """Each step holds the same 4 examples either way (accelerate gives rank r every other batch of the one seeded
    order), so with LoRA dropout off the training losses agree to float rounding. The eval loss does not: each
    process averages its own half of the val split over its tokens, and those means are then averaged, where one
    process takes one mean over all tokens. With dropout on, the ranks also draw other dropout masks than one
    process does (measured: 1e-4 relative after 6 steps)."""
    two, _ = two_procs
    one = make_project(tmp_path, **ONE)
    proc = run(one, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size: 2" not in proc.stdout + proc.stderr and train_json(one)["effective_batch"] == 4
    a, b = losses(two, "loss"), losses(one, "loss")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    for (step, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-5), f"step {step}"
    assert train_json(two)["eval_loss"] == pytest.approx(train_json(one)["eval_loss"], rel=1e-3)
    for key, tensor in adapter(two).items():
        assert tensor.allclose(adapter(one)[key], rtol=1e-3, atol=1e-6), key


def rank_pids(parent: int, rank: str) -> list[int]:
    """The training processes under `parent` (torchrun's workers, in sessions of their own) with RANK=rank."""
    import psutil

    found = []
    for child in psutil.Process(parent).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if env.get("RANK") == rank and env.get("LOCAL_RANK") == rank:
            found.append(child.pid)
    return found


@pytest.mark.slow
def test_killing_one_rank_stops_the_job_and_a_rerun_resumes_at_the_same_world_size(tiny_model_dir, tmp_path):
    root = make_project(tmp_path, **TWO, max_steps=100, save_steps=2, eval_steps=50)
    proc = start_stage(root, tiny_model_dir, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, root)
    victims = rank_pids(proc.pid, "1")
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)  # rank 1 alone, as an OOM killer or a lost GPU would
    _, stderr = proc.communicate(timeout=120)  # torchrun stops rank 0 too: no hang
    assert proc.returncode != 0
    assert "failed" in stderr.lower() or "signal" in stderr.lower()
    assert stderr.strip().splitlines()[-1].startswith("error: llamafactory-cli train exited with code ")
    assert "a rerun resumes from the newest complete checkpoint" in stderr.strip().splitlines()[-1]
    assert not (root / "models" / "lora").exists(), "nothing half-written lands in models/lora"
    assert not (root / "reports" / "metrics" / "train.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in root.glob("checkpoints/checkpoint-*"))
    assert killed_at < 100, "training finished before the kill; the test proves nothing"

    rerun = run(root, tiny_model_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = train_json(root)
    step = m["resumed_from_step"]
    assert step >= 2 and f"resuming from checkpoints/checkpoint-{step} (step {step})" in rerun.stderr
    assert "world size: 2" in rerun.stdout + rerun.stderr and m["world_size"] == 2 and m["global_step"] == 100
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"])

    # Decision on a changed world size: a checkpoint resumes only where a step still holds the same examples,
    # that is where the effective batch (batch x accumulation x processes) is the same.
    set_train(root, **(TWO | {"nproc": 1, "max_steps": 4}))  # effective batch 2 x 1 x 1 = 2, not 4
    fresh = run(root, tiny_model_dir)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "world size 2 -> 1 changed the effective batch 4 -> 2 since checkpoints was written" in fresh.stderr
    assert "starting fresh" in fresh.stderr and train_json(root)["resumed_from_step"] == 0


def test_a_checkpoint_resumes_at_another_world_size_with_the_same_effective_batch(tmp_path, caplog):
    lf_run.sync_checkpoints(tmp_path, "fp", world_size=2, effective_batch=4)  # 2 x 1 x 2 processes
    (tmp_path / "checkpoint-2").mkdir()
    with caplog.at_level("INFO", logger="llmft.train"):
        lf_run.sync_checkpoints(tmp_path, "fp", world_size=1, effective_batch=4)  # 1 x 4 x 1 process
    assert (tmp_path / "checkpoint-2").exists()
    assert "written at world size 2, this run has 1: the same effective batch (4), so they resume" in caplog.text
    assert lf_run.stamp(tmp_path) == {"fingerprint": "fp", "world_size": 1, "effective_batch": 4}


@pytest.mark.slow
def test_two_nodes_over_loopback_train_one_adapter_and_only_node_0_writes(two_procs, tiny_model_dir, tmp_path):
    """Two launches, NNODES=2 and NODE_RANK 0 and 1, one process each, in two copies of the project (two nodes
    share no disk). Together they are the two-process run of the fixture, so they train the same adapter."""
    nodes = [make_project(tmp_path / f"node{rank}", **(TWO | {"nproc": 1, "nnodes": 2})) for rank in (0, 1)]
    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RDZV_TIMEOUT": "120"}
    start = lambda rank: subprocess.Popen(
        stage_cmd(tiny_model_dir),
        cwd=nodes[rank],
        env=os.environ | CLEAN | env | {"NODE_RANK": str(rank)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # LLaMA-Factory logs to stdout, the stage to stderr
        text=True,
    )
    worker = start(1)  # first, so it waits for node 0 as a real worker would
    time.sleep(2)
    main = start(0)
    main_err, worker_err = main.communicate(timeout=600)[0], worker.communicate(timeout=120)[0]
    assert main.returncode == 0, main_err[-3000:]
    assert worker.returncode == 0, worker_err[-3000:]
    assert "Multi-node training enabled: num nodes: 2" in main_err
    assert "world size 2 (2 nodes x 1 process, node 1, master 127.0.0.1:" in worker_err
    assert "node 1 of 2 finished its part; node 0 writes models/lora" in worker_err
    m = train_json(nodes[0])
    assert (m["world_size"], m["nnodes"], m["nproc_per_node"]) == (2, 2, 1) and math.isfinite(m["eval_loss"])
    assert (nodes[0] / "models" / "lora" / "adapter_model.safetensors").exists()
    for written in ("models", "checkpoints", "reports", "dvclive"):
        assert not (nodes[1] / written).exists(), f"node 1 wrote {written}"
    two, _ = two_procs  # the same world, data and seed on one node
    for (step, x), (_, y) in zip(losses(nodes[0], "loss"), losses(two, "loss"), strict=True):
        assert x == pytest.approx(y, rel=1e-5), f"step {step}"


def stops_with(tmp_path: Path, env: dict, line: str, timeout: int = 60, **train) -> None:
    root = make_project(tmp_path, **train)
    started = time.monotonic()
    proc = run(root, no_weights(tmp_path), env, timeout=timeout)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last_line(proc) == f"error: {line}"
    assert time.monotonic() - started < timeout
    assert not (root / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "train", "line"),
    [
        (
            {},
            {"nproc": CORES + 1},
            f"train.nproc={CORES + 1}: this node has {CORES} CPU core(s) to run them on; "
            f"set NPROC={CORES} or fewer (each CPU process needs a core of its own)",
        ),
        (
            {"NODE_RANK": "1"},
            {},
            "NODE_RANK=1 without NNODES (train.nnodes is 1): make train NNODES=2 NODE_RANK=<0 on the first node, 1 "
            "on the second> MASTER_ADDR=<node 0's address>",
        ),
        (
            {"NNODES": "2"},
            {},
            "NNODES=2 is in the environment but params.yaml gives 1 (train.nnodes, or train.nproc's auto); pass it "
            "as `make train NNODES=2`, which sets both, or unset NNODES",
        ),
        (
            {"NODE_RANK": "0", "MASTER_ADDR": "192.0.2.1"},  # TEST-NET-1: never an address of this machine
            {"nnodes": 2},
            "MASTER_ADDR=192.0.2.1 is not an address of this machine, and NODE_RANK=0 is the node the others "
            "connect to: set MASTER_ADDR to this node's own address (one the other nodes can reach)",
        ),
    ],
    ids=["nproc-over-cores", "node-rank-without-nnodes", "nnodes-env-disagrees", "master-not-here"],
)
def test_bad_world_stops_before_anything_loads(tmp_path, env, train, line):
    stops_with(tmp_path, env, line, **train)


@pytest.mark.slow
def test_an_unreachable_master_stops_within_the_rendezvous_timeout(tmp_path):
    port = free_port()  # nothing listens there
    env = {"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_TIMEOUT": "4"}
    stops_with(
        tmp_path,
        env,
        f"node 0 did not answer at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within 4 s (RDZV_TIMEOUT): is `make "
        "train` with the same NNODES running there, with NODE_RANK=0, and is the port open between the nodes?",
        timeout=40,
        nnodes=2,
    )


@pytest.mark.slow
def test_a_master_that_is_no_host_stops_at_once(tmp_path):
    env = {"NODE_RANK": "1", "MASTER_ADDR": "no-such-node.invalid", "RDZV_TIMEOUT": "600"}
    root = make_project(tmp_path, nnodes=2)
    proc = run(root, no_weights(tmp_path), env, timeout=60)
    assert proc.returncode == 2 and last_line(proc).startswith("error: MASTER_ADDR=no-such-node.invalid: no such host")


@pytest.fixture(scope="session")
def deepspeed_path() -> Path:
    """requirements-deepspeed.txt installed off .venv (see its header), once per set of pins."""
    pins = (ROOT / "requirements-deepspeed.txt").read_text()
    target = ROOT / ".venv" / "deepspeed-check"
    stamp = target / f".pins-{hashlib.sha256(pins.encode()).hexdigest()[:16]}"
    if not stamp.exists():
        shutil.rmtree(target, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
        env = os.environ | {"DS_BUILD_OPS": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        proc = subprocess.run(
            [*cmd, str(target), "-r", str(ROOT / "requirements-deepspeed.txt")], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        stamp.touch()
    return target


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("zero", ["z2", "z3"])
def test_deepspeed_config_is_what_llamafactory_parses_in_two_processes(deepspeed_path, tiny_model_dir, tmp_path, zero):
    """The config the train stage writes for train.deepspeed, read by LLaMA-Factory's parser under a real 2-process
    torchrun: DeepSpeed's "auto" values come out as the stage means them. Nothing is faked but the GPU: fp32 on a
    CPU where a GPU would add bf16 (the same "auto" key)."""
    root = make_project(tmp_path)
    t = TrainParams(deepspeed=zero, per_device_train_batch_size=2, gradient_accumulation_steps=4, cutoff_len=64)
    sections = lf_config.build_config(
        t,
        model_path=str(tiny_model_dir),
        template="smollm2",
        trust_remote_code=False,
        data_dir=str(root / "data" / "processed"),
        output_dir=str(tmp_path / "checkpoints"),
        precision="fp32",
        deepspeed_config=str(ROOT / lf_config.DEEPSPEED_CONFIGS[zero]),
    )
    (tmp_path / "train_config.yaml").write_text(lf_config.to_yaml(sections, ["deepspeed check"]))
    out = tmp_path / "parsed.json"
    env = os.environ | {"PYTHONPATH": str(deepspeed_path), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*torchrun, str(ROOT / "tests" / "deepspeed_args.py"), "train_config.yaml", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(out.read_text())
    ds = parsed["deepspeed"]
    assert parsed["world_size"] == 2 and parsed["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert ds["zero_optimization"]["stage"] == int(zero[1])
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 4)
    assert ds["train_batch_size"] == 2 * 4 * 2  # micro-batch x accumulation x world size: the effective batch
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    if zero == "z3":  # the weights are gathered to save a whole model, which export needs
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
