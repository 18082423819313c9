#!/usr/bin/env bash
# mcad's two quickstart commands, each installing what it needs first:
#   ./dev.sh demo [ARGS]   the whole flow on the embedded shapes benchmark (`mcad demo`)
#   ./dev.sh test [ARGS]   the test suite (pytest; ARGS go to pytest)
#   ./dev.sh mcad [ARGS]   any other mcad command inside the project's environment
#   ./dev.sh mutate [MODULE...]  mutation testing of the pure core (mutmut; README "Tests")
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

# Mutation testing (mutmut 2.x, the `mutate` extra): each core module of
# mutmut_config.py's PAIRS (all by default) against its paired test files.
# mutmut edits the module in place, so this refuses a module with uncommitted
# changes and puts every module back on exit, Ctrl-C included.
mutate() {
    ensure_env
    "$VENV/bin/python" -c "import mutmut" 2>/dev/null ||
        "$VENV/bin/python" -m pip install -q -e ".[test,export,tensorboard,mutate]"
    local py mods m tests rc start setsid=
    command -v setsid >/dev/null && setsid=setsid
    py=$(cd "$(dirname "$VENV/bin/python")" && pwd)/python
    if [ $# -gt 0 ]; then mods=("$@"); else read -ra mods <<< "$("$py" mutmut_config.py modules)"; fi
    for m in "${mods[@]}"; do
        "$py" mutmut_config.py tests "$m" >/dev/null || exit 2
    done
    git rev-parse --git-dir >/dev/null 2>&1 || { echo "dev.sh mutate: needs a git checkout (it restores the modules from git)" >&2; exit 2; }
    if [ -n "$(git status --porcelain -- "${mods[@]}")" ]; then
        echo "dev.sh mutate: uncommitted changes in $(git status --porcelain -- "${mods[@]}" | cut -c4- | tr '\n' ' ')" >&2
        echo "  mutmut edits these files in place: commit or stash the changes first" >&2
        exit 2
    fi
    MUTATE_MODS=("${mods[@]}") MUTATE_PID=
    trap mutate_restore EXIT
    trap 'mutate_stop; exit 130' INT TERM
    for m in "${mods[@]}"; do
        tests=$("$py" mutmut_config.py tests "$m")
        rm -f "$(dirname "$m")/__pycache__/$(basename "$m" .py)".*.pyc
        echo "== $m: tests $tests" >&2
        start=$SECONDS rc=0
        # pytest.main in the runner process: any failure (a failing test, a module that no
        # longer imports) counts as killed, and mutmut's timeout kills pytest itself.
        # mutmut runs in a session of its own (setsid) and dev.sh waits for it: a Ctrl-C reaches
        # only dev.sh, which stops mutmut's whole group (mutmut, its worker process and the
        # current mutant's pytest) before it puts the module back.
        $setsid "$VENV/bin/mutmut" run --paths-to-mutate "$m" --simple-output --no-progress \
            --runner "$py -c 'import sys, pytest; sys.exit(pytest.main(sys.argv[1:]) != 0)' -x -q -p no:cacheprovider $tests" \
            >/dev/null &
        MUTATE_PID=$!
        wait "$MUTATE_PID" || rc=$?
        MUTATE_PID=
        [ $((rc & 1)) -eq 0 ] || { echo "dev.sh mutate: mutmut failed on $m (the tests must pass unmutated)" >&2; exit 1; }
        echo "== $m: $("$py" mutmut_config.py counts "$m") ($((SECONDS - start)) s)" >&2
    done
    mutate_restore
    local left id n=0
    for m in "${mods[@]}"; do
        left=$("$py" mutmut_config.py left "$m")
        [ -n "$left" ] || continue
        echo "---- $m: not killed: $left"
        for id in $left; do
            n=$((n + 1))
            echo "# mutant ${id%%:*} (${id#*:})"
            "$VENV/bin/mutmut" show "${id%%:*}"
        done
    done
    echo "dev.sh mutate: $n mutants not killed in ${mods[*]}"
    echo "  (results stay in .mutmut-cache: a rerun tests only new mutants unless tests/ changed; rm it to start over)"
}

mutate_stop() {
    [ -n "${MUTATE_PID:-}" ] || return 0
    kill -TERM -- "-$MUTATE_PID" 2>/dev/null || kill -TERM "$MUTATE_PID" 2>/dev/null
    wait "$MUTATE_PID" 2>/dev/null
    sleep 1  # its worker and the pytest it started leave with the group
    return 0
}

mutate_restore() {
    local m
    for m in "${MUTATE_MODS[@]}"; do
        [ -f "$m.bak" ] && mv -f "$m.bak" "$m"
        git diff --quiet -- "$m" || git checkout -q -- "$m"
    done
    return 0
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) ensure_env; exec "$VENV/bin/mcad" demo "$@" ;;
    test) ensure_env; exec "$VENV/bin/python" -m pytest "$@" ;;
    mcad) ensure_env; exec "$VENV/bin/mcad" "$@" ;;
    mutate) mutate "$@" ;;
    *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
