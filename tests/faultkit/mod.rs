//! Shared by the crash, fault, hostile-input, stress and maintenance tests:
//! deterministic part contents made of real Synthea resources, and helpers
//! that write, read and inspect a store the way a user would.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, FinalizedPart, SqliteOutputStore, StorageError,
    StorageResult, TenantContext, TenantId,
};
use tokio::io::AsyncReadExt;

/// One file of the real Synthea bulk export vendored in the repository
/// (`"Patient.000.ndjson"`), decompressed.
pub fn synthea(file: &str) -> Vec<u8> {
    sqlite_export_store::__test_support::sample::synthea_file(file)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Real FHIR resources (Synthea encounters), one NDJSON line each.
pub fn resources() -> &'static [String] {
    static LINES: OnceLock<Vec<String>> = OnceLock::new();
    LINES.get_or_init(|| {
        let text = String::from_utf8(synthea("Encounter.000.ndjson")).expect("NDJSON is UTF-8");
        let lines: Vec<String> = text.lines().take(400).map(str::to_string).collect();
        assert!(lines.len() >= 100, "too few Synthea resources");
        lines
    })
}

fn mix(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A stable hash of a key (FNV-1a over its fields).
pub fn key_hash(key: &ExportPartKey) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for field in [
        key.tenant_id.as_bytes(),
        key.job_id.as_str().as_bytes(),
        key.file_type.as_bytes(),
        key.resource_type.as_bytes(),
        &key.part_index.to_le_bytes(),
        &key.fencing_token.to_le_bytes(),
    ] {
        h = mix(h, field);
        h = mix(h, &[0xff]);
    }
    h
}

/// The lines a key's part holds in these tests: a first line naming the
/// key (so that two keys never share content, and a zombie's part never
/// looks like the live worker's), then 4 to 43 real resources chosen by the
/// key's hash.
pub fn lines(key: &ExportPartKey) -> Vec<String> {
    let pool = resources();
    let h = key_hash(key);
    let n = 4 + (h % 40) as usize;
    let start = (h >> 8) as usize % pool.len();
    let mut out = Vec::with_capacity(n + 1);
    out.push(format!(
        r#"{{"resourceType":"Basic","id":"{:016x}","code":{{"text":"part {} of job {} under token {}"}}}}"#,
        h,
        key.part_index,
        key.job_id.as_str().escape_default(),
        key.fencing_token
    ));
    out.extend((0..n).map(|i| pool[(start + i) % pool.len()].clone()));
    out
}

/// The NDJSON bytes of a key's part (see [`lines`]).
pub fn content(key: &ExportPartKey) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines(key) {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Lowercase hex XXH3-128, high half first (the content digest the store
/// records by default, as `xxhsum -H2` prints it).
pub fn digest_hex(bytes: &[u8]) -> String {
    format!("{:032x}", twox_hash::XxHash3_128::oneshot(bytes))
}

/// Writes `key`'s part (its [`lines`]) and finalizes it, as HFS does.
pub async fn write_part(
    store: &SqliteOutputStore,
    key: &ExportPartKey,
) -> StorageResult<FinalizedPart> {
    let mut w = store.open_writer(key).await?;
    for l in lines(key) {
        w.write_line(&l)
            .await
            .map_err(|e| StorageError::from_io("write_line", e))?;
    }
    store.finalize_part(key, w).await
}

/// Reads a finished part to the end.
pub async fn read_part(store: &SqliteOutputStore, key: &ExportPartKey) -> StorageResult<Vec<u8>> {
    let mut r = store.open_reader(key).await?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .await
        .map_err(|e| StorageError::from_io("read", e))?;
    Ok(out)
}

/// A key in tenant `tenant`, job `job`.
pub fn key(tenant: &str, job: &str, ty: &str, index: u32, token: u64) -> ExportPartKey {
    ExportPartKey::output(tenant, ExportJobId::from(job), ty, index, token)
}

/// `PRAGMA integrity_check` through a connection of its own.
pub fn integrity_check(path: &Path) -> String {
    let c = rusqlite::Connection::open(path).unwrap();
    let lines: Vec<String> = c
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    lines.join("; ")
}

/// Every part row: its key and whether it is finished.
pub fn part_rows(path: &Path) -> Vec<(ExportPartKey, bool)> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare(
            "SELECT tenant_id, job_id, file_type, resource_type, part_index, fencing_token,
                    finalized FROM parts ORDER BY id",
        )
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok((
                ExportPartKey {
                    tenant_id: r.get(0)?,
                    job_id: ExportJobId::from(r.get::<_, String>(1)?),
                    file_type: r.get(2)?,
                    resource_type: r.get(3)?,
                    part_index: r.get::<_, i64>(4)? as u32,
                    fencing_token: sqlite_export_store::__test_support::sql::token_from_sql(
                        r.get(5)?,
                    ),
                },
                r.get::<_, i64>(6)? == 1,
            ))
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

/// Parts, bytes and orphaned chunks, counted on a connection of its own.
pub fn census(path: &Path) -> sqlite_export_store::__test_support::sql::Census {
    let c = rusqlite::Connection::open(path).unwrap();
    sqlite_export_store::__test_support::sql::census(&c).unwrap()
}

/// Size of the database file plus its write-ahead log, in bytes.
pub fn disk_bytes(path: &Path) -> (u64, u64) {
    let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    (size(path.to_path_buf()), size(PathBuf::from(wal)))
}

/// A small xorshift generator: tests print their seed so that a failure
/// can be replayed with `EXPORT_STORE_TEST_SEED`.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `EXPORT_STORE_TEST_SEED` or the clock; prints the seed.
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("EXPORT_STORE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{what}: seed {seed} (replay with EXPORT_STORE_TEST_SEED={seed})");
        Rng(seed | 1)
    }
    /// The next number.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Waits until every connection to `db` is closed and its write-ahead log
/// is in the main file: a dropped store's last read connection may still be
/// closing on the pool's background thread for a moment.
pub fn settle(db: &Path) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Path::new(&wal).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "a connection to {} stayed open",
            db.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The request context of tenant `t`.
pub fn tenant(t: &str) -> TenantContext {
    TenantContext::new(TenantId::new(t))
}

/// Now, in Unix milliseconds (the store's clock).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `n` NDJSON lines that zstd cannot shrink much (each `chars` random
/// base64 characters in a Binary resource), so that a few MiB of parts
/// reach a size cap or fill pages. The same `seed` gives the same lines.
pub fn noisy_lines(seed: u64, n: usize, chars: usize) -> Vec<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = Rng(seed | 1);
    (0..n)
        .map(|i| {
            let data: String = (0..chars)
                .map(|_| ALPHABET[rng.below(64) as usize] as char)
                .collect();
            format!(r#"{{"resourceType":"Binary","id":"b{seed}-{i}","data":"{data}"}}"#)
        })
        .collect()
}

/// Runs `damage` on a raw connection to the store's file with the
/// immutability triggers lifted for the length of the call, then puts
/// them back: damage is what they exist to prevent, and bit rot or a
/// hostile edit ignores them.
pub fn with_triggers_lifted(db: &Path, damage: impl FnOnce(&rusqlite::Connection)) {
    let c = rusqlite::Connection::open(db).unwrap();
    let triggers: Vec<(String, String)> = c
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (name, _) in &triggers {
        c.execute_batch(&format!("DROP TRIGGER {name}")).unwrap();
    }
    damage(&c);
    for (_, sql) in &triggers {
        c.execute_batch(sql).unwrap();
    }
}

/// A key as one line of a child's report: its six fields joined by `|`
/// (test ids never hold one).
pub fn encode_key(k: &ExportPartKey) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}",
        k.tenant_id,
        k.job_id.as_str(),
        k.file_type,
        k.resource_type,
        k.part_index,
        k.fencing_token
    )
}

/// The key [`encode_key`] wrote.
pub fn decode_key(s: &str) -> ExportPartKey {
    let f: Vec<&str> = s.split('|').collect();
    ExportPartKey {
        tenant_id: f[0].into(),
        job_id: ExportJobId::from(f[1]),
        file_type: f[2].into(),
        resource_type: f[3].into(),
        part_index: f[4].parse().unwrap(),
        fencing_token: f[5].parse().unwrap(),
    }
}

/// After a crash: reclaiming abandoned staging leaves no staged part and no
/// orphaned chunk in the store at `db`, and every finished part verifies.
pub async fn reclaim_and_verify(store: &SqliteOutputStore, db: &Path, what: &str) {
    store
        .reclaim_abandoned(std::time::Duration::ZERO)
        .await
        .unwrap();
    let census = census(db);
    assert_eq!(
        (census.staged_parts, census.orphan_chunks),
        (0, 0),
        "{what}"
    );
    let report = store.verify().await.unwrap();
    assert!(report.is_ok(), "{what}: {:?}", report.problems);
}
