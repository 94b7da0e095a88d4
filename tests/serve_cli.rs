//! `export-store serve` reading its bearer secrets from files
//! (`--token-file`, `--tenant-token-file`): the real binary over real TCP,
//! driven by `curl`, beside the `--token` flag; and every way a token file
//! is refused (exit status 2, the file and line named, no secret shown).
#![cfg(feature = "server")]

mod server_support;

use std::path::Path;
use std::process::{Command, Stdio};

use server_support::{key, put, ServeProcess};
use sqlite_export_store::{SqliteOutputStore, StoreOptions};

const FILE_TOKEN: &str = "file-token-0123456789abcdef";
const TENANT_TOKEN: &str = "tenant-token=0123456789=abcdef";
const FLAG_TOKEN: &str = "flag-token-0123456789abcdef";
const DATA: &[u8] = b"{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n\
                      {\"resourceType\":\"Patient\",\"id\":\"p2\"}\n";

fn has_curl() -> bool {
    Command::new("curl").arg("--version").output().is_ok()
}

/// `curl URL` with optional bearer `token`: (HTTP status, body).
fn get(url: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(url).output().expect("curl runs");
    assert!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let split = out.stdout.iter().rposition(|&b| b == b'\n').unwrap();
    let status = std::str::from_utf8(&out.stdout[split + 1..])
        .unwrap()
        .parse()
        .unwrap();
    (status, out.stdout[..split].to_vec())
}

/// A store at `dir/export-store.db` holding one part of the default tenant
/// and one of `acme`, both of job `job`, `Patient-0`.
fn store_with_parts(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("export-store.db");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store =
            SqliteOutputStore::open_with(&db, "http://127.0.0.1:1", StoreOptions::default())
                .unwrap();
        put(&store, &key("default", "job", 0, 1), DATA).await;
        put(&store, &key("acme", "job", 0, 1), DATA).await;
    });
    db
}

fn write_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    #[cfg(not(unix))]
    let _ = mode;
}

#[test]
fn token_files_grant_access_beside_the_token_flag() {
    if !has_curl() {
        println!("skipped: curl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = store_with_parts(dir.path());
    let tokens = dir.path().join("tokens");
    write_file(
        &tokens,
        &format!("# default tenant\n\n  {FILE_TOKEN}\r\n"),
        0o600,
    );
    // Readable by everyone: served, with a warning.
    let tenant_tokens = dir.path().join("tenant-tokens");
    write_file(
        &tenant_tokens,
        &format!("# acme's downloads\nacme={TENANT_TOKEN}\n"),
        0o644,
    );

    let mut server = ServeProcess::start(
        &db,
        &[
            "--token".as_ref(),
            FLAG_TOKEN.as_ref(),
            "--token-file".as_ref(),
            tokens.as_os_str(),
            "--tenant-token-file".as_ref(),
            tenant_tokens.as_os_str(),
        ],
    );
    let base = server.base.clone();
    let default_url = format!("{base}/export-file/job/Patient-0");
    let acme_url = format!("{base}/acme/export-file/job/Patient-0");

    assert_eq!(get(&default_url, None).0, 401);
    assert_eq!(get(&default_url, Some("not-a-granted-token-0000")).0, 401);
    assert_eq!(get(&default_url, Some(FILE_TOKEN)), (200, DATA.to_vec()));
    assert_eq!(get(&default_url, Some(FLAG_TOKEN)), (200, DATA.to_vec()));
    // The tenant file's secret holds `=`: the line was split at the first.
    assert_eq!(get(&acme_url, Some(TENANT_TOKEN)), (200, DATA.to_vec()));
    assert_eq!(get(&acme_url, None).0, 401);
    assert_eq!(get(&acme_url, Some(FILE_TOKEN)).0, 403);
    assert_eq!(get(&default_url, Some(TENANT_TOKEN)).0, 403);

    let logs = server.kill_and_read_logs();
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(
        warnings[0].contains("--tenant-token-file")
            && warnings[0].contains(tenant_tokens.to_str().unwrap())
            && warnings[0].contains("644"),
        "{logs}"
    );
    for secret in [FILE_TOKEN, TENANT_TOKEN, FLAG_TOKEN] {
        assert!(!logs.contains(secret), "a secret in the logs: {logs}");
    }
}

/// Runs `serve` with `args` on `db` and expects it refused before it
/// listens: returns its standard error.
fn refused(db: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_export-store"))
        .arg("serve")
        .arg("--db")
        .arg(db)
        .args(["--addr", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    stderr
}

#[test]
fn bad_token_files_are_refused_with_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = store_with_parts(dir.path());
    let path = |name: &str| dir.path().join(name);
    let secret = "never-shown-secret-0123456789";

    // (flag, file name, contents or None for no file, what the message says)
    let cases: &[(&str, &str, Option<String>, &str)] = &[
        ("--token-file", "missing", None, "cannot read it"),
        ("--token-file", ".", None, "cannot read it"),
        (
            "--token-file",
            "empty",
            Some(String::new()),
            "holds no secret",
        ),
        (
            "--token-file",
            "comments",
            Some("# to do\n\n   \n".into()),
            "holds no secret",
        ),
        (
            "--token-file",
            "short",
            Some(format!("{secret}\n# next\nnever-shown\n")),
            "line 3: the secret is shorter than 16 bytes",
        ),
        (
            "--token-file",
            "spaces",
            Some(format!("{secret} {secret}\n")),
            "line 1: the secret must be visible ASCII",
        ),
        (
            "--tenant-token-file",
            "no-equals",
            Some(format!("acme={secret}\n\n{secret}\n")),
            "line 3: expected TENANT=SECRET",
        ),
        (
            "--tenant-token-file",
            "no-tenant",
            Some(format!("={secret}\n")),
            "line 1: expected TENANT=SECRET: the tenant id before `=` is empty",
        ),
        (
            "--tenant-token-file",
            "no-secret",
            Some("# acme\nacme=\n".into()),
            "line 2: the secret is empty",
        ),
    ];
    for (flag, name, contents, says) in cases {
        let file = if *name == "." {
            dir.path().to_path_buf()
        } else {
            path(name)
        };
        if let Some(text) = contents {
            write_file(&file, text, 0o600);
        }
        let err = refused(&db, &[flag.as_ref(), file.as_os_str()]);
        let shown = file.display().to_string();
        assert!(
            err.contains(&format!("export-store: {flag} {shown}: {says}")),
            "{flag} {name}: {err}"
        );
        assert!(!err.contains("never-shown"), "{flag} {name}: {err}");
    }

    // A good file does not save a bad one given with it.
    let good = path("good");
    write_file(&good, &format!("{secret}\n"), 0o600);
    let err = refused(
        &db,
        &[
            "--token-file".as_ref(),
            good.as_os_str(),
            "--tenant-token-file".as_ref(),
            path("missing").as_os_str(),
        ],
    );
    assert!(err.contains("--tenant-token-file"), "{err}");
}
