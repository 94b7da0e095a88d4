//! Shared by the power-cut tests: mounts `tests/lossyfs/lossyfs.py`, a FUSE
//! file system that forgets what was not synced (see README.md beside this
//! file), cuts its power and unmounts it. Installed by `.ci/lossyfs.sh`;
//! without it these tests fail and say so.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `.ci/lossyfs.sh` installs the Python binding (or `$LOSSYFS_VENV`).
pub fn venv() -> PathBuf {
    std::env::var_os("LOSSYFS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/lossyfs-venv"))
}

/// The file system's script.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lossyfs/lossyfs.py")
}

/// How to mount.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// A cut also writes a random prefix (whole 4 KiB blocks) of each
    /// file's last unsynced write.
    pub tear: bool,
    /// Syncs persist nothing: the broken file system the tests must catch.
    pub ignore_fsync: bool,
    /// Seeds the choice of torn blocks.
    pub seed: u64,
}

/// A mounted lossyfs: the volatile view at `mountpoint` of the durable
/// state in `backing`. Dropping it unmounts it (lazily, if it is busy) and
/// ends its process.
pub struct LossyFs {
    child: Option<Child>,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The folder that holds what was synced.
    pub backing: PathBuf,
    log: PathBuf,
}

/// Panics, saying how to install it, when the file system cannot run here.
pub fn require() {
    let python = venv().join("bin/python");
    let hint = "run `bash .ci/lossyfs.sh` first (it installs fuse3 from Debian and the pinned \
                mfusepy from PyPI into target/lossyfs-venv), or set LOSSYFS_VENV to a virtual \
                environment with mfusepy";
    assert!(python.is_file(), "{} is missing: {hint}", python.display());
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this machine cannot mount FUSE file systems ({hint})"
    );
    let found = Command::new("fusermount3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(found, "fusermount3 is not on PATH: {hint}");
}

impl LossyFs {
    /// Mounts `backing` at `mountpoint` (both folders must exist) and waits
    /// until the file system answers.
    pub fn mount(backing: &Path, mountpoint: &Path, options: Options) -> LossyFs {
        require();
        let log = backing.with_extension(format!(
            "lossyfs-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(venv().join("bin/python"));
        cmd.arg(script())
            .arg(backing)
            .arg(mountpoint)
            .args(["--seed", &options.seed.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if options.tear {
            cmd.arg("--tear");
        }
        // LOSSYFS_IGNORE_FSYNC=1 breaks every mount of a test run, to show
        // that its checks catch a file system that loses synced data.
        if options.ignore_fsync
            || std::env::var_os("LOSSYFS_IGNORE_FSYNC").is_some_and(|v| v == "1")
        {
            cmd.arg("--ignore-fsync");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start lossyfs: {e}"));
        let mut fs = LossyFs {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            backing: backing.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = fs.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "lossyfs exited ({status}) before it was mounted: {}",
                    fs.log_text()
                );
            }
            if fs.try_status().is_some_and(|s| s.starts_with("live")) {
                return fs;
            }
            assert!(
                Instant::now() < deadline,
                "lossyfs did not come up within 30 s: {}",
                fs.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The control file.
    pub fn control(&self) -> PathBuf {
        self.mountpoint.join(".lossyfs")
    }

    /// A path inside the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    fn try_status(&self) -> Option<String> {
        std::fs::read_to_string(self.control()).ok()
    }

    /// `live` or `cut: WHERE`, then the last operation and the counters.
    pub fn status(&self) -> String {
        self.try_status()
            .unwrap_or_else(|| panic!("cannot read lossyfs's control file: {}", self.log_text()))
    }

    /// Where the power was cut, once it was.
    pub fn cut_at(&self) -> Option<String> {
        let s = self.status();
        s.strip_prefix("cut: ")
            .map(|rest| rest.lines().next().unwrap_or_default().to_string())
    }

    fn send(&self, line: &str) {
        std::fs::write(self.control(), line)
            .unwrap_or_else(|e| panic!("lossyfs refused {line:?}: {e}: {}", self.log_text()));
    }

    /// Cuts the power now; returns where it landed.
    pub fn cut(&self) -> String {
        self.send("cut");
        self.cut_at().expect("the power is cut")
    }

    /// Cuts the power at the `n`-th operation of `kind` (`write`,
    /// `fsync`, `truncate`, …, or `any`) on a path that ends in `suffix`
    /// (`*`: any path): before it runs, or once it has returned (`after`).
    pub fn arm(&self, kind: &str, suffix: &str, n: u64, after: bool) {
        assert!(n >= 1);
        let when = if after { " after" } else { "" };
        self.send(&format!("arm {kind} {suffix} {n}{when}"));
    }

    /// Switches tearing (see [`Options::tear`]) for the next cut.
    pub fn set_tear(&self, on: bool) {
        self.send(if on { "tear on" } else { "tear off" });
    }

    /// What the file system printed.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Unmounts, waits for the file system to exit, and removes its log.
    pub fn unmount(mut self) {
        self.stop(false);
    }

    fn stop(&mut self, lazy_at_once: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut done = false;
        if !lazy_at_once {
            // A process that was just killed may still hold files open for
            // a moment: retry before falling back to a lazy unmount.
            for _ in 0..50 {
                if fusermount(&self.mountpoint, false) {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !done {
            fusermount(&self.mountpoint, true);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `fusermount3 -u [-z] MOUNTPOINT`; whether it succeeded.
fn fusermount(mountpoint: &Path, lazy: bool) -> bool {
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    cmd.arg("-q")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for LossyFs {
    fn drop(&mut self) {
        // Never leave a mount behind, even when a test panicked with files
        // still open on it.
        let lazy = std::thread::panicking();
        self.stop(lazy);
    }
}

/// A temporary folder for one mount: `backing/` (what the disk holds),
/// `mnt/` (the mount point), and `off/` and `logs/` beside them, off the
/// mount. Removed when dropped.
pub struct Place {
    dir: tempfile::TempDir,
}

impl Place {
    pub fn new() -> Place {
        let dir = tempfile::tempdir().unwrap();
        for d in ["backing", "mnt", "off", "logs"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        Place { dir }
    }

    /// The backing folder: what survives a cut.
    pub fn backing(&self) -> PathBuf {
        self.dir.path().join("backing")
    }

    /// A folder off the mount (inputs, reports).
    pub fn off(&self) -> PathBuf {
        self.dir.path().join("off")
    }

    /// A folder off the mount for logs.
    pub fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Mounts the backing folder at `mnt/`.
    pub fn mount(&self, options: Options) -> LossyFs {
        LossyFs::mount(&self.backing(), &self.dir.path().join("mnt"), options)
    }

    /// Cuts the power, unmounts, and mounts what survived.
    pub fn cut_and_remount(&self, fs: LossyFs, options: Options) -> LossyFs {
        fs.cut();
        fs.unmount();
        self.mount(options)
    }
}
