//! The model of lossyfs, the file system of the power-cut tests
//! (`tests/lossyfs/`): what survives a cut is exactly what was synced.
//!
//! - synced data survives; unsynced data, truncations and removals do not;
//! - a file created and synced, in a folder not synced, is gone after a
//!   cut; one whose entry was synced but not its data is there, empty;
//! - a rename survives only once its folder is synced;
//! - `fdatasync` persists data and size;
//! - reads see the volatile layer; after a cut every operation fails;
//! - with tearing, a cut keeps a prefix of whole 4 KiB blocks of the last
//!   unsynced write; with syncs ignored, nothing survives.
//!
//! `cargo test --features powercut-tests --test lossyfs_model` (after
//! `bash .ci/lossyfs.sh`).
#![cfg(feature = "powercut-tests")]

mod lossyfs;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use lossyfs::{Options, Place};

fn sync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn read(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// Bytes that differ from block to block, so that a misplaced block shows.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 4096) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

#[test]
fn synced_data_survives_a_cut_and_unsynced_data_does_not() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    let a = pattern(1, 20_000);
    let mut f = File::create(fs.path("a")).unwrap();
    f.write_all(&a).unwrap();
    f.sync_all().unwrap();
    sync_dir(&fs.mountpoint);
    // Then, unsynced: an overwrite, an append, a file never synced.
    f.write_all_at(&pattern(9, 5000), 4096).unwrap();
    f.write_all_at(b"tail", 20_000).unwrap();
    std::fs::write(fs.path("b"), b"never synced").unwrap();
    // Reads see the volatile layer.
    let mut seen = a.clone();
    seen[4096..9096].copy_from_slice(&pattern(9, 5000));
    seen.extend_from_slice(b"tail");
    assert_eq!(read(&fs.path("a")).unwrap(), seen);
    assert_eq!(read(&fs.path("b")).unwrap(), b"never synced");
    drop(f);

    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(
        read(&fs.path("a")).unwrap(),
        a,
        "synced data survives as it was"
    );
    assert_eq!(read(&fs.path("b")), None, "an unsynced file is gone");
    fs.unmount();
}

#[test]
fn unsynced_truncations_and_removals_are_undone() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    let a = pattern(2, 50_000);
    for name in ["shrunk", "removed"] {
        let mut f = File::create(fs.path(name)).unwrap();
        f.write_all(&a).unwrap();
        f.sync_all().unwrap();
    }
    sync_dir(&fs.mountpoint);
    // Shrink, then grow again: the cut bytes read back as zeros until a cut.
    let f = OpenOptions::new()
        .write(true)
        .open(fs.path("shrunk"))
        .unwrap();
    f.set_len(5000).unwrap();
    f.set_len(60_000).unwrap();
    let now = read(&fs.path("shrunk")).unwrap();
    assert_eq!(now.len(), 60_000);
    assert_eq!(&now[..5000], &a[..5000]);
    assert!(
        now[5000..].iter().all(|b| *b == 0),
        "truncated bytes read as zeros"
    );
    std::fs::remove_file(fs.path("removed")).unwrap();
    assert_eq!(read(&fs.path("removed")), None);
    drop(f);

    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("shrunk")).unwrap(), a);
    assert_eq!(
        read(&fs.path("removed")).unwrap(),
        a,
        "an unsynced unlink is undone"
    );
    // A truncation that is synced holds.
    let f = OpenOptions::new()
        .write(true)
        .open(fs.path("shrunk"))
        .unwrap();
    f.set_len(7000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("shrunk")).unwrap(), &a[..7000]);
    fs.unmount();
}

#[test]
fn a_created_file_whose_folder_was_not_synced_is_gone_after_a_cut() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    std::fs::create_dir(fs.path("sub")).unwrap();
    sync_dir(&fs.mountpoint);
    // Data synced, folder not: gone.
    let mut f = File::create(fs.path("sub/data-only")).unwrap();
    f.write_all(b"synced data").unwrap();
    f.sync_all().unwrap();
    drop(f);
    // Folder synced, data not: there, empty.
    std::fs::write(fs.path("entry-only"), b"unsynced data").unwrap();
    // Both: there, whole.
    let mut f = File::create(fs.path("both")).unwrap();
    f.write_all(b"both synced").unwrap();
    f.sync_all().unwrap();
    drop(f);
    sync_dir(&fs.mountpoint);

    let fs = place.cut_and_remount(fs, Options::default());
    assert!(fs.path("sub").is_dir(), "a synced mkdir survives");
    assert_eq!(read(&fs.path("sub/data-only")), None);
    assert_eq!(read(&fs.path("entry-only")).unwrap(), b"");
    assert_eq!(read(&fs.path("both")).unwrap(), b"both synced");
    // Syncing the subfolder now makes a new file in it durable.
    let mut f = File::create(fs.path("sub/later")).unwrap();
    f.write_all(b"later").unwrap();
    f.sync_all().unwrap();
    sync_dir(&fs.path("sub"));
    drop(f);
    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("sub/later")).unwrap(), b"later");
    fs.unmount();
}

#[test]
fn a_rename_survives_only_after_its_folder_is_synced() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    for (name, body) in [("a", "old a"), ("target", "old target")] {
        let mut f = File::create(fs.path(name)).unwrap();
        f.write_all(body.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }
    sync_dir(&fs.mountpoint);
    // The publish-by-rename pattern without the folder's sync.
    let mut f = File::create(fs.path("tmp")).unwrap();
    f.write_all(b"new target").unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(fs.path("tmp"), fs.path("target")).unwrap();
    std::fs::rename(fs.path("a"), fs.path("b")).unwrap();
    assert_eq!(read(&fs.path("target")).unwrap(), b"new target");

    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("target")).unwrap(), b"old target");
    assert_eq!(read(&fs.path("a")).unwrap(), b"old a");
    assert_eq!(read(&fs.path("b")), None);
    assert_eq!(read(&fs.path("tmp")), None);

    // The same with the folder synced: the renames hold.
    let mut f = File::create(fs.path("tmp")).unwrap();
    f.write_all(b"new target").unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(fs.path("tmp"), fs.path("target")).unwrap();
    std::fs::rename(fs.path("a"), fs.path("b")).unwrap();
    sync_dir(&fs.mountpoint);
    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("target")).unwrap(), b"new target");
    assert_eq!(read(&fs.path("b")).unwrap(), b"old a");
    assert_eq!(read(&fs.path("a")), None);
    assert_eq!(read(&fs.path("tmp")), None);
    fs.unmount();
}

#[test]
fn fdatasync_persists_data_and_size() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    let mut f = File::create(fs.path("log")).unwrap();
    f.write_all(&pattern(3, 10_000)).unwrap();
    f.sync_all().unwrap();
    sync_dir(&fs.mountpoint);
    // Grows the file and overwrites its middle; fdatasync only.
    f.write_all_at(&pattern(4, 30_000), 6000).unwrap();
    f.sync_data().unwrap();
    let mut want = pattern(3, 10_000);
    want.truncate(6000);
    want.extend_from_slice(&pattern(4, 30_000));
    // Unsynced after it: lost.
    f.write_all_at(b"lost", 100).unwrap();
    drop(f);

    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("log")).unwrap(), want);
    fs.unmount();
}

#[test]
fn a_file_removed_while_open_keeps_working_until_closed() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fs.path("open"))
        .unwrap();
    f.write_all(b"still here").unwrap();
    f.sync_all().unwrap();
    sync_dir(&fs.mountpoint);
    std::fs::remove_file(fs.path("open")).unwrap();
    assert_eq!(read(&fs.path("open")), None);
    f.write_all(b", and more").unwrap();
    f.set_len(15).unwrap();
    f.sync_all().unwrap();
    let mut back = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "still here, and");
    drop(f);
    // The unlink was not synced: the name comes back, with the data synced
    // through the open file after the unlink (the same inode).
    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("open")).unwrap(), b"still here, and");
    fs.unmount();
}

#[test]
fn after_a_cut_every_operation_fails() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    let mut f = File::create(fs.path("a")).unwrap();
    f.write_all(b"x").unwrap();
    let at = fs.cut();
    assert!(at.contains("on request"), "{at}");
    assert!(f.write_all(b"y").is_err());
    assert!(f.sync_all().is_err(), "an fsync after the cut must fail");
    assert!(std::fs::read_dir(&fs.mountpoint).is_err());
    assert!(File::create(fs.path("b")).is_err());
    drop(f);
    fs.unmount();
}

#[test]
fn an_armed_cut_lands_on_the_chosen_operation() {
    let place = Place::new();
    let fs = place.mount(Options::default());
    let mut f = File::create(fs.path("x.db-wal")).unwrap();
    sync_dir(&fs.mountpoint);
    fs.arm("fsync", "-wal", 2, false);
    f.write_all(b"one").unwrap();
    f.sync_all().unwrap();
    f.write_all(b"two").unwrap();
    assert!(f.sync_all().is_err(), "the second fsync meets the cut");
    let at = fs.cut_at().unwrap();
    assert!(at.starts_with("before fsync x.db-wal"), "{at}");
    drop(f);
    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("x.db-wal")).unwrap(), b"one");
    // `after`: the operation completes, then the power goes.
    let mut f = OpenOptions::new()
        .append(true)
        .open(fs.path("x.db-wal"))
        .unwrap();
    fs.arm("fsync", "-wal", 1, true);
    f.write_all(b"three").unwrap();
    f.sync_all().unwrap();
    assert!(fs.cut_at().unwrap().starts_with("after fsync"));
    drop(f);
    let fs = place.cut_and_remount(fs, Options::default());
    assert_eq!(read(&fs.path("x.db-wal")).unwrap(), b"onethree");
    fs.unmount();
}

#[test]
fn a_torn_write_keeps_a_prefix_of_whole_blocks() {
    let old = pattern(5, 64 * 1024);
    let new = pattern(6, 64 * 1024);
    let mut kept = std::collections::BTreeSet::new();
    for seed in 0..6 {
        let place = Place::new();
        let options = Options {
            tear: true,
            seed,
            ..Options::default()
        };
        let fs = place.mount(options);
        let mut f = File::create(fs.path("f")).unwrap();
        f.write_all(&old).unwrap();
        f.sync_all().unwrap();
        sync_dir(&fs.mountpoint);
        // One unsynced write of 15 blocks from an unaligned offset, and an
        // earlier unsynced one that is never torn in: only the last tears.
        f.write_all_at(b"earlier", 0).unwrap();
        f.write_all_at(&new[..15 * 4096], 1000).unwrap();
        drop(f);
        let fs = place.cut_and_remount(fs, options);
        let got = read(&fs.path("f")).unwrap();
        assert_eq!(got.len(), old.len());
        assert_eq!(&got[..1000], &old[..1000], "the earlier write is lost");
        // got = old, with new[..k] at 1000 where 1000 + k is a block
        // boundary (or k is 0 or the whole write).
        let k = (0..=15 * 4096)
            .rev()
            .find(|&k| got[1000..1000 + k] == new[..k] && got[1000 + k..] == old[1000 + k..])
            .expect("the file is the old content with a prefix of the write");
        assert!(
            k == 0 || k == 15 * 4096 || (1000 + k) % 4096 == 0,
            "torn at {k}, not at a block boundary"
        );
        kept.insert(k);
        fs.unmount();
    }
    assert!(kept.len() > 1, "tearing keeps different prefixes: {kept:?}");
}

#[test]
fn with_syncs_ignored_nothing_survives() {
    let place = Place::new();
    let options = Options {
        ignore_fsync: true,
        ..Options::default()
    };
    let fs = place.mount(options);
    let mut f = File::create(fs.path("a")).unwrap();
    f.write_all(b"synced, but in vain").unwrap();
    f.sync_all().unwrap();
    sync_dir(&fs.mountpoint);
    drop(f);
    let fs = place.cut_and_remount(fs, options);
    assert_eq!(read(&fs.path("a")), None);
    fs.unmount();
}

#[test]
fn sqlite_in_wal_mode_keeps_what_it_committed_with_full_sync() {
    // Two connections (so the -shm is shared through mmap), WAL mode, every
    // commit synced: each committed row survives the cut.
    let place = Place::new();
    let fs = place.mount(Options::default());
    let db = fs.path("t.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
        .unwrap();
    c.pragma_update(None, "synchronous", "FULL").unwrap();
    c.execute_batch("CREATE TABLE t (n INTEGER, b BLOB)")
        .unwrap();
    let d = rusqlite::Connection::open(&db).unwrap();
    for n in 0..200 {
        c.execute("INSERT INTO t VALUES (?1, randomblob(3000))", [n])
            .unwrap();
    }
    let seen: i64 = d
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(seen, 200);
    // Unsynced: lost.
    c.pragma_update(None, "synchronous", "OFF").unwrap();
    c.execute("INSERT INTO t VALUES (-1, NULL)", []).unwrap();
    let at = fs.cut();
    drop((c, d));
    fs.unmount();
    let fs = place.mount(Options::default());
    let c = rusqlite::Connection::open(fs.path("t.db")).unwrap();
    let (n, max): (i64, i64) = c
        .query_row("SELECT count(*), max(n) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((n, max), (200, 199), "cut {at}");
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    drop(c);
    fs.unmount();
}
