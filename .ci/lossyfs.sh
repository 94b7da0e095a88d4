#!/usr/bin/env bash
# Installs what the power-cut tests' file system (tests/lossyfs/lossyfs.py,
# a FUSE file system that forgets what was not synced) needs:
#
# - from Debian: fuse3 (fusermount3, which mounts and unmounts a FUSE file
#   system, and libfuse3), when fusermount3 is missing;
# - from PyPI: mfusepy (ctypes bindings over libfuse3, pure Python: nothing
#   to compile), pinned, into a virtual environment inside the checkout:
#   target/lossyfs-venv (or $LOSSYFS_VENV).
#
# tests/lossyfs_model.rs and tests/powercut.rs (feature `powercut-tests`)
# run the file system from there, and fail with a message pointing here
# when it is missing. /dev/fuse must exist (it does on a normal Linux host,
# and in a container started with --device /dev/fuse).
#
# Idempotent: when fusermount3 is there and the environment already holds
# exactly these pins it only checks them and returns (well under a second).
# Otherwise it installs what is missing. Any failure stops the script with
# a message and a non-zero exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOSSYFS_VENV:-$here/target/lossyfs-venv}"
python="${PYTHON:-python3}"
name=lossyfs
min_python=3.9
mfusepy_version=3.1.1
version="with mfusepy $mfusepy_version"

[ -e /dev/fuse ] || {
    echo "lossyfs.sh: /dev/fuse is missing: this machine cannot mount FUSE file systems" >&2
    exit 1
}
if ! command -v fusermount3 >/dev/null; then
    echo "lossyfs.sh: installing fuse3 (Debian) for fusermount3 and libfuse3"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q fuse3 >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y -q fuse3 >/dev/null
    } || {
        echo "lossyfs.sh: apt-get install fuse3 failed" >&2
        exit 1
    }
fi
command -v fusermount3 >/dev/null || {
    echo "lossyfs.sh: fusermount3 is still missing after installing fuse3" >&2
    exit 1
}

# What we ask for; mfusepy has no dependencies of its own.
requirements="mfusepy==$mfusepy_version"
constraints=""
source "$here/.ci/pyvenv.sh"

# Exits 0 if the environment at $venv is complete and is the pinned one,
# and mfusepy finds libfuse3.
check() {
    pyvenv_pinned || return 1
    MFUSEPY_VERSION="$mfusepy_version" "$venv/bin/python" - <<'PY' || return 1
import importlib.metadata as md, os
import mfusepy
assert md.version("mfusepy") == os.environ["MFUSEPY_VERSION"], md.version("mfusepy")
assert mfusepy.fuse_version_major == 3, mfusepy.fuse_version_major
PY
}

pyvenv_ensure "$venv/bin/python" "$here/tests/lossyfs/lossyfs.py" --check
