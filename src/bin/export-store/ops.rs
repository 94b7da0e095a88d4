//! `export-store gc` and `export-store verify` (being written).

use std::process::ExitCode;

/// Arguments of `export-store gc`.
#[derive(clap::Args)]
pub struct GcArgs {}

/// Arguments of `export-store verify`.
#[derive(clap::Args)]
pub struct VerifyArgs {}

/// Runs `gc`.
pub fn gc(_args: GcArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    Err("not implemented yet".into())
}

/// Runs `verify`.
pub fn verify(_args: VerifyArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    Err("not implemented yet".into())
}
