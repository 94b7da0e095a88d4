//! The operator's read-side commands as real processes on real files:
//! `export-store ls` (tenants, jobs, parts, totals, and its speed on a file
//! of 100,000 parts), `export-store cat` (by name, by download URL, as
//! zstd frames, on a damaged part, into a closed pipe) and
//! `export-store export` (HFS's local-fs layout, refusals, re-runs).

mod clikit;
mod faultkit;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clikit::{bin, code, run, stderr, stdout};
use faultkit::{content, digest_hex, key, noisy_lines, now_ms, settle, write_part};
use serde_json::Value;
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StoreOptions,
};

const BASE: &str = "http://hfs.test";
const JOB: &str = "0b6c4e2a-job";

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Writes `lines` as the part `key` and finalizes it.
async fn write_lines(store: &SqliteOutputStore, key: &ExportPartKey, lines: &[String]) -> Vec<u8> {
    let mut w = store.open_writer(key).await.unwrap();
    let mut bytes = Vec::new();
    for l in lines {
        w.write_line(l).await.unwrap();
        bytes.extend_from_slice(l.as_bytes());
        bytes.push(b'\n');
    }
    store.finalize_part(key, w).await.unwrap();
    bytes
}

/// Staging left by a writer (staged row, two chunks), straight into the file.
fn staging(db: &Path, k: &ExportPartKey) {
    use sqlite_export_store::__test_support::{codec, sql};
    let c = rusqlite::Connection::open(db).unwrap();
    let id = sql::insert_staged(&c, k, now_ms()).unwrap();
    for seq in 0..2u64 {
        let frame = codec::compress(b"{\"resourceType\":\"Patient\"}\n", 3).unwrap();
        sql::insert_chunk(&c, id, seq, seq * 27, 27, &frame).unwrap();
    }
}

/// A store file: tenant `default` with job [`JOB`] (Patient-0 under
/// tokens 1 and 2, Encounter-0 and -1, an error part, and a staged
/// Observation-0), job `other` (one part), and tenant `acme/research`
/// (one part). Returns the file.
async fn sample_store(dir: &Path) -> PathBuf {
    let db = dir.join("store.db");
    let store = SqliteOutputStore::open_with(&db, BASE, StoreOptions::default()).unwrap();
    for k in [
        key("default", JOB, "Patient", 0, 1),
        key("default", JOB, "Patient", 0, 2),
        key("default", JOB, "Encounter", 0, 2),
        key("default", JOB, "Encounter", 1, 2),
        ExportPartKey::error("default", ExportJobId::from(JOB), "OperationOutcome", 0, 2),
        key("default", "other", "Patient", 0, 1),
        key("acme/research", JOB, "Patient", 0, 5),
    ] {
        write_part(&store, &k).await.unwrap();
    }
    drop(store);
    staging(&db, &key("default", JOB, "Observation", 0, 2));
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_lists_tenants_then_jobs_then_parts_with_totals() {
    let dir = tempfile::tempdir().unwrap();
    let db = sample_store(dir.path()).await;
    let sizes = |keys: &[ExportPartKey]| keys.iter().map(|k| content(k).len() as u64).sum::<u64>();
    let default_parts = [
        key("default", JOB, "Patient", 0, 1),
        key("default", JOB, "Patient", 0, 2),
        key("default", JOB, "Encounter", 0, 2),
        key("default", JOB, "Encounter", 1, 2),
        ExportPartKey::error("default", ExportJobId::from(JOB), "OperationOutcome", 0, 2),
    ];
    let other = key("default", "other", "Patient", 0, 1);

    // Tenants.
    let doc = json(&run(&db, &["ls", "--json"]));
    assert_eq!(doc["level"], "tenants");
    let tenants = doc["tenants"].as_array().unwrap();
    let names: Vec<&str> = tenants
        .iter()
        .map(|t| t["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme/research", "default"]);
    let default = &tenants[1];
    assert_eq!(default["jobs"], 2);
    assert_eq!(default["parts"], 7);
    assert_eq!(default["staged_parts"], 1);
    assert_eq!(
        default["ndjson_bytes"].as_u64().unwrap(),
        sizes(&default_parts) + sizes(std::slice::from_ref(&other)) + 54,
        "finished parts as recorded, the staged one as stored so far"
    );
    assert_eq!(doc["totals"]["parts"], 8);
    assert!(doc["file"]["page_count"].as_u64().unwrap() > 0);
    assert!(doc["file"]["file_bytes"].as_u64().unwrap() > 0);
    let table = run(&db, &["ls"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(text.starts_with("TENANT"), "{text}");
    assert!(
        text.contains("all tenants: 2 tenants, 3 jobs, 8 parts (1 staged)"),
        "{text}"
    );
    assert!(text.contains("\nfile: "), "{text}");

    // One tenant's jobs.
    let doc = json(&run(&db, &["ls", "--tenant", "default", "--json"]));
    assert_eq!(doc["level"], "jobs");
    let jobs = doc["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    assert_eq!(
        (jobs[0]["job"].as_str(), jobs[0]["parts"].as_u64()),
        (Some(JOB), Some(6))
    );
    assert_eq!(jobs[1]["job"], "other");
    assert_eq!(
        jobs[1]["lines"].as_u64().unwrap(),
        faultkit::lines(&other).len() as u64
    );

    // One job's parts, in key order, with states, sizes and digests.
    let doc = json(&run(
        &db,
        &["ls", "--tenant", "default", "--job", JOB, "--json"],
    ));
    assert_eq!(doc["level"], "parts");
    let parts = doc["parts"].as_array().unwrap();
    let listed: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap()).collect();
    let name = |rest: &str| format!("default/{JOB}/{rest}");
    assert_eq!(
        listed,
        [
            name("error/OperationOutcome-0@2"),
            name("output/Encounter-0@2"),
            name("output/Encounter-1@2"),
            name("output/Observation-0@2"),
            name("output/Patient-0@1"),
            name("output/Patient-0@2"),
        ]
    );
    let staged = &parts[3];
    assert_eq!(staged["state"], "staged");
    assert_eq!(
        (staged["ndjson_bytes"].as_u64(), staged["chunks"].as_u64()),
        (Some(54), Some(2))
    );
    assert!(staged["lines"].is_null() && staged["digest"].is_null());
    let patient = &parts[5];
    let k = key("default", JOB, "Patient", 0, 2);
    assert_eq!(patient["state"], "finished");
    assert_eq!(
        patient["ndjson_bytes"].as_u64().unwrap(),
        content(&k).len() as u64
    );
    assert_eq!(
        patient["digest"].as_str().unwrap(),
        digest_hex(&content(&k))
    );
    assert_eq!(patient["digest_algorithm"], "xxh3-128");
    assert!(patient["stored_bytes"].as_u64().unwrap() < patient["ndjson_bytes"].as_u64().unwrap());
    assert_eq!(doc["jobs"][0]["parts"], 6);
    let text = stdout(&run(&db, &["ls", "--job", JOB]));
    assert!(text.contains("staged"), "{text}");
    assert!(text.contains(&name("output/Patient-0@2")), "{text}");
    assert!(
        text.contains(&format!("  job default/{JOB}: 6 parts (1 staged)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("  job acme/research/{JOB}: 1 part,")),
        "{text}"
    );

    // Every part of the file, and a script's view of it.
    let doc = json(&run(&db, &["ls", "--parts", "--json"]));
    assert_eq!(doc["parts"].as_array().unwrap().len(), 8);
    assert_eq!(
        doc["parts"][0]["name"],
        format!("acme/research/{JOB}/output/Patient-0@5")
    );

    // Nothing matched; a bad id; no store.
    let none = run(&db, &["ls", "--tenant", "nobody"]);
    assert_eq!(code(&none), 4, "{}", stderr(&none));
    assert!(stderr(&none).contains("no parts of tenant \"nobody\""));
    let bad = run(&db, &["ls", "--tenant", ""]);
    assert_eq!(code(&bad), 2, "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("tenant id is empty"),
        "{}",
        stderr(&bad)
    );
    let missing = run(&dir.path().join("nope.db"), &["ls"]);
    assert_eq!(code(&missing), 1);
    assert!(stderr(&missing).contains("nope.db"), "{}", stderr(&missing));
    assert!(
        !dir.path().join("nope.db").exists(),
        "ls never creates a store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_writes_a_part_by_name_or_download_url() {
    let dir = tempfile::tempdir().unwrap();
    let db = sample_store(dir.path()).await;
    let newest = key("default", JOB, "Patient", 0, 2);
    let cat = |args: &[&str]| run(&db, &[&["cat"], args].concat());

    // By name, with and without a token.
    let o = cat(&[&format!("default/{JOB}/output/Patient-0@1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout == content(&key("default", JOB, "Patient", 0, 1)));
    let o = cat(&[&format!("default/{JOB}/output/Patient-0")]);
    assert!(o.stdout == content(&newest), "the slot's highest token");
    // What `| jq` reads: one JSON document per line.
    for line in stdout(&o).lines() {
        serde_json::from_str::<Value>(line).unwrap();
    }

    // By download URL, as the store mints it, or its path.
    let store = SqliteOutputStore::open(&db, BASE).unwrap();
    let url = store
        .download_url(&newest, Duration::from_secs(60))
        .await
        .unwrap()
        .url;
    drop(store);
    assert!(cat(&[&url]).stdout == content(&newest), "{url}");
    let path = format!("/export-file/{JOB}/Patient-0");
    assert!(cat(&[&path]).stdout == content(&newest));
    let research = key("acme/research", JOB, "Patient", 0, 5);
    let o = cat(&[&format!("/acme%2Fresearch/export-file/{JOB}/Patient-0")]);
    assert!(o.stdout == content(&research), "{}", stderr(&o));
    let o = cat(&[
        "--tenant",
        "acme/research",
        &format!("{BASE}/fhir/export-file/{JOB}/Patient-0"),
    ]);
    assert!(o.stdout == content(&research), "{}", stderr(&o));
    let error = ExportPartKey::error("default", ExportJobId::from(JOB), "OperationOutcome", 0, 2);
    let o = cat(&[&format!("/export-file/{JOB}/OperationOutcome-0")]);
    assert!(
        o.stdout == content(&error),
        "an error part, as the route serves it"
    );

    // The stored frames: a .zst stream of the same NDJSON.
    let o = cat(&["--frames", &format!("default/{JOB}/output/Patient-0@2")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(zstd::decode_all(&o.stdout[..]).unwrap() == content(&newest));
    assert!(o.stdout.len() < content(&newest).len());
    if let Ok(mut zstd) = Command::new("zstd")
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        zstd.stdin.take().unwrap().write_all(&o.stdout).unwrap();
        let out = zstd.wait_with_output().unwrap();
        assert!(out.status.success());
        assert!(out.stdout == content(&newest), "zstd -d decodes it");
    }

    // Nothing there, staged only, and names that name nothing.
    let o = cat(&[&format!("default/{JOB}/output/Patient-0@3")]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    let o = cat(&[&format!("default/{JOB}/output/Observation-0")]);
    assert_eq!(code(&o), 4);
    assert!(
        stderr(&o).contains("staged part is there"),
        "{}",
        stderr(&o)
    );
    let o = cat(&[&format!("/export-file/{JOB}/Nothing-0")]);
    assert_eq!(code(&o), 4);
    for bad in [
        "Patient-0",
        "default/j/output/Patient",
        "/export-file/j",
        "/export-file/j/Pat%FFient-0",
    ] {
        let o = cat(&[bad]);
        assert_eq!(code(&o), 2, "{bad}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
}

/// Flips one byte inside `frame`'s compressed data where it sits in the
/// file (a frame may span pages, so a short run of it is looked for).
fn damage(db: &Path, frame: &[u8]) {
    let mut bytes = std::fs::read(db).unwrap();
    let found = (frame.len() / 4..frame.len() / 2)
        .step_by(16)
        .find_map(|from| {
            let probe = &frame[from..from + 24];
            let at = bytes.windows(probe.len()).position(|w| w == probe)?;
            Some(at + 12)
        });
    let at = found.expect("the frame is in the database file");
    bytes[at] ^= 0x55;
    std::fs::write(db, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_of_a_damaged_part_fails_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("damaged.db");
    let options = StoreOptions::default().with_chunk_size(4096);
    let store = SqliteOutputStore::open_with(&db, BASE, options).unwrap();
    let k = key("default", JOB, "Binary", 0, 1);
    let whole = write_lines(&store, &k, &noisy_lines(7, 120, 300)).await;
    let info = store.part_info(&k).await.unwrap();
    assert!(info.chunk_count >= 8, "{} chunks", info.chunk_count);
    drop(store);
    settle(&db);
    let frame: Vec<u8> = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT frame FROM chunks WHERE seq = 4", [], |r| r.get(0))
        .unwrap();
    damage(&db, &frame);

    let name = format!("default/{JOB}/output/Binary-0@1");
    for args in [
        vec!["cat", name.as_str()],
        vec!["cat", "--frames", name.as_str()],
    ] {
        let o = run(&db, &args);
        assert_eq!(code(&o), 3, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
        assert!(o.stdout.len() < whole.len(), "never the whole part");
        if args.len() == 2 {
            assert!(
                whole.starts_with(&o.stdout),
                "what was written is a verified prefix"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cat_into_a_closed_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    let store = SqliteOutputStore::open(&db, BASE).unwrap();
    let k = key("default", JOB, "Binary", 0, 1);
    let whole = write_lines(&store, &k, &noisy_lines(3, 4000, 500)).await;
    assert!(whole.len() > 1 << 20);
    drop(store);
    let mut child = bin()
        .args(["cat", "--db"])
        .arg(&db)
        .arg(format!("default/{JOB}/output/Binary-0"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // The reader (`| head -c 100`) is gone.
    let out = child.wait_with_output().unwrap();
    assert!(head[..] == whole[..100]);
    assert!(out.status.success(), "exit {:?}", out.status);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_hfs_local_fs_files_and_names_what_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let db = sample_store(dir.path()).await;
    let to = dir.path().join("out");
    let export = |extra: &[&str]| {
        let mut args = vec!["export", "--to", to.to_str().unwrap()];
        args.extend_from_slice(extra);
        run(&db, &args)
    };

    let o = export(&[]);
    // Tenant `acme/research` cannot be one folder: refused, named, counted.
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "acme/research/{JOB}/output/Patient-0@5: refused: the tenant id"
        )),
        "{}",
        stderr(&o)
    );
    assert!(
        stdout(&o).starts_with("exported 6 parts,"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("1 failed"), "{}", stdout(&o));
    let expected = [
        format!("default/{JOB}/error-OperationOutcome-0-2.ndjson"),
        format!("default/{JOB}/output-Encounter-0-2.ndjson"),
        format!("default/{JOB}/output-Encounter-1-2.ndjson"),
        format!("default/{JOB}/output-Patient-0-1.ndjson"),
        format!("default/{JOB}/output-Patient-0-2.ndjson"),
        "default/other/output-Patient-0-1.ndjson".to_string(),
    ];
    assert_eq!(files(&to), expected, "finished parts only, no .tmp left");
    let k = key("default", JOB, "Patient", 0, 2);
    assert!(std::fs::read(to.join(&expected[4])).unwrap() == content(&k));

    // Again: nothing to do. A file of another size is replaced; --force
    // rewrites the rest.
    let o = export(&["--tenant", "default", "--json"]);
    let summary = json(&o);
    assert_eq!(
        (
            summary["exported"].as_u64(),
            summary["already_there"].as_u64()
        ),
        (Some(0), Some(6))
    );
    std::fs::write(to.join(&expected[4]), b"truncated").unwrap();
    let summary = json(&export(&["--tenant", "default", "--json"]));
    assert_eq!(summary["exported"], 1);
    assert!(std::fs::read(to.join(&expected[4])).unwrap() == content(&k));
    let summary = json(&export(&["--job", "other", "--force", "--json"]));
    assert_eq!(
        (summary["exported"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(0))
    );

    let o = export(&["--tenant", "nobody"]);
    assert_eq!(code(&o), 4, "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_of_a_damaged_part_names_it_and_exports_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("damaged.db");
    let options = StoreOptions::default().with_chunk_size(4096);
    let store = SqliteOutputStore::open_with(&db, BASE, options).unwrap();
    let bad = key("default", JOB, "Binary", 0, 1);
    write_lines(&store, &bad, &noisy_lines(9, 60, 300)).await;
    let good = key("default", JOB, "Patient", 0, 1);
    write_part(&store, &good).await.unwrap();
    drop(store);
    settle(&db);
    let frame: Vec<u8> = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT frame FROM chunks JOIN parts ON parts.id = chunks.part_id
             WHERE resource_type = 'Binary' AND seq = 2",
            [],
            |r| r.get(0),
        )
        .unwrap();
    damage(&db, &frame);
    let to = dir.path().join("out");
    let o = run(&db, &["export", "--to", to.to_str().unwrap()]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Binary-0@1: the part is damaged"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        files(&to),
        [format!("default/{JOB}/output-Patient-0-1.ndjson")]
    );
}

/// `ls` on a file of 100,000 finished parts (4 tenants × 25 jobs × 1,000
/// parts, published straight into the file by `__test_support::bulk`):
/// each level answers in well under a few seconds, and lists them all.
/// `cargo test --release --test ops_cli ls_on_100000_parts -- --nocapture`
/// prints the times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_on_100000_parts_is_quick() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    drop(SqliteOutputStore::open(&db, BASE).unwrap());
    let started = Instant::now();
    let keys = (0..4).flat_map(|t| {
        (0..25).flat_map(move |j| {
            (0..1000).map(move |i| {
                let ty = ["Patient", "Encounter", "Observation", "Condition"][i % 4];
                key(
                    &format!("tenant-{t}"),
                    &format!("job-{j:02}"),
                    ty,
                    (i / 4) as u32,
                    1,
                )
            })
        })
    });
    let line = br#"{"resourceType":"Patient","id":"p1","name":[{"family":"Doe"}]}
"#;
    let n =
        sqlite_export_store::__test_support::bulk::insert_finished(&db, keys, line, 1, now_ms())
            .unwrap();
    assert_eq!(n, 100_000);
    eprintln!(
        "built 100,000 parts in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let timed = |args: &[&str]| {
        let started = Instant::now();
        let o = run(&db, args);
        let took = started.elapsed();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        eprintln!(
            "export-store {} took {:.3} s",
            args.join(" "),
            took.as_secs_f64()
        );
        (o, took)
    };
    let (o, t1) = timed(&["ls"]);
    assert!(
        stdout(&o).contains("4 tenants, 100 jobs, 100000 parts"),
        "{}",
        stdout(&o)
    );
    let (o, t2) = timed(&["ls", "--tenant", "tenant-2"]);
    assert!(
        stdout(&o).contains("tenant tenant-2: 25 jobs, 25000 parts"),
        "{}",
        stdout(&o)
    );
    let (o, t3) = timed(&["ls", "--tenant", "tenant-2", "--job", "job-07"]);
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.starts_with("finished"))
            .count(),
        1000
    );
    let (o, t4) = timed(&["ls", "--parts"]);
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.starts_with("finished"))
            .count(),
        100_000
    );
    let (o, t5) = timed(&["ls", "--parts", "--json"]);
    let doc = json(&o);
    assert_eq!(doc["parts"].as_array().unwrap().len(), 100_000);
    assert_eq!(doc["jobs"].as_array().unwrap().len(), 100);
    // Generous bounds for a loaded debug build; the release figures are in
    // docs/operations.md.
    for (t, bound) in [(t1, 5), (t2, 5), (t3, 5), (t4, 30), (t5, 30)] {
        assert!(t < Duration::from_secs(bound), "{t:?} over {bound} s");
    }
}

/// A command this build leaves out (`hfs` needs the `hfs` feature) is not
/// an "unrecognized subcommand": it says which feature brings it in and
/// exits 2, whatever arguments follow.
#[cfg(not(feature = "hfs"))]
#[test]
fn a_command_this_build_leaves_out_says_which_feature_brings_it() {
    let o = bin()
        .args(["hfs", "--data-dir", "./nowhere", "--addr", "127.0.0.1:0"])
        .output()
        .expect("the binary runs");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("no `hfs` command"), "{err}");
    assert!(err.contains("--features hfs"), "{err}");
    assert!(!Path::new("./nowhere").exists(), "nothing is created");
    // Hidden from the list of commands.
    let help = bin().arg("--help").output().expect("the binary runs");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(!help.contains("\n  hfs "), "{help}");
    assert!(help.contains("\n  import "), "{help}");
}
