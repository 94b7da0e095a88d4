//! `export-store serve`, the real binary, driven by `curl`: a full
//! download, a range, a resumed download, zstd (raw and decoded by curl),
//! gzip, the token rule, a signed URL, and a clean stop on SIGINT.
#![cfg(feature = "server")]

mod server_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use server_support::{key, ndjson_of, put, ServeProcess};
use sqlite_export_store::{ExportOutputStore, SqliteOutputStore, StoreOptions};

const TOKEN: &str = "curl-smoke-token-0123456789";
const SIGNING_KEY: &str = "6a1f0c0ffee0ddba11c0ffee0ddba11c";

/// Runs curl with `args`; returns (HTTP status, response headers, body).
fn curl(args: &[&str], dir: &Path) -> (u16, String, Vec<u8>) {
    let (headers, body) = (dir.join("headers.txt"), dir.join("body.bin"));
    let _ = std::fs::remove_file(&body);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let headers = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    (status, headers, std::fs::read(&body).unwrap_or_default())
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

#[test]
fn curl_downloads_from_the_real_binary() {
    if Command::new("curl").arg("--version").output().is_err() {
        println!("skipped: curl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("export-store.db");
    let key_file = dir.path().join("signing.key");
    std::fs::write(&key_file, format!("{SIGNING_KEY}\n")).unwrap();
    let data = ndjson_of(3 << 20);
    let k = key("default", "curl-job", 0, 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let info = runtime.block_on(async {
        let store = SqliteOutputStore::open_with(
            &db,
            "http://127.0.0.1:1",
            StoreOptions::default().with_chunk_size(256 * 1024),
        )
        .unwrap();
        put(&store, &k, &data).await
    });
    assert!(info.chunk_count > 4);

    let mut server = ServeProcess::start(
        &db,
        &[
            "--token".as_ref(),
            TOKEN.as_ref(),
            "--signing-key-file".as_ref(),
            key_file.as_os_str(),
        ],
    );
    let base = server.base.clone();
    let url = format!("{base}/export-file/curl-job/Patient-0");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let d = dir.path();

    // No token: 401 with a challenge.
    let (status, headers, body) = curl(&[&url], d);
    assert_eq!(status, 401);
    assert!(header(&headers, "www-authenticate")
        .unwrap()
        .starts_with("bearer"));
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("OperationOutcome"));

    // The whole part, with its headers.
    let (status, headers, body) = curl(&["-H", &auth, &url], d);
    assert_eq!(status, 200);
    assert_eq!(body, data);
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/fhir+ndjson")
    );
    assert_eq!(
        header(&headers, "content-length"),
        Some(data.len().to_string().as_str())
    );
    let etag = format!("\"{}\"", info.digest);
    assert_eq!(header(&headers, "etag"), Some(etag.as_str()));
    assert!(header(&headers, "x-request-id").is_some());

    // A range across frames.
    let (status, headers, body) = curl(&["-H", &auth, "-r", "262000-262999", &url], d);
    assert_eq!(status, 206);
    assert_eq!(body, &data[262_000..263_000]);
    let total = data.len();
    assert_eq!(
        header(&headers, "content-range"),
        Some(format!("bytes 262000-262999/{total}").as_str())
    );

    // curl resumes a broken-off download (-C -) into the whole part.
    let partial = d.join("partial.ndjson");
    std::fs::write(&partial, &data[..1_000_000]).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-C", "-", "-H", &auth, "-o"])
        .arg(&partial)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&partial).unwrap(), data);

    // zstd as stored, decoded here; and decoded by curl itself.
    let (status, headers, body) = curl(&["-H", &auth, "-H", "Accept-Encoding: zstd", &url], d);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-encoding"), Some("zstd"));
    assert_eq!(body.len() as u64, info.stored_bytes);
    assert_eq!(zstd::decode_all(&body[..]).unwrap(), data);
    let curl_zstd = String::from_utf8(Command::new("curl").arg("-V").output().unwrap().stdout)
        .unwrap()
        .contains("zstd");
    if curl_zstd {
        let (status, headers, body) = curl(&["-H", &auth, "--compressed", &url], d);
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "content-encoding"), Some("zstd"));
        assert_eq!(body, data, "curl decodes the multi-frame zstd stream");
    } else {
        println!("this curl has no zstd decoder: its own decoding was not tried");
    }

    // gzip made on the fly, decoded by curl.
    let (status, headers, body) = curl(
        &[
            "-H",
            &auth,
            "-H",
            "Accept-Encoding: gzip",
            "--compressed",
            &url,
        ],
        d,
    );
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-encoding"), Some("gzip"));
    assert_eq!(body, data);

    // A signed URL needs no token.
    let signed = runtime.block_on(async {
        let minting = SqliteOutputStore::open_with(
            &db,
            &base,
            StoreOptions::default().with_signing_key(SIGNING_KEY.as_bytes().to_vec()),
        )
        .unwrap();
        minting
            .download_url(&k, Duration::from_secs(60))
            .await
            .unwrap()
            .url
    });
    let (status, _, body) = curl(&[&signed], d);
    assert_eq!((status, body == data), (200, true));
    let (status, _, _) = curl(&[&signed.replace("signature=", "signature=0")], d);
    assert_eq!(status, 403);

    // SIGINT stops the server cleanly.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    let logs = server.logs();
    assert!(
        logs.contains("response sent") && logs.contains("status=206"),
        "{logs}"
    );
}
