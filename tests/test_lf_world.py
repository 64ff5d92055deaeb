"""lf/world.py: train.nproc / train.nnodes and NODE_RANK, MASTER_ADDR, MASTER_PORT -> the world a run trains in,
and the environment LLaMA-Factory's launcher reads. GPUs cannot exist here, so their count is passed in."""

from __future__ import annotations

import pytest

from llmft.common import UserError
from llmft.lf.world import World, resolve_world
from llmft.params import TrainParams


def world(env: dict | None = None, gpus: int = 0, cores: int = 2, **train) -> World:
    return resolve_world(TrainParams(**train), env or {}, gpus=gpus, cores=cores)


def test_auto_is_one_process_per_gpu_and_one_on_a_cpu():
    assert world(gpus=8).nproc == 8 and world(gpus=8).threads is None
    assert world(gpus=0).nproc == 1 and world().size == 1 and world().is_main


def test_cpu_processes_split_the_cores_between_them():
    w = world(cores=16, nproc=4)
    assert (w.size, w.threads) == (4, 4)
    assert w.launch_env() == {"NPROC_PER_NODE": "4", "FORCE_TORCHRUN": "1", "NNODES": "1", "NODE_RANK": "0",
                              "OMP_NUM_THREADS": "4"}  # fmt: skip


def test_one_process_needs_no_torchrun_unless_deepspeed():
    assert world().launch_env() == {"NPROC_PER_NODE": "1"}
    assert world().launch_env(deepspeed=True)["FORCE_TORCHRUN"] == "1"


def test_several_nodes_agree_on_a_fixed_port_and_a_bounded_rendezvous():
    w = world({"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "RDZV_TIMEOUT": "90"}, gpus=8, nnodes=2)
    assert (w.size, w.node_rank, w.is_main, w.master_port) == (16, 1, False, 29500)
    env = w.launch_env()
    assert (env["NNODES"], env["NODE_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("2", "1", "10.0.0.1", "29500")
    assert env["PET_RDZV_CONF"] == "timeout=90" and "OMP_NUM_THREADS" not in env


@pytest.mark.parametrize(
    ("env", "gpus", "train", "message"),
    [
        ({}, 2, {"nproc": 4}, "train.nproc=4: this node has 2 GPU(s); set NPROC=2 or fewer"),
        ({"NPROC_PER_NODE": "8"}, 2, {}, "NPROC_PER_NODE=8 is in the environment but params.yaml gives 2"),
        ({"NODE_RANK": "2", "MASTER_ADDR": "h"}, 0, {"nnodes": 2}, "NODE_RANK=2: with NNODES=2 it is 0..1"),
        ({"NODE_RANK": "one"}, 0, {}, "NODE_RANK='one': expected a whole number"),
        ({}, 0, {"nnodes": 2}, "NNODES=2 needs MASTER_ADDR, node 0's address"),
    ],
)
def test_bad_worlds_are_one_line_naming_the_value(env, gpus, train, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        world(env, gpus=gpus, **train)


def test_nproc_is_a_positive_number_or_auto():
    from llmft.params import parse_params

    with pytest.raises(UserError, match="train.nproc"):
        parse_params({"prepare": {"input": "x.csv"}, "train": {"nproc": 0}}, "params.yaml")
