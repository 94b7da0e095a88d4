# Sourced by the scripts that install a pinned Python tool from PyPI into a
# virtual environment inside the checkout (.ci/smart-fetch.sh, .ci/moto.sh).
#
# The caller sets: name (for messages), version, venv, python, min_python
# ("3.11"), requirements, constraints (pip's requirements and constraints
# files, as text), and defines check (exits 0 when $venv is complete and
# holds exactly the pins). Then `pyvenv_ensure PROBE...` returns at once when
# check passes, and otherwise builds the environment afresh, records the
# pins, runs check and PROBE (a command of the new environment that must
# succeed), and stops the script with a message on any failure.

fail() {
    echo "$name.sh: $*" >&2
    exit 1
}

# The file in $venv that records which pins it was built with, and what
# it must say.
stamp="$venv/.$name-pins"
wanted="$(printf '%s\n--\n%s\n' "$requirements" "$constraints")"

# True when $venv records exactly these pins.
pyvenv_pinned() {
    [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]
}

pyvenv_ensure() {
    if check 2>/dev/null; then
        echo "$name.sh: $name $version is ready in $venv"
        exit 0
    fi
    [ -e "$venv" ] && echo "$name.sh: $venv is incomplete or holds other versions: rebuilding it"

    command -v "$python" >/dev/null || fail "no $python on PATH: $name $version needs Python $min_python or later"
    MIN_PYTHON="$min_python" "$python" - <<'PY' || fail "$("$python" --version 2>&1) is too old: $name $version needs Python $min_python or later"
import os, sys
sys.exit(0 if sys.version_info >= tuple(map(int, os.environ["MIN_PYTHON"].split("."))) else 1)
PY

    echo "$name.sh: installing $name $version into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" ||
        fail "$python -m venv failed (on Debian: apt-get install python3-venv)"

    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    printf '%s\n' "$requirements" >"$work/requirements.txt"
    printf '%s\n' "$constraints" >"$work/constraints.txt"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --no-input --quiet \
        -r "$work/requirements.txt" -c "$work/constraints.txt" ||
        fail "pip install of the pinned $name failed (see above); $venv is incomplete"

    printf '%s' "$wanted" >"$stamp"
    check || {
        rm -f "$stamp"
        fail "the new environment in $venv does not pass its own check (see above)"
    }
    "$@" >/dev/null 2>&1 || fail "$* failed"
    echo "$name.sh: $name $version is ready in $venv"
}
