//! Chunk workers: one thread per core, shared by every store of the
//! process, that run the CPU-heavy work on chunks in the order it was
//! submitted: part writers' jobs (hash, compress, queue for the store's
//! writer thread) and readers' jobs (fetch with a connection that is free
//! at once, decompress, hash).
//!
//! A fixed set of workers instead of Tokio's blocking pool: with many
//! parts written at once, the blocking pool held a thread per chunk in
//! flight, and those threads woke each other up to take turns at the
//! cores; here at most one job per core runs, the others wait in one queue
//! without a thread each.
//!
//! Workers are started when jobs first need them and live as long as the
//! process (they hold nothing of a store between jobs). A job that panics
//! does not take its worker down: the panic is caught and the job's
//! captured state is dropped, which a job's submitter sees as a closed
//! channel. A job never waits for a store: a chunk whose store's writer
//! thread has a full queue waits for room on Tokio's blocking pool instead
//! (`Db::queue_chunk`), so one slow store cannot hold the workers other
//! stores need.
//!
//! Measured against Tokio's blocking pool with a turn per core
//! (`export-store bench --groups concurrent,write`, 13 alternating rounds;
//! `--memory-gib 1`, 6): one 64 MiB part 0.85x -> 0.91x of one-core zstd,
//! 4 parts 0.84x -> 0.96x, 16 parts 0.82x -> 0.86x, and a 1 GiB part
//! 809 -> 960 MB/s with 6% less CPU: mostly the wake-up of a blocking
//! thread per chunk saved. Readers moved onto the same workers measured
//! 0.61-0.67x -> 0.74-0.98x of one-core decompression on the Synthea part
//! (`bench --groups read --reps 11`, 3 alternating rounds).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use tokio::runtime::Handle;
use tokio::sync::Semaphore;

/// One unit of work for a compression worker.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

struct State {
    jobs: VecDeque<Job>,
    /// Workers started.
    workers: usize,
    /// Workers waiting for a job.
    idle: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    jobs: VecDeque::new(),
    workers: 0,
    idle: 0,
});
static JOB_QUEUED: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Workers at most: the cores available to the process.
fn max_workers() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
}

/// Writer chunks per worker that may be handed over at once, process-wide.
const SLOTS_PER_WORKER: usize = 3;

/// The slots of writer chunks that are being compressed or wait for a
/// worker, shared by every writer of every store of the process (a
/// writer's own limit, `in_flight_chunks`, applies within them). A writer
/// takes one before it hands a chunk over, in turn (the semaphore is
/// fair), and the chunk's job gives it back once the chunk is compressed
/// and queued for its store: never later, so a store that is slow to store
/// holds no slot that another store's writers need. Three per worker: one
/// being compressed and two waiting, so a worker that finishes finds the
/// next chunk ready however the writers take turns, while the raw chunks in
/// flight stay a few per core, however many parts are written at once.
pub(crate) fn writer_slots() -> &'static Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS.get_or_init(|| Arc::new(Semaphore::new(SLOTS_PER_WORKER * max_workers())))
}

/// Runs `job` on a compression worker, after the jobs submitted before it.
/// If no worker can be started (the system refuses a thread), it runs on
/// `fallback`'s blocking pool instead. A panic in `job` is caught; the job's
/// captured state is dropped either way.
pub(crate) fn submit(job: Job, fallback: &Handle) {
    let mut s = state();
    if s.idle == 0 && s.workers < max_workers() {
        let started = std::thread::Builder::new()
            .name("export-store-compress".into())
            .spawn(work);
        match started {
            Ok(_) => s.workers += 1,
            Err(_) if s.workers == 0 => {
                drop(s);
                fallback.spawn_blocking(move || run(job));
                return;
            }
            // The workers already running will get to it.
            Err(_) => {}
        }
    }
    s.jobs.push_back(job);
    let wake = s.idle > 0;
    drop(s);
    if wake {
        JOB_QUEUED.notify_one();
    }
}

fn run(job: Job) {
    let _ = catch_unwind(AssertUnwindSafe(job));
}

/// A worker's life: take the oldest job, run it, again.
fn work() {
    loop {
        let job = {
            let mut s = state();
            loop {
                if let Some(job) = s.jobs.pop_front() {
                    break job;
                }
                s.idle += 1;
                s = JOB_QUEUED.wait(s).unwrap_or_else(|p| p.into_inner());
                s.idle -= 1;
            }
        };
        run(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn jobs_run_and_a_panicking_job_keeps_its_worker() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        // More panicking jobs than workers: every worker survives them.
        for _ in 0..max_workers() * 2 {
            let tx = tx.clone();
            submit(
                Box::new(move || {
                    let _keep = tx;
                    panic!("a chunk job failed");
                }),
                rt.handle(),
            );
        }
        for i in 0..100 {
            let tx = tx.clone();
            submit(Box::new(move || tx.send(i).unwrap()), rt.handle());
        }
        drop(tx);
        let mut got: Vec<i32> = rx.iter().collect();
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert!(state().workers <= max_workers());
    }
}
