//! The contract as a suite: scenarios any [`ExportOutputStore`] can run.
//!
//! Each scenario is a `pub async fn` taking `&dyn ExportOutputStore` (plus,
//! where a store legitimately differs, a parameter such as its chunk size),
//! and panics with a message naming what broke. [`run_all`] runs them all.
//! Scenarios use fresh job ids and tenant names, so they can share a store
//! with each other and with other data.
//!
//! The suite is run against [`SqliteOutputStore`](crate::SqliteOutputStore)
//! and against [`MemoryOutputStore`](super::memory::MemoryOutputStore), a
//! deliberately simple reference implementation that keeps the scenarios
//! honest: a scenario that only our store passes is testing an accident,
//! not the contract.
//!
//! Scenarios that need several tasks run their futures concurrently in one
//! task, so they work on any runtime flavour; run them on a multi-thread
//! runtime to exercise real parallelism.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    ExportJobId, ExportOutputStore, ExportPartKey, FinalizedPart, StorageError, StorageResult,
    TenantContext, TenantId,
};

/// How a store under test legitimately differs from others.
#[derive(Debug, Clone)]
pub struct Params {
    /// Raw bytes per chunk, so that sizes around chunk boundaries are probed.
    pub chunk_size: usize,
    /// Whether the store refuses lower tokens in a slot (store-side fencing).
    pub fencing: bool,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            chunk_size: crate::DEFAULT_CHUNK_SIZE,
            fencing: true,
        }
    }
}

/// Runs every scenario, in order, printing each name.
pub async fn run_all(store: &dyn ExportOutputStore, p: &Params) {
    macro_rules! run {
        ($name:ident $(, $arg:expr)*) => {{
            println!("conformance: {}", stringify!($name));
            $name(store $(, $arg)*).await;
        }};
    }
    run!(round_trip_sizes, p.chunk_size);
    run!(line_across_chunk_boundary, p.chunk_size);
    run!(one_line_of_three_chunks, p.chunk_size);
    run!(raw_unaligned_writes, p.chunk_size);
    run!(byte_count_mismatch_is_not_published);
    run!(staged_parts_are_invisible);
    run!(dropped_writer_leaves_nothing);
    if p.fencing {
        run!(fencing_refuses_lower_tokens);
        run!(deleted_jobs_stay_deleted);
    }
    run!(refinalize_swaps_atomically, p.chunk_size);
    run!(deletes_are_scoped_and_idempotent);
    run!(delete_stops_a_staging_writer, p.chunk_size);
    run!(tenant_purge_is_exact);
    run!(invalid_keys_are_rejected);
    run!(bulk_submit_key_shapes, p.chunk_size);
    run!(bulk_submit_receipts);
    run!(concurrent_parts, 32, p.chunk_size);
    run!(read_meets_delete, p.chunk_size);
}

// ---------------------------------------------------------------------------
// Helpers

fn tenant(name: &str) -> String {
    // Unique per call, so scenarios never see each other's data.
    format!("{name}-{}", &ExportJobId::new().as_str()[..8])
}

fn ctx(tenant: &str) -> TenantContext {
    TenantContext::new(TenantId::new(tenant))
}

/// NDJSON of exactly `n` bytes: lines of varied length, each ending in `\n`.
pub fn ndjson_exact(n: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i = 0u64;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let left = n - out.len();
        let head = format!("{{\"resourceType\":\"Observation\",\"id\":\"{seed}-{i}\",\"v\":\"");
        let want = 60 + (x % 900) as usize;
        let len = if left <= want + 40 { left } else { want };
        if len < head.len() + 3 {
            // Too short for a JSON object: pad with a line of spaces.
            out.extend(std::iter::repeat_n(b' ', len - 1));
        } else {
            out.extend_from_slice(head.as_bytes());
            let body = len - head.len() - 3;
            out.extend((0..body).map(|k| b"abcdefghij"[(k + i as usize) % 10]));
            out.extend_from_slice(b"\"}");
        }
        out.push(b'\n');
        i += 1;
    }
    out
}

fn lines_of(data: &[u8]) -> Vec<&str> {
    let text = std::str::from_utf8(data).expect("scenario data is UTF-8");
    let mut v: Vec<&str> = text.split('\n').collect();
    assert_eq!(v.pop(), Some(""), "scenario data ends with a newline");
    v
}

/// Writes `data` (whole lines) with `write_line` and finalizes.
async fn put_lines(
    store: &dyn ExportOutputStore,
    key: &ExportPartKey,
    data: &[u8],
) -> StorageResult<FinalizedPart> {
    let mut w = store.open_writer(key).await?;
    for line in lines_of(data) {
        w.write_line(line)
            .await
            .map_err(|e| StorageError::from_io("write_line", e))?;
    }
    store.finalize_part(key, w).await
}

/// Writes `data` as raw pieces of the given sizes (cycled), sets the
/// counters by hand, bulk-submit style, and finalizes.
async fn put_raw(
    store: &dyn ExportOutputStore,
    key: &ExportPartKey,
    data: &[u8],
    pieces: &[usize],
) -> StorageResult<FinalizedPart> {
    let mut w = store.open_writer(key).await?;
    let mut at = 0;
    for size in pieces.iter().cycle() {
        if at >= data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        w.writer
            .write_all(&data[at..end])
            .await
            .map_err(|e| StorageError::from_io("write", e))?;
        at = end;
    }
    w.line_count = data.iter().filter(|b| **b == b'\n').count() as u64;
    w.byte_count = data.len() as u64;
    store.finalize_part(key, w).await
}

/// Reads a whole part.
pub async fn read_all(
    store: &dyn ExportOutputStore,
    key: &ExportPartKey,
) -> StorageResult<Vec<u8>> {
    let mut r = store.open_reader(key).await?;
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .await
        .map_err(|e| StorageError::from_io("read", e))?;
    Ok(out)
}

async fn assert_missing(store: &dyn ExportOutputStore, key: &ExportPartKey, why: &str) {
    match read_all(store, key).await {
        Err(e) if e.is_not_found() => {}
        Err(e) => panic!("{why}: expected not found, got {e}"),
        Ok(data) => panic!("{why}: expected not found, read {} bytes", data.len()),
    }
}

async fn assert_reads(store: &dyn ExportOutputStore, key: &ExportPartKey, want: &[u8], why: &str) {
    let got = read_all(store, key)
        .await
        .unwrap_or_else(|e| panic!("{why}: read failed: {e}"));
    assert!(
        got == want,
        "{why}: read {} bytes, expected {} (first difference at {:?})",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

// ---------------------------------------------------------------------------
// Scenarios

/// Parts of 0, 1, chunk−1, chunk, chunk+1 and 5×chunk+7 bytes round-trip
/// exactly, with the counts reported by `finalize_part`.
pub async fn round_trip_sizes(store: &dyn ExportOutputStore, chunk: usize) {
    let t = tenant("sizes");
    let job = ExportJobId::new();
    let mut sizes = vec![
        0,
        1,
        chunk.saturating_sub(1),
        chunk,
        chunk + 1,
        5 * chunk + 7,
    ];
    sizes.dedup();
    for (i, n) in sizes.into_iter().enumerate() {
        let key = ExportPartKey::output(&t, job.clone(), "Observation", i as u32, 1);
        let data = ndjson_exact(n, i as u64);
        let part = put_lines(store, &key, &data)
            .await
            .unwrap_or_else(|e| panic!("size {n}: {e}"));
        assert_eq!(part.size_bytes, n as u64, "size {n}: size_bytes");
        assert_eq!(
            part.line_count,
            lines_of(&data).len() as u64,
            "size {n}: line_count"
        );
        assert_eq!(part.resource_type, "Observation");
        assert_eq!(&part.key, &key);
        assert_reads(store, &key, &data, &format!("size {n}")).await;
    }
}

/// A line that starts before a chunk boundary and ends after it.
pub async fn line_across_chunk_boundary(store: &dyn ExportOutputStore, chunk: usize) {
    let key = ExportPartKey::output(tenant("span"), ExportJobId::new(), "Encounter", 0, 1);
    let first = chunk.saturating_sub(20).max(1);
    let mut data = vec![b'a'; first - 1];
    data.push(b'\n');
    data.extend(std::iter::repeat_n(b'b', 40));
    data.push(b'\n');
    data.extend(ndjson_exact(chunk / 2 + 3, 9));
    put_lines(store, &key, &data).await.expect("finalize");
    assert_reads(store, &key, &data, "line across a chunk boundary").await;
}

/// One line three chunks long.
pub async fn one_line_of_three_chunks(store: &dyn ExportOutputStore, chunk: usize) {
    let key = ExportPartKey::output(
        tenant("long"),
        ExportJobId::new(),
        "DocumentReference",
        0,
        1,
    );
    let mut data: Vec<u8> = (0..3 * chunk).map(|i| b'A' + (i % 26) as u8).collect();
    data.push(b'\n');
    let part = put_lines(store, &key, &data).await.expect("finalize");
    assert_eq!(part.line_count, 1);
    assert_reads(store, &key, &data, "one line of three chunks").await;
}

/// Bulk-submit style: raw byte pieces that ignore line and chunk
/// boundaries, with the counters set by hand.
pub async fn raw_unaligned_writes(store: &dyn ExportOutputStore, chunk: usize) {
    let key = ExportPartKey::output(tenant("raw"), ExportJobId::new(), "Bundle", 0, 1);
    let data = ndjson_exact(3 * chunk + 12_345, 4);
    let part = put_raw(store, &key, &data, &[1, 7, 65_536, 3, chunk + 1, 100])
        .await
        .expect("finalize raw part");
    assert_eq!(part.size_bytes, data.len() as u64);
    assert_eq!(part.line_count, lines_of(&data).len() as u64);
    assert_reads(store, &key, &data, "raw unaligned writes").await;
    // Bytes that are not line-aligned at all, not even at the end.
    let key2 = ExportPartKey::output(&key.tenant_id, key.job_id.clone(), "Bundle", 1, 1);
    let odd: Vec<u8> = (0..chunk + 3).map(|i| (i * 7 % 251) as u8).collect();
    put_raw(store, &key2, &odd, &[64 * 1024])
        .await
        .expect("finalize binary part");
    assert_reads(store, &key2, &odd, "non-UTF-8 raw bytes").await;
}

/// A `byte_count` that disagrees with the bytes written is not published.
pub async fn byte_count_mismatch_is_not_published(store: &dyn ExportOutputStore) {
    let t = tenant("count");
    let job = ExportJobId::new();
    for (i, delta) in [1i64, -1].into_iter().enumerate() {
        let key = ExportPartKey::output(&t, job.clone(), "Patient", i as u32, 1);
        let mut w = store.open_writer(&key).await.expect("open");
        w.write_line("{\"resourceType\":\"Patient\"}")
            .await
            .expect("write");
        w.byte_count = (w.byte_count as i64 + delta) as u64;
        let e = store
            .finalize_part(&key, w)
            .await
            .expect_err("a wrong byte_count must not finalize");
        assert!(!e.is_not_found() || delta != 0, "{e}");
        assert_missing(store, &key, "part with a wrong byte_count").await;
    }
}

/// Nothing of a staged part is readable, and a finished version stays
/// readable while its replacement is staged.
pub async fn staged_parts_are_invisible(store: &dyn ExportOutputStore) {
    let key = ExportPartKey::output(tenant("staged"), ExportJobId::new(), "Condition", 0, 1);
    let mut w = store.open_writer(&key).await.expect("open");
    w.write_line("{\"v\":1}").await.expect("write");
    w.flush().await.expect("flush");
    assert_missing(store, &key, "staged part").await;
    store.finalize_part(&key, w).await.expect("finalize v1");
    let mut w2 = store.open_writer(&key).await.expect("open v2");
    w2.write_line("{\"v\":2}").await.expect("write v2");
    w2.flush().await.expect("flush v2");
    assert_reads(
        store,
        &key,
        b"{\"v\":1}\n",
        "finished v1 while v2 is staged",
    )
    .await;
    drop(w2);
    assert_reads(
        store,
        &key,
        b"{\"v\":1}\n",
        "v1 after v2's writer was dropped",
    )
    .await;
}

/// A writer dropped without finalizing leaves nothing readable, and the
/// key can be written afresh.
pub async fn dropped_writer_leaves_nothing(store: &dyn ExportOutputStore) {
    let key = ExportPartKey::output(tenant("drop"), ExportJobId::new(), "Procedure", 0, 1);
    let mut w = store.open_writer(&key).await.expect("open");
    for _ in 0..100 {
        w.write_line("{\"resourceType\":\"Procedure\"}")
            .await
            .expect("write");
    }
    drop(w);
    assert_missing(store, &key, "dropped writer").await;
    put_lines(store, &key, b"{\"again\":true}\n")
        .await
        .expect("rewrite");
    assert_reads(store, &key, b"{\"again\":true}\n", "after a dropped writer").await;
}

/// Store-side fencing: a lower token is refused once a higher one was
/// seen in the slot, whichever order the writers opened in; other slots
/// are not affected.
pub async fn fencing_refuses_lower_tokens(store: &dyn ExportOutputStore) {
    let t = tenant("fence");
    let job = ExportJobId::new();
    let k = |idx: u32, token: u64| ExportPartKey::output(&t, job.clone(), "Patient", idx, token);
    // Higher first: the lower one cannot even open.
    put_lines(store, &k(0, 2), b"{\"live\":1}\n")
        .await
        .expect("live part");
    let e = store
        .open_writer(&k(0, 1))
        .await
        .expect_err("zombie open must fail");
    assert!(e.is_conflict(), "zombie open: {e}");
    // Lower first: both stage, the higher finalizes, the lower is refused.
    let mut zombie = store
        .open_writer(&k(1, 1))
        .await
        .expect("zombie opens first");
    zombie
        .write_line("{\"zombie\":1}")
        .await
        .expect("zombie writes");
    let mut live = store.open_writer(&k(1, 2)).await.expect("live opens");
    live.write_line("{\"live\":1}").await.expect("live writes");
    store
        .finalize_part(&k(1, 2), live)
        .await
        .expect("live finalizes");
    let e = store
        .finalize_part(&k(1, 1), zombie)
        .await
        .expect_err("zombie finalize must fail");
    assert!(e.is_conflict(), "zombie finalize: {e}");
    assert_missing(store, &k(1, 1), "zombie part").await;
    assert_reads(store, &k(1, 2), b"{\"live\":1}\n", "live part").await;
    // A lower token in another slot is someone else's business.
    put_lines(store, &k(2, 1), b"{\"other\":1}\n")
        .await
        .expect("other slot");
    // And a higher token after a lower one is a normal reclaim.
    put_lines(store, &k(2, 3), b"{\"reclaim\":1}\n")
        .await
        .expect("reclaim");
}

/// Deleting a job fences out the tokens it had reached (CONTRACT: "nothing
/// comes back to life"): a worker of the deleted claim cannot finalize the
/// part it was writing, nor open a new part of the job, while a later
/// claim (a higher token) writes the job again from part 0.
pub async fn deleted_jobs_stay_deleted(store: &dyn ExportOutputStore) {
    let t = tenant("gone");
    let job = ExportJobId::new();
    let k = |idx: u32, token: u64| ExportPartKey::output(&t, job.clone(), "Patient", idx, token);
    put_lines(store, &k(0, 1), b"{\"first\":1}\n")
        .await
        .expect("first claim's part");
    let mut zombie = store.open_writer(&k(1, 1)).await.expect("zombie opens");
    zombie
        .write_line("{\"zombie\":1}")
        .await
        .expect("zombie writes");
    store
        .delete_job_outputs(&ctx(&t), &job)
        .await
        .expect("delete the job");
    let e = store
        .finalize_part(&k(1, 1), zombie)
        .await
        .expect_err("a writer of the deleted job must not publish");
    assert!(
        e.is_not_found() || e.is_conflict(),
        "zombie finalize after delete: {e}"
    );
    let e = store
        .open_writer(&k(2, 1))
        .await
        .expect_err("the deleted claim must not open a new part");
    assert!(e.is_conflict(), "zombie open after delete: {e}");
    for idx in 0..3 {
        assert_missing(store, &k(idx, 1), "a part of the deleted claim").await;
    }
    put_lines(store, &k(0, 2), b"{\"second\":1}\n")
        .await
        .expect("a later claim writes the job again");
    assert_reads(
        store,
        &k(0, 2),
        b"{\"second\":1}\n",
        "the later claim's part",
    )
    .await;
}

/// Finalizing a key again replaces the part atomically: readers see the old
/// version until the new one is finalized, then only the new one; a read
/// that straddles the swap returns the old version whole or fails.
pub async fn refinalize_swaps_atomically(store: &dyn ExportOutputStore, chunk: usize) {
    let key = ExportPartKey::output(tenant("swap"), ExportJobId::new(), "Observation", 0, 1);
    let v1 = ndjson_exact(6 * chunk + 5, 1);
    let v2 = ndjson_exact(2 * chunk + 1, 2);
    put_lines(store, &key, &v1).await.expect("v1");
    let mut reader = store.open_reader(&key).await.expect("reader on v1");
    let mut head = vec![0u8; 10];
    reader
        .read_exact(&mut head)
        .await
        .expect("first bytes of v1");
    let mut w = store.open_writer(&key).await.expect("open v2");
    for line in lines_of(&v2) {
        w.write_line(line).await.expect("write v2");
    }
    assert_reads(store, &key, &v1, "v1 before v2 is finalized").await;
    store.finalize_part(&key, w).await.expect("finalize v2");
    assert_reads(store, &key, &v2, "v2 after finalize").await;
    let mut rest = Vec::new();
    if reader.read_to_end(&mut rest).await.is_ok() {
        head.extend_from_slice(&rest);
        assert!(head == v1, "a read straddling the swap returned mixed data");
    }
}

/// Deleting a job removes exactly that tenant's job, every token, staged
/// and finished; deleting again or deleting nothing is `Ok`.
pub async fn deletes_are_scoped_and_idempotent(store: &dyn ExportOutputStore) {
    let (a, b) = (tenant("del-a"), tenant("del-b"));
    let job = ExportJobId::new();
    let other_job = ExportJobId::new();
    let ka0 = ExportPartKey::output(&a, job.clone(), "Patient", 0, 1);
    let ka1 = ExportPartKey::error(&a, job.clone(), "OperationOutcome", 0, 2);
    let ka_other = ExportPartKey::output(&a, other_job.clone(), "Patient", 0, 1);
    let kb = ExportPartKey::output(&b, job.clone(), "Patient", 0, 1);
    for k in [&ka0, &ka1, &ka_other, &kb] {
        put_lines(store, k, b"{\"x\":1}\n").await.expect("put");
    }
    let staged = ExportPartKey::output(&a, job.clone(), "Patient", 1, 1);
    let mut w = store.open_writer(&staged).await.expect("staged");
    w.write_line("{\"y\":1}").await.expect("write");
    store
        .delete_job_outputs(&ctx(&a), &job)
        .await
        .expect("delete");
    assert_missing(store, &ka0, "deleted output part").await;
    assert_missing(store, &ka1, "deleted error part").await;
    assert!(
        store.finalize_part(&staged, w).await.is_err(),
        "a part staged before the delete must not finalize"
    );
    assert_missing(store, &staged, "staged part of a deleted job").await;
    assert_reads(store, &ka_other, b"{\"x\":1}\n", "same tenant, other job").await;
    assert_reads(store, &kb, b"{\"x\":1}\n", "other tenant, same job id").await;
    store
        .delete_job_outputs(&ctx(&a), &job)
        .await
        .expect("delete again");
    store
        .delete_job_outputs(&ctx(&a), &ExportJobId::new())
        .await
        .expect("delete a job that never existed");
}

/// A writer still staging a job when it is deleted cannot bring it back:
/// its later writes or its finalize fail, and nothing becomes readable.
pub async fn delete_stops_a_staging_writer(store: &dyn ExportOutputStore, chunk: usize) {
    let t = tenant("resurrect");
    let job = ExportJobId::new();
    let key = ExportPartKey::output(&t, job.clone(), "Encounter", 0, 1);
    let data = ndjson_exact(6 * chunk, 3);
    let lines = lines_of(&data);
    let half = lines.len() / 2;
    let mut w = store.open_writer(&key).await.expect("open");
    for line in &lines[..half] {
        w.write_line(line).await.expect("write before delete");
    }
    w.flush().await.expect("flush");
    store
        .delete_job_outputs(&ctx(&t), &job)
        .await
        .expect("delete");
    let mut failed = false;
    for line in &lines[half..] {
        if w.write_line(line).await.is_err() {
            failed = true;
            break;
        }
    }
    if !failed {
        let e = store
            .finalize_part(&key, w)
            .await
            .expect_err("finalize after the job was deleted must fail");
        assert!(e.is_not_found() || e.is_invalid_input(), "{e}");
    }
    assert_missing(store, &key, "part of a deleted job").await;
}

/// Tenant purge matches the tenant id exactly: `acme` is not `acme/research`
/// nor `acmex`. An empty tenant id is invalid input.
pub async fn tenant_purge_is_exact(store: &dyn ExportOutputStore) {
    let acme = tenant("acme");
    let research = format!("{acme}/research");
    let acmex = format!("{acme}x");
    let job = ExportJobId::new();
    let keys: Vec<ExportPartKey> = [&acme, &research, &acmex]
        .iter()
        .map(|t| ExportPartKey::output(t.as_str(), job.clone(), "Patient", 0, 1))
        .collect();
    for k in &keys {
        put_lines(store, k, b"{\"t\":1}\n").await.expect("put");
    }
    store.delete_tenant_outputs(&acme).await.expect("purge");
    assert_missing(store, &keys[0], "purged tenant").await;
    assert_reads(store, &keys[1], b"{\"t\":1}\n", "child tenant survives").await;
    assert_reads(
        store,
        &keys[2],
        b"{\"t\":1}\n",
        "prefix-sharing tenant survives",
    )
    .await;
    store
        .delete_tenant_outputs(&acme)
        .await
        .expect("purge again");
    let e = store
        .delete_tenant_outputs("")
        .await
        .expect_err("empty tenant");
    assert!(e.is_invalid_input(), "{e}");
}

/// Every kind of bad key is invalid input, on every call that takes a key,
/// before any I/O.
pub async fn invalid_keys_are_rejected(store: &dyn ExportOutputStore) {
    let good = ExportPartKey::output(tenant("bad"), ExportJobId::new(), "Patient", 0, 1);
    let long = "x".repeat(crate::MAX_ID_BYTES + 1);
    let mut cases: Vec<(&str, ExportPartKey)> = Vec::new();
    let mut add = |name, f: &dyn Fn(&mut ExportPartKey)| {
        let mut k = good.clone();
        f(&mut k);
        cases.push((name, k));
    };
    add("empty tenant", &|k| k.tenant_id.clear());
    add("empty job", &|k| k.job_id = ExportJobId::from(""));
    add("empty resource type", &|k| k.resource_type.clear());
    add("NUL in tenant", &|k| k.tenant_id.push('\0'));
    add("newline in job", &|k| k.job_id = ExportJobId::from("a\nb"));
    add("tab in type", &|k| k.resource_type = "Pat\tient".into());
    add("overlong tenant", &|k| k.tenant_id = long.clone());
    add("overlong job", &|k| {
        k.job_id = ExportJobId::from(long.as_str())
    });
    add("overlong type", &|k| k.resource_type = long.clone());
    add("upper-case file type", &|k| k.file_type = "Output".into());
    add("file type with a slash", &|k| {
        k.file_type = "output/x".into()
    });
    add("file type starting with a digit", &|k| {
        k.file_type = "0utput".into()
    });
    add("overlong file type", &|k| k.file_type = "o".repeat(33));
    add("empty file type", &|k| k.file_type.clear());
    for (name, key) in &cases {
        let e = store.open_writer(key).await.expect_err(name);
        assert!(e.is_invalid_input(), "open_writer, {name}: {e}");
        let e = store
            .open_reader(key)
            .await
            .err()
            .unwrap_or_else(|| panic!("open_reader, {name}"));
        assert!(e.is_invalid_input(), "open_reader, {name}: {e}");
        let e = store
            .download_url(key, Duration::from_secs(60))
            .await
            .expect_err(name);
        assert!(e.is_invalid_input(), "download_url, {name}: {e}");
    }
    let e = store
        .delete_job_outputs(&ctx(""), &ExportJobId::new())
        .await
        .expect_err("empty tenant");
    assert!(e.is_invalid_input(), "delete with empty tenant: {e}");
    let e = store
        .delete_job_outputs(&ctx(&good.tenant_id), &ExportJobId::from(""))
        .await
        .expect_err("empty job");
    assert!(e.is_invalid_input(), "delete with empty job: {e}");
    // The store still works.
    put_lines(store, &good, b"{\"ok\":1}\n")
        .await
        .expect("store still usable");
}

/// Bulk submit's key shapes (`submit-<16 hex>` jobs, `submit-v1-<64 hex>`
/// resource types) work end to end, with raw writes.
pub async fn bulk_submit_key_shapes(store: &dyn ExportOutputStore, chunk: usize) {
    let job = ExportJobId::from(format!("submit-{}", "0f1e2d3c4b5a6978"));
    let ty = format!("submit-v1-{}", "9a".repeat(32));
    let key = ExportPartKey::output(tenant("submit"), job, ty.clone(), 0, 1);
    let data = ndjson_exact(2 * chunk + 99, 5);
    put_raw(store, &key, &data, &[64 * 1024])
        .await
        .expect("submit part");
    assert_reads(store, &key, &data, "bulk submit part").await;
    let url = store
        .download_url(&key, Duration::from_secs(60))
        .await
        .expect("url");
    assert!(url.url.contains(&ty), "{}", url.url);
}

/// The receipts HFS 0.2.7's bulk-submit worker writes for one submission:
/// per-type `output` parts and an `error` part (raw writes), and a `deleted`
/// receipt (`Bundle` lines) whenever a provider manifest lists deletions,
/// for two manifests of one submission, which share the submission's job id
/// and differ in their locators. All read back and get URLs; HFS deletes the
/// submission's outputs twice on `DELETE` (once from the handler, once from
/// the cleanup sweep), and both calls succeed and leave nothing.
pub async fn bulk_submit_receipts(store: &dyn ExportOutputStore) {
    let t = tenant("receipts");
    let job = ExportJobId::from(format!("submit-{:016x}", 0x1234_5678_9abc_def0u64));
    let locator = |n: u8| format!("submit-v1-{}", format!("{n:02x}").repeat(32));
    let mut parts = Vec::new();
    for manifest in 0..2u8 {
        let receipts: [(&str, u8, Vec<u8>); 3] = [
            (
                "output",
                0,
                ndjson_exact(70_000 + usize::from(manifest), 11),
            ),
            (
                "error",
                1,
                b"{\"resourceType\":\"OperationOutcome\",\"issue\":[]}\n".to_vec(),
            ),
            (
                "deleted",
                2,
                b"{\"reference\":\"Patient/p1\"}\n{\"reference\":\"Patient/p2\"}\n".to_vec(),
            ),
        ];
        for (file_type, n, data) in receipts {
            let mut key = ExportPartKey::output(&t, job.clone(), locator(manifest * 16 + n), 0, 3);
            key.file_type = file_type.to_string();
            put_raw(store, &key, &data, &[64 * 1024])
                .await
                .unwrap_or_else(|e| panic!("{file_type} receipt of manifest {manifest}: {e}"));
            parts.push((key, data));
        }
    }
    for (key, data) in &parts {
        assert_reads(store, key, data, &format!("{} receipt", key.file_type)).await;
        let url = store
            .download_url(key, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{} receipt url: {e}", key.file_type));
        assert!(url.url.contains(&key.resource_type), "{}", url.url);
    }
    for round in 0..2 {
        store
            .delete_job_outputs(&ctx(&t), &job)
            .await
            .unwrap_or_else(|e| panic!("delete of the submission, call {round}: {e}"));
    }
    for (key, _) in &parts {
        assert_missing(store, key, "receipt of a deleted submission").await;
    }
}

/// `n` parts written at once, of different types and sizes, all read back
/// exactly.
pub async fn concurrent_parts(store: &dyn ExportOutputStore, n: u32, chunk: usize) {
    let t = tenant("many");
    let job = ExportJobId::new();
    let types = ["Patient", "Encounter", "Observation", "Condition"];
    let parts: Vec<(ExportPartKey, Vec<u8>)> = (0..n)
        .map(|i| {
            let key = ExportPartKey::output(&t, job.clone(), types[i as usize % 4], i, 1);
            (
                key,
                ndjson_exact(chunk / 3 + i as usize * chunk / 4, i as u64),
            )
        })
        .collect();
    let writes = parts.iter().map(|(k, d)| put_lines(store, k, d));
    for (r, (k, _)) in futures::future::join_all(writes)
        .await
        .into_iter()
        .zip(&parts)
    {
        r.unwrap_or_else(|e| panic!("{}: {e}", k.part_segment()));
    }
    let reads = parts.iter().map(|(k, _)| read_all(store, k));
    for (r, (k, d)) in futures::future::join_all(reads)
        .await
        .into_iter()
        .zip(&parts)
    {
        let got = r.unwrap_or_else(|e| panic!("{}: {e}", k.part_segment()));
        assert!(got == *d, "{} read back different bytes", k.part_segment());
    }
}

/// A part deleted while it is being read ends the read with an error, never
/// with a short part reported as complete.
pub async fn read_meets_delete(store: &dyn ExportOutputStore, chunk: usize) {
    let t = tenant("readdel");
    let job = ExportJobId::new();
    let key = ExportPartKey::output(&t, job.clone(), "Observation", 0, 1);
    let data = ndjson_exact(24 * chunk + 1, 6);
    put_lines(store, &key, &data).await.expect("put");
    let mut r = store.open_reader(&key).await.expect("reader");
    let mut first = vec![0u8; chunk];
    r.read_exact(&mut first).await.expect("first chunk");
    store
        .delete_job_outputs(&ctx(&t), &job)
        .await
        .expect("delete");
    let mut rest = Vec::new();
    let outcome = r.read_to_end(&mut rest).await;
    assert!(
        outcome.is_err(),
        "a read that met a delete ended cleanly after {} of {} bytes",
        chunk + rest.len(),
        data.len()
    );
}
