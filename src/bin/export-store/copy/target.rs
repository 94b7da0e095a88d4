//! Where `export-store copy` puts a part: the bucket URL it takes
//! (`s3://BUCKET[/PREFIX]`) and the object key of each part, which is
//! exactly the key HFS's own `S3OutputStore` (helios-persistence 0.2.7,
//! `backends/s3/output_store.rs`) reads and presigns:
//!
//! ```text
//! {tenant}/exports/{job}/{file_type}-{Type}-{n}-{token}.ndjson
//! ```
//!
//! HFS's store has no prefix; a PREFIX, when given, goes in front of that
//! key, and HFS then does not find the objects (for staging or an archive).

use sqlite_export_store::ExportPartKey;

/// A parsed `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketUrl {
    /// The bucket name.
    pub bucket: String,
    /// The key prefix without leading or trailing `/`, or `None`.
    pub prefix: Option<String>,
}

impl BucketUrl {
    /// The object key of `key` under this URL: HFS's key, after the prefix.
    pub fn object_key(&self, key: &ExportPartKey) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}/{}", hfs_object_key(key)),
            None => hfs_object_key(key),
        }
    }
}

impl std::fmt::Display for BucketUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.prefix {
            Some(prefix) => write!(f, "s3://{}/{prefix}", self.bucket),
            None => write!(f, "s3://{}", self.bucket),
        }
    }
}

/// The key under which HFS's `S3OutputStore` keeps the part `key`.
pub fn hfs_object_key(key: &ExportPartKey) -> String {
    format!(
        "{}/exports/{}/{}-{}-{}-{}.ndjson",
        key.tenant_id,
        key.job_id.as_str(),
        key.file_type,
        key.resource_type,
        key.part_index,
        key.fencing_token
    )
}

/// Parses `--to`: `s3://BUCKET` or `s3://BUCKET/PREFIX` (clap's value
/// parser, so a bad URL is a bad argument, exit status 2).
pub fn parse_bucket_url(s: &str) -> Result<BucketUrl, String> {
    let rest = s.strip_prefix("s3://").ok_or_else(|| {
        format!("{s:?} is not an S3 bucket URL: expected s3://BUCKET or s3://BUCKET/PREFIX")
    })?;
    let (bucket, prefix) = match rest.split_once('/') {
        Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
        None => (rest, ""),
    };
    check_bucket(bucket).map_err(|why| format!("{s:?}: {why}"))?;
    if prefix.split('/').any(|seg| seg.is_empty()) && !prefix.is_empty() {
        return Err(format!("{s:?}: the prefix has an empty segment (`//`)"));
    }
    if prefix.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!(
            "{s:?}: the prefix has a `.` or `..` segment, which S3 would keep literally"
        ));
    }
    if prefix.chars().any(char::is_control) {
        return Err(format!("{s:?}: the prefix has a control character"));
    }
    Ok(BucketUrl {
        bucket: bucket.to_string(),
        prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
    })
}

/// S3's bucket naming rules (3 to 63 of `a-z`, `0-9`, `.`, `-`, starting
/// and ending with a letter or digit), so a typo is refused before any
/// request is made.
fn check_bucket(bucket: &str) -> Result<(), &'static str> {
    if bucket.is_empty() {
        return Err("no bucket name after s3://");
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err("a bucket name has 3 to 63 characters");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err("a bucket name has only lowercase letters, digits, `.` and `-`");
    }
    let first_last = [bucket.as_bytes()[0], bucket.as_bytes()[bucket.len() - 1]];
    if !first_last
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err("a bucket name starts and ends with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlite_export_store::ExportJobId;

    #[test]
    fn keys_are_hfs_keys_after_the_prefix() {
        let job = ExportJobId::from_string("9f1c");
        let key = ExportPartKey::output("acme/research", job.clone(), "Patient", 3, 7);
        assert_eq!(
            hfs_object_key(&key),
            "acme/research/exports/9f1c/output-Patient-3-7.ndjson"
        );
        let err = ExportPartKey::error("t", job, "OperationOutcome", 0, 1);
        let url = parse_bucket_url("s3://my-bucket/archive/2026/").unwrap();
        assert_eq!(url.prefix.as_deref(), Some("archive/2026"));
        assert_eq!(
            url.object_key(&err),
            "archive/2026/t/exports/9f1c/error-OperationOutcome-0-1.ndjson"
        );
        assert_eq!(url.to_string(), "s3://my-bucket/archive/2026");
    }

    #[test]
    fn bucket_urls_are_checked() {
        assert_eq!(
            parse_bucket_url("s3://exports").unwrap(),
            BucketUrl {
                bucket: "exports".into(),
                prefix: None
            }
        );
        assert_eq!(parse_bucket_url("s3://exports/").unwrap().prefix, None);
        for bad in [
            "exports",
            "https://s3.amazonaws.com/exports",
            "s3:/exports",
            "s3://",
            "s3://Exports",
            "s3://ex",
            "s3://-exports",
            "s3://exports/a//b",
            "s3://exports/a/../b",
        ] {
            assert!(parse_bucket_url(bad).is_err(), "{bad} is refused");
        }
        assert!(parse_bucket_url("exports")
            .unwrap_err()
            .contains("expected s3://BUCKET"));
    }
}
