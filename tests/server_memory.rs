//! Fifty concurrent downloads of a large part under a memory bound. Alone
//! in its test binary, so that no other test's allocations move the
//! process's resident size while it is measured.
#![cfg(feature = "server")]

mod server_support;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use server_support::*;
use sqlite_export_store::server::ServerConfig;
use sqlite_export_store::StoreOptions;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_downloads_of_a_large_part_stay_within_a_memory_bound() {
    const DOWNLOADS: usize = 50;
    let s = serve(
        StoreOptions::default().with_chunk_size(64 * 1024),
        ServerConfig::new(),
    )
    .await;
    let data = ndjson_of(4 << 20);
    let k = key("default", "large", 0, 1);
    let info = put(&s.store, &k, &data).await;
    let url = url_of(&s, &k).await;
    // Warm up allocator and connection set-up with one download.
    assert_eq!(s.get(&url, &[]).await.2.len(), data.len());
    drop(data);
    let before = rss_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Every download starts before any is read further, so a server that
    // buffered parts would hold all fifty at once.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(DOWNLOADS));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..DOWNLOADS {
        let (http, url, barrier) = (s.http.clone(), url.clone(), barrier.clone());
        let accept = if i % 5 == 0 { "zstd" } else { "identity" };
        tasks.push(tokio::spawn(async move {
            let mut r = http
                .get(&url)
                .header("accept-encoding", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let mut hash = twox_hash::XxHash3_128::new();
            let mut n = 0u64;
            let first = r.chunk().await.unwrap().unwrap();
            barrier.wait().await;
            hash.write(&first);
            n += first.len() as u64;
            while let Some(c) = r.chunk().await.unwrap() {
                hash.write(&c);
                n += c.len() as u64;
            }
            (accept, n, hash.finish_128())
        }));
    }
    let mut wire = 0;
    for t in tasks {
        let (accept, n, digest) = t.await.unwrap();
        if accept == "identity" {
            assert_eq!(n, info.size_bytes);
            assert_eq!(format!("{digest:032x}"), info.digest);
        } else {
            assert_eq!(n, info.stored_bytes);
        }
        wire += n;
    }
    let elapsed = started.elapsed();
    sampler.abort();
    let growth = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    let buffered_all = DOWNLOADS as u64 * info.size_bytes;
    println!(
        "{DOWNLOADS} downloads of {} MiB: {:.0} MiB on the wire in {elapsed:?}, RSS growth {:.1} MiB \
         (whole parts in memory would be {} MiB)",
        info.size_bytes >> 20,
        wire as f64 / (1 << 20) as f64,
        growth as f64 / (1 << 20) as f64,
        buffered_all >> 20
    );
    // Whole parts in memory would be 200 MiB; measured: about 20 MiB.
    assert!(
        growth < 64 << 20,
        "RSS grew by {} MiB during {DOWNLOADS} downloads",
        growth >> 20
    );
}
