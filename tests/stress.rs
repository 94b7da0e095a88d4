//! Everything at once: per job a zombie worker (token 1) and the live worker
//! that reclaimed the job (token 2) race on the same slots, while readers
//! download, a job is cancelled mid-write, finished jobs are deleted and a
//! tenant is purged mid-flight. An event clock orders what happened so that
//! the end state can be judged exactly:
//!
//! - every part whose finalize returned `Ok`, and that no delete or purge
//!   could have covered, reads back byte for byte;
//! - once the live worker's finalize of a slot returned `Ok`, the slot never
//!   serves the zombie's data again (`latest_in_slot` and downloads), and a
//!   zombie finalize of that slot is refused as a conflict;
//! - a delete fences the job out for the claims it had seen (the job's fence
//!   mark): a zombie part never outlives the delete of its job, and no
//!   zombie writes into a job after its delete, so nothing comes back to
//!   life (each delete waits until its jobs have staged something, so that
//!   the store has seen a token of theirs to remember);
//! - parts a completed delete covered are gone; nothing is left staged, no
//!   chunk is orphaned, and `verify` finds nothing wrong.

mod faultkit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultkit::{content, key, lines, read_part};
use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, SqliteOutputStore, StorageError, StoreOptions,
    TenantContext, TenantId,
};

const ZOMBIE: u64 = 1;
const LIVE: u64 = 2;
const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
const JOBS: u32 = 4;
const SLOTS: [(&str, u32); 6] = [
    ("Patient", 0),
    ("Patient", 1),
    ("Encounter", 0),
    ("Encounter", 1),
    ("Encounter", 2),
    ("Observation", 0),
];
/// The tenant purged mid-flight, and the job cancelled mid-write.
const PURGED: &str = "t2";
const CANCELLED: (&str, u32) = ("t0", 3);

type Slot = (String, String, String, u32);

fn slot_of(k: &ExportPartKey) -> Slot {
    (
        k.tenant_id.clone(),
        k.job_id.as_str().to_string(),
        k.resource_type.clone(),
        k.part_index,
    )
}

fn job_name(j: u32) -> String {
    format!("job-{j}")
}

/// What happened, on one event clock.
#[derive(Default)]
struct Log {
    /// Finalize calls that returned `Ok`: when they began and returned.
    finalized: HashMap<ExportPartKey, (u64, u64)>,
    /// Slots the live worker finalized, with when its finalize returned.
    live_done: HashMap<Slot, u64>,
    /// Deletes (tenant, job) and purges (tenant, "") with start and end.
    deletes: HashMap<(String, String), (u64, Option<u64>)>,
    /// Jobs (tenant, job) with when an `open_writer` of theirs first
    /// returned `Ok`.
    opened: HashMap<(String, String), u64>,
    zombie_refused: u64,
    zombie_published: u64,
    zombie_fenced_by_delete: u64,
    reads: u64,
}

struct World {
    store: SqliteOutputStore,
    clock: AtomicU64,
    log: Mutex<Log>,
    writers_done: AtomicBool,
}

impl World {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
    /// The delete or purge that covers `k`, if one has started.
    fn cover(&self, k: &ExportPartKey) -> Option<(u64, Option<u64>)> {
        let log = self.log.lock().unwrap();
        let job = log
            .deletes
            .get(&(k.tenant_id.clone(), k.job_id.as_str().to_string()));
        let tenant = log.deletes.get(&(k.tenant_id.clone(), String::new()));
        match (job, tenant) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { *a } else { *b }),
            (a, b) => a.or(b).copied(),
        }
    }
}

/// Writes and finalizes `k`; returns when it began.
async fn write(world: &World, k: &ExportPartKey) -> Result<u64, StorageError> {
    let start = world.tick();
    let mut w = world.store.open_writer(k).await?;
    let opened = world.tick();
    world
        .log
        .lock()
        .unwrap()
        .opened
        .entry((k.tenant_id.clone(), k.job_id.as_str().to_string()))
        .or_insert(opened);
    for (i, l) in lines(k).iter().enumerate() {
        w.write_line(l)
            .await
            .map_err(|e| StorageError::from_io("write_line", e))?;
        if i % 8 == 0 {
            tokio::task::yield_now().await;
        }
    }
    world.store.finalize_part(k, w).await?;
    let end = world.tick();
    let mut log = world.log.lock().unwrap();
    log.finalized.insert(k.clone(), (start, end));
    if k.fencing_token == LIVE {
        log.live_done.insert(slot_of(k), end);
    }
    Ok(start)
}

async fn worker(world: Arc<World>, tenant: &'static str, job: u32, token: u64, seed: u64) {
    let mut rng = faultkit::Rng(seed | 1);
    let mut order: Vec<usize> = (0..SLOTS.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for i in order {
        let (ty, idx) = SLOTS[i];
        let k = key(tenant, &job_name(job), ty, idx, token);
        let before = world
            .log
            .lock()
            .unwrap()
            .live_done
            .get(&slot_of(&k))
            .copied();
        match write(&world, &k).await {
            Ok(began) if token == ZOMBIE => {
                // Deletes included: once the live worker finished the slot,
                // the job's fence mark (a delete after that finalize) or the
                // slot's own token (a live part written after a delete)
                // keeps the zombie out.
                assert!(
                    before.is_none(),
                    "a zombie finalized {} after the live worker did",
                    k.display()
                );
                // A delete that had ended before the zombie began fenced it
                // out of the whole job.
                if let Some((_, Some(end))) = world.cover(&k) {
                    assert!(
                        began < end,
                        "a zombie brought {} back after its job was deleted",
                        k.display()
                    );
                }
                world.log.lock().unwrap().zombie_published += 1;
            }
            Ok(_) => {}
            Err(e) if token == ZOMBIE && (e.is_conflict() || e.is_not_found()) => {
                let fenced_by_delete = e.is_conflict()
                    && e.to_string()
                        .contains("deleted or reclaimed under a newer claim");
                let mut log = world.log.lock().unwrap();
                log.zombie_refused += 1;
                if fenced_by_delete {
                    log.zombie_fenced_by_delete += 1;
                }
            }
            Err(e) => {
                // A delete may also end the live claim: the job's fence mark
                // is the highest token the job had, often the live one.
                assert!(
                    (e.is_not_found() || e.is_conflict()) && world.cover(&k).is_some(),
                    "the live worker failed on {} without a delete: {e}",
                    k.display()
                );
            }
        }
        if rng.below(3) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
        }
    }
}

/// Downloads as HFS does while everything else runs.
async fn reader(world: Arc<World>, seed: u64) {
    let mut rng = faultkit::Rng(seed | 1);
    while !world.writers_done.load(Ordering::SeqCst) {
        let (slots, keys): (Vec<Slot>, Vec<ExportPartKey>) = {
            let log = world.log.lock().unwrap();
            (
                log.live_done.keys().cloned().collect(),
                log.finalized.keys().cloned().collect(),
            )
        };
        if !slots.is_empty() {
            // A slot the live worker finished serves the live data only.
            let (t, j, ty, idx) = &slots[rng.below(slots.len() as u64) as usize];
            let probe = key(t, j, ty, *idx, 0);
            match world.store.latest_in_slot(&probe).await {
                Ok(info) if info.fencing_token != LIVE => assert!(
                    world.cover(&probe).is_some(),
                    "zombie data served for {t}/{j}/{ty}-{idx}"
                ),
                Ok(_) => {
                    let live = key(t, j, ty, *idx, LIVE);
                    match read_part(&world.store, &live).await {
                        Ok(bytes) => assert!(bytes == content(&live), "{}", live.display()),
                        Err(e) => assert!(e.is_not_found() && world.cover(&live).is_some(), "{e}"),
                    }
                }
                Err(e) => assert!(e.is_not_found() && world.cover(&probe).is_some(), "{e}"),
            }
        }
        if !keys.is_empty() {
            let k = &keys[rng.below(keys.len() as u64) as usize];
            match read_part(&world.store, k).await {
                Ok(bytes) => assert!(bytes == content(k), "{} read back wrong", k.display()),
                Err(e) => assert!(
                    e.is_not_found() && world.cover(k).is_some(),
                    "{}: {e}",
                    k.display()
                ),
            }
        }
        world.log.lock().unwrap().reads += 1;
        tokio::task::yield_now().await;
    }
}

async fn delete(world: &World, tenant: &str, job: Option<u32>) {
    let id = (tenant.to_string(), job.map(job_name).unwrap_or_default());
    // The store can only fence a job out under a token it has seen: wait
    // until every job the delete covers has staged something.
    let covered: Vec<String> = match job {
        Some(j) => vec![job_name(j)],
        None => (0..JOBS).map(job_name).collect(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !covered.iter().all(|j| {
        world
            .log
            .lock()
            .unwrap()
            .opened
            .contains_key(&(tenant.to_string(), j.clone()))
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "no writer of {tenant} ever opened a part"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let start = world.tick();
    world
        .log
        .lock()
        .unwrap()
        .deletes
        .insert(id.clone(), (start, None));
    match job {
        Some(j) => world
            .store
            .delete_job_outputs(
                &TenantContext::new(TenantId::new(tenant)),
                &ExportJobId::from(job_name(j)),
            )
            .await
            .unwrap(),
        None => world.store.delete_tenant_outputs(tenant).await.unwrap(),
    }
    let end = world.tick();
    world
        .log
        .lock()
        .unwrap()
        .deletes
        .insert(id, (start, Some(end)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zombies_live_workers_readers_and_deletes_race_and_nothing_wrong_is_ever_served() {
    let mut rng = faultkit::Rng::from_env("stress");
    let store = SqliteOutputStore::temporary_with(
        "http://hfs.test",
        StoreOptions::default()
            .with_chunk_size(1024)
            .with_pool_size(4),
    )
    .unwrap();
    let world = Arc::new(World {
        store: store.clone(),
        clock: AtomicU64::new(1),
        log: Mutex::new(Log::default()),
        writers_done: AtomicBool::new(false),
    });
    let readers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(reader(world.clone(), rng.next())))
        .collect();
    let mut writers = Vec::new();
    for tenant in TENANTS {
        for job in 0..JOBS {
            for token in [ZOMBIE, LIVE] {
                writers.push(tokio::spawn(worker(
                    world.clone(),
                    tenant,
                    job,
                    token,
                    rng.next(),
                )));
            }
        }
    }
    // A cancel while the job is being written, a purge mid-flight.
    let cancel_after = Duration::from_millis(20 + rng.below(80));
    let purge_after = Duration::from_millis(50 + rng.below(150));
    let w = world.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(cancel_after).await;
        delete(&w, CANCELLED.0, Some(CANCELLED.1)).await;
    });
    let w = world.clone();
    let purger = tokio::spawn(async move {
        tokio::time::sleep(purge_after).await;
        delete(&w, PURGED, None).await;
    });
    for w in writers {
        w.await.unwrap();
    }
    canceller.await.unwrap();
    purger.await.unwrap();
    // Finished jobs are downloaded, then deleted, while readers still run.
    delete(&world, "t1", Some(0)).await;
    delete(&world, "t1", Some(1)).await;
    world.writers_done.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }

    // Judge the end state.
    let log = std::mem::take(&mut *world.log.lock().unwrap());
    let (mut present, mut gone) = (0, 0);
    for (k, (began, returned)) in &log.finalized {
        let cover = log
            .deletes
            .iter()
            .filter(|((t, j), _)| t == &k.tenant_id && (j.is_empty() || j == k.job_id.as_str()))
            .map(|(_, d)| *d)
            .min();
        let r = read_part(&store, k).await;
        if k.fencing_token == ZOMBIE && cover.is_some() {
            // Whatever the timing, a zombie part never outlives the delete
            // of its job: finished before it, it went with the job; staged
            // across it, its finalize failed; opened after it, it was
            // fenced out.
            assert!(
                r.unwrap_err().is_not_found(),
                "a zombie part {} outlived the delete of its job",
                k.display()
            );
            gone += 1;
            continue;
        }
        match cover {
            Some((start, Some(_))) if *returned < start => {
                assert!(
                    r.unwrap_err().is_not_found(),
                    "{} outlived its delete",
                    k.display()
                );
                gone += 1;
            }
            Some((_, Some(end))) if *began > end => {
                assert!(r.unwrap() == content(k), "{}", k.display());
                present += 1;
            }
            Some(_) => match r {
                // Raced with the delete: either outcome, never wrong bytes.
                Ok(bytes) => assert!(bytes == content(k), "{}", k.display()),
                Err(e) => assert!(e.is_not_found(), "{e}"),
            },
            None => {
                assert!(r.unwrap() == content(k), "{} read back wrong", k.display());
                present += 1;
            }
        }
    }
    // Every live slot still standing serves the live part, and pruning the
    // zombies' leftovers keeps it.
    for (t, j, ty, idx) in log.live_done.keys() {
        let probe = key(t, j, ty, *idx, 0);
        let deleted = log
            .deletes
            .keys()
            .any(|(dt, dj)| dt == t && (dj.is_empty() || dj == j));
        if !deleted {
            assert_eq!(
                store.latest_in_slot(&probe).await.unwrap().fencing_token,
                LIVE
            );
        }
    }
    let mut pruned = 0;
    for t in TENANTS {
        for j in 0..JOBS {
            pruned += store
                .prune_superseded(
                    &TenantContext::new(TenantId::new(t)),
                    &ExportJobId::from(job_name(j)),
                )
                .await
                .unwrap();
        }
    }
    assert_eq!(
        store
            .reclaim_abandoned(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    let census = faultkit::census(store.path());
    assert_eq!((census.staged_parts, census.orphan_chunks), (0, 0));
    let report = store.verify().await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(faultkit::integrity_check(store.path()), "ok");
    // No zombie part is left in a deleted job, staged or finished.
    for (k, _) in faultkit::part_rows(store.path()) {
        let deleted = log.deletes.keys().any(|(dt, dj)| {
            dt == &k.tenant_id && (dj.is_empty() || dj.as_str() == k.job_id.as_str())
        });
        assert!(
            !(deleted && k.fencing_token == ZOMBIE),
            "an orphan of a zombie survived the delete of its job: {}",
            k.display()
        );
    }
    println!(
        "stress: {} parts finalized ({} by zombies before the live worker; {} zombie attempts \
         refused, {} of them by a deleted job's fence mark), {present} read back exactly, \
         {gone} removed by deletes, {} reads during the race, {pruned} superseded parts pruned, \
         {} parts verified",
        log.finalized.len(),
        log.zombie_published,
        log.zombie_refused,
        log.zombie_fenced_by_delete,
        log.reads,
        report.parts_checked
    );
    assert!(log.zombie_refused > 0, "the zombies never lost a race");
    assert!(log.reads > 10, "the readers hardly ran");
}
