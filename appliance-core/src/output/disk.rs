//! Bootable disk outputs: a sparse GPT disk with an EFI system partition (systemd-boot, the
//! image's kernel and initramfs) and an ext4 root partition written by `mke2fs -d` from a
//! staged tree; qcow2 is the same disk converted by `qemu-img`. Nothing is mounted: the ESP is
//! a FAT image filled with mtools and copied in, the root filesystem is written in place by
//! `mke2fs -E offset=`.
//! Identifiers (partition and filesystem UUIDs) derive from the tree digest, so one tree gives
//! one disk.

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
    kernels.sort();
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

/// Write `image` as a raw GPT disk at `destination` (sparse). `size` is the manifest's, or
/// computed from the content with headroom.
pub fn write_raw(
    store: &Store,
    image: &ImageRecord,
    cmdline_extra: &[String],
    size: Option<u64>,
    destination: &Path,
) -> anyhow::Result<DiskLayout> {
    for program in ["mke2fs", "mkfs.vfat", "mcopy", "mmd", "sfdisk"] {
        if !crate::process::available(program) {
            bail!(
                "`{program}` is missing: disk outputs need e2fsprogs, dosfstools, mtools and fdisk (`.ci/install-deps` installs them)"
            );
        }
    }
    let tree = store.tree(image)?;
    let (kernel, initrd) = kernel_files(&tree)?;
    if tree.get(SYSTEMD_BOOT).is_none() {
        bail!("the image has no /{SYSTEMD_BOOT} (package systemd-boot-efi)");
    }
    let objects = store.objects();
    let parent = destination
        .parent()
        .context("the disk has no parent directory")?;
    let work = tempfile::Builder::new()
        .prefix(".disk-")
        .tempdir_in(parent)?;

    // The EFI system partition: systemd-boot, a loader entry, the kernel and initramfs.
    let root_uuid = derived_uuid(&image.tree_digest, "root filesystem");
    let kernel_size = tree.get(&kernel).map_or(0, |e| e.size);
    let initrd_size = tree.get(&initrd).map_or(0, |e| e.size);
    let esp_size = ((kernel_size + initrd_size) * 5 / 4 + 32 * MIB)
        .div_ceil(MIB)
        .max(64)
        * MIB;
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
    let staged = work.path().join("esp-files");
    fs_err::create_dir_all(&staged)?;
    write_object(SYSTEMD_BOOT, &staged.join("BOOTX64.EFI"))?;
    write_object(&kernel, &staged.join("vmlinuz"))?;
    write_object(&initrd, &staged.join("initrd.img"))?;
    fs_err::write(
        staged.join("loader.conf"),
        "default appliance.conf\ntimeout 0\nconsole-mode keep\n",
    )?;
    fs_err::write(
        staged.join("appliance.conf"),
        format!(
            "title {}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {}\n",
            image.reference(),
            command_line(&root_uuid, cmdline_extra)
        ),
    )?;
    // The root filesystem's content: the tree staged with its real owners.
    let root_dir = work.path().join("root");
    let mut tree = tree;
    add_fstab(&mut tree, store, &root_uuid)?;
    crate::store::export::export_directory(&tree, &objects, &root_dir)?;
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
        None => ((content * 4 / 3 + inodes * 4096 + 256 * MIB) / MIB + 1) * MIB,
    };

    // The disk: a sparse file and its GPT by sfdisk; the root filesystem is then written in
    // place at its partition's offset (no intermediate image of hundreds of MiB to copy).
    let total = FIRST_LBA_BYTES + esp_size + root_size + TAIL_BYTES;
    let disk = work.path().join("disk.raw");
    fs_err::File::create(&disk)?.set_len(total)?;
    let script = format!(
        "label: gpt\nlabel-id: {}\nfirst-lba: 2048\n\
         start=2048, size={}, type={ESP_TYPE}, uuid={}, name=\"esp\"\n\
         size={}, type={ROOT_TYPE}, uuid={}, name=\"root\"\n",
        derived_uuid(&image.tree_digest, "disk"),
        esp_size / 512,
        derived_uuid(&image.tree_digest, "esp partition"),
        root_size / 512,
        derived_uuid(&image.tree_digest, "root partition"),
    );
    run_with_stdin(
        std::process::Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&disk),
        &script,
    )
    .context("writing the partition table with sfdisk")?;

    // The ESP is small: formatted as an image of its own and copied in (mtools cannot read a
    // FAT that `mkfs.vfat --offset` wrote inside a larger file).
    let volume_id = &derived_uuid(&image.tree_digest, "esp")[..8];
    let esp = work.path().join("esp.img");
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

    Cmd::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", "root", "-U", &root_uuid])
        .args([
            "-E",
            &format!(
                "hash_seed={root_uuid},root_owner=0:0,offset={}",
                FIRST_LBA_BYTES + esp_size
            ),
        ])
        .arg("-d")
        .arg(&root_dir)
        .arg(&disk)
        .arg(format!("{}k", root_size / 1024))
        .env("E2FSPROGS_FAKE_TIME", image.created_at.to_string())
        .output()
        .context("writing the root filesystem with mke2fs -d")?;
    fs_err::File::open(&disk)?.sync_all()?;
    fs_err::rename(&disk, destination)?;
    Ok(DiskLayout {
        root_uuid,
        size: total,
    })
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
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
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
    Cmd::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(&temp)
        .output()
        .context("converting the disk to qcow2 (qemu-img)")?;
    fs_err::rename(&temp, destination)?;
    Ok(())
}

/// Where the disk outputs of an appliance live.
pub fn disk_path(dir: &Path, name: &str, format: &str) -> PathBuf {
    dir.join(format!("{name}.{format}"))
}
