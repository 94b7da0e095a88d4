//! Shared by the tests that run the `export-store` binary on a store file
//! (`ops_cli`, `import_cli`, `backup_cli`): how to start it and read what
//! it said.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The `export-store` binary of this build.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_export-store"))
}

/// Runs `export-store ARGS --db DB` to its end.
pub fn run(db: &Path, args: &[&str]) -> Output {
    bin()
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .expect("the binary runs")
}

/// What it wrote on standard error.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What it wrote on standard output.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Its exit status (it exited, rather than died of a signal).
pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}
