//! The store beside its baselines, on the same bytes, in the same run.
//!
//! Groups (each with its ceiling and HFS's local-filesystem way of writing):
//! - `write_one_part/{synthea,synthetic}-64MiB`: one part through
//!   `write_line`, versus the store's codec alone on one thread (the
//!   ceiling) and `LocalFsOutputStore` without and with fsync. Set
//!   `EXPORT_STORE_BENCH_LARGE=1` to add 512 MiB parts.
//! - `write_concurrent/{2,4,16}-parts`: 64 MiB split over parts written at
//!   once, a task each, line by line (as HFS's export workers write),
//!   versus every core compressing the same chunks (each thread its own
//!   share and context: the ceiling) and one core doing it all.
//! - `read_one_part/synthea-64MiB`: the store's reader versus the codec's
//!   decompression alone and reading the file.
//! - `hfs_small_part`: open, 1,000 resources, finalize; one part per
//!   iteration, so criterion's distribution is the latency distribution.
//! - `hfs_finalize`: the same parts written as HFS 0.2.7's export worker
//!   writes them (every line made before the writer opens, then written at
//!   once, and `finalize_part` given the open writer), timing only what
//!   that worker waits for: the last line written to `finalize_part`
//!   returned.
//! - `delete_job_outputs/1000-parts`: the setup (filling the job) is not
//!   timed.
//!
//! Data: the Synthea sample (`$EXPORT_STORE_SYNTHEA`, default the sample
//! vendored in `data/synthea-10-patients`) repeated to size, and the
//! synthetic generator's output. The machine these run on is small and
//! shared, so samples are few and short; `export-store bench` prints the
//! same comparisons as one table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use sqlite_export_store::{ExportJobId, StoreOptions, DEFAULT_CHUNK_SIZE};
use tokio::runtime::Runtime;

#[path = "../src/bin/export-store/bench/workload.rs"]
#[allow(dead_code)]
mod workload;

use workload::{
    codec_parallel, codec_run, delete_job, discard, fill_job, hfs_parts, key, read_part, settle,
    write_concurrently, write_part, write_part_timed, Contenders, Corpus, PartTimes, Producer,
    Which, HFS_BATCH, READ_BUFFER,
};

const MIB: u64 = 1 << 20;
const LEVEL: i32 = 3;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

fn contenders() -> Contenders {
    Contenders::open(&std::env::temp_dir(), StoreOptions::default()).expect("open the stores")
}

fn corpora() -> Vec<Arc<Corpus>> {
    let mut out = Vec::new();
    match workload::synthea_dir(None).and_then(|d| Corpus::synthea(d.path())) {
        Ok(c) => out.push(Arc::new(c)),
        Err(e) => eprintln!("no Synthea sample ({e}); synthetic data only"),
    }
    out.push(Arc::new(Corpus::synthetic(42, 16 << 20)));
    out
}

fn label(w: Which) -> &'static str {
    match w {
        Which::Store => "store",
        Which::Fs => "local_fs",
        Which::FsSync => "local_fs_fsync",
    }
}

fn write_one_part(c: &mut Criterion) {
    let rt = runtime();
    let stores = contenders();
    let mut sizes = vec![64 * MIB];
    if std::env::var_os("EXPORT_STORE_BENCH_LARGE").is_some() {
        sizes.push(512 * MIB);
    }
    let mut g = c.benchmark_group("write_one_part");
    g.sampling_mode(SamplingMode::Flat);
    for corpus in corpora() {
        for &size in &sizes {
            let part = corpus.part_of_size(size);
            let id = format!("{}-{}MiB", corpus.name, size / MIB);
            g.throughput(Throughput::BytesDecimal(part.bytes()));
            g.bench_function(format!("{id}/zstd3_compress_1thread"), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| codec_run(&part, DEFAULT_CHUNK_SIZE, LEVEL, false).compress)
                        .sum()
                })
            });
            for w in [Which::Store, Which::Fs, Which::FsSync] {
                let (stores, part) = (&stores, &part);
                g.bench_function(format!("{id}/{}", label(w)), |b| {
                    b.to_async(&rt).iter_custom(|iters| async move {
                        let job = ExportJobId::new();
                        let mut spent = Duration::ZERO;
                        for i in 0..iters {
                            settle();
                            let t = Instant::now();
                            write_part(stores.get(w), &key(&job, i as u32), part)
                                .await
                                .unwrap();
                            spent += t.elapsed();
                            discard(stores, w, &job).await.unwrap();
                        }
                        spent
                    })
                });
            }
        }
    }
    g.finish();
}

fn write_concurrent(c: &mut Criterion) {
    let rt = runtime();
    let stores = contenders();
    let corpus = corpora().remove(0);
    let mut g = c.benchmark_group("write_concurrent");
    g.sampling_mode(SamplingMode::Flat);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for n in [2usize, 4, 16] {
        let parts: Vec<_> = (0..n)
            .map(|i| corpus.part_of_size_from(i * corpus.line_count() / n, 64 * MIB / n as u64))
            .collect();
        g.throughput(Throughput::BytesDecimal(
            parts.iter().map(|p| p.bytes()).sum(),
        ));
        let id = format!("{}-parts-{}", n, corpus.name);
        for t in [threads, 1] {
            let parts = &parts;
            g.bench_function(format!("{id}/zstd3_compress_{t}thread"), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| codec_parallel(parts, DEFAULT_CHUNK_SIZE, LEVEL, t))
                        .sum()
                })
            });
        }
        for w in [Which::Store, Which::Fs, Which::FsSync] {
            let (stores, parts) = (&stores, &parts);
            g.bench_function(format!("{id}/{}", label(w)), |b| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        settle();
                        let (d, job) = write_concurrently(stores.shared(w), parts).await.unwrap();
                        spent += d;
                        discard(stores, w, &job).await.unwrap();
                    }
                    spent
                })
            });
        }
    }
    g.finish();
}

fn read_one_part(c: &mut Criterion) {
    let rt = runtime();
    let stores = contenders();
    let corpus = corpora().remove(0);
    let part = corpus.part_of_size(64 * MIB);
    let job = ExportJobId::new();
    let k = key(&job, 0);
    rt.block_on(async {
        for w in [Which::Store, Which::Fs] {
            write_part(stores.get(w), &k, &part).await.unwrap();
        }
    });
    let mut g = c.benchmark_group("read_one_part");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::BytesDecimal(part.bytes()));
    let id = format!("{}-64MiB", corpus.name);
    g.bench_function(format!("{id}/zstd_decompress_1thread"), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| codec_run(&part, DEFAULT_CHUNK_SIZE, LEVEL, true).decompress)
                .sum()
        })
    });
    for w in [Which::Store, Which::Fs] {
        let (stores, k, bytes) = (&stores, &k, part.bytes());
        g.bench_function(format!("{id}/{}", label(w)), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut buf = vec![0u8; READ_BUFFER];
                let t = Instant::now();
                for _ in 0..iters {
                    let n = read_part(stores.get(w), k, &mut buf).await.unwrap();
                    assert_eq!(n, bytes);
                }
                t.elapsed()
            })
        });
    }
    g.finish();
}

fn hfs_small_part(c: &mut Criterion) {
    per_hfs_part(c, "hfs_small_part", Producer::Flat, |t| t.total);
}

fn hfs_finalize(c: &mut Criterion) {
    per_hfs_part(c, "hfs_finalize", Producer::Hfs, |t| t.finalize);
}

/// One HFS-sized part (1,000 resources) per iteration in each store, so
/// that criterion's distribution is the latency distribution; `counted`
/// picks what of each part's times is measured.
fn per_hfs_part(
    c: &mut Criterion,
    group: &str,
    producer: Producer,
    counted: fn(PartTimes) -> Duration,
) {
    let rt = runtime();
    let stores = contenders();
    let corpus = corpora().remove(0);
    let parts = hfs_parts(&corpus, 64, HFS_BATCH);
    let mut g = c.benchmark_group(group);
    g.measurement_time(Duration::from_secs(3));
    for w in [Which::Store, Which::FsSync, Which::Fs] {
        let (stores, parts) = (&stores, &parts);
        g.bench_function(format!("1000-resources/{}", label(w)), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let job = ExportJobId::new();
                let mut spent = Duration::ZERO;
                for i in 0..iters {
                    let p = &parts[i as usize % parts.len()];
                    let k = key(&job, i as u32);
                    let t = write_part_timed(stores.get(w), &k, p, producer)
                        .await
                        .unwrap();
                    spent += counted(t);
                }
                spent
            })
        });
    }
    g.finish();
}

fn delete_job_outputs(c: &mut Criterion) {
    const PARTS: usize = 1000;
    const LINES: usize = 100;
    let rt = runtime();
    let stores = contenders();
    let corpus = corpora().remove(0);
    let mut g = c.benchmark_group("delete_job_outputs");
    // Filling a job takes seconds (a durable finalize per part) and is not
    // timed: one warm-up run and one deletion per sample.
    g.sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    for w in [Which::Store, Which::Fs] {
        let (stores, corpus) = (&stores, &corpus);
        g.bench_function(format!("{PARTS}-parts/{}", label(w)), |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let job = fill_job(stores.get(w), corpus, PARTS, LINES).await.unwrap();
                    let t = Instant::now();
                    delete_job(stores.get(w), &job).await.unwrap();
                    spent += t.elapsed();
                }
                spent
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = config();
    targets = write_one_part, write_concurrent, read_one_part, hfs_small_part, hfs_finalize,
        delete_job_outputs
}
criterion_main!(benches);
