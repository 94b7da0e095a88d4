//! `StoreOptions::with_finalize_timings` and
//! `SqliteOutputStore::take_finalize_timings`: where each `finalize_part`
//! spent its time, stage by stage.

use std::time::{Duration, Instant};

use sqlite_export_store::{
    ExportJobId, ExportOutputStore, ExportPartKey, FinalizeTiming, SqliteOutputStore, StoreOptions,
};

fn key(index: u32) -> ExportPartKey {
    ExportPartKey::output("acme", ExportJobId::from("job"), "Observation", index, 1)
}

/// About 1.5 MB of NDJSON written as HFS's export worker writes a batch:
/// every line at once, then `finalize_part`; returns the time the call took.
async fn hfs_part(store: &SqliteOutputStore, index: u32) -> Duration {
    let lines: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"resourceType":"Observation","id":"o-{index}-{i}","status":"final","valueQuantity":{{"value":{i},"unit":"mg"}},"note":"{}"}}"#,
                "x".repeat(1400 + (i % 7) * 13)
            )
        })
        .collect();
    let mut w = store.open_writer(&key(index)).await.unwrap();
    for line in &lines {
        w.write_line(line).await.unwrap();
    }
    let t = Instant::now();
    store.finalize_part(&key(index), w).await.unwrap();
    t.elapsed()
}

fn stages(t: &FinalizeTiming) -> Duration {
    t.compress + t.store_chunks + t.hand_off + t.statements + t.commit + t.reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_finalize_is_broken_down_into_stages_that_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::default().with_finalize_timings(true);
    let store =
        SqliteOutputStore::open_with(dir.path().join("s.db"), "http://hfs.test", options).unwrap();
    let mut took = Vec::new();
    for i in 0..3 {
        took.push(hfs_part(&store, i).await);
    }
    let timings = store.take_finalize_timings();
    assert_eq!(timings.len(), 3, "{timings:#?}");
    for (t, outside) in timings.iter().zip(&took) {
        assert_eq!(stages(t), t.total, "{t:#?}");
        assert!(t.total <= *outside, "{t:#?} measured {outside:?} outside");
        // A durable commit writes and syncs the log: never free.
        assert!(t.commit > Duration::ZERO, "{t:#?}");
        // 1.5 MB written at once leave most of a chunk to compress.
        assert!(t.compress > Duration::ZERO, "{t:#?}");
    }
    assert!(store.take_finalize_timings().is_empty(), "taken once");
    // Clones share one record.
    hfs_part(&store.clone(), 3).await;
    assert_eq!(store.take_finalize_timings().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_recorded_unless_asked_or_when_a_finalize_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteOutputStore::open(dir.path().join("off.db"), "http://hfs.test").unwrap();
    hfs_part(&store, 0).await;
    assert!(store.take_finalize_timings().is_empty());

    let options = StoreOptions::default().with_finalize_timings(true);
    let store =
        SqliteOutputStore::open_with(dir.path().join("on.db"), "http://hfs.test", options).unwrap();
    // A writer that reports more bytes than it wrote is refused.
    let mut w = store.open_writer(&key(0)).await.unwrap();
    w.write_line(r#"{"resourceType":"Observation","id":"a"}"#)
        .await
        .unwrap();
    w.byte_count += 1;
    let e = store.finalize_part(&key(0), w).await.unwrap_err();
    assert!(e.to_string().contains("incomplete"), "{e}");
    assert!(store.take_finalize_timings().is_empty());
    // finalize_parts publishes in one commit for many parts: not broken
    // down per part.
    let mut w = store.open_writer(&key(1)).await.unwrap();
    w.write_line(r#"{"resourceType":"Observation","id":"b"}"#)
        .await
        .unwrap();
    store.finalize_parts(vec![(key(1), w)]).await.unwrap();
    assert!(store.take_finalize_timings().is_empty());
}
