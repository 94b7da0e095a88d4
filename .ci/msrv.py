"""Fails when Cargo.lock holds a package that needs a newer Rust than the
crate's own `rust-version`. Reads `cargo metadata --format-version 1` on
standard input."""
import json
import sys


def version(text):
    return tuple(int(x) for x in text.split(".")[:2])


meta = json.load(sys.stdin)
root = next(p for p in meta["packages"] if p["name"] == "sqlite-export-store")
msrv = root["rust_version"]
newer = [
    f"{p['name']} {p['version']} needs Rust {p['rust_version']}"
    for p in meta["packages"]
    if p.get("rust_version") and version(p["rust_version"]) > version(msrv)
]
if newer:
    sys.exit(f"Cargo.lock holds packages newer than rust-version {msrv}: " + "; ".join(newer))
print(f"all {len(meta['packages'])} locked packages build on Rust {msrv}")
