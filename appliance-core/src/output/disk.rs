//! Bootable disk outputs: a sparse GPT disk with an EFI system partition (systemd-boot, the
//! image's kernel and initramfs) and an ext4 root partition made by `mke2fs -E offset=` and
//! filled by debugfs from the store's objects (`ext4`); qcow2 is the same disk converted by
//! `qemu-img`. Nothing is mounted: the ESP is a FAT image filled with mtools and copied in.
//! Identifiers (partition and filesystem UUIDs) derive from the image's name, so an appliance
//! keeps them across rebuilds; a rebuild updates the previous disk's root filesystem in place
//! when only its content changed (`ext4`).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::process::Cmd;
use crate::store::tree::{EntryKind, Tree};
use crate::store::{ImageRecord, Store};

const MIB: u64 = 1024 * 1024;
/// The first partition starts at 1 MiB, as every partitioning tool aligns.
const FIRST_LBA_BYTES: u64 = MIB;
/// GPT's backup header and table take the last 33 sectors; keep a MiB free.
const TAIL_BYTES: u64 = MIB;
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// "Linux root (x86-64)" of the Discoverable Partitions Specification.
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
pub const SYSTEMD_BOOT: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Packages a bootable image needs on top of what the manifest asks for.
pub fn boot_packages(kernel: Option<&str>) -> Vec<String> {
    vec![
        kernel.unwrap_or("linux-image-amd64").to_owned(),
        "systemd-sysv".to_owned(),
        "systemd-boot-efi".to_owned(),
    ]
}

/// A UUID (RFC 4122 version 4 layout) derived from a digest and a purpose.
pub fn derived_uuid(digest: &str, purpose: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let hash = Sha256::digest(format!("{purpose}\n{digest}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = crate::store::tree::hex(&bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The kernel and initramfs of an image: the newest `/boot/vmlinuz-*` with its initrd.
fn kernel_files(tree: &Tree) -> anyhow::Result<(String, String)> {
    let mut kernels: Vec<&str> = tree
        .entries()
        .iter()
        .filter(|(p, e)| p.starts_with("boot/vmlinuz-") && e.kind == EntryKind::File)
        .map(|(p, _)| p.as_str())
        .collect();
    // As dpkg orders versions: by string order `6.1.0-9` would beat `6.1.0-10`.
    kernels.sort_by(|a, b| {
        crate::packages::debian_version::compare(
            a.trim_start_matches("boot/vmlinuz-"),
            b.trim_start_matches("boot/vmlinuz-"),
        )
    });
    let Some(kernel) = kernels.last() else {
        bail!(
            "the image has no kernel in /boot; a disk output installs `linux-image-amd64` unless `kernel` names another"
        );
    };
    let version = kernel.trim_start_matches("boot/vmlinuz-");
    let initrd = format!("boot/initrd.img-{version}");
    if tree.get(&initrd).is_none_or(|e| e.kind != EntryKind::File) {
        bail!("the image has a kernel ({version}) but no /{initrd}: is initramfs-tools installed?");
    }
    Ok(((*kernel).to_owned(), initrd))
}

/// What the disk is made of, for the caller's stamp and for `run`.
#[derive(Debug, Clone)]
pub struct DiskLayout {
    pub root_uuid: String,
    pub size: u64,
}

/// The kernel command line of the boot entry.
pub fn command_line(root_uuid: &str, extra: &[String]) -> String {
    let mut words = vec![format!("root=UUID={root_uuid}"), "rw".to_owned()];
    if !extra.iter().any(|w| w.starts_with("console=")) {
        words.push("console=ttyS0,115200".to_owned());
    }
    words.extend(extra.iter().cloned());
    words.join(" ")
}

/// Whether a disk written earlier at the destination may be updated instead of rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Write from scratch.
    Never,
    /// Update a copy of the previous disk, then put it in place: a failed build leaves the
    /// previous output as it was.
    Copy,
    /// Update the previous disk where it is (a work file that nothing else reads).
    InPlace,
}

/// How the disk came to be, for the build's `-v` notes.
#[derive(Debug, Clone)]
pub enum Written {
    Full,
    /// The previous disk's root filesystem was updated: this many entries changed.
    Updated(usize),
    /// An update was possible in principle but declined or failed; the disk was rewritten.
    Rewritten(String),
}

/// What a disk of an image consists of, decided before anything is written.
struct Plan {
    tree: Tree,
    kernel: String,
    initrd: String,
    root_uuid: String,
    esp_size: u64,
    root_size: u64,
    total: u64,
    /// Bytes of file content in the tree: what the root filesystem holds at least.
    content: u64,
    loader_entry: String,
    /// A digest of everything but the root filesystem's content: an earlier disk with the
    /// same key differs only inside the root filesystem.
    layout_key: String,
}

/// What an earlier disk was written from, kept beside it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct DiskState {
    image: i64,
    tree_digest: String,
    layout_key: String,
}

fn state_path(disk: &Path) -> PathBuf {
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    disk.with_file_name(format!(".{}.state.json", name.trim_start_matches('.')))
}

/// Root filesystem sizes are rounded to this, so a small change keeps the layout.
const ROOT_SIZE_STEP: u64 = 64 * MIB;

fn plan(
    store: &Store,
    image: &ImageRecord,
    cmdline_extra: &[String],
    size: Option<u64>,
) -> anyhow::Result<Plan> {
    let mut tree = store.tree(image)?;
    let (kernel, initrd) = kernel_files(&tree)?;
    if tree.get(SYSTEMD_BOOT).is_none() {
        bail!("the image has no /{SYSTEMD_BOOT} (package systemd-boot-efi)");
    }
    // Identifiers follow the image's name, not its content: a rebuilt appliance keeps its
    // UUIDs (so fstab and the boot entry stay the same and the disk can be updated).
    let root_uuid = derived_uuid(&image.name, "root filesystem");
    let kernel_size = tree.get(&kernel).map_or(0, |e| e.size);
    let initrd_size = tree.get(&initrd).map_or(0, |e| e.size);
    let esp_size = ((kernel_size + initrd_size) * 5 / 4 + 32 * MIB)
        .div_ceil(MIB)
        .max(64)
        * MIB;
    add_fstab(&mut tree, store, &root_uuid)?;
    let content: u64 = tree.entries().values().map(|e| e.size).sum();
    let inodes = tree.len() as u64;
    let root_size = match size {
        Some(total) => {
            let available = total.saturating_sub(FIRST_LBA_BYTES + esp_size + TAIL_BYTES);
            if available < content + content / 10 {
                bail!(
                    "size {} is too small: the root filesystem needs about {} MiB",
                    crate::manifest::validate::human_size(total),
                    (content * 11 / 10 + FIRST_LBA_BYTES + esp_size + TAIL_BYTES) / MIB + 1
                );
            }
            available / MIB * MIB
        }
        // Headroom: a third more than the content, plus 256 MiB for logs and state.
        None => {
            (content * 4 / 3 + inodes * 4096 + 256 * MIB).div_ceil(ROOT_SIZE_STEP) * ROOT_SIZE_STEP
        }
    };
    let total = FIRST_LBA_BYTES + esp_size + root_size + TAIL_BYTES;
    let loader_entry = format!(
        "title {}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {}\n",
        image.name,
        command_line(&root_uuid, cmdline_extra)
    );
    let layout_key = {
        use sha2::{Digest as _, Sha256};
        let digest_of = |path: &str| tree.get(path).and_then(|e| e.digest.clone());
        let mut hasher = Sha256::new();
        hasher.update(format!(
            "disk v2\n{root_uuid}\n{esp_size} {root_size} {total}\n{loader_entry}\n{:?} {:?} {:?}\n",
            digest_of(&kernel),
            digest_of(&initrd),
            digest_of(SYSTEMD_BOOT)
        ));
        crate::store::tree::hex(&hasher.finalize())
    };
    Ok(Plan {
        tree,
        kernel,
        initrd,
        root_uuid,
        esp_size,
        root_size,
        total,
        content,
        loader_entry,
        layout_key,
    })
}

/// Write `image` as a raw GPT disk at `destination` (sparse). `size` is the manifest's, or
/// computed from the content with headroom. With `reuse`, a disk written earlier at the
/// destination for another tree of the same layout is updated rather than rewritten.
pub fn write_raw(
    store: &Store,
    image: &ImageRecord,
    cmdline_extra: &[String],
    size: Option<u64>,
    destination: &Path,
    reuse: Reuse,
) -> anyhow::Result<(DiskLayout, Written)> {
    if let Some(missing) = crate::process::host::describe_missing(crate::process::host::Need::Disk)
    {
        bail!(
            "disk outputs need {missing}, which is not on PATH (`.ci/install-deps` installs everything cargo-appliance uses)"
        );
    }
    let plan = plan(store, image, cmdline_extra, size)?;
    let parent = destination
        .parent()
        .context("the disk has no parent directory")?;
    let work = tempfile::Builder::new()
        .prefix(".disk-")
        .tempdir_in(parent)?;
    let layout = DiskLayout {
        root_uuid: plan.root_uuid.clone(),
        size: plan.total,
    };
    let state = DiskState {
        image: image.id,
        tree_digest: image.tree_digest.clone(),
        layout_key: plan.layout_key.clone(),
    };
    let mut written = Written::Full;
    if reuse != Reuse::Never {
        match update(store, &plan, destination, reuse, work.path()) {
            Ok(Some(changed)) => {
                crate::json_file::write_atomically(&state_path(destination), &state)?;
                return Ok((layout, Written::Updated(changed)));
            }
            Ok(None) => {}
            Err(error) => written = Written::Rewritten(format!("{error:#}")),
        }
    }
    let _ = std::fs::remove_file(state_path(destination));
    write_full(store, image, &plan, destination, work.path())?;
    crate::json_file::write_atomically(&state_path(destination), &state)?;
    Ok((layout, written))
}

/// Update the disk at `destination` when it was written for a tree of the same layout.
/// `Ok(None)`: there is nothing to update from (or the changes are beyond debugfs).
fn update(
    store: &Store,
    plan: &Plan,
    destination: &Path,
    reuse: Reuse,
    work: &Path,
) -> anyhow::Result<Option<usize>> {
    let state_file = state_path(destination);
    let Some(state) = crate::json_file::load::<DiskState>(&state_file) else {
        return Ok(None);
    };
    if state.layout_key != plan.layout_key
        || !fs_err::metadata(destination).is_ok_and(|m| m.len() == plan.total)
    {
        return Ok(None);
    }
    let previous = {
        let catalog = store.read_catalog()?;
        match catalog
            .images()?
            .into_iter()
            .find(|i| i.id == state.image && i.tree_digest == state.tree_digest)
        {
            Some(previous) => catalog.tree(previous.id)?,
            None => return Ok(None),
        }
    };
    let mut previous = previous;
    add_fstab(&mut previous, store, &plan.root_uuid)?;
    let Some(script) = super::ext4::script(&previous, &plan.tree) else {
        return Ok(None);
    };
    let disk = match reuse {
        Reuse::InPlace => {
            // From here on the disk no longer matches its state.
            fs_err::remove_file(&state_file)?;
            destination.to_path_buf()
        }
        _ => {
            let copy = work.join("disk.raw");
            Cmd::new("cp")
                .args(["--sparse=always", "--reflink=auto"])
                .arg(destination)
                .arg(&copy)
                .output()
                .context("copying the previous disk")?;
            copy
        }
    };
    super::ext4::apply(
        &script,
        &store.objects(),
        &disk,
        FIRST_LBA_BYTES + plan.esp_size,
        work,
    )?;
    if disk != destination {
        fs_err::rename(&disk, destination)?;
    }
    Ok(Some(script.changed))
}

fn write_full(
    store: &Store,
    image: &ImageRecord,
    plan: &Plan,
    destination: &Path,
    work: &Path,
) -> anyhow::Result<()> {
    let objects = store.objects();
    let tree = &plan.tree;
    // The disk is sparse, so nothing reserves its space: without this check a full
    // filesystem shows as thousands of failed writes halfway through the root filesystem.
    // It holds the content, its metadata (a block per entry at most) and the ESP written
    // twice (staged, then copied in).
    let needed = plan.content + plan.tree.len() as u64 * 4096 + 2 * plan.esp_size;
    crate::disk_space::ensure_room(work, needed, &format!("the disk {}", destination.display()))?;
    // The EFI system partition: systemd-boot, a loader entry, the kernel and initramfs.
    let write_object = |path: &str, to: &Path| -> anyhow::Result<()> {
        let digest = tree
            .get(path)
            .and_then(|e| e.digest.clone())
            .with_context(|| format!("/{path} has no content"))?;
        let mut reader = objects.open(&digest)?;
        let mut file = fs_err::File::create(to)?;
        std::io::copy(&mut reader, &mut file)?;
        Ok(())
    };
    let staged = work.join("esp-files");
    fs_err::create_dir_all(&staged)?;
    write_object(SYSTEMD_BOOT, &staged.join("BOOTX64.EFI"))?;
    write_object(&plan.kernel, &staged.join("vmlinuz"))?;
    write_object(&plan.initrd, &staged.join("initrd.img"))?;
    fs_err::write(
        staged.join("loader.conf"),
        "default appliance.conf\ntimeout 0\nconsole-mode keep\n",
    )?;
    fs_err::write(staged.join("appliance.conf"), &plan.loader_entry)?;
    // The disk: a sparse file and its GPT by sfdisk; the root filesystem is then written in
    // place at its partition's offset (no intermediate image of hundreds of MiB to copy).
    let (esp_size, root_size, root_uuid) = (plan.esp_size, plan.root_size, &plan.root_uuid);
    let disk = work.join("disk.raw");
    fs_err::File::create(&disk)?.set_len(plan.total)?;
    let script = format!(
        "label: gpt\nlabel-id: {}\nfirst-lba: 2048\n\
         start=2048, size={}, type={ESP_TYPE}, uuid={}, name=\"esp\"\n\
         size={}, type={ROOT_TYPE}, uuid={}, name=\"root\"\n",
        derived_uuid(&image.name, "disk"),
        esp_size / 512,
        derived_uuid(&image.name, "esp partition"),
        root_size / 512,
        derived_uuid(&image.name, "root partition"),
    );
    run_with_stdin(
        crate::process::background("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&disk),
        &script,
    )
    .context("writing the partition table with sfdisk")?;

    // The ESP is small: formatted as an image of its own and copied in (mtools cannot read a
    // FAT that `mkfs.vfat --offset` wrote inside a larger file).
    let volume_id = &derived_uuid(&image.name, "esp")[..8];
    let esp = work.join("esp.img");
    Cmd::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "-i", volume_id, "-C"])
        .arg(&esp)
        .arg((esp_size / 1024).to_string())
        .output()
        .context("creating the EFI system partition")?;
    let esp_arg = esp.to_string_lossy().into_owned();
    Cmd::new("mmd")
        .args([
            "-i",
            &esp_arg,
            "::/EFI",
            "::/EFI/BOOT",
            "::/loader",
            "::/loader/entries",
        ])
        .output()?;
    for (file, to) in [
        ("BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"),
        ("vmlinuz", "::/vmlinuz"),
        ("initrd.img", "::/initrd.img"),
        ("loader.conf", "::/loader/loader.conf"),
        ("appliance.conf", "::/loader/entries/appliance.conf"),
    ] {
        Cmd::new("mcopy")
            .args(["-i", &esp_arg])
            .arg(staged.join(file))
            .arg(to)
            .output()
            .with_context(|| format!("copying {file} into the EFI system partition"))?;
    }
    copy_sparse(&esp, &disk, FIRST_LBA_BYTES)?;

    // The root filesystem, in place at its partition's offset: written by debugfs from the
    // store's objects into an empty ext4, or (for names debugfs cannot quote) by `mke2fs -d`
    // from the tree staged as a directory.
    let script = super::ext4::populate(tree);
    let staged_root = match script {
        Some(_) => None,
        None => {
            let root_dir = work.join("root");
            crate::store::export::export_directory(tree, &objects, &root_dir)?;
            Some(root_dir)
        }
    };
    let root_offset = FIRST_LBA_BYTES + esp_size;
    let mut mke2fs = Cmd::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "root", "-U", root_uuid])
        .args([
            "-E",
            &format!("hash_seed={root_uuid},root_owner=0:0,offset={root_offset}"),
        ]);
    if let Some(root_dir) = &staged_root {
        mke2fs = mke2fs.arg("-d").arg(root_dir);
    }
    mke2fs
        .arg(&disk)
        .arg(format!("{}k", root_size / 1024))
        .env("E2FSPROGS_FAKE_TIME", image.created_at.to_string())
        .output()
        .context("writing the root filesystem with mke2fs")?;
    if let Some(script) = &script {
        super::ext4::apply(script, &objects, &disk, root_offset, work)?;
    }
    // An output, like Cargo's: rebuilt if lost, so not flushed here (the writeback of
    // hundreds of MiB would double the time).
    fs_err::rename(&disk, destination)?;
    Ok(())
}

/// `/etc/fstab` naming the root filesystem by UUID (added to the staged tree only: the
/// stored image stays independent of the disk it is written to).
fn add_fstab(tree: &mut Tree, store: &Store, root_uuid: &str) -> anyhow::Result<()> {
    let text = format!(
        "# Written by cargo-appliance for the disk output.\nUUID={root_uuid} / ext4 defaults,errors=remount-ro 0 1\n"
    );
    let mut staging = store.staging()?;
    let (digest, size) = staging.add(text.as_bytes())?;
    staging.commit()?;
    let entry = crate::store::tree::Entry {
        kind: EntryKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        digest: Some(digest),
        link_target: None,
        device: None,
        xattrs: Default::default(),
        mtime: 0,
    };
    tree.insert("etc/fstab", entry)?;
    Ok(())
}

fn run_with_stdin(command: &mut std::process::Command, input: &str) -> anyhow::Result<()> {
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let watched = crate::process::interrupt::watch(&child);
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    drop(watched);
    crate::process::interrupt::check()?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// Copy `from` into `to` at `offset`, leaving all-zero blocks as holes.
fn copy_sparse(from: &Path, to: &Path, offset: u64) -> anyhow::Result<()> {
    const BLOCK: usize = 64 * 1024;
    let mut input = fs_err::File::open(from)?;
    let mut output = fs_err::OpenOptions::new().write(true).open(to)?;
    let mut buffer = vec![0u8; BLOCK];
    let mut position = offset;
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            let n = input.read(&mut buffer[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buffer[..filled].iter().any(|&b| b != 0) {
            output.seek(SeekFrom::Start(position))?;
            output.write_all(&buffer[..filled])?;
        }
        position += filled as u64;
        if filled < BLOCK {
            break;
        }
    }
    Ok(())
}

/// `qemu-img convert` of a raw disk to qcow2.
pub fn write_qcow2(raw: &Path, destination: &Path) -> anyhow::Result<()> {
    let temp = destination.with_extension("qcow2.partial");
    let convert = |direct: bool| {
        let mut command = Cmd::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]);
        if direct {
            // Written with O_DIRECT, out of order: hundreds of MiB bypass the page cache,
            // which makes the conversion about twice as fast; tmpfs has no O_DIRECT.
            command = command.args(["-t", "none", "-W"]);
        }
        command.arg(raw).arg(&temp).output()
    };
    if let Err(error) = convert(true).or_else(|_| convert(false)) {
        std::fs::remove_file(&temp).ok();
        return Err(error).context("converting the disk to qcow2 (qemu-img)");
    }
    fs_err::rename(&temp, destination)?;
    Ok(())
}

/// Where the disk outputs of an appliance live.
pub fn disk_path(dir: &Path, name: &str, format: &str) -> PathBuf {
    dir.join(format!("{name}.{format}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tree::Entry;

    fn file() -> Entry {
        Entry {
            kind: EntryKind::File,
            digest: Some("00".repeat(32)),
            size: 1,
            ..Entry::dir(0o644)
        }
    }

    #[test]
    fn the_newest_kernel_wins_by_dpkg_order_not_string_order() {
        let mut tree = Tree::new();
        for version in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            tree.insert(&format!("boot/vmlinuz-{version}"), file())
                .expect("insert");
            tree.insert(&format!("boot/initrd.img-{version}"), file())
                .expect("insert");
        }
        let (kernel, initrd) = kernel_files(&tree).expect("a kernel");
        assert_eq!(kernel, "boot/vmlinuz-6.1.0-10-amd64");
        assert_eq!(initrd, "boot/initrd.img-6.1.0-10-amd64");
    }
}
