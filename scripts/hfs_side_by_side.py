#!/usr/bin/env python3
"""HFS's bulk $export through SqliteOutputStore beside HFS's own local-fs store.

Runs the real Helios FHIR Server (`export-store hfs`, feature `hfs`) on the
same FHIR data once per output mode per round and prints one table with a
column per mode. The modes (`--modes`, comma-separated, default
`sqlite,local-fs`; sqlite and at least one other):

- `sqlite`: `--output sqlite`, this crate's SqliteOutputStore;
- `local-fs`: `--output local-fs`, HFS's LocalFsOutputStore, which never
  fsyncs;
- `local-fs-synced`: `--output local-fs-synced`, HFS's LocalFsOutputStore
  with each finalized file and its folder fsynced after finalize: the cost of
  durable files, as a baseline. Its files go where local-fs puts them.

Beside the columns, the table gives the ratios sqlite / each other mode,
as the median [min–max] of per-round pairs; the targets (MET / NOT MET) are
judged on sqlite / local-fs only. It measures:

- export time: kick-off to complete manifest as a client sees it (polling
  every 0.1 s, ignoring Retry-After), which includes the idle worker's claim
  wait (HFS's workers look for jobs every 2 s); and claim to completion from
  the job's own `started_at`/`completed_at` in HFS's fhir.db, which does not;
- download time of every manifest part through HFS's `/export-file/` route,
  one at a time and four at once, with every line parsed and counted;
- bytes on disk about 2 s after the manifest (the store truncates its WAL
  after 1 s idle): the output db + `-wal` (+ `-shm` shown apart) against the
  total size of DATA_DIR/export-files (local-fs and local-fs-synced);
- the server's peak RSS (VmHWM, reset after start-up) and CPU time.

The data is the crate's seeded synthetic FHIR R4 export (`export-store demo`,
read back through `export-store serve`), loaded once into one HFS data folder
over FHIR REST in Bundles of PUTs, so ids and references are kept: a
transaction Bundle first, and batch Bundles when HFS refuses it (HFS resolves
conditional references such as `Practitioner?identifier=...` in transactions
only, and the data holds no Practitioner), one PUT per resource as the last
resort. Every run starts from a copy of that folder, written back to disk
before the server starts, so from the same fhir.db and an empty output store;
runs alternate through the chosen modes in their order, every mode once per
round (sqlite, local-fs, sqlite, local-fs, ... by default). Python 3 standard
library only.

`--workers N` (default 1) starts every run's HFS with N export workers
(`HFS_BULK_EXPORT_WORKER_CONCURRENCY=N`; also HFS's per-tenant cap on
running exports, `HFS_BULK_EXPORT_MAX_CONCURRENT_PER_TENANT`, 4 by default,
raised to N when N is larger) and kicks off N system exports at once, with
the same `_type` list: N separate jobs, which HFS 0.2.7 runs one per worker.
All N are polled; kick-off to manifest then runs to the last job's manifest,
claim to completion from the earliest `started_at` to the latest
`completed_at` of the N jobs, the downloads fetch every part of every job
(each job is checked on its own to hold every loaded resource), and the
bytes on disk are those of all N jobs' output. With N = 1 HFS runs one
worker (its own default is 2) and the single job is measured as above.

    python3 scripts/hfs_side_by_side.py --bin target/release/export-store [--patients N] [--rounds R] [--workers N]
        [--modes sqlite,local-fs,local-fs-synced]
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

# The order resources are loaded in: referenced types first.
LOAD_ORDER = [
    "Patient", "Encounter", "Condition", "Observation", "DiagnosticReport",
    "MedicationRequest", "Procedure", "Immunization", "AllergyIntolerance",
    "DocumentReference",
]
# The output modes `--modes` may choose from (`export-store hfs --output`),
# with their column headings; sqlite is always run, every ratio is sqlite / X.
MODES = ("sqlite", "local-fs", "local-fs-synced")
MODE_LABELS = {
    "sqlite": "sqlite (SqliteOutputStore)",
    "local-fs": "local-fs (HFS LocalFsOutputStore)",
    "local-fs-synced": "local-fs-synced (LocalFs + fsync)",
}
DEFAULT_MODES = "sqlite,local-fs"
FHIR_JSON = "application/fhir+json"

# urllib without any proxy from the environment: every request here goes to
# a server on the loopback interface.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
T0 = time.monotonic()


class Fail(Exception):
    """A failure with a message for the user; the script stops with it."""


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def http(method, url, body=None, headers=None, timeout=60.0):
    """One request through urllib: (status, headers, body); HTTP errors are
    answers, connection failures and timeouts raise Fail."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise Fail(f"{method} {url}: no answer within {timeout:.0f} s or connection failed: {e}")


def outcome_text(body, limit=600):
    """The diagnostics of an OperationOutcome body, or the body's start."""
    try:
        doc = json.loads(body)
        if doc.get("resourceType") == "OperationOutcome":
            msgs = [
                " ".join(str(v) for v in (i.get("severity"), i.get("code"), i.get("diagnostics"),
                                          (i.get("details") or {}).get("text")) if v)
                for i in doc.get("issue", [])
            ]
            return "; ".join(msgs)[:limit]
    except (ValueError, AttributeError):
        pass
    return body[:limit].decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Raw HTTP/1.1 GET for the timed downloads: reads the whole response to EOF
# with large recv calls and leaves header parsing and de-chunking until after
# the clock stops, so the client's cost per 4 KiB chunk (HFS streams through
# a ReaderStream) is not counted as the server's.


def raw_get(url, headers, timeout):
    u = urllib.parse.urlsplit(url)
    path = u.path + (f"?{u.query}" if u.query else "")
    req = [f"GET {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close"]
    req += [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(req) + "\r\n\r\n").encode()
    bufs = []
    start = time.monotonic()
    try:
        with socket.create_connection((u.hostname, u.port or 80), timeout=timeout) as s:
            s.sendall(data)
            while True:
                b = s.recv(1 << 20)
                if not b:
                    break
                bufs.append(b)
    except OSError as e:
        raise Fail(f"GET {url}: {e}")
    elapsed = time.monotonic() - start
    raw = b"".join(bufs)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise Fail(f"GET {url}: the answer ended inside its headers ({len(raw)} bytes)")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise Fail(f"GET {url}: bad status line {lines[0]!r}")
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        body = dechunk(body, url)
    elif "content-length" in hdrs and len(body) != int(hdrs["content-length"]):
        raise Fail(f"GET {url}: {len(body)} bytes, Content-Length says {hdrs['content-length']}")
    return status, hdrs, body, elapsed


def dechunk(data, url):
    out, pos = [], 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            raise Fail(f"GET {url}: the chunked body ends without its last chunk (truncated download)")
        size = int(data[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            return b"".join(out)
        if pos + size > len(data):
            raise Fail(f"GET {url}: truncated chunk")
        out.append(data[pos:pos + size])
        pos += size + 2


# --------------------------------------------------------------------------
# Processes.

SERVERS = []  # every process started here, stopped in `finally`


class Server:
    """A process that prints `listening on http://ADDR` as its first stdout
    line; its stderr goes to `log_path`."""

    def __init__(self, name, argv, log_path, env=None, timeout=180.0):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.log_file = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log_file,
            env=env, start_new_session=True,
        )
        SERVERS.append(self)
        self.pid = self.proc.pid
        lines = queue.Queue()

        def drain():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        try:
            first = lines.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            raise Fail(f"{name}: no 'listening on' line within {timeout:.0f} s\n{self.log_tail()}")
        if first is None:
            code = self.proc.wait()
            raise Fail(f"{name} exited with status {code} before listening\n{self.log_tail()}")
        m = re.match(rb"listening on (http://\S+)", first)
        if not m:
            self.stop()
            raise Fail(f"{name}: unexpected first line {first!r}")
        self.base = m.group(1).decode()
        self.started = time.monotonic()

    def log_tail(self, n=25):
        try:
            with open(self.log_path, "rb") as f:
                tail = f.read().decode("utf-8", "replace").splitlines()[-n:]
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in tail)

    def proc_status(self):
        """VmHWM and VmRSS in bytes, and user+system CPU seconds, from /proc."""
        out = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmHWM", "VmRSS"):
                        out[k] = int(v.split()[0]) * 1024
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out["cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
        return out

    def reset_peak_rss(self):
        """Resets VmHWM to the current RSS (Linux's clear_refs 5); False if refused."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def stop(self, timeout=60.0):
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout:.0f} s of SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        if self in SERVERS:
            SERVERS.remove(self)
        self.log_file.close()
        return self.proc.returncode


def stop_all():
    for s in list(SERVERS):
        try:
            s.stop(timeout=20)
        except Exception as e:  # keep stopping the others
            log(f"stopping {s.name}: {e}")


def run_cmd(argv, timeout, what):
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Fail(f"{what}: no result within {timeout:.0f} s: {shlex.join(argv)}")
    if p.returncode != 0:
        raise Fail(f"{what} failed with status {p.returncode}: {shlex.join(argv)}\n"
                   f"{p.stderr.decode('utf-8', 'replace')[-3000:]}")
    return p


def hfs_env(rust_log):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HFS_")}
    env["RUST_LOG"] = rust_log
    return env


# --------------------------------------------------------------------------
# Step 1: the data.


def generate(args, work):
    """The synthetic export as {type: [line bytes]}, via `demo` and `serve`."""
    db = os.path.join(work, "generated.db")
    log(f"generating {args.patients} patients (seed {args.seed}) with `export-store demo`")
    p = run_cmd([args.bin, "demo", "--db", db, "--patients", str(args.patients),
                 "--seed", str(args.seed), "--base-url", "http://127.0.0.1:1"],
                args.timeout_load, "export-store demo")
    manifest = json.loads(p.stdout)
    summary = p.stderr.decode("utf-8", "replace").strip().splitlines()
    if summary:
        log(summary[-1])
    serve = Server("export-store serve", [args.bin, "serve", "--db", db, "--addr", "127.0.0.1:0"],
                   os.path.join(work, "serve.log"))
    data = {}
    try:
        for out in manifest["output"]:
            path = urllib.parse.urlsplit(out["url"]).path
            status, _, body, _ = raw_get(serve.base + path, {"Accept": "application/fhir+ndjson"},
                                         args.timeout_download)
            if status != 200:
                raise Fail(f"export-store serve: GET {path}: {status}: {outcome_text(body)}")
            lines = body.splitlines()
            if "count" in out and len(lines) != out["count"]:
                raise Fail(f"{path}: {len(lines)} lines, the demo manifest says {out['count']}")
            data.setdefault(out["type"], []).extend(lines)
    finally:
        serve.stop()
    os.remove(db)
    return data


# --------------------------------------------------------------------------
# Step 2: the load.


def bundle(kind, items):
    entries = b",".join(
        b'{"fullUrl":"' + ref + b'","resource":' + line + b',"request":{"method":"PUT","url":"'
        + ref + b'"}}'
        for ref, line in items
    )
    return b'{"resourceType":"Bundle","type":"' + kind.encode() + b'","entry":[' + entries + b"]}"


def post_bundle(base, kind, items, timeout):
    """POSTs one Bundle; None when every entry succeeded, else why not."""
    status, _, body = http("POST", base, bundle(kind, items),
                           {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout)
    if status != 200:
        return f"HTTP {status}: {outcome_text(body)}"
    doc = json.loads(body)
    bad = [(i, e.get("response", {})) for i, e in enumerate(doc.get("entry", []))
           if not str(e.get("response", {}).get("status", "")).startswith("2")]
    if bad or len(doc.get("entry", [])) != len(items):
        i, resp = bad[0] if bad else (None, {})
        out = resp.get("outcome")
        why = outcome_text(json.dumps(out).encode()) if out else ""
        return (f"{len(bad)} of {len(items)} entries failed (answer has "
                f"{len(doc.get('entry', []))} entries); first: {items[i][0].decode() if i is not None else '?'}"
                f" {resp.get('status')} {why}")
    return None


def put_one(base, ref, line, timeout):
    status, _, body = http("PUT", f"{base}/{ref.decode()}", line,
                           {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}, timeout)
    if status not in (200, 201):
        raise Fail(f"PUT {ref.decode()}: HTTP {status}: {outcome_text(body)}")


def load(args, work, data):
    """Loads `data` into a fresh HFS data folder; returns the folder."""
    template = os.path.join(work, "loaded")
    items = []
    for t in sorted(data, key=lambda t: (LOAD_ORDER.index(t) if t in LOAD_ORDER else 99, t)):
        for line in data[t]:
            items.append((f"{t}/{json.loads(line)['id']}".encode(), line))
    hfs = Server("export-store hfs (load)",
                 [args.bin, "hfs", "--data-dir", template, "--addr", "127.0.0.1:0",
                  "--output", "local-fs"],
                 os.path.join(work, "hfs-load.log"), hfs_env(args.rust_log), args.timeout_start)
    try:
        load_secs, kind = load_into(args, hfs, items, data)
    except Fail as e:
        raise Fail(f"{e}\nthe end of HFS's log ({hfs.log_path}):\n{hfs.log_tail()}")
    finally:
        code = hfs.stop()
    if code != 0:
        raise Fail(f"HFS (load) exited with status {code} after SIGTERM\n{hfs.log_tail()}")
    for name in os.listdir(template):  # the copies start with empty output stores
        if name.startswith("export-output.db") or name in ("export-files", "submit-files"):
            p = os.path.join(template, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    return template, load_secs, kind, len(items)


def load_into(args, hfs, items, data):
    """POSTs `items` to a running HFS and checks its counts: (seconds, how)."""
    log(f"HFS for the load at {hfs.base}; {len(items)} resources, "
        f"bundles of {args.bundle_size}, mode {args.load}")
    kind = args.load
    size = args.bundle_size
    start = time.monotonic()
    pos, last_report = 0, start
    while pos < len(items):
        chunk = items[pos:pos + size]
        if kind in ("transaction", "batch", "auto"):
            tried = "transaction" if kind == "auto" else kind
            why = post_bundle(hfs.base, tried, chunk, args.timeout_request)
            if why and why.startswith("HTTP 408") and size > 10:
                size //= 2
                log(f"{tried} Bundle timed out (408); bundles of {size} from here")
                continue
            if why and kind == "auto":
                log(f"a transaction Bundle was refused: {why}")
                why2 = post_bundle(hfs.base, "batch", chunk, args.timeout_request)
                if why2 is None:
                    log("a batch Bundle of the same entries was accepted; loading with batch Bundles")
                    kind = "batch"
                    pos += len(chunk)
                    continue
                log(f"a batch Bundle failed too: {why2}; falling back to one PUT per resource")
                kind = "put"
                continue
            if why:
                raise Fail(f"loading {tried} Bundle at entry {pos}: {why}")
            if kind == "auto":
                kind = "transaction"
        else:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda it: put_one(hfs.base, it[0], it[1], args.timeout_request), chunk))
        pos += len(chunk)
        now = time.monotonic()
        if now - last_report > 15:
            log(f"  loaded {pos}/{len(items)} ({pos / (now - start):.0f} resources/s)")
            last_report = now
    load_secs = time.monotonic() - start
    counts = {}
    for t in data:
        status, _, body = http("GET", f"{hfs.base}/{t}?_summary=count", None,
                               {"Accept": FHIR_JSON}, args.timeout_request)
        counts[t] = json.loads(body).get("total") if status == 200 else f"HTTP {status}"
    short = {t: (c, len(data[t])) for t, c in counts.items() if c != len(data[t])}
    if short:
        raise Fail(f"after the load HFS counts differ from the data (HFS, data): {short}")
    return load_secs, kind


# --------------------------------------------------------------------------
# Step 3: one export run.


def tree_bytes(path):
    total, files = 0, 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def file_size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def disk_usage(data_dir, mode):
    if mode == "sqlite":
        db = os.path.join(data_dir, "export-output.db")
        return {"db": file_size(db), "wal": file_size(db + "-wal"), "shm": file_size(db + "-shm")}
    total, files = tree_bytes(os.path.join(data_dir, "export-files"))
    return {"files": total, "count": files}


def parse_ts(s):
    """RFC 3339 with up to nanoseconds (chrono's to_rfc3339) to epoch seconds."""
    m = re.match(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", s)
    if not m:
        return None
    base = datetime.datetime.fromisoformat(m.group(1) + (m.group(3).replace("Z", "+00:00")))
    return base.timestamp() + (int(m.group(2)) / 10 ** len(m.group(2)) if m.group(2) else 0.0)


def job_times(fhir_db, job_id):
    con = sqlite3.connect(f"file:{fhir_db}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT started_at, completed_at, status FROM bulk_export_jobs WHERE id = ?", (job_id,)
        ).fetchone()
    finally:
        con.close()
    if not row:
        return None
    return {"started": parse_ts(row[0]) if row[0] else None,
            "completed": parse_ts(row[1]) if row[1] else None, "status": row[2]}


def download_all(parts, timeout):
    bodies, secs = [], 0.0
    start = time.monotonic()
    for p in parts:
        status, _, body, _ = raw_get(p["url"], {"Accept": "application/fhir+ndjson"}, timeout)
        if status != 200:
            raise Fail(f"GET {p['url']}: HTTP {status}: {outcome_text(body)}")
        bodies.append(body)
    secs = time.monotonic() - start
    return bodies, secs


def download_concurrent(parts, timeout, workers):
    def one(p):
        status, _, body, _ = raw_get(p["url"], {"Accept": "application/fhir+ndjson"}, timeout)
        if status != 200:
            raise Fail(f"GET {p['url']}: HTTP {status}: {outcome_text(body)}")
        return body
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        bodies = list(pool.map(one, parts))
    return bodies, time.monotonic() - start


def verify(parts, bodies, source_ids):
    """Every line parses and has the part's type; counts match the manifest
    and the loaded data; the ids are exactly the loaded ones."""
    seen = {}
    for p, body in zip(parts, bodies):
        lines = body.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if "count" in p and p["count"] != len(lines):
            raise Fail(f"{p['url']}: {len(lines)} lines, the manifest says {p['count']}")
        ids = seen.setdefault(p["type"], set())
        for i, line in enumerate(lines):
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise Fail(f"{p['url']} line {i + 1} does not parse: {e}")
            if doc.get("resourceType") != p["type"]:
                raise Fail(f"{p['url']} line {i + 1} is a {doc.get('resourceType')}, not a {p['type']}")
            ids.add(doc.get("id"))
    for t, want in source_ids.items():
        if seen.get(t, set()) != want:
            raise Fail(f"{t}: the export holds {len(seen.get(t, ()))} ids, the data "
                       f"{len(want)}; {len(seen.get(t, set()) ^ want)} differ")


def run_env(args):
    """The environment of the export runs' HFS: `hfs_env` with N export
    workers, and room for N running exports per tenant."""
    env = hfs_env(args.rust_log)
    env["HFS_BULK_EXPORT_WORKER_CONCURRENCY"] = str(args.workers)
    if args.workers > 4:  # HFS refuses a tenant's kick-off beyond 4 running exports by default
        env["HFS_BULK_EXPORT_MAX_CONCURRENT_PER_TENANT"] = str(args.workers)
    return env


def kick_off(url, timeout):
    """One `$export` kick-off: the job's status URL and id."""
    status, headers, body = http("GET", url, None, {"Accept": FHIR_JSON, "Prefer": "respond-async"},
                                 timeout)
    if status != 202 or not headers.get("Content-Location"):
        raise Fail(f"kick-off {url}: HTTP {status} (Content-Location "
                   f"{headers.get('Content-Location')!r}): {outcome_text(body)}")
    status_url = headers["Content-Location"]
    job_id = urllib.parse.urlsplit(status_url).path.rstrip("/").rsplit("/", 1)[-1]
    return {"status_url": status_url, "job_id": job_id, "claimed": None, "progress": None}


def one_run(args, work, template, mode, rnd, types, source_ids, digests):
    run_dir = os.path.join(work, f"run-{rnd}-{mode}")
    data_dir = os.path.join(run_dir, "data")
    need = tree_bytes(template)[0] * 1.5 + 200 * 2**20
    free = shutil.disk_usage(work).free
    if free < need:
        raise Fail(f"only {mib(free)} free in {work}; a run needs about {mib(need)} "
                   f"(a copy of the loaded data folder and the export)")
    shutil.copytree(template, data_dir)
    # Write the copy back now: left to the kernel's writeback it would be
    # hundreds of MB queued in front of the run's first fsyncs, which only
    # the sqlite store and local-fs-synced make.
    t = time.monotonic()
    os.sync()
    r_sync = time.monotonic() - t
    hfs = Server(f"export-store hfs ({mode}, round {rnd})",
                 [args.bin, "hfs", "--data-dir", data_dir, "--output", mode, "--retry-after", "1",
                  "--addr", "127.0.0.1:0"] + (["--batch-size", str(args.batch_size)] if args.batch_size else []),
                 os.path.join(run_dir, "hfs.log"), run_env(args), args.timeout_start)
    r = {"mode": mode, "round": rnd, "sync": r_sync}
    n = args.workers
    try:
        time.sleep(args.settle)  # let start-up work (seeding, WAL passes) finish
        st = hfs.proc_status()
        cpu0 = st.get("cpu", 0.0)
        r["rss_startup"] = st.get("VmHWM")
        r["rss_reset"] = hfs.reset_peak_rss()
        url = f"{hfs.base}/$export?_type={','.join(types)}"
        kick_wall, kick = time.time(), time.monotonic()
        if n == 1:
            jobs = [kick_off(url, args.timeout_request)]
        else:
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                jobs = list(pool.map(lambda _: kick_off(url, args.timeout_request), range(n)))
        job_ids = [j["job_id"] for j in jobs]
        if len(set(job_ids)) != n:
            raise Fail(f"{n} kick-offs gave {len(set(job_ids))} distinct jobs: {', '.join(job_ids)}")
        polls = 0
        deadline = kick + args.timeout_export
        pending = list(jobs)
        while True:
            if time.monotonic() > deadline:
                which = f" for {len(pending)} of {n} jobs" if n > 1 else ""
                raise Fail(f"{mode} round {rnd}: no complete manifest{which} {args.timeout_export:.0f} s "
                           f"after kick-off ({polls} polls)\n{hfs.log_tail()}")
            if hfs.proc.poll() is not None:
                raise Fail(f"HFS exited with status {hfs.proc.returncode} during the export\n{hfs.log_tail()}")
            for j in list(pending):
                asked = time.monotonic()
                status, headers, body = http("GET", j["status_url"], None, {"Accept": "application/json"},
                                             args.timeout_request)
                now = time.monotonic()
                polls += 1
                if status == 200:
                    j.update(done=now, manifest_request=now - asked, manifest=json.loads(body))
                    pending.remove(j)
                    continue
                if status != 202:
                    raise Fail(f"status {j['status_url']}: HTTP {status}: {outcome_text(body)}")
                if j["claimed"] is None:
                    try:
                        params = {p["name"]: p for p in json.loads(body).get("parameter", [])}
                        if params.get("typesTotal", {}).get("valueInteger", 0) > 0:
                            j["claimed"] = now
                    except (ValueError, AttributeError):
                        pass
                if j["progress"] is None and headers.get("X-Progress", "0%") not in ("0%", ""):
                    j["progress"] = now
            if not pending:
                break
            time.sleep(0.1)
        done = max(j["done"] for j in jobs)
        claimed_seen = min((j["claimed"] for j in jobs if j["claimed"]), default=None)
        progress_seen = min((j["progress"] for j in jobs if j["progress"]), default=None)
        r["manifest_request"] = max(j["manifest_request"] for j in jobs)
        cpu_export = hfs.proc_status().get("cpu", 0.0) - cpu0
        parts = []
        for k, j in enumerate(jobs):
            j["parts"] = j["manifest"].get("output", [])
            parts += j["parts"]
            if j["manifest"].get("error"):
                which = f" of job {k + 1}/{n} ({j['job_id']})" if n > 1 else ""
                log(f"  the manifest{which} lists {len(j['manifest']['error'])} error file(s)")
        r.update(export=done - kick, claim_seen=(claimed_seen - kick) if claimed_seen else None,
                 progress_seen=(done - progress_seen) if progress_seen else None,
                 polls=polls, parts=len(parts), cpu_export=cpu_export, job_id=job_ids[0],
                 job_ids=job_ids, kick_wall=kick_wall, done_wall=kick_wall + (done - kick))

        # Bytes on disk, once the store's WAL has been idle long enough to be
        # truncated.
        time.sleep(max(0.0, done + args.disk_delay - time.monotonic()))
        r["disk"] = disk_usage(data_dir, mode)

        cpu1 = hfs.proc_status().get("cpu", 0.0)
        bodies, r["dl_seq"] = download_all(parts, args.timeout_download)
        bodies4, r["dl_par"] = download_concurrent(parts, args.timeout_download, args.concurrency)
        r["cpu_download"] = hfs.proc_status().get("cpu", 0.0) - cpu1
        st = hfs.proc_status()
        r["rss"] = st.get("VmHWM")
        r["cpu_total"] = st.get("cpu")
        r["ndjson"] = sum(len(b) for b in bodies)
        r["lines"] = sum(b.count(b"\n") for b in bodies)
        if any(a != b for a, b in zip(bodies, bodies4)):
            raise Fail(f"{mode} round {rnd}: the concurrent downloads differ from the sequential ones")
        pos = 0
        for k, j in enumerate(jobs):  # every job on its own holds every resource
            job_bodies = bodies[pos:pos + len(j["parts"])]
            pos += len(j["parts"])
            try:
                verify(j["parts"], job_bodies, source_ids)
            except Fail as e:
                if n == 1:
                    raise
                raise Fail(f"job {k + 1}/{n} ({j['job_id']}): {e}")
            h = hashlib.sha256()
            for p, b in sorted(zip(j["parts"], job_bodies), key=lambda x: x[0]["url"].rsplit("/", 1)[-1]):
                h.update(b)
            digests.add(h.hexdigest())
        del bodies, bodies4, job_bodies
    except Fail as e:
        raise Fail(f"{mode} round {rnd}: {e}\nthe end of HFS's log ({hfs.log_path}):\n{hfs.log_tail()}")
    finally:
        code = hfs.stop()
    if code != 0:
        log(f"  HFS exited with status {code} after SIGTERM")
    times = [job_times(os.path.join(data_dir, "fhir.db"), i) for i in r["job_ids"]]
    if all(t and t["started"] and t["completed"] for t in times):
        started = min(t["started"] for t in times)
        completed = max(t["completed"] for t in times)
        r["claim_wait"] = started - r["kick_wall"]
        r["claim_to_done"] = completed - started
        r["done_to_manifest"] = r["done_wall"] - completed
        r["jobs"] = [(t["started"] - r["kick_wall"], t["completed"] - t["started"]) for t in times]
    r["disk_after_stop"] = disk_usage(data_dir, mode)
    r["log_lines"] = summarize_log(os.path.join(run_dir, "hfs.log"), run_dir)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return r


def summarize_log(path, run_dir):
    """The warnings and errors of a server log, without their timestamps and
    with the run's folder as DIR, so that runs can be compared."""
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                text = re.sub(r"\x1b\[[0-9;]*m", "", line.decode("utf-8", "replace")).rstrip()
                if re.search(r"\b(WARN|ERROR)\b", text):
                    text = re.sub(r"^\S+Z\s+", "", text).replace(run_dir, "DIR")
                    out.append(text[:400])
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------
# Step 4: the table.


def mib(n):
    return f"{n / 2**20:.2f} MiB"


def fmt_range(vals, fmt):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    return f"{fmt(statistics.median(vals))} [{fmt(min(vals))}–{fmt(max(vals))}]"


def secs(v):
    return f"{v:.3f} s"


def ratio(v):
    return f"{v:.3f}×"


def disk_total(r):
    d = r["disk"]
    return d["db"] + d["wal"] if r["mode"] == "sqlite" else d["files"]


def run_shape(args):
    """Workers, jobs and batch size in a few words, for the table's header."""
    n, s = args.workers, "s" if args.workers > 1 else ""
    return f"{n} worker{s}, {n} job{s}, batch {args.batch_size or '1000 (default)'}"


def report(args, results, ndjson_src, facts):
    modes = list(args.modes)
    by = {m: [r for r in results if r["mode"] == m] for m in modes}
    files_modes = [m for m in modes if m != "sqlite"]
    disk_name = ("disk (sqlite: db + WAL; local-fs: files)" if files_modes == ["local-fs"]
                 else "disk (sqlite: db + WAL; others: files)")
    rows = [
        ("export: kick-off → manifest", lambda r: r["export"], secs),
        ("export: claim → complete (fhir.db)", lambda r: r.get("claim_to_done"), secs),
        ("export: first progress → manifest", lambda r: r.get("progress_seen"), secs),
        ("  claim wait (kick-off → started_at)", lambda r: r.get("claim_wait"), secs),
        ("  complete → manifest seen", lambda r: r.get("done_to_manifest"), secs),
        ("  the manifest request itself", lambda r: r.get("manifest_request"), secs),
        ("  server CPU during export", lambda r: r.get("cpu_export"), secs),
        ("download, sequential", lambda r: r["dl_seq"], secs),
        (f"download, {args.concurrency} at once", lambda r: r["dl_par"], secs),
        ("  server CPU during downloads", lambda r: r.get("cpu_download"), secs),
        (disk_name, disk_total, mib),
        ("  of which -wal (sqlite)", lambda r: r["disk"]["wal"] if r["mode"] == "sqlite" else None, mib),
        ("  -shm, not counted (sqlite)", lambda r: r["disk"]["shm"] if r["mode"] == "sqlite" else None, mib),
        ("  after SIGTERM", lambda r: sum(v for k, v in r["disk_after_stop"].items() if k != "count"), mib),
        ("peak RSS, export + downloads (VmHWM)", lambda r: r.get("rss"), mib),
        ("  peak RSS of start-up", lambda r: r.get("rss_startup"), mib),
        ("NDJSON downloaded", lambda r: r["ndjson"], mib),
        ("parts", lambda r: r["parts"], lambda v: f"{v:.0f}"),
    ]
    shape = run_shape(args)
    w = max(42, len(shape) + 1)
    print()
    print(f"{shape:{w}} " + " ".join(f"{MODE_LABELS.get(m, m):38}" for m in modes))
    print(f"{'':{w}} " + " ".join(f"{'median [min–max]':38}" for m in modes))
    for name, get, fmt in rows:
        cells = [fmt_range([get(r) for r in by[m]], fmt) for m in modes]
        print(f"{name:{w}} " + " ".join(f"{c:38}" for c in cells))

    checks = []
    for other in files_modes:
        # The targets are set against HFS's own store as it ships (local-fs);
        # against the other modes the same ratios are shown without them.
        targeted = other == "local-fs"
        pairs = [(s, o) for s in by["sqlite"] for o in by[other] if s["round"] == o["round"]]

        def pair_ratio(get, pairs=pairs):
            vals = [get(s) / get(o) for s, o in pairs if get(s) is not None and get(o)]
            return (statistics.median(vals), min(vals), max(vals)) if vals else None

        print()
        print(f"ratios sqlite / {other} (median of {len(pairs)} per-round pairs [min–max]):")

        def ratio_line(name, get, target=None, invert=False, pair_ratio=pair_ratio, targeted=targeted):
            rr = pair_ratio(get)
            if rr is None:
                print(f"  {name:40} n/a")
                return
            med, lo, hi = rr
            text = f"  {name:40} {ratio(med)} [{ratio(lo)}–{ratio(hi)}]"
            if target is not None and targeted:
                if invert:
                    ok = med > 0 and 1 / med >= target
                    text += f"   local-fs / sqlite = {1 / med:.1f}×; target ≥ {target:g}×: {'MET' if ok else 'NOT MET'}"
                else:
                    ok = med <= target
                    text += f"   target ≤ {target:g}×: {'MET' if ok else 'NOT MET'}"
                checks.append((name, ok))
            elif invert and med > 0:
                text += f"   {other} / sqlite = {1 / med:.1f}×"
            print(text)

        ratio_line("export, claim → complete", lambda r: r.get("claim_to_done"), 1.00)
        ratio_line("export, kick-off → manifest", lambda r: r["export"])
        ratio_line("export, first progress → manifest", lambda r: r.get("progress_seen"))
        ratio_line("server CPU during export", lambda r: r.get("cpu_export"))
        ratio_line("download, sequential", lambda r: r["dl_seq"], 1.25)
        ratio_line(f"download, {args.concurrency} at once", lambda r: r["dl_par"], 1.25)
        ratio_line("disk (db + WAL vs files)", disk_total, 10, invert=True)
        ratio_line("peak RSS, export + downloads", lambda r: r.get("rss"))
    s_disk = [disk_total(r) for r in by["sqlite"]]
    if s_disk and ndjson_src:
        nd = statistics.median([r["ndjson"] for r in by["sqlite"]])
        print(f"  {'NDJSON / sqlite db + WAL':40} {nd / statistics.median(s_disk):.1f}×")
    print()
    if "local-fs" in modes:
        print("the export target is judged on claim → complete (HFS's own timestamps), which leaves out the up to")
        print("2 s an idle HFS worker takes to claim a job; kick-off → manifest includes it (and 0.1 s polling).")
    if args.workers > 1:
        print(f"with {args.workers} jobs at once, claim → complete runs from the earliest started_at to the latest")
        print("completed_at of the jobs, kick-off → manifest to the last manifest; downloads and disk cover every job.")
    if "local-fs" in modes:
        print("targets: " + "; ".join(f"{n}: {'MET' if ok else 'NOT MET'}" for n, ok in checks))
    else:
        print("targets: not judged (they are set against local-fs, which was not among --modes)")

    print()
    print("per run:")
    mw = max([8] + [len(r["mode"]) for r in results])
    for r in results:
        d = r["disk"]
        dtext = (f"db {d['db']} + wal {d['wal']} (shm {d['shm']})" if r["mode"] == "sqlite"
                 else f"{d['count']} files, {d['files']} B")
        cl = r.get("claim_to_done")
        print(f"  round {r['round']} {r['mode']:{mw}} export {r['export']:.3f} s (claim→complete "
              f"{cl:.3f} s, claim wait {r.get('claim_wait', float('nan')):.3f} s)" if cl is not None else
              f"  round {r['round']} {r['mode']:{mw}} export {r['export']:.3f} s", end="")
        print(f"; downloads {r['dl_seq']:.3f} s / {r['dl_par']:.3f} s; {dtext}; "
              f"RSS {mib(r['rss'] or 0)}; CPU export {r.get('cpu_export', 0):.2f} s, "
              f"downloads {r.get('cpu_download', 0):.2f} s; {r['polls']} polls", end="")
        if args.workers > 1 and r.get("jobs"):
            print("; jobs (claim wait / claim→complete): "
                  + ", ".join(f"{wait:.3f}/{took:.3f} s" for wait, took in r["jobs"]), end="")
        print()
    if not all(r.get("rss_reset") for r in results):
        print("note: /proc/PID/clear_refs was refused, so 'peak RSS, export + downloads' includes start-up")
    seen = {}
    for r in results:
        for line in r["log_lines"]:
            seen.setdefault(line, []).append(f"{r['round']}/{r['mode']}")
    if seen:
        print()
        print("warnings and errors in the HFS logs (runs: round/mode):")
        for line, runs in list(seen.items())[:20]:
            where = "every run" if len(runs) == len(results) else ", ".join(runs)
            print(f"  [{where}] {line}")
        if len(seen) > 20:
            print(f"  ... {len(seen) - 20} more distinct lines")


def machine_facts(args):
    facts = {}
    facts["command"] = shlex.join([sys.executable] + sys.argv)
    facts["nproc"] = f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})"
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    st = os.stat(args.bin)
    facts["binary"] = (f"{os.path.abspath(args.bin)} ({st.st_size / 2**20:.1f} MiB, mtime "
                       f"{datetime.datetime.fromtimestamp(st.st_mtime).isoformat(' ', 'seconds')})")
    facts["kernel"] = platform.release()
    facts["python"] = platform.python_version()
    facts["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return facts


def parse_modes(text):
    """`--modes`: comma-separated output modes, in run order; sqlite and at
    least one other, each once."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(map(repr, unknown))}; choose from {', '.join(MODES)}")
    dup = sorted({m for m in modes if modes.count(m) > 1})
    if dup:
        raise argparse.ArgumentTypeError(f"mode(s) given more than once: {', '.join(dup)}")
    if "sqlite" not in modes:
        raise argparse.ArgumentTypeError("must include sqlite (every ratio is sqlite / another mode)")
    if len(modes) < 2:
        raise argparse.ArgumentTypeError("needs at least two modes: sqlite and one of "
                                         + ", ".join(m for m in MODES if m != "sqlite"))
    return tuple(modes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/export-store",
                    help="export-store built with --features hfs (default %(default)s)")
    ap.add_argument("--patients", type=int, default=100,
                    help="synthetic patients (about 330 resources, 0.39 MB of NDJSON each; default %(default)s)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds; each runs every mode of --modes once, in the given order (default %(default)s)")
    ap.add_argument("--modes", type=parse_modes, default=DEFAULT_MODES, metavar="M,M[,M]",
                    help=f"output modes to run and compare, comma-separated, in run order: sqlite and at least "
                         f"one of local-fs, local-fs-synced (HFS's local-fs with every finalized file and its "
                         f"folder fsynced) (default {DEFAULT_MODES})")
    ap.add_argument("--batch-size", type=int, help="resources per part (HFS default 1000)")
    ap.add_argument("--bundle-size", type=int, default=300, help="entries per load Bundle (default %(default)s)")
    ap.add_argument("--load", choices=("auto", "transaction", "batch", "put"), default="auto",
                    help="how to load: auto tries a transaction Bundle, then batch, then PUT per resource")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent downloads (default %(default)s)")
    ap.add_argument("--workers", type=int, default=1,
                    help="HFS export workers, and system exports kicked off at once (default %(default)s)")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds after start-up before the kick-off")
    ap.add_argument("--disk-delay", type=float, default=2.0,
                    help="seconds after the manifest to measure the disk (default %(default)s)")
    ap.add_argument("--rust-log", default="info", help="RUST_LOG of the servers (default %(default)s)")
    ap.add_argument("--template", help="reuse a loaded HFS data folder (from an earlier --keep run)")
    ap.add_argument("--save-template", metavar="DIR",
                    help="copy the loaded HFS data folder to DIR, for --template later")
    ap.add_argument("--workdir", help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and the server logs")
    ap.add_argument("--timeout-start", type=float, default=180)
    ap.add_argument("--timeout-load", type=float, default=3600)
    ap.add_argument("--timeout-export", type=float, default=1800)
    ap.add_argument("--timeout-request", type=float, default=300)
    ap.add_argument("--timeout-download", type=float, default=600)
    args = ap.parse_args()
    if args.workers < 1:
        raise Fail(f"--workers {args.workers}: HFS needs at least one export worker")
    if not os.access(args.bin, os.X_OK):
        raise Fail(f"{args.bin}: no such executable (build it with `cargo build --release --features hfs`)")
    p = run_cmd([args.bin, "hfs", "--help"], 60, "export-store hfs --help")
    if b"--output" not in p.stdout:
        raise Fail(f"{args.bin} has no `hfs --output`: build it with --features hfs")
    for m in args.modes:
        if m.encode() not in p.stdout:
            raise Fail(f"{args.bin} hfs --help lists no output mode {m}: rebuild it")
    args.bin = os.path.abspath(args.bin)

    facts = machine_facts(args)
    for k, v in facts.items():
        print(f"{k}: {v}")
    sys.stdout.flush()

    work = tempfile.mkdtemp(prefix="hfs-side-by-side-", dir=args.workdir)
    log(f"working in {work}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = False
    try:
        data = generate(args, work)
        types = sorted(data, key=lambda t: (LOAD_ORDER.index(t) if t in LOAD_ORDER else 99, t))
        n_res = sum(len(v) for v in data.values())
        n_bytes = sum(len(l) + 1 for v in data.values() for l in v)
        print(f"data: {args.patients} patients, seed {args.seed}: {n_res} resources, "
              f"{n_bytes / 1e6:.1f} MB of NDJSON, types {', '.join(f'{t} {len(data[t])}' for t in types)}")
        source_ids = {t: {json.loads(l)["id"] for l in data[t]} for t in types}
        if args.template:
            template = args.template
            print(f"load: reusing {template}")
        else:
            need = 15 * n_bytes + 512 * 2**20  # HFS's fhir.db and WAL while loading, measured ~10x
            free = shutil.disk_usage(work).free
            if free < need:
                raise Fail(f"only {mib(free)} free in {work}; loading {n_bytes / 1e6:.0f} MB of NDJSON "
                           f"into HFS needs about {mib(need)}")
            template, load_secs, kind, n = load(args, work, data)
            if args.save_template:
                shutil.copytree(template, args.save_template)
                log(f"saved the loaded data folder as {args.save_template}")
            print(f"load: {n} resources into HFS ({kind} Bundles of up to {args.bundle_size} PUTs"
                  f"{'' if kind != 'put' else ' / one PUT each'}) in {load_secs:.1f} s "
                  f"({n / load_secs:.0f} resources/s; not part of the comparison)")
        sz = file_size(os.path.join(template, "fhir.db")) + file_size(os.path.join(template, "fhir.db-wal"))
        many = f"{args.workers} " if args.workers > 1 else ""
        print(f"HFS fhir.db: {mib(sz)}; export: {many}system $export?_type={','.join(types)}"
              f"{' at once' if args.workers > 1 else ''}, batch size {args.batch_size or 'HFS default (1000)'}, "
              f"{args.workers} export worker{'s' if args.workers > 1 else ''} "
              f"(HFS_BULK_EXPORT_WORKER_CONCURRENCY={args.workers})")
        sys.stdout.flush()
        del data

        results, digests = [], set()
        for rnd in range(1, args.rounds + 1):
            for mode in args.modes:
                log(f"round {rnd}/{args.rounds}: {mode}")
                r = one_run(args, work, template, mode, rnd, types, source_ids, digests)
                cl = r.get("claim_to_done")
                log(f"  export {r['export']:.3f} s (claim→complete {cl if cl is None else round(cl, 3)} s), "
                    f"downloads {r['dl_seq']:.3f} s / {r['dl_par']:.3f} s, disk {mib(disk_total(r))}, "
                    f"RSS {mib(r['rss'] or 0)}, {r['parts']} parts, {r['ndjson']} bytes")
                results.append(r)
        facts["load average (end)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average at the end: {facts['load average (end)']}")
        every = "every job of every run" if args.workers > 1 else "every run"
        print(f"{every} exported the same NDJSON: {'yes' if len(digests) == 1 else f'NO ({len(digests)} versions)'}")
        report(args, results, n_bytes, facts)
        ok = True
    except Fail as e:
        print(f"hfs_side_by_side: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("hfs_side_by_side: interrupted", file=sys.stderr)
    finally:
        stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        print(f"hfs_side_by_side: {e}", file=sys.stderr)
        sys.exit(1)
