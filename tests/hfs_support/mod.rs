//! For the tests that run HFS: the real `export-store hfs` binary (HFS 0.2.7
//! with this crate's store) started on 127.0.0.1:0, the vendored Synthea
//! sample loaded into it over FHIR REST, the Bulk Data client side
//! (kick-off, polling, manifests, downloads, exactly-once checks) and a
//! Data Provider for bulk submits.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlite_export_store::__test_support::sample::{self, SampleFile};

/// How long the server may take to print its address (debug build, busy
/// machine, HFS seeding its search parameters on first start).
pub const START_TIMEOUT: Duration = Duration::from_secs(240);
/// How long one export or submission may take to complete.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// One HTTP request (a transaction bundle of a few hundred entries
/// included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The types of the vendored sample, in an order in which every
/// conditional reference (`Location?identifier=…`, `Practitioner?…`,
/// `Organization?…`) names a resource loaded before it.
pub const LOAD_ORDER: &[&str] = &[
    "Organization",
    "Location",
    "Practitioner",
    "PractitionerRole",
    "Patient",
    "Encounter",
    "Condition",
    "AllergyIntolerance",
    "Device",
    "Immunization",
    "MedicationRequest",
    "Procedure",
    "DocumentReference",
];

/// Logs the time since the test binary started, so that `--nocapture`
/// shows where the time goes.
pub fn note(what: impl std::fmt::Display) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!("[hfs {:>7.1}s] {what}", start.elapsed().as_secs_f64());
}

/// A fresh multi-threaded runtime for one test.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(8)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// How to start `export-store hfs`.
#[derive(Clone, Debug, Default)]
pub struct HfsOptions {
    /// `--batch-size`.
    pub batch_size: Option<u32>,
    /// Environment variables for HFS (`HFS_*`); `{data_dir}` in a value
    /// stands for the server's data folder.
    pub env: Vec<(String, String)>,
    /// Run it under a watchdog that stops it, and removes its folder, when
    /// this test process ends, even though the handle is never dropped
    /// (a server shared through a `static`).
    pub outlive_handle: bool,
    /// `--metrics-addr 127.0.0.1:0`: `/metrics` and `/healthz` on a
    /// listener of their own, at [`Hfs::metrics`].
    pub metrics: bool,
    /// `--digest`, when set.
    pub digest: Option<&'static str>,
    /// `--output`, when set (`sqlite` or `local-fs`).
    pub output: Option<&'static str>,
    /// The binary to run instead of this build's `export-store`, when set
    /// (a copy taken at the start of a long test).
    pub exe: Option<PathBuf>,
}

impl HfsOptions {
    pub fn batch_size(mut self, n: u32) -> Self {
        self.batch_size = Some(n);
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }
    pub fn digest(mut self, name: &'static str) -> Self {
        self.digest = Some(name);
        self
    }
    pub fn output(mut self, name: &'static str) -> Self {
        self.output = Some(name);
        self
    }
    pub fn exe(mut self, path: &Path) -> Self {
        self.exe = Some(path.to_path_buf());
        self
    }
}

/// A running `export-store hfs`: killed when dropped (or, when started
/// with `outlive_handle`, when the test process ends).
pub struct Hfs {
    child: Child,
    /// The watchdog's standard input: closing it stops the server.
    watchdog: Option<ChildStdin>,
    /// The server's own process id (not the watchdog's).
    pub pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `http://127.0.0.1:PORT` of `/metrics` and `/healthz`, when started
    /// with [`HfsOptions::metrics`].
    pub metrics: Option<String>,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// The output store's database (`DATA_DIR/export-output.db`).
    pub output_db: PathBuf,
    /// Where its standard error (the logs) goes.
    pub log: PathBuf,
    options: HfsOptions,
    /// The folder is removed with the handle, unless the watchdog owns it.
    _dir: Option<tempfile::TempDir>,
}

/// The watchdog: runs the server in the background, waits for its standard
/// input to close (the test process closed it, or ended), then stops the
/// server (SIGTERM, SIGKILL after 30 s) and removes its folder.
const WATCHDOG: &str = r#"
"$@" </dev/null &
pid=$!
echo "pid $pid"
cat >/dev/null
kill -TERM "$pid" 2>/dev/null
i=0
while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
kill -KILL "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
if [ -n "$HFS_TEST_DIR" ]; then rm -rf "$HFS_TEST_DIR"; fi
"#;

impl Hfs {
    /// Starts the binary with a new temporary data folder.
    pub fn start(options: HfsOptions) -> Hfs {
        let dir = tempfile::Builder::new()
            .prefix("export-store-hfs-test-")
            .tempdir()
            .unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        let (dir, keep) = if options.outlive_handle {
            (None, Some(dir.keep()))
        } else {
            (Some(dir), None)
        };
        let root = keep
            .clone()
            .unwrap_or_else(|| dir.as_ref().unwrap().path().to_path_buf());
        let mut hfs = Hfs::spawn(&root, &data_dir, options);
        hfs._dir = dir;
        hfs
    }

    /// Starts the binary on `data_dir`, which may hold what an earlier
    /// server left, with its log in `root`; neither is removed with the
    /// handle.
    pub fn start_in(root: &Path, data_dir: &Path, options: HfsOptions) -> Hfs {
        Hfs::spawn(root, data_dir, options)
    }

    /// Starts the binary again on this one's data folder and output
    /// database (this one must have stopped: killed or shut down).
    pub fn restart(&mut self) -> Hfs {
        let root = self.data_dir.parent().unwrap().to_path_buf();
        let mut next = Hfs::spawn(&root, &self.data_dir, self.options.clone());
        // The folder now belongs to the new process's handle.
        next._dir = self._dir.take();
        next
    }

    fn spawn(root: &Path, data_dir: &Path, options: HfsOptions) -> Hfs {
        let exe = options
            .exe
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_export-store")));
        let log = root.join(format!("hfs-{}.log", std::process::id()));
        let log = unique(log);
        let mut args: Vec<String> = vec![
            "hfs".into(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.to_str().unwrap().into(),
            "--retry-after".into(),
            "1".into(),
        ];
        if let Some(n) = options.batch_size {
            args.extend(["--batch-size".into(), n.to_string()]);
        }
        if options.metrics {
            args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
        }
        if let Some(d) = options.digest {
            args.extend(["--digest".into(), d.into()]);
        }
        if let Some(o) = options.output {
            args.extend(["--output".into(), o.into()]);
        }
        let mut cmd = if options.outlive_handle {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(WATCHDOG)
                .arg("sh")
                .arg(&exe)
                .env("HFS_TEST_DIR", root)
                .stdin(Stdio::piped());
            c
        } else {
            let mut c = Command::new(&exe);
            c.stdin(Stdio::null());
            c
        };
        cmd.args(&args)
            .envs(
                options
                    .env
                    .iter()
                    .map(|(k, v)| (k, v.replace("{data_dir}", data_dir.to_str().unwrap()))),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let watchdog = child.stdin.take();
        let stdout = child.stdout.take().unwrap();

        // Read its first lines on a thread, so that a server that never
        // prints is a bounded wait with a message, not a hang.
        let (lines, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut pid = (!options.outlive_handle).then(|| child.id());
        let mut base = None;
        let mut metrics = None;
        let deadline = Instant::now() + START_TIMEOUT;
        while base.is_none() || pid.is_none() || (options.metrics && metrics.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        base = Some(url.trim().trim_end_matches('/').to_string());
                    } else if let Some(url) = line.strip_prefix("metrics on ") {
                        metrics = Some(url.trim().to_string());
                    } else if let Some(p) = line.strip_prefix("pid ") {
                        pid = p.trim().parse().ok();
                    } else if base.is_none() {
                        let _ = child.kill();
                        panic!(
                            "export-store hfs printed {line:?} before `listening on URL`\n{}",
                            log_tail(&log)
                        );
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "export-store hfs did not print `listening on URL` ({}): {e}\n{}",
                        match e {
                            mpsc::RecvTimeoutError::Timeout => format!("waited {START_TIMEOUT:?}"),
                            mpsc::RecvTimeoutError::Disconnected =>
                                "it closed its standard output, probably exited".into(),
                        },
                        log_tail(&log)
                    );
                }
            }
        }
        Hfs {
            child,
            watchdog,
            pid: pid.unwrap(),
            base: base.unwrap(),
            metrics,
            data_dir: data_dir.to_path_buf(),
            output_db: data_dir.join("export-output.db"),
            log,
            options,
            _dir: None,
        }
    }

    /// SIGKILL: the process ends at once, mid-write if it was writing.
    pub fn kill(&mut self) {
        signal(self.pid, "KILL");
        // A watchdog waits for its input to close before it exits.
        self.watchdog.take();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the server to exit.
    pub fn shut_down(&mut self) -> std::process::ExitStatus {
        if self.watchdog.take().is_none() {
            signal(self.pid, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "export-store hfs did not exit within 60 s of SIGTERM\n{}",
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Hfs {
    fn drop(&mut self) {
        if self.watchdog.take().is_some() {
            // Closing the watchdog's input stops the server; the watchdog
            // waits for it and removes the folder.
            let _ = self.child.wait();
        } else if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unique(path: PathBuf) -> PathBuf {
    let mut n = 0;
    let mut candidate = path.clone();
    while candidate.exists() {
        n += 1;
        candidate = path.with_extension(format!("{n}.log"));
    }
    candidate
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill -{sig} {pid}: {e}"));
    assert!(status.success(), "kill -{sig} {pid}: {status}");
}

/// The last 60 lines of a log file.
pub fn log_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(60)..];
    format!(
        "---- export-store hfs log ({}), last lines ----\n{}\n----",
        path.display(),
        tail.join("\n")
    )
}

// ---------------------------------------------------------------------------
// The sample, and what a server holds
// ---------------------------------------------------------------------------

/// Resource ids by type.
pub type Ids = BTreeMap<String, BTreeSet<String>>;

/// The vendored sample, parsed.
pub struct Sample {
    pub files: Vec<SampleFile>,
    /// Every resource, by type, as JSON.
    pub resources: BTreeMap<String, Vec<Value>>,
}

impl Sample {
    pub fn load() -> Sample {
        let files = sample::synthea().unwrap_or_else(|e| panic!("{e}"));
        let mut resources: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for f in &files {
            let text = std::str::from_utf8(&f.ndjson).unwrap();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).unwrap();
                resources
                    .entry(f.resource_type.clone())
                    .or_default()
                    .push(v);
            }
        }
        for t in resources.keys() {
            assert!(
                LOAD_ORDER.contains(&t.as_str()),
                "the sample has {t}, which LOAD_ORDER does not place"
            );
        }
        Sample { files, resources }
    }

    /// Ids of every resource of `types`.
    pub fn ids(&self, types: &[&str]) -> Ids {
        types
            .iter()
            .map(|t| {
                let ids = self.resources.get(*t).map(|rs| {
                    rs.iter()
                        .map(|r| r["id"].as_str().unwrap().to_string())
                        .collect()
                });
                (t.to_string(), ids.unwrap_or_default())
            })
            .collect()
    }

    pub fn types(&self) -> Vec<&str> {
        self.resources.keys().map(String::as_str).collect()
    }

    pub fn count(&self, types: &[&str]) -> usize {
        self.ids(types).values().map(BTreeSet::len).sum()
    }

    /// Ids of `types` in the Patient compartments of `patients`: a
    /// `Patient` whose id is one of them, or a resource whose `subject` or
    /// `patient` references one (the compartment parameters Synthea's data
    /// uses).
    pub fn compartment_ids(&self, types: &[&str], patients: &BTreeSet<String>) -> Ids {
        let refs: BTreeSet<String> = patients.iter().map(|p| format!("Patient/{p}")).collect();
        types
            .iter()
            .map(|t| {
                let ids = self
                    .resources
                    .get(*t)
                    .into_iter()
                    .flatten()
                    .filter(|r| {
                        let id = r["id"].as_str().unwrap();
                        if *t == "Patient" {
                            return patients.contains(id);
                        }
                        ["subject", "patient"].iter().any(|field| {
                            r[field]["reference"]
                                .as_str()
                                .is_some_and(|reference| refs.contains(reference))
                        })
                    })
                    .map(|r| r["id"].as_str().unwrap().to_string())
                    .collect();
                (t.to_string(), ids)
            })
            .collect()
    }
}

/// How resources are loaded into HFS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadMode {
    /// One `PUT [base]/Type/id` per resource (a few in flight).
    Put,
    /// `POST [base]` transaction bundles of PUT entries.
    Transaction,
}

impl LoadMode {
    /// `HFS_TEST_LOAD=put|transaction`; transaction bundles by default.
    pub fn from_env() -> LoadMode {
        match std::env::var("HFS_TEST_LOAD").as_deref() {
            Ok("put") => LoadMode::Put,
            Ok("transaction") | Err(_) => LoadMode::Transaction,
            Ok(other) => panic!("HFS_TEST_LOAD={other:?}: expected put or transaction"),
        }
    }
}

/// Entries per transaction bundle: small enough to stay well inside HFS's
/// request timeout (`HFS_REQUEST_TIMEOUT`, 30 s) in a debug build.
pub const BUNDLE_ENTRIES: usize = 250;

/// Loads `types` of the sample into the server, in [`LOAD_ORDER`].
pub async fn load(
    http: &reqwest::Client,
    base: &str,
    sample: &Sample,
    types: &[&str],
    mode: LoadMode,
) {
    let started = Instant::now();
    for t in LOAD_ORDER.iter().filter(|t| types.contains(t)) {
        let Some(resources) = sample.resources.get(*t) else {
            continue;
        };
        let one = Instant::now();
        match mode {
            LoadMode::Transaction => {
                for chunk in resources.chunks(BUNDLE_ENTRIES) {
                    transaction(http, base, chunk).await;
                }
            }
            LoadMode::Put => {
                use futures::StreamExt;
                let mut puts = futures::stream::iter(resources.iter().map(|r| put(http, base, r)))
                    .buffer_unordered(4);
                while puts.next().await.is_some() {}
            }
        }
        note(format_args!(
            "loaded {} {t} by {mode:?} in {:.1}s",
            resources.len(),
            one.elapsed().as_secs_f64()
        ));
    }
    note(format_args!(
        "loaded {} resources of {} types in {:.1}s",
        sample.count(types),
        types.len(),
        started.elapsed().as_secs_f64()
    ));
}

/// `PUT [base]/Type/id`: 200 or 201.
pub async fn put(http: &reqwest::Client, base: &str, resource: &Value) {
    let (t, id) = (
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap(),
    );
    let r = http
        .put(format!("{base}/{t}/{id}"))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(serde_json::to_vec(resource).unwrap())
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {t}/{id}: {e}"));
    let status = r.status();
    if !matches!(status, StatusCode::OK | StatusCode::CREATED) {
        let body = r.text().await.unwrap_or_default();
        panic!("PUT {t}/{id}: {status}: {body}");
    }
}

/// One transaction bundle of PUTs; every entry must answer 200 or 201.
pub async fn transaction(http: &reqwest::Client, base: &str, resources: &[Value]) {
    let entries: Vec<Value> = resources
        .iter()
        .map(|r| {
            let (t, id) = (
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap(),
            );
            json!({
                "fullUrl": format!("{base}/{t}/{id}"),
                "resource": r,
                "request": {"method": "PUT", "url": format!("{t}/{id}")},
            })
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let first = format!(
        "{}/{}",
        resources[0]["resourceType"].as_str().unwrap(),
        resources[0]["id"].as_str().unwrap()
    );
    let r = http
        .post(base.to_string())
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .body(serde_json::to_vec(&bundle).unwrap())
        .send()
        .await
        .unwrap_or_else(|e| panic!("transaction of {} from {first}: {e}", resources.len()));
    let status = r.status();
    let body = r.bytes().await.unwrap();
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body);
        let hint = if text.contains("Conditional reference") {
            "\n(HFS resolves `Type?identifier=…` only with the spec's search parameters: \
             is search-parameters-r4.json in its data folder?)"
        } else {
            ""
        };
        panic!(
            "transaction of {} entries from {first}: {status}: {text}{hint}",
            resources.len(),
        );
    }
    let response: Value = serde_json::from_slice(&body).unwrap();
    let answers = response["entry"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(answers, resources.len(), "transaction-response entries");
    for e in response["entry"].as_array().unwrap() {
        let s = e["response"]["status"].as_str().unwrap_or("");
        assert!(
            s.starts_with("200") || s.starts_with("201"),
            "transaction entry answered {s:?}: {e}"
        );
    }
}

/// `PUT [base]/Group/{id}`: a Group of `members` (Patient ids).
pub async fn put_group(http: &reqwest::Client, base: &str, id: &str, members: &BTreeSet<String>) {
    let group = json!({
        "resourceType": "Group",
        "id": id,
        "type": "person",
        "actual": true,
        "name": "export-store hfs test group",
        "member": members
            .iter()
            .map(|m| json!({"entity": {"reference": format!("Patient/{m}")}}))
            .collect::<Vec<_>>(),
    });
    put(http, base, &group).await;
}

// ---------------------------------------------------------------------------
// Bulk export, client side
// ---------------------------------------------------------------------------

/// A kick-off (`GET url` with `Prefer: respond-async`): 202 with a
/// `Content-Location`, which is returned.
pub async fn kickoff(http: &reqwest::Client, url: &str) -> String {
    let r = http
        .get(url)
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .send()
        .await
        .unwrap_or_else(|e| panic!("kick-off {url}: {e}"));
    let status = r.status();
    let location = r
        .headers()
        .get("content-location")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::ACCEPTED, "kick-off {url}: {body}");
    location.unwrap_or_else(|| panic!("kick-off {url}: 202 without Content-Location"))
}

/// Polls a status URL until it answers something other than 202; returns
/// that answer. Sleeps what `Retry-After` says (the server runs with
/// `--retry-after 1`), never past `timeout`.
pub async fn poll(
    http: &reqwest::Client,
    status_url: &str,
    timeout: Duration,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let deadline = Instant::now() + timeout;
    let mut polls = 0u32;
    loop {
        let r = http
            .get(status_url)
            .header("accept", "application/json")
            .send()
            .await
            .unwrap_or_else(|e| panic!("status {status_url}: {e}"));
        polls += 1;
        let (status, headers) = (r.status(), r.headers().clone());
        let body = r.bytes().await.unwrap().to_vec();
        if status != StatusCode::ACCEPTED && status != StatusCode::TOO_MANY_REQUESTS {
            return (status, headers, body);
        }
        let retry_after = headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(1);
        assert!(
            retry_after <= 5,
            "status {status_url} asks for Retry-After: {retry_after} although the server runs \
             with --retry-after 1"
        );
        if Instant::now() + Duration::from_secs(retry_after) > deadline {
            panic!(
                "{status_url} still answers {status} after {polls} polls in {timeout:?} (X-Progress: \
                 {:?}): {}",
                headers.get("x-progress"),
                String::from_utf8_lossy(&body)
            );
        }
        tokio::time::sleep(Duration::from_secs(retry_after)).await;
    }
}

/// Polls an export to completion and returns its manifest (200,
/// `application/json`).
pub async fn manifest(http: &reqwest::Client, status_url: &str) -> Value {
    let (status, headers, body) = poll(http, status_url, JOB_TIMEOUT).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "export {status_url} ended in {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let ct = headers.get("content-type").map(|v| v.to_str().unwrap());
    assert!(
        ct.is_some_and(|c| c.starts_with("application/json")),
        "manifest Content-Type {ct:?}"
    );
    serde_json::from_slice(&body).unwrap()
}

/// One export run to completion: kick-off, polls, manifest, downloads.
pub struct Export {
    pub status_url: String,
    pub manifest: Value,
    pub got: Downloaded,
}

/// Kicks off `GET {base}{path}`, polls it to completion and downloads every
/// file (see [`download_all`]).
pub async fn export(http: &reqwest::Client, base: &str, path: &str) -> Export {
    export_as(http, base, path, false).await
}

/// [`export`] on a server whose manifests say `requiresAccessToken:
/// requires_token` (`http` then sends the token).
pub async fn export_as(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    requires_token: bool,
) -> Export {
    let url = format!("{base}{path}");
    let status_url = kickoff(http, &url).await;
    let manifest = manifest(http, &status_url).await;
    let got = download_all(http, base, &url, &manifest, requires_token).await;
    Export {
        status_url,
        manifest,
        got,
    }
}

/// What a manifest's files held.
#[derive(Debug, Default)]
pub struct Downloaded {
    /// Ids by type, duplicates kept.
    pub ids: BTreeMap<String, Vec<String>>,
    /// Every output URL, in manifest order.
    pub urls: Vec<String>,
    /// Output entries per type.
    pub parts: BTreeMap<String, usize>,
    /// The manifest's `count` per type.
    pub counts: BTreeMap<String, u64>,
}

/// Checks a complete export manifest's fields (`request` must be
/// `kickoff_url`, `requiresAccessToken` must be `requires_token`) and
/// downloads every output file: 200,
/// `application/fhir+ndjson`, every line a resource of the entry's type, as
/// many lines as its `count`. Files must be on `base`'s `/export-file/`
/// route.
pub async fn download_all(
    http: &reqwest::Client,
    base: &str,
    kickoff_url: &str,
    manifest: &Value,
    requires_token: bool,
) -> Downloaded {
    let m = manifest;
    let tt = m["transactionTime"]
        .as_str()
        .unwrap_or_else(|| panic!("no transactionTime: {m}"));
    assert!(tt.len() >= 20 && tt.contains('T'), "transactionTime {tt:?}");
    let request = m["request"]
        .as_str()
        .unwrap_or_else(|| panic!("no request: {m}"));
    assert_eq!(request, kickoff_url, "the manifest's request");
    assert_eq!(
        m["requiresAccessToken"],
        json!(requires_token),
        "requiresAccessToken: {m}"
    );
    assert!(m["error"].is_array(), "`error` must be an array: {m}");
    assert_eq!(m["error"], json!([]), "the export reported errors: {m}");
    let output = m["output"]
        .as_array()
        .unwrap_or_else(|| panic!("no output array: {m}"));

    let mut got = Downloaded::default();
    for entry in output {
        let t = entry["type"]
            .as_str()
            .unwrap_or_else(|| panic!("output entry without type: {entry}"));
        let url = entry["url"]
            .as_str()
            .unwrap_or_else(|| panic!("output entry without url: {entry}"));
        let count = entry["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("output entry without count: {entry}"));
        assert!(
            url.starts_with(&format!("{base}/export-file/")),
            "output URL {url} is not HFS's /export-file/ route under {base}"
        );
        let lines = get_ndjson(http, url).await;
        assert_eq!(
            lines.len() as u64,
            count,
            "{url}: manifest count {count}, file has {} lines",
            lines.len()
        );
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(
                line["resourceType"].as_str(),
                Some(t),
                "{url} line {}: {line}",
                i + 1
            );
            let id = line["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{url} line {}: no id", i + 1));
            got.ids
                .entry(t.to_string())
                .or_default()
                .push(id.to_string());
        }
        got.urls.push(url.to_string());
        *got.parts.entry(t.to_string()).or_default() += 1;
        *got.counts.entry(t.to_string()).or_default() += count;
    }
    got
}

/// GET an NDJSON file: 200 and `application/fhir+ndjson`, parsed line by
/// line.
pub async fn get_ndjson(http: &reqwest::Client, url: &str) -> Vec<Value> {
    let r = http
        .get(url)
        .header("accept", "application/fhir+ndjson")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = r.status();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: body: {e}"));
    assert_eq!(
        status,
        StatusCode::OK,
        "GET {url}: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        ct.as_deref()
            .is_some_and(|c| c.starts_with("application/fhir+ndjson")),
        "GET {url}: Content-Type {ct:?}"
    );
    parse_ndjson(&body, url)
}

pub fn parse_ndjson(body: &[u8], what: &str) -> Vec<Value> {
    let text = std::str::from_utf8(body).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{what} line {}: {e}: {l}", i + 1))
        })
        .collect()
}

/// Every expected id exactly once, and nothing else, type by type.
pub fn assert_exactly_once(what: &str, expected: &Ids, got: &BTreeMap<String, Vec<String>>) {
    let mut problems = Vec::new();
    for (t, want) in expected {
        let have = got.get(t).cloned().unwrap_or_default();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let dupes: BTreeSet<&String> = have
            .iter()
            .filter(|id| !seen.insert((*id).clone()))
            .collect();
        let missing: Vec<&String> = want.difference(&seen).collect();
        let extra: Vec<&String> = seen.iter().filter(|id| !want.contains(*id)).collect();
        if !dupes.is_empty() || !missing.is_empty() || !extra.is_empty() {
            problems.push(format!(
                "{t}: expected {}, got {} lines ({} distinct); {} missing (e.g. {:?}), {} duplicated \
                 (e.g. {:?}), {} unexpected (e.g. {:?})",
                want.len(),
                have.len(),
                seen.len(),
                missing.len(),
                missing.iter().take(3).collect::<Vec<_>>(),
                dupes.len(),
                dupes.iter().take(3).collect::<Vec<_>>(),
                extra.len(),
                extra.iter().take(3).collect::<Vec<_>>(),
            ));
        }
    }
    for t in got.keys().filter(|t| !expected.contains_key(*t)) {
        problems.push(format!(
            "{t}: {} resources of a type not asked for",
            got[t].len()
        ));
    }
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

/// The job id of an export status URL (`…/export-status/{job}`).
pub fn job_of(status_url: &str) -> String {
    status_url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string()
}

pub async fn status_of(http: &reqwest::Client, method: Method, url: &str) -> (StatusCode, String) {
    let r = http
        .request(method.clone(), url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = r.status();
    (status, r.text().await.unwrap_or_default())
}

// ---------------------------------------------------------------------------
// Bulk submit, from a Data Provider served by the test
// ---------------------------------------------------------------------------

/// A Data Provider: files served by name on 127.0.0.1:0; records what it
/// was asked for (`GET /name`).
pub struct Provider {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Each request, in order.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Serves `files` (name → content type, body) until the runtime ends; a
/// name it does not hold is 404.
pub async fn provider(files: BTreeMap<String, (String, Vec<u8>)>) -> Provider {
    use axum::extract::{Path, State};
    use axum::http::{header, StatusCode as S};
    use axum::response::IntoResponse;
    use std::sync::{Arc, Mutex};

    type Files = Arc<BTreeMap<String, (String, Vec<u8>)>>;
    let requests = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = requests.clone();
    let app = axum::Router::new()
        .route(
            "/{name}",
            axum::routing::get(
                move |State(files): State<Files>,
                      method: axum::http::Method,
                      Path(name): Path<String>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(format!("{method} /{name}"));
                        match files.get(&name) {
                            Some((ct, body)) => {
                                ([(header::CONTENT_TYPE, ct.clone())], body.clone()).into_response()
                            }
                            None => S::NOT_FOUND.into_response(),
                        }
                    }
                },
            ),
        )
        .with_state(Arc::new(files));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Provider { base, requests }
}

/// Resources as NDJSON, one line each.
pub fn ndjson_of(resources: &[Value]) -> Vec<u8> {
    resources
        .iter()
        .map(|r| format!("{r}\n"))
        .collect::<String>()
        .into_bytes()
}

/// `manifest` (a Bulk Data manifest, which names the data provider's
/// address) served as `manifest.json` by a provider of its own: the
/// manifest's URL and that provider.
pub async fn serve_manifest(manifest: &Value) -> (String, Provider) {
    let meta = provider(BTreeMap::from([(
        "manifest.json".to_string(),
        (
            "application/json".to_string(),
            manifest.to_string().into_bytes(),
        ),
    )]))
    .await;
    (format!("{}/manifest.json", meta.base), meta)
}

/// The sample's `types`, each served as `{Type}.ndjson` by one provider,
/// and a manifest listing them (with their counts) by another: the
/// manifest's URL and the data provider's base.
pub async fn serve_sample(sample: &Sample, types: &[&str]) -> (String, String) {
    let ct = "application/fhir+ndjson".to_string();
    let files = types
        .iter()
        .map(|t| {
            let body = ndjson_of(&sample.resources[*t]);
            (format!("{t}.ndjson"), (ct.clone(), body))
        })
        .collect();
    let data = provider(files).await.base;
    let output: Vec<Value> = types
        .iter()
        .map(|t| {
            json!({"type": t, "url": format!("{data}/{t}.ndjson"),
                   "count": sample.resources[*t].len()})
        })
        .collect();
    let manifest = json!({
        "transactionTime": "2025-01-01T00:00:00Z",
        "request": format!("{data}/$export"),
        "requiresAccessToken": false,
        "output": output,
        "error": [],
    });
    (serve_manifest(&manifest).await.0, data)
}

/// A `$bulk-submit` of a completed submission and the
/// `$bulk-submit-status` request that asks after it.
pub struct Submission {
    /// The kick-off's Parameters.
    pub kickoff: Value,
    /// The status request's Parameters (submitter and submission id).
    pub status_request: Value,
}

impl Submission {
    /// Submission `id` from submitter `value` (system
    /// `https://example.org/providers`): the manifest at `manifest_url`,
    /// the provider's FHIR base `{data}/fhir`.
    pub fn completed(value: &str, id: &str, manifest_url: &str, data: &str) -> Submission {
        let submitter = json!({"system": "https://example.org/providers", "value": value});
        Submission {
            kickoff: json!({
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "submitter", "valueIdentifier": submitter},
                    {"name": "submissionId", "valueString": id},
                    {"name": "manifestUrl", "valueString": manifest_url},
                    {"name": "fhirBaseUrl", "valueString": format!("{data}/fhir")},
                    {"name": "submissionStatus", "valueCoding": {
                        "system": "http://hl7.org/fhir/event-status", "code": "completed"}},
                ],
            }),
            status_request: json!({
                "resourceType": "Parameters",
                "parameter": [
                    {"name": "submitter", "valueIdentifier": submitter},
                    {"name": "submissionId", "valueString": id},
                ],
            }),
        }
    }

    /// POSTs the kick-off to `url` (a server's `…/$bulk-submit`): its
    /// status and body.
    pub async fn kick_off(&self, http: &reqwest::Client, url: &str) -> (StatusCode, String) {
        let r = http
            .post(url)
            .header("content-type", "application/fhir+json")
            .body(self.kickoff.to_string())
            .send()
            .await
            .unwrap();
        let code = r.status();
        (code, r.text().await.unwrap())
    }

    /// Kicks the submission off at `hfs`, which must accept it (200);
    /// otherwise fails with its answer and the server's log.
    pub async fn submit_to(&self, http: &reqwest::Client, hfs: &Hfs) {
        let (code, body) = self.kick_off(http, &hfs.url("/$bulk-submit")).await;
        assert_eq!(
            code,
            StatusCode::OK,
            "$bulk-submit: {body}\n{}",
            hfs.log_tail()
        );
    }
}

// ---------------------------------------------------------------------------
// The output store's database, read-only
// ---------------------------------------------------------------------------

/// One row of the store's `parts` table.
#[derive(Debug, Clone)]
pub struct PartRow {
    pub file_type: String,
    pub resource_type: String,
    pub part_index: u32,
    pub fencing_token: u64,
    pub finalized: bool,
    pub line_count: Option<u64>,
}

/// The parts of one job, read from the output database with a read-only
/// connection (the server may be running).
pub fn parts_of(db: &Path, job: &str) -> Vec<PartRow> {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("open {} read-only: {e}", db.display()));
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT file_type, resource_type, part_index, fencing_token, finalized, line_count \
             FROM parts WHERE job_id = ?1 ORDER BY id",
        )
        .unwrap();
    stmt.query_map([job], |row| {
        // Tokens are stored as token XOR 2^63 (an order-preserving map onto
        // SQLite's signed integers).
        let stored: i64 = row.get(3)?;
        Ok(PartRow {
            file_type: row.get(0)?,
            resource_type: row.get(1)?,
            part_index: row.get(2)?,
            fencing_token: (stored as u64) ^ (1 << 63),
            finalized: row.get::<_, i64>(4)? == 1,
            line_count: row.get::<_, Option<i64>>(5)?.map(|n| n as u64),
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}
