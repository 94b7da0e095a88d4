//! `export-store bench` runs end to end on small sizes and prints the table
//! and the memory check a reader of the README is told to run.

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .arg("bench")
        .args([
            "--db-dir",
            dir.path().to_str().unwrap(),
            "--data",
            "synthetic",
        ])
        .args(args)
        .output()
        .expect("run export-store bench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing is left behind in the folder it was given.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{text}");
    text
}

#[test]
fn the_table_names_the_machine_every_contender_and_the_targets() {
    let groups = if cfg!(feature = "server") {
        "write,concurrent,read,small,serve"
    } else {
        "write,concurrent,read,small"
    };
    let text = bench(&[
        "--size-mib",
        "2",
        "--reps",
        "1",
        "--small-parts",
        "3",
        "--large-mib",
        "0",
        "--groups",
        groups,
    ]);
    for want in [
        "machine: ",
        "write 1 part, 2 MiB synthetic",
        "zstd-2 compress, 1 thread (ceiling)",
        "store (SQLite, zstd)",
        "local fs + fsync",
        "write 4 parts at once",
        "write 16 parts at once",
        "read 1 part",
        "zstd decompress, 1 thread (ceiling)",
        "HFS parts of 1,000 resources",
        "peak RSS of this run (VmHWM)",
        "targets:",
        "≥ 0.90× zstd-2 1 thread",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    if cfg!(feature = "server") {
        for want in [
            "serve 1 part over loopback HTTP, 2 MiB synthetic, 1 connection",
            "serve 1 part over loopback HTTP, 2 MiB synthetic, 4 connections at once",
            "same NDJSON from memory, same HTTP stack (ceiling)",
            "store, identity (frames decoded as sent)",
            "store, zstd pass-through (",
            "store, gzip on the fly (",
            "peak RSS before serve (its baseline holds the part)",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}

#[test]
fn the_memory_check_writes_reads_and_reports_peak_rss() {
    let text = bench(&["--memory-gib", "0.01"]);
    assert!(
        text.contains("peak RSS of the whole process (VmHWM)"),
        "{text}"
    );
    assert!(text.contains("wrote 0.01 GiB"), "{text}");
    assert!(text.contains("read it back"), "{text}");
}
