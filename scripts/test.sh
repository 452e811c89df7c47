#!/usr/bin/env bash
# The whole test suite (8 simulated CPU devices, set in tests/conftest.py).
# Extra arguments go to pytest, e.g. scripts/test.sh -k attention -x;
# naming test files or directories runs only those: scripts/test.sh tests/test_rope.py
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# The whole suite runs on T5X_LIKE_TEST_WORKERS (default 2) pytest-xdist workers, each test
# file on one worker (module fixtures are built once); -n 0 or naming files runs in-process.
WORKERS=(-n "${T5X_LIKE_TEST_WORKERS:-2}" --dist loadfile)
for arg in "$@"; do
  case "$arg" in
    tests/*|./tests/*) WORKERS=(); FILES=1 ;;
    -n|-n*|--numprocesses*|-s|--capture=no) WORKERS=() ;;
  esac
done
if [ -n "${FILES:-}" ]; then exec python -m pytest ${WORKERS[@]+"${WORKERS[@]}"} "$@"; fi
exec python -m pytest ${WORKERS[@]+"${WORKERS[@]}"} tests "$@"
