//! Fail points: named places on the write path where a test can make the
//! process die, to prove what survives a crash.
//!
//! They exist only with the `failpoints` feature (the crate's own tests turn
//! it on); without it `hit` is an empty inline function and nothing reads
//! the environment. With it, the variable `EXPORT_STORE_FAILPOINT` is read
//! once, at the first point reached:
//!
//! ```text
//! EXPORT_STORE_FAILPOINT=NAME[:N][:ACTION]
//! ```
//!
//! When the point `NAME` (one of [`POINTS`]) is reached for the `N`-th time
//! (default: the first), the process performs `ACTION`:
//!
//! - `abort` (default): `std::process::abort()`, with no destructor, no
//!   flush and no rollback, as in a crash;
//! - `pause`: writes `export-store failpoint NAME paused` on a line of its
//!   own straight to standard error and sleeps for ever, so that the test can
//!   `SIGKILL` the process at exactly that place.
//!
//! A value that does not parse, or names no known point, stops the process
//! with exit status 2 and a message, so that a typo in a test cannot pass
//! silently.

/// Every fail point, by name.
///
/// - `open_writer.before_commit`: the staged part row is inserted, not committed.
/// - `writer.chunk.inserted`: one chunk row of a batch is inserted, the
///   batch is not committed.
/// - `writer.batch.before_commit`: a batch of chunks is inserted, not committed.
/// - `writer.batch.after_commit`: a batch of chunks is committed, not acknowledged.
/// - `finalize.before_commit`: a group of finalizes passed their checks and
///   flagged their parts finished inside one transaction, not committed.
/// - `finalize.after_commit`: that transaction is committed (and synced),
///   and no `finalize_part` of the group has returned.
/// - `delete.before_commit` / `delete.after_commit`: a job or tenant delete,
///   around its commit.
/// - `reclaim.before_commit` / `reclaim.after_commit`: one batch of
///   `reclaim_abandoned`, around its commit.
/// - `prune.before_commit`: `prune_superseded` deleted, not committed.
/// - `vacuum.step`: between two steps of space reclamation.
pub const POINTS: &[&str] = &[
    "open_writer.before_commit",
    "writer.chunk.inserted",
    "writer.batch.before_commit",
    "writer.batch.after_commit",
    "finalize.before_commit",
    "finalize.after_commit",
    "delete.before_commit",
    "delete.after_commit",
    "reclaim.before_commit",
    "reclaim.after_commit",
    "prune.before_commit",
    "vacuum.step",
];

/// The environment variable that arms a fail point.
pub const ENV: &str = "EXPORT_STORE_FAILPOINT";

/// The environment variable that, with the `failpoints` feature, weakens
/// the durable commit (finalize): its value (`FULL`, `NORMAL` or `OFF`) is
/// the `PRAGMA synchronous` of that commit instead of `FULL`. The power-cut
/// tests set it to `OFF` to prove that they catch a store that skips the
/// finalize's fsync. Any other value stops the process with exit status 2.
pub const FINALIZE_SYNC_ENV: &str = "EXPORT_STORE_FINALIZE_SYNC";

/// The `PRAGMA synchronous` of the durable commit: `FULL`.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn finalize_sync() -> &'static str {
    "FULL"
}

/// The `PRAGMA synchronous` of the durable commit: `FULL`, unless
/// [`FINALIZE_SYNC_ENV`] says otherwise (read once).
#[cfg(feature = "failpoints")]
pub(crate) fn finalize_sync() -> &'static str {
    static LEVEL: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    LEVEL.get_or_init(|| match std::env::var(FINALIZE_SYNC_ENV).ok().as_deref() {
        None | Some("FULL") => "FULL",
        Some("NORMAL") => "NORMAL",
        Some("OFF") => "OFF",
        Some(other) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{FINALIZE_SYNC_ENV}={other:?}: expected FULL, NORMAL or OFF"
            );
            std::process::exit(2);
        }
    })
}

/// Marks the fail point `name`. Without the `failpoints` feature this does
/// nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &'static str) {}

/// Marks the fail point `name`: performs the armed action if this is the
/// armed point's armed hit. Costs one atomic load when nothing is armed.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &'static str) {
    armed::hit(name)
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Action {
        Abort,
        Pause,
    }

    #[derive(Debug)]
    pub(super) struct Armed {
        pub name: String,
        pub nth: u64,
        pub action: Action,
        seen: AtomicU64,
    }

    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

    pub(super) fn hit(name: &'static str) {
        let Some(armed) = ARMED.get_or_init(from_env) else {
            return;
        };
        if armed.name != name || armed.seen.fetch_add(1, Ordering::SeqCst) + 1 != armed.nth {
            return;
        }
        match armed.action {
            Action::Abort => std::process::abort(),
            Action::Pause => {
                let line = format!("export-store failpoint {name} paused\n");
                let _ = std::io::stderr().write_all(line.as_bytes());
                let _ = std::io::stderr().flush();
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
        }
    }

    fn from_env() -> Option<Armed> {
        let value = std::env::var(super::ENV).ok()?;
        match parse(&value) {
            Ok(armed) => Some(armed),
            Err(why) => {
                let _ = writeln!(std::io::stderr(), "{}={value:?}: {why}", super::ENV);
                std::process::exit(2);
            }
        }
    }

    pub(super) fn parse(value: &str) -> Result<Armed, String> {
        let mut fields = value.split(':');
        let name = fields.next().unwrap_or_default();
        if !super::POINTS.contains(&name) {
            return Err(format!("no fail point is named {name:?}"));
        }
        let mut nth = 1;
        let mut action = Action::Abort;
        for field in fields {
            match field {
                "abort" => action = Action::Abort,
                "pause" => action = Action::Pause,
                n => match n.parse::<u64>() {
                    Ok(n) if n >= 1 => nth = n,
                    _ => {
                        return Err(format!(
                            "{n:?} is neither a hit number (1, 2, …) nor an action (abort, pause)"
                        ))
                    }
                },
            }
        }
        Ok(Armed {
            name: name.to_string(),
            nth,
            action,
            seen: AtomicU64::new(0),
        })
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::armed::{parse, Action};
    use super::POINTS;

    #[test]
    fn specs_parse_and_typos_are_refused() {
        let a = parse("finalize.after_commit").unwrap();
        assert_eq!(
            (a.name.as_str(), a.nth, a.action),
            ("finalize.after_commit", 1, Action::Abort)
        );
        let a = parse("writer.chunk.inserted:3:pause").unwrap();
        assert_eq!((a.nth, a.action), (3, Action::Pause));
        for bad in [
            "",
            "finalize",
            "finalize.after_commit:0",
            "vacuum.step:kill",
            "x:1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_point_is_placed_in_the_code() {
        let sources = [
            include_str!("db.rs"),
            include_str!("mod.rs"),
            include_str!("maintenance.rs"),
        ]
        .concat();
        for p in POINTS {
            assert!(
                sources.contains(&format!("hit(\"{p}\")")),
                "{p} is never hit"
            );
        }
    }
}
