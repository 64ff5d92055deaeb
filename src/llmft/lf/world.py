"""How many processes train, on how many nodes, where they meet, and the environment that tells LLaMA-Factory so.

    world = resolve_world(params.train, os.environ, gpus=torch.cuda.device_count(), cores=usable_cores())
    world.size, world.is_main      # train.nnodes x train.nproc processes; node 0 writes every output
    env = world.launch_env()       # FORCE_TORCHRUN, NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_*, OMP_NUM_THREADS
    wait_for_master(world)         # the other nodes: a bounded wait for node 0, then one line

LLaMA-Factory's launcher (llamafactory/launcher.py) starts `torchrun --nnodes --node_rank --nproc_per_node
--master_addr --master_port` from these variables when FORCE_TORCHRUN is set or it sees several GPUs. On a CPU it
counts 0 devices, so NPROC_PER_NODE must be given; accelerate then runs DDP over gloo. train.nproc and train.nnodes
are params (DVC reruns train when they change, dvc.lock records them) because they change the effective batch:
per-device batch x accumulation x processes, as in LLaMA-Factory and HF. NODE_RANK, MASTER_ADDR and MASTER_PORT
differ per node and per cluster, so they stay in the environment, as torchrun has them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping

from llmft.common import UserError

DEFAULT_PORT = 29500  # torchrun's; several nodes must agree on it, so it is never picked at random there
RDZV_TIMEOUT_S = 300  # how long a node waits for the others (env RDZV_TIMEOUT): bounded, never a hang
EXAMPLE = "make train NNODES=2 NODE_RANK=<0 on the first node, 1 on the second> MASTER_ADDR=<node 0's address>"


@dataclasses.dataclass(frozen=True)
class World:
    nnodes: int = 1
    nproc: int = 1  # processes on this node: one per GPU, or CPU processes sharing the cores
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    threads: int | None = None  # CPU threads per process (cores // nproc); None = torch's default
    rdzv_timeout: int = RDZV_TIMEOUT_S
    cpu: bool = True  # no GPU: DDP over gloo

    @property
    def size(self) -> int:
        return self.nnodes * self.nproc

    @property
    def is_main(self) -> bool:
        """Node 0, whose rank-0 process writes checkpoints, models/lora and metrics; DVC runs there only."""
        return self.node_rank == 0

    def describe(self) -> str:
        where = f"{self.nnodes} nodes x {self.nproc}" if self.nnodes > 1 else f"{self.nproc}"
        node = f", node {self.node_rank}, master {self.master_addr}:{self.master_port}" if self.nnodes > 1 else ""
        threads = f", {self.threads} CPU threads each" if self.threads else ""
        return f"world size {self.size} ({where} process{'es' if self.nproc > 1 else ''}{threads}{node})"

    def launch_env(self, deepspeed: bool = False) -> dict[str, str]:
        """The variables LLaMA-Factory's launcher reads (and torchrun after it); empty keys are left to their
        defaults. One process on one node without DeepSpeed runs as before, with no torchrun in between."""
        env = {"NPROC_PER_NODE": str(self.nproc)}  # also stops LF from starting one process per GPU by itself
        if self.size > 1 or deepspeed:
            env |= {"FORCE_TORCHRUN": "1", "NNODES": str(self.nnodes), "NODE_RANK": str(self.node_rank)}
        if self.nnodes > 1:
            env |= {"MASTER_ADDR": str(self.master_addr), "MASTER_PORT": str(self.master_port)}
            env["PET_RDZV_CONF"] = f"timeout={self.rdzv_timeout}"  # torchrun's --rdzv-conf: its wait, bounded
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _int_env(environ: Mapping[str, str], key: str) -> int | None:
    value = environ.get(key, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{key}={value!r}: expected a whole number") from None


def resolve_world(t, environ: Mapping[str, str], *, gpus: int, cores: int) -> World:
    """train.nproc / train.nnodes (a params.TrainParams `t`) and this node's NODE_RANK, MASTER_ADDR, MASTER_PORT.

    Raises UserError, naming the value and the fix, for: more processes than GPUs (or CPU cores), NNODES or
    NPROC_PER_NODE in the environment that disagree with params, a NODE_RANK without NNODES or past it, and
    several nodes without MASTER_ADDR."""
    nproc = (gpus or 1) if t.nproc == "auto" else t.nproc
    if gpus and nproc > gpus:
        raise UserError(f"train.nproc={nproc}: this node has {gpus} GPU(s); set NPROC={gpus} or fewer (one per GPU)")
    if not gpus and nproc > cores:
        raise UserError(
            f"train.nproc={nproc}: this node has {cores} CPU core(s) to run them on; set NPROC={cores} or fewer "
            "(each CPU process needs a core of its own)"
        )
    for key, value, knob in (("NPROC_PER_NODE", nproc, "NPROC"), ("NNODES", t.nnodes, "NNODES")):
        given = _int_env(environ, key)
        if given is not None and given != value:
            raise UserError(
                f"{key}={given} is in the environment but params.yaml gives {value} (train.{knob.lower()}, or "
                f"train.nproc's auto); pass it as `make train {knob}={given}`, which sets both, or unset {key}"
            )
    node_rank = _int_env(environ, "NODE_RANK") or 0
    if node_rank and t.nnodes == 1:
        raise UserError(f"NODE_RANK={node_rank} without NNODES (train.nnodes is 1): {EXAMPLE}")
    if not 0 <= node_rank < t.nnodes:
        raise UserError(f"NODE_RANK={node_rank}: with NNODES={t.nnodes} it is 0..{t.nnodes - 1}")
    addr, port = environ.get("MASTER_ADDR") or None, _int_env(environ, "MASTER_PORT")
    if t.nnodes > 1 and not addr:
        raise UserError(f"NNODES={t.nnodes} needs MASTER_ADDR, node 0's address, reachable from every node: {EXAMPLE}")
    return World(
        nnodes=t.nnodes,
        nproc=nproc,
        node_rank=node_rank,
        master_addr=addr if t.nnodes > 1 else None,
        master_port=(port or DEFAULT_PORT) if t.nnodes > 1 else None,
        threads=max(1, cores // nproc) if not gpus and nproc > 1 else None,
        rdzv_timeout=_int_env(environ, "RDZV_TIMEOUT") or RDZV_TIMEOUT_S,
        cpu=not gpus,
    )


def wait_for_master(world: World, poll_s: float = 2.0) -> None:
    """Before anything loads: node 0 checks MASTER_ADDR is its own; the others wait (at most RDZV_TIMEOUT seconds)
    until node 0 answers there. A wrong address stops with one line instead of torchrun's 10-minute wait."""
    if world.nnodes == 1:
        return
    addr, port = world.master_addr, world.master_port
    try:
        family, *_, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UserError(f"MASTER_ADDR={addr}: no such host ({err.strerror}); give node 0's address") from None
    if world.is_main:
        try:  # the rendezvous listens here: only an address of this machine can be bound
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
        except OSError:
            raise UserError(
                f"MASTER_ADDR={addr} is not an address of this machine, and NODE_RANK=0 is the node the others "
                "connect to: set MASTER_ADDR to this node's own address (one the other nodes can reach)"
            ) from None
        return
    deadline = time.monotonic() + world.rdzv_timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(poll_s, world.rdzv_timeout)):
                return
        except OSError:
            if time.monotonic() + poll_s > deadline:
                raise UserError(
                    f"node 0 did not answer at MASTER_ADDR={addr} MASTER_PORT={port} within {world.rdzv_timeout} s "
                    "(RDZV_TIMEOUT): is `make train` with the same NNODES running there, with NODE_RANK=0, and is the "
                    "port open between the nodes?"
                ) from None
            time.sleep(poll_s)
