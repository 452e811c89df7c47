#!/usr/bin/env bash
# The whole test suite (8 simulated CPU devices, set in tests/conftest.py).
# Extra arguments go to pytest, e.g. scripts/test.sh -k attention -x
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec python -m pytest tests "$@"
