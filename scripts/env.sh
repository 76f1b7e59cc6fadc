# Sourced by the other scripts: make (once) and activate the project's virtualenv.
# TORCH_SPEC picks the torch build to install (default: the release we test with).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CKPTMIGRATE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "Setting up $VENV (first run only) ..." >&2
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [ ! -f "$VENV/.ckptmigrate-ready" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.ckptmigrate-ready" ]; then
    python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
    python -m pip install --quiet -e "$ROOT[${CKPTMIGRATE_EXTRAS:-test}]"
    touch "$VENV/.ckptmigrate-ready"
fi
