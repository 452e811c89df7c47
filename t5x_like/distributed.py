"""Joining a multi-process job: explicit coordinator flags, or discovery from SLURM,
Open MPI or jax's own detection (Cloud TPU VMs, GKE).

One process per host is the layout everywhere: on a TPU VM worker or a GPU node a
single process drives all local devices. Every process runs the same command; this
module turns its environment into ``jax.distributed.initialize`` arguments, which
must happen before anything touches a device.

This module imports nothing else of ours (like ``partitioning``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping

import jax

log = logging.getLogger(__name__)

# Overrides the discovered coordinator ("host:port") on any cluster.
COORDINATOR_ENV = "T5X_LIKE_COORDINATOR"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process job (the config's ``distributed`` section).

    Empty fields: a single process. ``auto=True`` discovers the job from the
    environment (``discover``): SLURM, Open MPI, else jax's own detection
    (Cloud TPU VMs).
    """

    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    auto: bool = False
    cpu_collectives: str = "gloo"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "DistributedConfig":
        items = dict(config.items()) if hasattr(config, "items") else dict(vars(config))
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - valid)
        if unknown:
            raise ValueError(
                f"distributed config has unknown field(s) {unknown}; valid: {sorted(valid)}"
            )
        return cls(**items)

    @property
    def multi_process(self) -> bool:
        return self.auto or self.num_processes > 1 or bool(self.coordinator_address)

    def check(self) -> None:
        """Explicit settings are complete and consistent (auto is checked by ``discover``)."""
        if self.auto:
            return
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError(
                f"distributed.num_processes={self.num_processes} needs "
                "distributed.coordinator_address (host:port of process 0)"
            )
        if self.coordinator_address and not _HOST_PORT.fullmatch(self.coordinator_address):
            raise ValueError(f"distributed.coordinator_address={self.coordinator_address!r} "
                             "is not host:port")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"distributed.process_id={self.process_id} is outside "
                f"[0, num_processes={self.num_processes})"
            )


_HOST_PORT = re.compile(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+")


# ------------------------------------------------------------------ discovery


def discover(environ: Mapping[str, str] | None = None) -> DistributedConfig | None:
    """The job this process belongs to, read from its environment.

    SLURM (tasks launched by ``srun``) and Open MPI (``mpirun``) are read here;
    None means "no scheduler variables found": jax's own detection (Cloud TPU)
    takes over. ``T5X_LIKE_COORDINATOR=host:port`` overrides the coordinator.
    """
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        return _from_slurm(env)
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _from_open_mpi(env)
    return None


def _from_slurm(env: Mapping[str, str]) -> DistributedConfig:
    # SLURM_STEP_NUM_TASKS is srun's count; SLURM_NTASKS alone also appears in the
    # batch script itself, where one process would wait forever for the others.
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    coordinator = env.get(COORDINATOR_ENV)
    if not coordinator:
        if not nodes:
            raise ValueError("SLURM job without SLURM_JOB_NODELIST: set "
                             f"{COORDINATOR_ENV}=host:port of process 0")
        coordinator = f"{first_slurm_host(nodes)}:{slurm_port(env['SLURM_JOB_ID'])}"
    return DistributedConfig(coordinator_address=coordinator, num_processes=int(tasks),
                             process_id=int(env["SLURM_PROCID"]))


def _from_open_mpi(env: Mapping[str, str]) -> DistributedConfig:
    coordinator = env.get(COORDINATOR_ENV)
    if not coordinator:
        # mpirun's head node publishes its URI, e.g. "123.0;tcp://10.1.2.3,172.17.0.1:45123".
        match = re.search(r"tcp6?://\[?([^,:\]\s;]+)", env.get("OMPI_MCA_orte_hnp_uri", ""))
        if not match:
            raise ValueError("Open MPI job whose head-node address is not in the environment "
                             "(OMPI_MCA_orte_hnp_uri; Open MPI 5 no longer sets it): set "
                             f"{COORDINATOR_ENV}=host:port of rank 0, e.g. with "
                             f"mpirun -x {COORDINATOR_ENV}=$(hostname):12345")
        coordinator = f"{match.group(1)}:{DEFAULT_PORT}"
    return DistributedConfig(coordinator_address=coordinator,
                             num_processes=int(env["OMPI_COMM_WORLD_SIZE"]),
                             process_id=int(env["OMPI_COMM_WORLD_RANK"]))


DEFAULT_PORT = 12355


def slurm_port(job_id: str) -> int:
    """A port every task of one job derives alike; jobs sharing a node differ."""
    return 61440 + int(re.sub(r"\D", "", job_id) or 0) % 4096


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM host list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first  # zero padding is part of the digits SLURM prints


# ------------------------------------------------------------------ joining


def initialize(config: Mapping[str, Any] | DistributedConfig | None) -> bool:
    """Joins the job ``config`` describes; returns whether this is a multi-process run.

    Must run before anything touches a device. Idempotent: a second call (e.g. the
    next stage of a recipe) does nothing. On CPU the cross-process collectives
    need an implementation (gloo), set here before initialisation.
    """
    if config is None:
        return False
    cfg = config if isinstance(config, DistributedConfig) else DistributedConfig.from_config(config)
    if not cfg.multi_process:
        return False
    cfg.check()
    if jax.distributed.is_initialized():
        return True
    if cfg.cpu_collectives and _platform_hint() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    found = discover() if cfg.auto else cfg
    if found is None:
        log.info("no SLURM / Open MPI variables: jax discovers the cluster (Cloud TPU)")
        jax.distributed.initialize()
    else:
        found.check()
        log.info("joining %d processes as %d through %s", found.num_processes,
                 found.process_id, found.coordinator_address)
        # One process per host drives all its devices: jax's own detection, left on,
        # would pin each SLURM / Open MPI task to the GPU of its local rank.
        jax.distributed.initialize(coordinator_address=found.coordinator_address,
                                   num_processes=found.num_processes,
                                   process_id=found.process_id,
                                   cluster_detection_method="deactivate")
    log.info("joined %d processes as process %d", jax.process_count(), jax.process_index())
    return True


def _platform_hint() -> str:
    """The platform jax will pick, read without initialising a backend."""
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    return platforms.split(",")[0] if platforms else "cpu"
