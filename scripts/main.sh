#!/usr/bin/env bash
# The main job on its embedded default config; extra flags pass through, e.g.
#   scripts/main.sh --config.mesh.tensor=2 --config.model.num_layers=2
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# On a CPU-only machine, simulate 8 devices so the mesh is real (no effect on GPU / TPU).
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec python -m t5x_like.main "$@"
