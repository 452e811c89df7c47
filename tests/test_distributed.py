"""Multi-process settings: validation and discovery from SLURM / Open MPI variables."""

import pytest

from t5x_like import distributed
from t5x_like.distributed import DistributedConfig


def test_single_process_settings_join_nothing():
    assert distributed.initialize(None) is False
    assert distributed.initialize({}) is False
    assert distributed.initialize({"num_processes": 1, "process_id": 0}) is False


@pytest.mark.parametrize("fields, message", [
    ({"num_processes": 2}, "needs distributed.coordinator_address"),
    ({"num_proc": 2}, "unknown field"),
    ({"coordinator_address": "10.0.0.1", "num_processes": 2}, "is not host:port"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "outside"),
])
def test_bad_explicit_settings_fail_before_joining(fields, message):
    with pytest.raises(ValueError, match=message):
        distributed.initialize(fields)


@pytest.mark.parametrize("nodelist, first", [
    ("gpu-a100-17", "gpu-a100-17"),
    ("node[003-005,9]", "node003"),
    ("node[7,1-2],login1", "node7"),
    ("h1,h2", "h1"),
])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_slurm_tasks_of_srun():
    env = {"SLURM_JOB_ID": "84211", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "gpu[012-015]",
           "SLURM_STEP_NODELIST": "gpu[012-015]"}
    found = distributed.discover(env)
    port = distributed.slurm_port("84211")
    assert found == DistributedConfig(coordinator_address=f"gpu012:{port}", num_processes=4,
                                      process_id=3)
    assert 61440 <= port < 65536
    # Every task of a job derives the same port; another job gets another one.
    assert distributed.slurm_port("84212") != port
    found.check()


def test_coordinator_variable_overrides_discovery():
    env = {"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "a[1-2]", distributed.COORDINATOR_ENV: "10.0.0.5:9999"}
    assert distributed.discover(env).coordinator_address == "10.0.0.5:9999"


def test_open_mpi_ranks_and_head_node():
    env = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_MCA_orte_hnp_uri": "3125405696.0;tcp://10.128.0.7,172.17.0.1:41879"}
    found = distributed.discover(env)
    assert found == DistributedConfig(coordinator_address=f"10.128.0.7:{distributed.DEFAULT_PORT}",
                                      num_processes=8, process_id=5)


def test_open_mpi_without_head_node_says_what_to_set():
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    with pytest.raises(ValueError, match=distributed.COORDINATOR_ENV):
        distributed.discover(env)


def test_no_scheduler_leaves_discovery_to_jax():
    assert distributed.discover({"HOME": "/root", "PATH": "/bin"}) is None
