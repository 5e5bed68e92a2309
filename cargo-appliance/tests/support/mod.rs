//! Helpers shared by the integration tests that run the real binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The binary, with the environment that would change its behaviour removed. Its stores
/// start without the seed history, so a test's history is what the test put there;
/// [`seeded_binary`] is the binary as users run it.
pub fn binary() -> Command {
    let mut command = seeded_binary();
    command.env("APPLIANCE_NO_SEED", "1");
    command
}

/// The binary whose new stores get the seed history, as a user's do. The one Cargo built
/// for these tests, or `APPLIANCE_TEST_BINARY` (a long run, such as the kill harness' 60
/// kills, goes on with a copy while the target directory is rebuilt).
pub fn seeded_binary() -> Command {
    let program = std::env::var_os("APPLIANCE_TEST_BINARY").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_cargo-appliance")),
        PathBuf::from,
    );
    let mut command = Command::new(program);
    command
        .env_remove("APPLIANCE_STORE")
        .env_remove("APPLIANCE_NO_SEED")
        .env("NO_COLOR", "1");
    command
}

/// `command` run with a tmpfs of `size` (as `mount -o size=` reads it) at `dir`, in a mount
/// namespace of its own so nothing outside sees it: a small filesystem to fill without
/// filling the host's. After the command, the shell prints `left: ` and what `dir` still
/// holds on stdout; the exit status is the command's.
pub fn on_small_tmpfs(size: &str, dir: &std::path::Path, command: &Command) -> Command {
    let script = r#"mount -t tmpfs -o "size=$1" tmpfs "$2" || exit 99
dir=$2; shift 2
"$@"; status=$?
echo "left: $(ls -A "$dir")"
exit $status"#;
    let mut wrapped = Command::new("unshare");
    wrapped
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            size,
        ])
        .arg(dir)
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(current) = command.get_current_dir() {
        wrapped.current_dir(current);
    }
    wrapped
}

/// `mmdebstrap --variant=minbase bookworm`, built once and shared by the tests and runs.
pub fn minbase_tarball() -> PathBuf {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("appliance-cache");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let tarball = cache.join("minbase-bookworm.tar");
    let lock = std::fs::File::create(cache.join("minbase.lock")).expect("lock file");
    lock.lock().expect("lock");
    if !tarball.exists() {
        let partial = cache.join("minbase-bookworm.partial.tar");
        let status = Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", "bookworm"])
            .arg(&partial)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .status()
            .expect("mmdebstrap runs (installed by .ci/install-deps)");
        assert!(status.success(), "mmdebstrap failed");
        std::fs::rename(&partial, &tarball).expect("rename");
    }
    tarball
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `find` of a tree, one line per entry (path, type, mode, owner, group, size, link target),
/// sorted: two trees are equal when their listings are.
pub fn tree_listing(root: &std::path::Path) -> Vec<String> {
    let output = Command::new("find")
        .arg(".")
        .args(["-printf", "%p %y %m %U %G %s %l\n"])
        .current_dir(root)
        .output()
        .expect("find runs");
    assert!(output.status.success());
    let mut lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        // Directory sizes are the filesystem's business, not the image's.
        .map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            if fields.get(1) == Some(&"d") {
                fields[..5].join(" ")
            } else {
                l.to_owned()
            }
        })
        .collect();
    lines.sort();
    lines
}

/// Docker's registry (Debian's `docker-registry`) on a loopback port with a configuration
/// and storage of its own, its access log kept for counting requests; stopped on drop.
pub struct Registry {
    pub port: u16,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

/// What a [`Registry`] asks of its clients beyond plain HTTP.
#[derive(Debug, Default)]
pub struct Guard<'a> {
    /// PEM certificate and key files for TLS.
    pub tls: Option<(&'a std::path::Path, &'a std::path::Path)>,
    /// An htpasswd file (bcrypt) for basic auth.
    pub htpasswd: Option<&'a std::path::Path>,
}

impl Registry {
    pub fn start() -> Self {
        Self::start_with(&Guard::default())
    }

    pub fn start_with(guard: &Guard<'_>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((certificate, key)) = guard.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                certificate.display(),
                key.display()
            ));
        }
        if let Some(htpasswd) = guard.htpasswd {
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: tests\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).expect("config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry runs (installed by .ci/install-deps)");
        let registry = Self { port, dir, child };
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "the registry did not listen: {}",
                registry.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Access-log lines of requests with `method` whose path contains `path_part`.
    pub fn requests(&self, method: &str, path_part: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(path_part))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The root filesystem of a disk (qcow2 or raw) as a file of its own, after the tools users
/// run on disks accepted it: `qemu-img check` (qcow2), `sfdisk --dump` (the GPT layout with
/// an ESP and a root partition), `e2fsck -fn`.
pub fn root_filesystem(disk: &std::path::Path, work: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(work).expect("mkdir");
    let raw = if disk.extension().is_some_and(|e| e == "qcow2") {
        let check = Command::new("qemu-img")
            .arg("check")
            .arg(disk)
            .output()
            .expect("qemu-img");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let raw = work.join("disk.raw");
        let convert = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(disk)
            .arg(&raw)
            .status()
            .expect("qemu-img");
        assert!(convert.success());
        raw
    } else {
        disk.to_path_buf()
    };
    let dump = Command::new("sfdisk")
        .arg("--dump")
        .arg(&raw)
        .output()
        .expect("sfdisk");
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains("label: gpt"), "{dump}");
    let partitions: Vec<&str> = dump.lines().filter(|l| l.contains("start=")).collect();
    assert_eq!(partitions.len(), 2, "{dump}");
    assert!(
        partitions[0].contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        "{dump}"
    );
    assert!(
        partitions[1].contains("type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"),
        "{dump}"
    );
    let field = |line: &str, name: &str| -> u64 {
        line.split(',')
            .find_map(|f| f.split_once('=').filter(|(k, _)| k.trim().ends_with(name)))
            .and_then(|(_, v)| v.trim().parse().ok())
            .expect("a number")
    };
    let root_fs = work.join("root.ext4");
    let extract = Command::new("dd")
        .arg(format!("if={}", raw.display()))
        .arg(format!("of={}", root_fs.display()))
        .args(["bs=512", "conv=sparse", "status=none"])
        .arg(format!("skip={}", field(partitions[1], "start")))
        .arg(format!("count={}", field(partitions[1], "size")))
        .status()
        .expect("dd");
    assert!(extract.success());
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&root_fs)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    root_fs
}

/// The kill harnesses' schedule: `APPLIANCE_KILLS` random kills (`default` without it) at
/// moments drawn from `APPLIANCE_KILL_SEED` (the clock without it); printed, so a failure
/// can be replayed.
pub fn kill_schedule(harness: &str, default: u32) -> (u32, Moments) {
    let kills = std::env::var("APPLIANCE_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(default);
    let seed: u64 = std::env::var("APPLIANCE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1)
        });
    eprintln!("{harness}: APPLIANCE_KILLS={kills} APPLIANCE_KILL_SEED={seed}");
    (kills, Moments { seed, state: seed })
}

/// xorshift64*: the harnesses' kill moments, reproducible from the printed seed.
pub struct Moments {
    pub seed: u64,
    state: u64,
}

impl Moments {
    pub fn next_below(&mut self, bound: u64) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound.max(1)
    }
}

/// The history a store recorded build by build equals what `history rebuild` derives from
/// its images: none listed without its derivations, none recorded twice, the package
/// steps' consequences marked alike; `appliance`'s builds are in it. `store_command` runs
/// the binary on the store.
pub fn assert_history_rederivable(
    store_command: impl Fn(&[&str]) -> Command,
    appliance: &str,
    context: &str,
) {
    let run = |args: &[&str]| {
        let output = store_command(args).output().expect("the binary runs");
        assert!(output.status.success(), "{context}: {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let export = || {
        let mut lines: Vec<String> = run(&["history", "export", "-"])
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };
    let recorded = export();
    run(&["history", "rebuild"]);
    let derived = export();
    assert!(
        derived.iter().any(|l| l.contains(&format!("{appliance}@"))),
        "{context}: the history has {appliance}'s derivations: {derived:?}"
    );
    assert_eq!(recorded, derived, "{context}: the recorded history");
}
