//! The Bulk Data completion manifest of an export, as HFS answers a
//! status poll once the job is done: shared by `demo` and `import`.

use std::time::Duration;

use serde_json::{json, Value};
use sqlite_export_store::{ExportOutputStore, FinalizedPart, SqliteOutputStore, StorageError};

/// How long the manifest's download URLs are minted for (signed URLs
/// expire then; plain URLs ignore it).
const URL_TTL: Duration = Duration::from_secs(24 * 3600);

/// The manifest of an export of `types` whose finished parts are `output`
/// and `error`, each list in the order given: `transactionTime` now,
/// `request` the `$export` kick-off URL under the store's base URL, one
/// entry per part with its download URL and resource count.
pub async fn manifest(
    store: &SqliteOutputStore,
    types: &[&str],
    output: &[FinalizedPart],
    error: &[FinalizedPart],
) -> Result<Value, StorageError> {
    manifest_with_deleted(store, types, output, error, &[]).await
}

/// [`manifest`] with `deleted` parts too: the Bulk Data `deleted` array
/// (Bundles of the resources deleted since `_since`), present only when
/// there are such parts, as the specification makes it optional.
pub async fn manifest_with_deleted(
    store: &SqliteOutputStore,
    types: &[&str],
    output: &[FinalizedPart],
    error: &[FinalizedPart],
    deleted: &[FinalizedPart],
) -> Result<Value, StorageError> {
    let (output, output_token) = entries(store, output).await?;
    let (error, error_token) = entries(store, error).await?;
    let (deleted, deleted_token) = entries(store, deleted).await?;
    let mut manifest = json!({
        "transactionTime": now_rfc3339(),
        "request": format!("{}/$export?_type={}", store.base_url(), types.join(",")),
        // Every URL of one store says the same; a manifest without one
        // says what Bulk Data clients assume safest.
        "requiresAccessToken": output_token.or(error_token).or(deleted_token).unwrap_or(true),
        "output": output,
        "error": error,
    });
    if !deleted.is_empty() {
        manifest["deleted"] = Value::Array(deleted);
    }
    Ok(manifest)
}

/// One manifest entry per part, and whether their URLs need a token.
async fn entries(
    store: &SqliteOutputStore,
    parts: &[FinalizedPart],
) -> Result<(Vec<Value>, Option<bool>), StorageError> {
    let mut out = Vec::with_capacity(parts.len());
    let mut requires_access_token = None;
    for p in parts {
        let url = store.download_url(&p.key, URL_TTL).await?;
        requires_access_token = Some(url.requires_access_token);
        out.push(json!({ "type": p.resource_type, "url": url.url, "count": p.line_count }));
    }
    Ok((out, requires_access_token))
}

/// Now, as RFC 3339 in UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
