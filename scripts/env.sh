# Sourced by scripts/main.sh and scripts/test.sh: create or reuse the virtualenv
# and install the pinned requirements when they changed since the last install.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${T5X_LIKE_VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[t5x_like] creating virtualenv $VENV with $($PYTHON --version 2>&1)" >&2
  "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.t5x_like-requirements"
WANT="$(cat "$REPO_ROOT"/requirements*.txt "$REPO_ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[t5x_like] installing pinned requirements into $VENV (a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -r "$REPO_ROOT/requirements.txt" -c "$REPO_ROOT/requirements-lock.txt" >&2
  "$VENV/bin/python" -m pip install -q --no-deps -r "$REPO_ROOT/requirements-nodeps.txt" >&2
  "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO_ROOT" >&2
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$REPO_ROOT"
