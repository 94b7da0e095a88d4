#!/usr/bin/env bash
# Installs smart-fetch (the SMART/Cumulus Bulk Data client, from PyPI) with
# zstandard and brotli, so that it asks for `gzip, deflate, br, zstd`, into a
# virtual environment inside the checkout: target/smart-fetch-venv (or
# $SMART_FETCH_VENV). tests/hfs.rs runs it from there.
#
# Idempotent: when the environment already holds exactly these pins it only
# checks them and returns (well under a second). Otherwise it builds the
# environment afresh. Every version is pinned, the transitive ones too, so
# CI installs the same client every time. Any failure stops the script with
# a message and a non-zero exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SMART_FETCH_VENV:-$here/target/smart-fetch-venv}"
python="${PYTHON:-python3}"
name=smart-fetch
min_python=3.11
version=1.0.3


# What we ask for, and the versions of everything it pulls in (from
# `pip freeze` of a fresh install on Python 3.11). Change them together.
requirements="smart-fetch==$version
zstandard==0.25.0
brotli==1.2.1"
constraints="aiobotocore==3.10.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aioitertools==0.13.0
aiosignal==1.4.0
anyio==4.16.0
attrs==26.1.0
botocore==1.43.117
certifi==2026.10.19.post1
cffi==2.1.1
charset-normalizer==3.5.3
cryptography==50.0.2
cumulus-fhir-support==1.12.2
fhirclient==4.4.0
frozenlist==1.8.0
fsspec==2026.9.0
h11==0.16.0
httpcore==1.0.9
httpx==0.28.1
idna==3.20
inscriptis==2.7.6
jmespath==1.1.0
jwcrypto==1.6.1
lxml==6.1.3
markdown-it-py==4.3.0
mdurl==0.1.2
multidict==7.2.1
propcache==0.5.4
pyarrow==26.0.1
pycparser==3.12
Pygments==2.21.0
python-dateutil==2.9.0.post0
requests==2.34.2
rich==15.0.0
s3fs==2026.9.0
six==1.17.0
typing_extensions==4.16.0
urllib3==2.8.0
wrapt==2.5.2
yarl==1.25.1"
source "$here/.ci/pyvenv.sh"

# Exits 0 if the environment at $venv is complete and is the pinned one.
check() {
    [ -x "$venv/bin/smart-fetch" ] && pyvenv_pinned || return 1
    SMART_FETCH_VERSION="$version" "$venv/bin/python" - <<'EOF' || return 1
import importlib.metadata as md, os
import zstandard, brotli  # the decoders httpx needs to ask for zstd and br
import httpx._decoders as d
assert md.version("smart-fetch") == os.environ["SMART_FETCH_VERSION"], md.version("smart-fetch")
missing = {"zstd", "br"} - set(d.SUPPORTED_DECODERS)
assert not missing, f"httpx cannot decode {missing}"
EOF
}

pyvenv_ensure "$venv/bin/smart-fetch" --version
