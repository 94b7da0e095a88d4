//! Naming a part on the command line, the way `ls` prints it and `cat`
//! reads it: `TENANT/JOB/FILE_TYPE/TYPE-N@TOKEN`, or a download URL (whole,
//! or its path) as HFS and `export-store serve` serve it.
//!
//! In a name, each segment is percent-encoded where it must be: `%` always,
//! and `/` in every segment but the tenant's (the tenant is whatever comes
//! before the last three segments, so `acme/research/JOB/…` names tenant
//! `acme/research`). So every name `ls` prints reads back as the same key,
//! and a plain id needs no encoding at all.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use sqlite_export_store::{ExportJobId, ExportPartKey};

/// What the tenant segment escapes: `%` (and control characters, which no
/// stored id holds).
const TENANT: &AsciiSet = &CONTROLS.add(b'%');
/// What the other segments escape: `%` and `/`.
const SEGMENT: &AsciiSet = &CONTROLS.add(b'%').add(b'/');

/// The tenant download URLs name when their path does not.
pub const DEFAULT_TENANT: &str = "default";

/// The name of a part, as `cat` reads it back.
pub fn name(key: &ExportPartKey) -> String {
    format!(
        "{}/{}/{}/{}-{}@{}",
        utf8_percent_encode(&key.tenant_id, TENANT),
        utf8_percent_encode(key.job_id.as_str(), SEGMENT),
        utf8_percent_encode(&key.file_type, SEGMENT),
        utf8_percent_encode(&key.resource_type, SEGMENT),
        key.part_index,
        key.fencing_token
    )
}

/// A part named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A name: one slot (the key's token is 0 when none was given), and
    /// the token if one was.
    Key {
        /// The slot (and token, if given).
        key: ExportPartKey,
        /// The token, if the name gave one.
        token: Option<u64>,
    },
    /// A download route: the slot of file type `output`, or else `error`,
    /// as the route resolves it.
    Route {
        /// The tenant (from the path, `--tenant`, or the default).
        tenant: String,
        /// The job id.
        job: String,
        /// The resource type.
        resource_type: String,
        /// The part index.
        part_index: u32,
    },
}

/// Reads a part's name or download URL (see the module docs). `tenant`
/// (`--tenant`) names the tenant of a URL whose path names none, and wins
/// over the one it names: a base URL with a path of its own
/// (`https://host/fhir/export-file/…`) would otherwise be taken for tenant
/// `fhir`. It is refused with a name, which carries its tenant.
pub fn parse(text: &str, tenant: Option<&str>) -> Result<Target, String> {
    let text = text.trim();
    let path = if let Some(rest) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    {
        match rest.find('/') {
            Some(at) => &rest[at..],
            None => {
                return Err(format!(
                    "{text:?} has no path: expected …/export-file/JOB/TYPE-N"
                ))
            }
        }
    } else if text.starts_with('/') {
        text
    } else {
        if tenant.is_some() {
            return Err(
                "--tenant applies to download URLs only: a part's name begins with its tenant"
                    .into(),
            );
        }
        return parse_name(text);
    };
    parse_route(path, tenant)
}

fn decode(segment: &str, what: &str) -> Result<String, String> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("the {what} {segment:?} is not valid percent-encoded UTF-8"))
}

/// `TYPE-N`, split at its last `-`, the index written as digits only.
fn split_file(file: &str) -> Option<(&str, u32)> {
    let (resource_type, index) = file.rsplit_once('-')?;
    let n: u32 = index.parse().ok()?;
    (n.to_string() == index && !resource_type.is_empty()).then_some((resource_type, n))
}

fn parse_name(text: &str) -> Result<Target, String> {
    let shape = || {
        format!("{text:?} is not a part name: expected TENANT/JOB/FILE_TYPE/TYPE-N[@TOKEN] (as `ls` prints it) or a download URL")
    };
    let mut segments = text.rsplitn(4, '/');
    let (Some(last), Some(file_type), Some(job), Some(tenant)) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(shape());
    };
    let (file, token) = match last.rsplit_once('@') {
        Some((file, t)) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
            let token = t
                .parse::<u64>()
                .map_err(|_| format!("the fencing token {t} is larger than any token"))?;
            (file, Some(token))
        }
        _ => (last, None),
    };
    let (resource_type, part_index) = split_file(file).ok_or_else(shape)?;
    let key = ExportPartKey {
        tenant_id: decode(tenant, "tenant")?,
        job_id: ExportJobId::from_string(decode(job, "job id")?),
        file_type: decode(file_type, "file type")?,
        resource_type: decode(resource_type, "resource type")?,
        part_index,
        fencing_token: token.unwrap_or(0),
    };
    key.validate("cat").map_err(|e| e.message().to_string())?;
    Ok(Target::Key { key, token })
}

fn parse_route(path: &str, tenant: Option<&str>) -> Result<Target, String> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let at = segments
        .iter()
        .rposition(|s| *s == "export-file")
        .filter(|at| segments.len() == at + 3)
        .ok_or_else(|| {
            format!("{path:?} is not a download route: expected [/TENANT]/export-file/JOB/TYPE-N")
        })?;
    let tenant = match (tenant, at) {
        (Some(t), _) => t.to_string(),
        (None, 0) => DEFAULT_TENANT.to_string(),
        (None, _) => decode(segments[at - 1], "tenant")?,
    };
    let job = decode(segments[at + 1], "job id")?;
    let file = decode(segments[at + 2], "file")?;
    let (resource_type, part_index) = split_file(&file)
        .ok_or_else(|| format!("{file:?} is not TYPE-N (a resource type and a part index)"))?;
    let key = ExportPartKey::output(
        tenant.clone(),
        ExportJobId::from(job.as_str()),
        resource_type,
        part_index,
        0,
    );
    key.validate("cat").map_err(|e| e.message().to_string())?;
    Ok(Target::Route {
        tenant,
        job,
        resource_type: resource_type.to_string(),
        part_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(
        tenant: &str,
        job: &str,
        file_type: &str,
        ty: &str,
        n: u32,
        token: u64,
    ) -> ExportPartKey {
        let mut k = ExportPartKey::output(tenant, ExportJobId::from(job), ty, n, token);
        k.file_type = file_type.into();
        k
    }

    #[test]
    fn names_read_back_as_the_same_key() {
        for k in [
            key("default", "0b6c-4e", "output", "Patient", 0, 1),
            key("acme/research", "j/1", "error", "Pat-ient", 7, u64::MAX),
            key("t%20x", "50%", "deleted", "submit-v1-ab", 3, 0),
            key("a@b", "j@2", "output", "Type@9-3", 4294967295, 12),
            key("ünï", "jöb", "output", "Patient", 2, 5),
        ] {
            let n = name(&k);
            assert_eq!(
                parse(&n, None),
                Ok(Target::Key {
                    key: k.clone(),
                    token: Some(k.fencing_token)
                }),
                "{n}"
            );
        }
        assert_eq!(
            name(&key("acme/research", "j/1", "output", "P", 0, 1)),
            "acme/research/j%2F1/output/P-0@1"
        );
    }

    #[test]
    fn a_name_without_a_token_names_the_slot() {
        let Ok(Target::Key { key: k, token }) = parse("acme/job/output/Patient-3", None) else {
            panic!("a name")
        };
        assert_eq!(token, None);
        assert_eq!(
            (k.tenant_id.as_str(), k.job_id.as_str(), k.part_index),
            ("acme", "job", 3)
        );
    }

    #[test]
    fn urls_and_paths_name_a_route() {
        let route = |tenant: &str, job: &str, ty: &str, n| Target::Route {
            tenant: tenant.into(),
            job: job.into(),
            resource_type: ty.into(),
            part_index: n,
        };
        assert_eq!(
            parse("/export-file/j1/Patient-0", None),
            Ok(route("default", "j1", "Patient", 0))
        );
        assert_eq!(
            parse("/export-file/j1/Patient-0", Some("acme")),
            Ok(route("acme", "j1", "Patient", 0))
        );
        assert_eq!(
            parse("/acme%2Fresearch/export-file/job%201/Pa%3Fient-7", None),
            Ok(route("acme/research", "job 1", "Pa?ient", 7))
        );
        assert_eq!(
            parse(
                "https://fhir.example.org/acme/export-file/j/Patient-2?expires=1&signature=ab",
                None
            ),
            Ok(route("acme", "j", "Patient", 2))
        );
        assert_eq!(
            parse(
                "http://h:8080/fhir/export-file/j/Patient-2",
                Some("default")
            ),
            Ok(route("default", "j", "Patient", 2))
        );
    }

    #[test]
    fn bad_names_say_what_is_expected() {
        for bad in [
            "",
            "Patient-0",
            "a/b/Patient-0",
            "a/b/output/Patient",
            "a/b/output/Patient-x",
            "a/b/output/Patient-01",
            "a/b/Output/Patient-0",
            "a/b/output/Patient-0@99999999999999999999999",
            "a/%FF/output/Patient-0",
            "/export-file/j",
            "/export-file/j/Patient-0/extra",
            "/export-file/j/Patient",
            "http://host",
            "https://host/x/y",
        ] {
            assert!(parse(bad, None).is_err(), "{bad:?}");
        }
        assert!(parse("a/b/output/Patient-0", Some("t"))
            .unwrap_err()
            .contains("--tenant"));
    }
}
