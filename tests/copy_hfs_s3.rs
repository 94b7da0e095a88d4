//! The hand-off beyond one node: parts copied by `export-store copy` into
//! a real S3-compatible server (moto, from `.ci/moto.sh`) are read back
//! byte for byte by HFS's own `S3OutputStore` (helios-persistence 0.2.7,
//! feature `s3`), built as helios-hfs 0.2.7's `main.rs` builds it for a
//! custom endpoint (`AwsS3Client::from_sdk_config_with_options`, path-style
//! addressing); its presigned download URLs serve the same bytes; and its
//! job delete removes them, so HFS owns them as its own output.
//!
//! `cargo test --features helios-s3 --test copy_hfs_s3` (after
//! `bash .ci/moto.sh`); `helios-s3` compiles the AWS SDK for S3.
#![cfg(feature = "helios-s3")]

mod s3_support;

use std::sync::Arc;
use std::time::Duration;

use helios_persistence::backends::s3::{
    AccessTokenMode, AwsS3Client, AwsS3ClientOptions, S3OutputStore,
};
use helios_persistence::core::bulk_export::ExportJobId as HfsJobId;
use helios_persistence::core::bulk_export_output::{
    ExportOutputStore as HfsOutputStore, ExportPartKey as HfsPartKey,
};
use helios_persistence::tenant::{TenantContext, TenantId, TenantPermissions};
use s3_support::{bin, keys, put, summary, Moto, ACCESS_KEY, REGION, SECRET_KEY};
use sqlite_export_store::testkit::synthetic::Generator;
use sqlite_export_store::{ExportJobId, ExportPartKey, SqliteOutputStore};
use tokio::io::AsyncReadExt;

const BUCKET: &str = "hfs-bulk-export";

fn hfs_key(k: &ExportPartKey) -> HfsPartKey {
    HfsPartKey {
        tenant_id: k.tenant_id.clone(),
        job_id: HfsJobId::from_string(k.job_id.as_str()),
        resource_type: k.resource_type.clone(),
        file_type: k.file_type.clone(),
        part_index: k.part_index,
        fencing_token: k.fencing_token,
    }
}

#[test]
fn hfs_s3_output_store_reads_and_presigns_what_copy_wrote() {
    // HFS's client reads its keys the way helios-hfs does: the standard
    // AWS chain, here the environment (set before any thread starts; the
    // instance role and the shared files are kept out of it).
    let home = tempfile::tempdir().unwrap();
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            std::env::remove_var(k);
        }
    }
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_CONFIG_FILE", home.path().join("config"));
    std::env::set_var(
        "AWS_SHARED_CREDENTIALS_FILE",
        home.path().join("credentials"),
    );

    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("export-store.db");
    let job = |s: &str| ExportJobId::from_string(s);
    let parts: Vec<(ExportPartKey, Vec<u8>)> = vec![
        (
            ExportPartKey::output("default", job("job-1"), "Patient", 0, 1),
            Generator::new(1).ndjson_of_size(200_000),
        ),
        (
            // Two 5 MiB pieces and a rest: a multipart upload.
            ExportPartKey::output("default", job("job-1"), "Observation", 0, 1),
            Generator::new(2).ndjson_of_size(11 << 20),
        ),
        (
            ExportPartKey::error("default", job("job-1"), "OperationOutcome", 0, 1),
            b"{\"resourceType\":\"OperationOutcome\",\"issue\":[]}\n".to_vec(),
        ),
        (
            ExportPartKey::output("acme", job("job-2"), "Condition", 2, 4),
            Generator::new(3).ndjson_of_size(50_000),
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = SqliteOutputStore::open(&db, "http://127.0.0.1:1").unwrap();
        for (k, b) in &parts {
            put(&store, k, b).await;
        }
    });

    let out = bin(home.path())
        .args([
            "copy",
            "--to",
            &format!("s3://{BUCKET}"),
            "--endpoint",
            &moto.endpoint(),
        ])
        .args(["--part-size", "5MiB", "--json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out.stdout);
    assert_eq!(s["uploaded"], parts.len() as u64, "{s}");
    assert_eq!(s["multipart_uploads"], 1, "{s}");

    rt.block_on(async {
        // As helios-hfs 0.2.7 builds its export output store for
        // HFS_BULK_EXPORT_OUTPUT_BACKEND=s3 with HFS_BULK_EXPORT_S3_ENDPOINT.
        let sdk_config = AwsS3Client::load_sdk_config(Some(REGION)).await;
        let client = Arc::new(AwsS3Client::from_sdk_config_with_options(
            &sdk_config,
            AwsS3ClientOptions {
                endpoint_url: Some(moto.endpoint()),
                force_path_style: true,
            },
        ));
        let hfs = S3OutputStore::new(
            client,
            BUCKET,
            "http://hfs.example",
            AccessTokenMode::Auto,
            Duration::from_secs(3600),
        )
        .with_scratch_dir(dir.path().join("scratch"));
        let http = reqwest::Client::new();

        for (k, bytes) in &parts {
            let key = hfs_key(k);
            let mut read = Vec::new();
            hfs.open_reader(&key)
                .await
                .unwrap_or_else(|e| panic!("HFS cannot read {k:?}: {e}"))
                .read_to_end(&mut read)
                .await
                .unwrap();
            assert!(read == *bytes, "{k:?}: HFS reads other bytes");

            let url = hfs
                .download_url(&key, Duration::from_secs(600))
                .await
                .unwrap();
            assert!(!url.requires_access_token, "a presigned URL");
            assert!(
                url.url
                    .starts_with(&format!("{}/{BUCKET}/", moto.endpoint()))
                    && url.url.contains("X-Amz-Signature="),
                "{}",
                url.url
            );
            let got = http.get(&url.url).send().await.unwrap();
            assert_eq!(got.status(), 200, "{}", url.url);
            assert!(
                got.bytes().await.unwrap() == bytes.as_slice(),
                "{k:?}: the presigned URL serves other bytes"
            );
        }

        // HFS's retention sweep deletes a copied job as its own.
        let tenant = TenantContext::new(TenantId::new("default"), TenantPermissions::full_access());
        hfs.delete_job_outputs(&tenant, &HfsJobId::from_string("job-1"))
            .await
            .unwrap();
        assert_eq!(
            keys(&moto.client(BUCKET), None).await,
            vec!["acme/exports/job-2/output-Condition-2-4.ndjson"]
        );
    });
}
