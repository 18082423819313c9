#!/usr/bin/env bash
# mcad's two quickstart commands, each installing what it needs first:
#   ./dev.sh demo [ARGS]   the whole flow on the embedded shapes benchmark (`mcad demo`)
#   ./dev.sh test [ARGS]   the test suite (pytest; ARGS go to pytest)
#   ./dev.sh mcad [ARGS]   any other mcad command inside the project's environment
# The environment is ./.venv (override with MCAD_VENV). Installing is skipped
# when nothing changed since the last install, so a second run starts at once.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MCAD_VENV:-.venv}
PY=${PYTHON:-python3}

have_torch() { "$1" -c "import torch" >/dev/null 2>&1; }

install_torch() {
    # Keep any torch the environment already has (a user's CUDA build).
    have_torch "$VENV/bin/python" && return 0
    local pip=("$VENV/bin/python" -m pip install -q)
    if command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" torch && return 0
    fi
    # No GPU: a CPU build, never the multi-GB CUDA one when a CPU wheel can be had.
    "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null && return 0
    "${pip[@]}" --timeout 20 --retries 1 torch \
        --index-url "${MCAD_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" 2>/dev/null && return 0
    echo "dev.sh: no CPU build of torch found; installing the default torch build" >&2
    "${pip[@]}" torch
}

ensure_env() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "dev.sh: creating $VENV" >&2
        local opts=()
        # A torch installed system-wide (e.g. a CUDA build) is reused, not replaced.
        have_torch "$PY" && opts+=(--system-site-packages)
        "$PY" -m venv "${opts[@]}" "$VENV"
    fi
    local stamp="$VENV/.mcad-installed"
    local want
    want=$(cat pyproject.toml dev.sh | "$PY" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    echo "dev.sh: installing mcad and its dependencies into $VENV (once)" >&2
    install_torch
    "$VENV/bin/python" -m pip install -q -e ".[test,export,tensorboard]"
    echo "$want" > "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) ensure_env; exec "$VENV/bin/mcad" demo "$@" ;;
    test) ensure_env; exec "$VENV/bin/python" -m pytest "$@" ;;
    mcad) ensure_env; exec "$VENV/bin/mcad" "$@" ;;
    *) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
