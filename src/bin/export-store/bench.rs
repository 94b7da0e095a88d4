//! `export-store bench` (being written).

use std::process::ExitCode;

/// Arguments of `export-store bench`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the command.
pub fn run(_args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    Err("not implemented yet".into())
}
