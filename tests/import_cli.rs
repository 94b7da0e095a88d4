//! `export-store import` as a real process on real files: the vendored
//! Synthea export (zstd, plain, gzip, numbered files) comes back byte for
//! byte, part by part, with a correct manifest; hostile folders are refused
//! with the file and line named and nothing imported; a kill mid-import
//! publishes nothing.

mod clikit;
mod faultkit;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use clikit::{bin, code, run, stderr};
use faultkit::{noisy_lines, read_part, synthea};
use serde_json::Value;
use sqlite_export_store::{
    DigestAlgorithm, ExportJobId, ExportPartKey, PartFilter, SqliteOutputStore,
};

const BASE: &str = "http://hfs.test";

/// The Synthea files vendored in `data/synthea-10-patients`, by type.
const TYPES: [&str; 13] = [
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DocumentReference",
    "Encounter",
    "Immunization",
    "Location",
    "MedicationRequest",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
];

/// Runs `export-store import DIR --db DB ARGS`.
fn import(db: &Path, dir: &Path, args: &[&str]) -> Output {
    bin()
        .arg("import")
        .arg(dir)
        .arg("--db")
        .arg(db)
        .args(["--base-url", BASE])
        .args(args)
        .output()
        .expect("the binary runs")
}

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea-10-patients")
}

/// The lines of one Synthea type, decompressed, without their `\n`.
fn synthea_lines(ty: &str) -> Vec<Vec<u8>> {
    let bytes = synthea(&format!("{ty}.000.ndjson"));
    let mut lines: Vec<Vec<u8>> = bytes.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    if lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    lines
}

fn ndjson(lines: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Every finished or staged part of one tenant's job, as the library lists
/// them (an absent store file holds none).
async fn job_parts(db: &Path, tenant: &str, job: &str) -> Vec<(String, bool)> {
    if !db.exists() {
        return Vec::new();
    }
    let store = SqliteOutputStore::open(db, BASE).unwrap();
    store
        .list_parts(&PartFilter::all().tenant(tenant).job(ExportJobId::from(job)))
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key.display().to_string(), p.finished))
        .collect()
}

/// The vendored export, re-shaped the ways bulk NDJSON folders come: most
/// types as the vendored `.ndjson.zst`, Patient plain, Encounter gzip,
/// Condition split into numbered plain, gzip and zstd files (with a CRLF
/// line end and a blank line, which import drops). Returns each type's
/// expected NDJSON, in reading order.
fn synthea_folder(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(dir).unwrap();
    let mut expected = BTreeMap::new();
    for ty in TYPES {
        let lines = synthea_lines(ty);
        expected.insert(ty.to_string(), ndjson(&lines));
        match ty {
            "Patient" => std::fs::write(dir.join("Patient.ndjson"), ndjson(&lines)).unwrap(),
            "Encounter" => {
                std::fs::write(dir.join("Encounter.ndjson.gz"), gzip(&ndjson(&lines))).unwrap()
            }
            "Condition" => {
                let third = lines.len() / 3;
                let mut first = ndjson(&lines[..third]);
                // A CRLF end and a blank line: not part of any resource.
                first.truncate(first.len() - 1);
                first.extend_from_slice(b"\r\n\n");
                std::fs::write(dir.join("Condition.000.ndjson"), first).unwrap();
                std::fs::write(
                    dir.join("Condition.001.ndjson.gz"),
                    gzip(&ndjson(&lines[third..2 * third])),
                )
                .unwrap();
                // The last line without its `\n`.
                let mut last = ndjson(&lines[2 * third..]);
                last.pop();
                std::fs::write(
                    dir.join("Condition.002.ndjson.zst"),
                    zstd::encode_all(&last[..], 3).unwrap(),
                )
                .unwrap();
            }
            _ => {
                let name = format!("{ty}.000.ndjson.zst");
                std::fs::copy(sample_dir().join(&name), dir.join(&name)).unwrap();
            }
        }
    }
    // Hidden files are ignored.
    std::fs::write(dir.join(".DS_Store"), b"\0\0junk").unwrap();
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synthea_export_comes_back_byte_for_byte_part_by_part() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bulk");
    let db = tmp.path().join("store.db");
    let expected = synthea_folder(&dir);
    let total: usize = expected
        .values()
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .sum();
    assert_eq!(total, 7160, "the vendored sample");

    let per_part = 250_u64;
    let o = import(
        &db,
        &dir,
        &[
            "--tenant",
            "acme",
            "--job",
            "synthea-1",
            "--per-part",
            "250",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let manifest: Value = serde_json::from_slice(&o.stdout).expect("the manifest is JSON");

    // The manifest: HFS's completion manifest of this job.
    assert_eq!(
        manifest["request"],
        format!("{BASE}/$export?_type={}", TYPES.join(","))
    );
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert!(manifest["requiresAccessToken"].is_boolean());
    assert_eq!(manifest["error"], serde_json::json!([]));
    let output = manifest["output"].as_array().unwrap();
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for entry in output {
        let ty = entry["type"].as_str().unwrap().to_string();
        let index = counts.entry(ty.clone()).or_default();
        assert_eq!(
            entry["url"],
            format!("{BASE}/export-file/synthea-1/{ty}-{}", index.len()),
            "{entry}"
        );
        index.push(entry["count"].as_u64().unwrap());
    }
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (ty, parts) in &counts {
        let lines = expected[ty].iter().filter(|c| **c == b'\n').count() as u64;
        assert_eq!(parts.iter().sum::<u64>(), lines, "{ty}");
        assert_eq!(parts.len() as u64, lines.div_ceil(per_part), "{ty}");
        for (i, n) in parts.iter().enumerate() {
            let full = i + 1 < parts.len();
            assert!(*n == per_part || (!full && *n <= per_part), "{ty}-{i}: {n}");
        }
    }

    // Every part through `export-store cat`: each type's parts, in order,
    // are its files' resources byte for byte.
    let mut ids = HashSet::new();
    for (ty, parts) in &counts {
        let mut got = Vec::new();
        for (i, count) in parts.iter().enumerate() {
            let o = run(&db, &["cat", &format!("acme/synthea-1/output/{ty}-{i}@1")]);
            assert_eq!(code(&o), 0, "{}", stderr(&o));
            assert_eq!(
                o.stdout.iter().filter(|c| **c == b'\n').count() as u64,
                *count
            );
            got.extend_from_slice(&o.stdout);
        }
        assert!(got == expected[ty], "{ty}: the parts are the files' lines");
        for line in got.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_slice(line).unwrap();
            assert!(
                ids.insert((ty.clone(), v["id"].as_str().unwrap().to_string())),
                "{ty}/{} imported twice",
                v["id"]
            );
        }
    }
    assert_eq!(ids.len(), 7160, "every resource exactly once");

    // And through the library's reader, by the manifest's keys.
    let store = SqliteOutputStore::open(&db, BASE).unwrap();
    let listed = store
        .list_parts(&PartFilter::all().tenant("acme"))
        .await
        .unwrap();
    assert_eq!(listed.len(), output.len());
    assert!(listed.iter().all(|p| p.finished));
    for p in &listed {
        let bytes = read_part(&store, &p.key).await.unwrap();
        assert_eq!(bytes.len() as u64, p.byte_count);
        assert_eq!(p.key.fencing_token, 1);
        assert_eq!(p.key.file_type, "output");
    }
    drop(store);
    let o = run(&db, &["verify"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));

    // A second job from the same folder, default part size, new id.
    let o = import(&db, &dir, &["--tenant", "acme"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let manifest: Value = serde_json::from_slice(&o.stdout).unwrap();
    let n: u64 = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(n, 7160);
    let parts: u64 = counts
        .values()
        .map(|p| p.iter().sum::<u64>().div_ceil(1000))
        .sum();
    assert_eq!(manifest["output"].as_array().unwrap().len() as u64, parts);
}

/// A Bulk Data client's download folder, as smart-fetch leaves it: numbered
/// output files (one gzip), its own `log.ndjson` and `.metadata`, the
/// `error/` and `deleted/` subfolders, and a README. It imports as it is:
/// output, error and deleted parts, each in the manifest's own array, the
/// companions skipped and named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_data_client_download_folder_imports_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("store.db");
    let dir = tmp.path().join("download");
    std::fs::create_dir_all(dir.join("error")).unwrap();
    std::fs::create_dir_all(dir.join("deleted")).unwrap();
    let patients = ndjson(&synthea_lines("Patient"));
    let conditions = ndjson(&synthea_lines("Condition"));
    std::fs::write(dir.join("Patient.000.ndjson"), &patients).unwrap();
    std::fs::write(dir.join("Condition.000.ndjson.gz"), gzip(&conditions)).unwrap();
    std::fs::write(
        dir.join("log.ndjson"),
        b"{\"exportId\":\"x\",\"timestamp\":\"2026-11-30T00:00:00Z\",\"eventId\":\"kickoff\",\"eventDetail\":{}}\n",
    )
    .unwrap();
    std::fs::write(dir.join(".metadata"), b"{\"done\":true}").unwrap();
    std::fs::write(dir.join("README.md"), b"# downloaded\n").unwrap();
    let outcomes = lines_of(&[
        r#"{"resourceType":"OperationOutcome","id":"oo-1","issue":[{"severity":"error","code":"processing"}]}"#.into(),
        r#"{"resourceType":"OperationOutcome","id":"oo-2","issue":[{"severity":"warning","code":"processing"}]}"#.into(),
    ]);
    std::fs::write(dir.join("error/OperationOutcome.000.ndjson"), &outcomes).unwrap();
    let deleted = lines_of(&[r#"{"resourceType":"Bundle","id":"del-1","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/gone"}}]}"#.into()]);
    std::fs::write(dir.join("deleted/Bundle.000.ndjson"), &deleted).unwrap();

    let o = import(&db, &dir, &["--tenant", "t", "--job", "download"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 0, "{err}");
    for skipped in ["log.ndjson", "README.md"] {
        assert!(
            err.contains(&format!("skipped {}", dir.join(skipped).display())),
            "{err}"
        );
    }
    let manifest: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        manifest["request"],
        format!("{BASE}/$export?_type=Condition,Patient")
    );
    let entries = |array: &str| -> Vec<(String, u64)> {
        manifest[array]
            .as_array()
            .unwrap_or_else(|| panic!("{array} in {manifest}"))
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_string(),
                    e["count"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let count = |b: &[u8]| b.iter().filter(|c| **c == b'\n').count() as u64;
    assert_eq!(
        entries("output"),
        vec![
            ("Condition".to_string(), count(&conditions)),
            ("Patient".to_string(), count(&patients)),
        ]
    );
    assert_eq!(entries("error"), vec![("OperationOutcome".to_string(), 2)]);
    assert_eq!(entries("deleted"), vec![("Bundle".to_string(), 1)]);
    // Each part reads back byte for byte under its own file type.
    for (part, bytes) in [
        ("output/Patient-0@1", &patients),
        ("output/Condition-0@1", &conditions),
        ("error/OperationOutcome-0@1", &outcomes),
        ("deleted/Bundle-0@1", &deleted),
    ] {
        let o = run(&db, &["cat", &format!("t/download/{part}")]);
        assert_eq!(code(&o), 0, "{part}: {}", stderr(&o));
        assert_eq!(&o.stdout, bytes, "{part}");
    }
    assert_eq!(job_parts(&db, "t", "download").await.len(), 4);

    // Any other subfolder, or one inside error/, is refused: nothing imported.
    std::fs::create_dir_all(dir.join("error/nested")).unwrap();
    let o = import(&db, &dir, &["--tenant", "t", "--job", "nested"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("a folder"), "{}", stderr(&o));
    std::fs::remove_dir(dir.join("error/nested")).unwrap();
    std::fs::create_dir_all(dir.join("more")).unwrap();
    let o = import(&db, &dir, &["--tenant", "t", "--job", "more"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(job_parts(&db, "t", "more").await.is_empty());
    assert!(job_parts(&db, "t", "nested").await.is_empty());
}

/// One refused folder: what it holds besides good files, and what the
/// error must say.
struct Hostile {
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    /// Exit status.
    code: i32,
    /// Every one of these is in the error message.
    says: Vec<&'static str>,
}

fn sr(id: &str) -> String {
    format!(r#"{{"resourceType":"ServiceRequest","id":"{id}","status":"active"}}"#)
}

fn lines_of(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_folders_are_refused_naming_file_and_line_and_nothing_is_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("store.db");
    // Good files read before the bad one (types are read in name order), so
    // that parts are staged when the fault is found.
    let encounters = ndjson(&synthea_lines("Encounter"));
    let good = || vec![("Encounter.ndjson", encounters.clone())];
    let mut truncated_gz = gzip(&lines_of(&[sr("a"), sr("b"), sr("c")]));
    truncated_gz.truncate(truncated_gz.len() - 12);
    let mut truncated_zst = zstd::encode_all(&lines_of(&noisy_lines(3, 400, 300))[..], 3).unwrap();
    truncated_zst.truncate(truncated_zst.len() / 2);
    let cases = vec![
        Hostile {
            name: "not-json",
            files: vec![(
                "ServiceRequest.ndjson",
                lines_of(&[sr("a"), sr("b"), "{\"resourceType\": nope}".into()]),
            )],
            code: 2,
            says: vec!["ServiceRequest.ndjson: line 3", "not JSON"],
        },
        Hostile {
            name: "no-resource-type",
            files: vec![(
                "ServiceRequest.ndjson",
                lines_of(&[sr("a"), r#"{"id":"b","status":"active"}"#.into()]),
            )],
            code: 2,
            says: vec!["ServiceRequest.ndjson: line 2", "resourceType"],
        },
        Hostile {
            name: "other-type",
            files: vec![(
                "ServiceRequest.001.ndjson",
                lines_of(&[
                    sr("a"),
                    sr("b"),
                    sr("c"),
                    r#"{"resourceType":"Patient","id":"p"}"#.into(),
                ]),
            )],
            code: 2,
            says: vec![
                "ServiceRequest.001.ndjson: line 4",
                "Patient, but the file name says ServiceRequest",
            ],
        },
        Hostile {
            name: "bad-id",
            files: vec![(
                "ServiceRequest.ndjson",
                lines_of(&[sr("a"), sr("not/an id")]),
            )],
            code: 2,
            says: vec!["ServiceRequest.ndjson: line 2", "not a FHIR id"],
        },
        Hostile {
            name: "stray-file",
            files: vec![("notes.txt", b"hello".to_vec())],
            code: 2,
            says: vec!["notes.txt", "not a bulk NDJSON file name"],
        },
        Hostile {
            name: "truncated-gzip",
            files: vec![("ServiceRequest.ndjson.gz", truncated_gz)],
            code: 2,
            says: vec![
                "ServiceRequest.ndjson.gz: line",
                "gzip data is damaged or cut short",
            ],
        },
        Hostile {
            name: "truncated-zstd",
            files: vec![("Binary.ndjson.zst", truncated_zst)],
            code: 2,
            says: vec![
                "Binary.ndjson.zst: line",
                "zstd data is damaged or cut short",
            ],
        },
        Hostile {
            name: "not-ndjson",
            files: vec![(
                "ServiceRequest.ndjson",
                b"[{\"resourceType\":\"ServiceRequest\",\"id\":\"a\"}]\n".to_vec(),
            )],
            code: 2,
            says: vec!["ServiceRequest.ndjson: line 1", "not an object"],
        },
    ];
    for case in cases {
        let dir = tmp.path().join(case.name);
        std::fs::create_dir(&dir).unwrap();
        for (name, bytes) in good().into_iter().chain(case.files) {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let job = format!("job-{}", case.name);
        let o = import(
            &db,
            &dir,
            &["--tenant", "t", "--job", &job, "--per-part", "50"],
        );
        let err = stderr(&o);
        assert_eq!(code(&o), case.code, "{}: {err}", case.name);
        assert!(o.stdout.is_empty(), "{}: no manifest", case.name);
        for s in &case.says {
            assert!(err.contains(s), "{}: {s:?} not in {err}", case.name);
        }
        assert!(err.contains("nothing imported"), "{}: {err}", case.name);
        for sql in ["SELECT", "INSERT", "sqlite", "SQLITE"] {
            assert!(!err.contains(sql), "{}: {err}", case.name);
        }
        assert_eq!(
            job_parts(&db, "t", &job).await,
            vec![],
            "{}: nothing of the job is in the store",
            case.name
        );
    }

    // An empty folder, and one with only blank lines.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = import(&db, &empty, &["--tenant", "t", "--job", "empty"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("holds no NDJSON file"),
        "{}",
        stderr(&o)
    );
    std::fs::write(empty.join("Patient.ndjson"), b"\n\n  \n").unwrap();
    let o = import(&db, &empty, &["--tenant", "t", "--job", "empty"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("hold no resource"), "{}", stderr(&o));
    assert_eq!(job_parts(&db, "t", "empty").await, vec![]);

    // A missing folder, and bad ids for the tenant or the job.
    let o = import(&db, &tmp.path().join("missing"), &["--tenant", "t"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let ok = tmp.path().join("ok");
    std::fs::create_dir(&ok).unwrap();
    std::fs::write(ok.join("Encounter.ndjson"), &encounters).unwrap();
    for args in [
        ["--tenant", "", "--job", "j"],
        ["--tenant", "t", "--job", ""],
        ["--tenant", "t", "--job", "a\u{7}b"],
    ] {
        let o = import(&db, &ok, &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
    }

    // A job that exists is refused, and left as it was.
    let o = import(&db, &ok, &["--tenant", "t", "--job", "exists"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = job_parts(&db, "t", "exists").await;
    assert!(!before.is_empty());
    for per_part in ["50", "1000"] {
        let o = import(
            &db,
            &ok,
            &["--tenant", "t", "--job", "exists", "--per-part", per_part],
        );
        assert_eq!(code(&o), 2, "{}", stderr(&o));
        assert!(stderr(&o).contains("already has"), "{}", stderr(&o));
        assert_eq!(job_parts(&db, "t", "exists").await, before);
    }
    // The same id under another tenant is another job.
    let o = import(&db, &ok, &["--tenant", "u", "--job", "exists"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    let o = run(&db, &["verify"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
}

/// Staged and finished part rows of one job, read straight from the file.
fn rows(db: &Path, job: &str) -> (u64, u64) {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(
        "SELECT coalesce(sum(finalized = 0), 0), coalesce(sum(finalized = 1), 0)
         FROM parts WHERE job_id = ?1",
        [job],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_import_publishes_nothing_and_gc_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("big");
    let db = tmp.path().join("store.db");
    std::fs::create_dir(&dir).unwrap();
    // About 80 MiB of NDJSON that zstd cannot shrink much, in numbered files.
    for n in 0..8 {
        let lines = noisy_lines(n + 1, 10_000, 1000);
        std::fs::write(dir.join(format!("Binary.{n:03}.ndjson")), lines_of(&lines)).unwrap();
    }
    // A job of the same store, finished before, stays as it was.
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::write(
        small.join("Encounter.ndjson"),
        ndjson(&synthea_lines("Encounter")),
    )
    .unwrap();
    let o = import(&db, &small, &["--tenant", "t", "--job", "before"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let before = job_parts(&db, "t", "before").await;

    let mut child = bin()
        .arg("import")
        .arg(&dir)
        .arg("--db")
        .arg(&db)
        .args(["--tenant", "t", "--job", "killed", "--per-part", "500"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once several parts are staged, well before the end.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the import never staged parts");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the import ended before it could be killed: {status}");
        }
        let (staged, finished) = rows(&db, "killed");
        assert_eq!(finished, 0, "a part was published before the end");
        if staged >= 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no manifest");

    let (staged, finished) = rows(&db, "killed");
    assert_eq!(finished, 0, "no finished part of the killed job");
    assert!(staged > 0, "the kill left staging for gc");
    let o = run(&db, &["gc", "--older-than", "0s"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(rows(&db, "killed"), (0, 0));
    assert_eq!(job_parts(&db, "t", "killed").await, vec![]);
    let o = run(&db, &["verify"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(job_parts(&db, "t", "before").await, before);

    // The same job id imports whole afterwards.
    std::fs::write(
        dir.join("Binary.000.ndjson"),
        lines_of(&noisy_lines(9, 1200, 100)),
    )
    .unwrap();
    for n in 1..8 {
        std::fs::remove_file(dir.join(format!("Binary.{n:03}.ndjson"))).unwrap();
    }
    let o = import(
        &db,
        &dir,
        &["--tenant", "t", "--job", "killed", "--per-part", "500"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(rows(&db, "killed"), (0, 3));
}

/// `--digest blake3` records BLAKE3 (what `b3sum` prints) for every part
/// it imports, the default XXH3-128 (what `xxhsum -H2` prints), into the
/// same file; a digest the store does not offer is refused before the
/// store is touched.
#[tokio::test]
async fn the_digest_is_the_operators_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("store.db");
    let dir = tmp.path().join("bulk");
    std::fs::create_dir_all(&dir).unwrap();
    let patients = ndjson(&synthea_lines("Patient"));
    std::fs::write(dir.join("Patient.ndjson"), &patients).unwrap();

    let refused = import(&db, &dir, &["--tenant", "t", "--digest", "md5"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(!db.exists(), "a refused import creates no store");

    for (job, flag, algorithm, want) in [
        (
            "b3",
            Some("blake3"),
            DigestAlgorithm::Blake3,
            blake3::hash(&patients).to_hex().to_string(),
        ),
        (
            "xxh",
            None,
            DigestAlgorithm::Xxh3_128,
            faultkit::digest_hex(&patients),
        ),
    ] {
        let mut args = vec!["--tenant", "t", "--job", job, "--per-part", "100000"];
        if let Some(f) = flag {
            args.extend(["--digest", f]);
        }
        let out = import(&db, &dir, &args);
        assert!(out.status.success(), "{out:?}");
        let store = SqliteOutputStore::open(&db, BASE).unwrap();
        let key = ExportPartKey::output("t", ExportJobId::from(job), "Patient", 0, 1);
        let info = store.part_info(&key).await.unwrap();
        let back = read_part(&store, &key).await.unwrap();
        assert!(back == patients, "{job}: the part reads back as the file");
        assert_eq!(
            (info.digest_algorithm, info.digest),
            (algorithm, want),
            "{job}"
        );
    }
}
