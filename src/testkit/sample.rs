//! The Synthea sample vendored in this repository, for tests and benches.
//!
//! `data/synthea-10-patients/` holds a real FHIR R4 bulk-export result for
//! ten synthetic patients (SMART on FHIR's `sample-bulk-fhir-datasets`,
//! Apache-2.0; see the folder's README): 13 `Type.000.ndjson` files, each
//! stored zstd-compressed as `Type.000.ndjson.zst`. This module is the one
//! way the crate's tests, benches and `export-store bench` read it.
//!
//! The folder is found through the crate's source directory at compile time
//! ([`synthea_dir`]), so it is there in a checkout of the repository, not
//! beside an installed binary. Every function here says which folder it
//! looked in when the sample is missing or damaged.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The vendored sample's folder: `data/synthea-10-patients` under the
/// crate's root (`CARGO_MANIFEST_DIR` when this crate was compiled).
pub fn synthea_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/synthea-10-patients")
}

/// One file of the sample, decompressed.
#[derive(Clone, Debug)]
pub struct SampleFile {
    /// The FHIR resource type of every line, from the file name
    /// (`"Patient"`).
    pub resource_type: String,
    /// The file's name as the export wrote it, without `.zst`
    /// (`"Patient.000.ndjson"`).
    pub file_name: String,
    /// The NDJSON: one resource per line, each line ending in `\n`.
    pub ndjson: Vec<u8>,
}

/// Every file of the vendored sample, decompressed, sorted by file name.
///
/// About 10 MB in memory. An error names the folder if it is missing,
/// holds no `*.ndjson.zst` file, or a file does not decompress.
pub fn synthea() -> io::Result<Vec<SampleFile>> {
    read_all(&synthea_dir())
}

fn read_all(dir: &Path) -> io::Result<Vec<SampleFile>> {
    compressed_files(dir)?
        .into_iter()
        .map(|(file_name, path)| {
            Ok(SampleFile {
                resource_type: resource_type(&file_name).to_string(),
                ndjson: decompress(&path)?,
                file_name,
            })
        })
        .collect()
}

/// One file of the vendored sample, decompressed, by its plain name
/// (`"Encounter.000.ndjson"`).
pub fn synthea_file(file_name: &str) -> io::Result<Vec<u8>> {
    let dir = synthea_dir();
    let path = dir.join(format!("{file_name}.zst"));
    if !path.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the Synthea sample has no {file_name}: expected {} (files there: {})",
                path.display(),
                compressed_files(&dir)?
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    decompress(&path)
}

/// Writes the vendored sample's files, decompressed, into `dir` (which
/// must exist) as plain `Type.000.ndjson`, for code that reads a folder of
/// NDJSON. Returns the paths written, sorted by file name.
///
/// Streams one file at a time: it never holds the sample in memory.
pub fn synthea_to_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (file_name, source) in compressed_files(&synthea_dir())? {
        let target = dir.join(&file_name);
        let writing =
            |e: io::Error| io::Error::new(e.kind(), format!("writing {}: {e}", target.display()));
        let mut out = BufWriter::new(File::create(&target).map_err(writing)?);
        zstd::stream::copy_decode(open(&source)?, &mut out).map_err(|e| damaged(&source, e))?;
        out.flush().map_err(writing)?;
        written.push(target);
    }
    Ok(written)
}

/// `(plain file name, path of the .zst)` of every `*.ndjson.zst` in `dir`,
/// sorted.
fn compressed_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let missing = |why: String| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the Synthea sample is missing at {}: {why} (it is part of the repository: \
                 data/synthea-10-patients/*.ndjson.zst)",
                dir.display()
            ),
        )
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| missing(e.to_string()))? {
        let path = entry.map_err(|e| missing(e.to_string()))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(plain) = name.strip_suffix(".zst") {
            if plain.ends_with(".ndjson") {
                files.push((plain.to_string(), path.clone()));
            }
        }
    }
    if files.is_empty() {
        return Err(missing("no *.ndjson.zst file there".into()));
    }
    files.sort();
    Ok(files)
}

/// `"Patient"` of `"Patient.000.ndjson"`.
fn resource_type(file_name: &str) -> &str {
    file_name.split('.').next().unwrap_or(file_name)
}

fn open(path: &Path) -> io::Result<BufReader<File>> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

fn decompress(path: &Path) -> io::Result<Vec<u8>> {
    zstd::stream::decode_all(open(path)?).map_err(|e| damaged(path, e))
}

fn damaged(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the Synthea sample is damaged: {} does not decompress: {e}",
            path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirteen_files_of_7160_resources_each_of_its_files_type() {
        let files = synthea().unwrap();
        assert_eq!(files.len(), 13, "{:?}", names(&files));
        let mut lines = 0;
        for f in &files {
            assert_eq!(f.file_name, format!("{}.000.ndjson", f.resource_type));
            assert!(
                f.ndjson.ends_with(b"\n"),
                "{} lacks a final newline",
                f.file_name
            );
            let text = std::str::from_utf8(&f.ndjson).unwrap();
            for (i, line) in text.lines().enumerate() {
                let value: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{} line {}: {e}", f.file_name, i + 1));
                assert_eq!(
                    value["resourceType"].as_str(),
                    Some(f.resource_type.as_str()),
                    "{} line {}",
                    f.file_name,
                    i + 1
                );
                lines += 1;
            }
        }
        assert_eq!(lines, 7160);
        let sorted = {
            let mut n = names(&files);
            n.sort();
            n
        };
        assert_eq!(names(&files), sorted);
    }

    #[test]
    fn one_file_and_a_folder_hold_the_same_bytes() {
        let files = synthea().unwrap();
        let patient = files.iter().find(|f| f.resource_type == "Patient").unwrap();
        assert_eq!(synthea_file("Patient.000.ndjson").unwrap(), patient.ndjson);

        let dir = tempfile::tempdir().unwrap();
        let written = synthea_to_dir(dir.path()).unwrap();
        assert_eq!(written.len(), files.len());
        for (path, f) in written.iter().zip(&files) {
            assert_eq!(path, &dir.path().join(&f.file_name));
            assert!(
                std::fs::read(path).unwrap() == f.ndjson,
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let e = synthea_file("Observation.000.ndjson").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let text = e.to_string();
        assert!(text.contains("Observation.000.ndjson.zst"), "{text}");
        assert!(text.contains("Patient.000.ndjson"), "{text}");
    }

    #[test]
    fn a_missing_or_damaged_sample_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let e = read_all(&gone).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains(&gone.display().to_string()), "{e}");

        let e = read_all(dir.path()).unwrap_err();
        assert!(e.to_string().contains("no *.ndjson.zst file"), "{e}");

        let broken = dir.path().join("Patient.000.ndjson.zst");
        let mut bytes = std::fs::read(synthea_dir().join("Patient.000.ndjson.zst")).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        std::fs::write(&broken, bytes).unwrap();
        let e = read_all(dir.path()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(&broken.display().to_string()), "{e}");
    }

    fn names(files: &[SampleFile]) -> Vec<&str> {
        files.iter().map(|f| f.file_name.as_str()).collect()
    }
}
