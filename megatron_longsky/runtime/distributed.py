"""Process-group and megatron-core parallel-state initialisation.

Launchers: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), Slurm's
``srun`` with one task per device (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master
taken from the first host of SLURM_JOB_NODELIST), or a plain single process.
NCCL on GPU, gloo on CPU; on CPU the megatron-core compatibility layer is enabled.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, Mapping, Optional

import torch

from megatron_longsky.config import ConfigError
from megatron_longsky.runtime import cpu_compat

log = logging.getLogger(__name__)


@dataclass
class ParallelConfig:
    """How the model and data are split across processes."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    # Megatron sequence parallelism (shards LayerNorm/dropout activations over TP).
    sequence_parallel: bool = False
    # Transformer Engine's CP communication (GPU only); our CPU attention all-gathers K/V.
    # What each needs is checked with the model and data (attention.context_parallel.
    # validate_context_parallel); a2a+p2p also needs hierarchical_context_parallel_sizes.
    cp_comm_type: Literal["p2p", "a2a", "all_gather", "a2a+p2p"] = "p2p"
    # a2a+p2p: [a2a size, p2p size] with a2a size x p2p size = context_parallel_size; the a2a
    # level spans consecutive CP ranks (keep it inside a node: NVLink), the ring crosses nodes.
    hierarchical_context_parallel_sizes: Optional[list[int]] = None
    # Overlap TP communication with GEMMs (TE userbuffers; GPU with TE, TP > 1, sequence_parallel).
    tp_comm_overlap: bool = False
    timeout_minutes: int = 30

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_minutes < 1:
            raise ConfigError(f"parallel.timeout_minutes must be >= 1, got {self.timeout_minutes}")
        sizes = self.hierarchical_context_parallel_sizes
        if sizes is not None and self.cp_comm_type != "a2a+p2p":
            raise ConfigError(f"parallel.hierarchical_context_parallel_sizes={sizes} is used by cp_comm_type=a2a+p2p "
                             f"only; this config has cp_comm_type={self.cp_comm_type} (remove it)")
        if self.cp_comm_type == "a2a+p2p" and self.context_parallel_size > 1:
            cp = self.context_parallel_size
            if sizes is None:
                raise ConfigError(
                    "parallel.cp_comm_type=a2a+p2p needs parallel.hierarchical_context_parallel_sizes "
                    f"([a2a size, p2p size], product {cp}): without the hierarchical CP groups Transformer "
                    "Engine gets no CP group for attention")
            if len(sizes) != 2 or any(s < 1 for s in sizes) or sizes[0] * sizes[1] != cp:
                raise ConfigError(
                    f"parallel.hierarchical_context_parallel_sizes={sizes}: Transformer Engine takes two levels "
                    f"[a2a size, p2p size] of sizes >= 1 whose product is context_parallel_size={cp}")

    @property
    def hierarchical_cp_groups(self) -> Optional[list[int]]:
        """The sizes handed to ``initialize_model_parallel`` (None: no hierarchical CP groups)."""
        if self.cp_comm_type == "a2a+p2p" and self.context_parallel_size > 1:
            return list(self.hierarchical_context_parallel_sizes)
        return None

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclass
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: Literal["torchrun", "slurm", "single"]


def free_port() -> int:
    """A TCP port free on this host now (for single-process and local multi-process runs)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[003-010,012],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM_JOB_NODELIST")
    depth = 0
    end = len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    head = nodelist[:end]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", head)
    if not match:
        return head
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            master = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env:
            master = first_host(env["SLURM_JOB_NODELIST"])
        else:
            master = env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
        # A per-job port so two jobs sharing a node do not collide.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master,
            master_port=port,
            launcher="slurm",
        )
    # A single process binds no port (see initialize); master_port is informational.
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)), "single")


@dataclass
class Runtime:
    launch: LaunchEnv
    backend: str
    device: torch.device
    parallel: ParallelConfig

    @property
    def rank(self) -> int:
        return self.launch.rank


def initialize(parallel: ParallelConfig, seed: int = 1234, launch: LaunchEnv | None = None) -> Runtime:
    """Initialise torch.distributed, megatron-core's parallel groups and RNG seeds."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_longsky.runtime.device import current_device, use_cuda

    launch = launch or detect_launch_env()
    if use_cuda():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = current_device()
        backend = "nccl"
    else:
        cpu_compat.enable()
        device = torch.device("cpu")
        backend = "gloo"

    if launch.world_size % parallel.model_parallel_size:
        raise ConfigError(
            f"{launch.world_size} process(es) do not divide by tensor x pipeline x context parallel size "
            f"{parallel.tensor_model_parallel_size}*{parallel.pipeline_model_parallel_size}*"
            f"{parallel.context_parallel_size} (--tp/--pp/--cp or parallel.*): launch with torchrun/srun "
            "for more processes"
        )
    if not dist.is_initialized():
        timeout = timedelta(minutes=parallel.timeout_minutes)
        if launch.world_size == 1 and backend == "gloo":
            # One CPU process communicates with nobody: an in-memory store and a process group
            # whose collectives are those of one rank (copies), so no TCP port is bound at all
            # (gloo binds a listener per group, 21 of them; two single-process commands share a
            # host with a training job's MASTER_PORT range).
            dist.init_process_group(backend=_single_process_backend(), store=dist.HashStore(), rank=0,
                                    world_size=1, timeout=timeout)
        elif launch.world_size == 1:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                    rank=launch.rank, world_size=launch.world_size, timeout=timeout)
    if parallel.hierarchical_cp_groups:
        try:
            import einops  # noqa: F401 - megatron-core's create_hierarchical_groups needs it
        except ImportError:
            raise RuntimeError("parallel.cp_comm_type=a2a+p2p: megatron-core creates the hierarchical "
                               "context-parallel groups with einops, which is not installed (pip install "
                               "einops)") from None
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            hierarchical_context_parallel_sizes=parallel.hierarchical_cp_groups,
            distributed_timeout_minutes=parallel.timeout_minutes,
            # The gloo groups (distributed-optimizer CPU copies) would bind a port each.
            create_gloo_process_groups=has_gloo_groups(),
        )
    set_seed(seed)
    log.info(
        "distributed: launcher=%s rank=%d/%d backend=%s device=%s TP=%d PP=%d CP=%d DP=%d",
        launch.launcher, launch.rank, launch.world_size, backend, device,
        parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size, parallel_state.get_data_parallel_world_size(),
    )
    return Runtime(launch=launch, backend=backend, device=device, parallel=parallel)


_SINGLE = "longsky_single"


def has_gloo_groups() -> bool:
    """Whether megatron-core's gloo groups exist (not in one CPU process: see initialize)."""
    import torch.distributed as dist

    return dist.get_backend() != _SINGLE


def _single_process_backend() -> str:
    """A process-group backend for a world of one CPU process: torch's FakeProcessGroup, whose
    collectives copy (all-gather, reduce-scatter, all-to-all) or leave (all-reduce, broadcast)
    the tensors as a one-rank group must, without any transport."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import FakeProcessGroup

    if _SINGLE not in dist.Backend.backend_list:
        def create(common_opts, backend_opts):
            if common_opts.group_size != 1:
                raise RuntimeError(f"the {_SINGLE} backend is for one process, not {common_opts.group_size}")
            return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)

        dist.Backend.register_backend(_SINGLE, create, extended_api=True, devices=["cpu"])
    return _SINGLE


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron-core's model-parallel RNG tracker."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
