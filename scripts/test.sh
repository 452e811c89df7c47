#!/usr/bin/env bash
# The whole test suite (8 simulated CPU devices, set in tests/conftest.py).
# Extra arguments go to pytest, e.g. scripts/test.sh -k attention -x;
# naming test files or directories runs only those: scripts/test.sh tests/test_rope.py
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
for arg in "$@"; do
  case "$arg" in tests/*|./tests/*) exec python -m pytest "$@" ;; esac
done
exec python -m pytest tests "$@"
