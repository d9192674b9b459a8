//! Host set-up: packages, the cache directory, and the guest kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use super::VmError;

/// Modules the guest loads, named as in `modules.dep`; their dependencies come along: VFIO,
/// and NVMe over TCP both ways (the kernel's initiator, and its target as `rnvme serve`'s peer).
pub(crate) const KERNEL_MODULES: &[&str] =
    &["vfio_iommu_type1", "vfio_pci", "nvme_tcp", "nvmet_tcp"];

/// `kernel/drivers/vfio/pci/vfio-pci.ko.xz` → `vfio_pci`.
pub(crate) fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Host programs the runner and guests need, and the Debian package providing each.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("nvme", "nvme-cli"),
    ("fio", "fio"),
    ("mke2fs", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("xz", "xz-utils"),
];

/// The meta package naming the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Serialises package installation within this process (apt holds its own lock across
/// processes); also remembers that `apt-get update` already ran.
static APT: Mutex<bool> = Mutex::new(false);

/// The runner's cache directory: `$RNVME_VM_CACHE`, else `$XDG_CACHE_HOME/rnvme/vm`, else
/// `~/.cache/rnvme/vm`. Created if missing.
pub fn cache_dir() -> Result<PathBuf, VmError> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let dir = if let Some(d) = env("RNVME_VM_CACHE") {
        PathBuf::from(d)
    } else if let Some(x) = env("XDG_CACHE_HOME") {
        PathBuf::from(x).join("rnvme/vm")
    } else if let Some(h) = env("HOME") {
        PathBuf::from(h).join(".cache/rnvme/vm")
    } else {
        return Err(VmError::Config(
            "no cache directory: set RNVME_VM_CACHE or HOME".into(),
        ));
    };
    fs::create_dir_all(&dir)
        .map_err(|e| VmError::io(format!("create cache directory {}", dir.display()), e))?;
    Ok(dir)
}

/// Finds a program in `PATH`, then in `/usr/sbin` and `/sbin` (often not in a user's `PATH`).
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether `path` is an ELF executable without a program interpreter (statically linked).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(mut f) = fs::File::open(path) else {
        return false;
    };
    let mut data = Vec::new();
    if f.by_ref().take(1 << 16).read_to_end(&mut data).is_err() {
        return false;
    }
    elf_has_interp(&data) == Some(false)
}

/// `Some(true)` if the 64-bit little-endian ELF image starting with `data` has a PT_INTERP
/// program header, `Some(false)` if it has none, `None` if it is not such an ELF file or its
/// program headers lie beyond `data`.
pub(crate) fn elf_has_interp(data: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

/// Whether this process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Runs a command to completion, failing with its stderr tail if it exits non-zero.
pub(crate) fn run_command(cmd: &mut Command) -> Result<Output, VmError> {
    let shown = describe(cmd);
    log::debug!("running {shown}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VmError::io(format!("start {shown}"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(VmError::Command {
            command: shown,
            detail: format!("{} ({})", out.status, super::tail_lines(stderr.trim(), 3)),
        });
    }
    Ok(out)
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args().take(6) {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if cmd.get_args().len() > 6 {
        s.push_str(" …");
    }
    s
}

fn apt_get(args: &[&str]) -> Result<(), VmError> {
    run_command(
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .map(|_| ())
}

/// Runs `apt-get update` once per process.
fn apt_update_once(updated: &mut bool) -> Result<(), VmError> {
    if !*updated {
        log::info!("running apt-get update");
        apt_get(&["update"])?;
        *updated = true;
    }
    Ok(())
}

/// Packages whose programs are missing.
fn missing_packages() -> Vec<String> {
    let mut missing = BTreeSet::new();
    for (bin, pkg) in HOST_TOOLS {
        let ok = match find_binary(bin) {
            Some(p) if *bin == "busybox" => is_static_elf(&p),
            Some(_) => true,
            None => false,
        };
        if !ok {
            missing.insert(pkg.to_string());
        }
    }
    missing.into_iter().collect()
}

/// Makes sure QEMU, static busybox, cpio, nvme-cli, fio, e2fsprogs and xz-utils are installed.
/// As root, installs what is missing (`apt-get update` once, then `apt-get install -y`);
/// otherwise fails with the list of packages.
pub fn ensure_host() -> Result<(), VmError> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(VmError::MissingPackages { packages: missing });
    }
    let mut updated = APT.lock().unwrap_or_else(|p| p.into_inner());
    // Another thread may have installed them meanwhile.
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    log::info!("installing {}", missing.join(" "));
    apt_update_once(&mut updated)?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(missing.iter().map(String::as_str));
    apt_get(&args)?;
    let still = missing_packages();
    if !still.is_empty() {
        return Err(VmError::MissingPackages { packages: still });
    }
    Ok(())
}

/// An unpacked guest kernel in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Kernel release, e.g. `6.1.0-41-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// Directory holding the kept modules (uncompressed) at their `kernel/…` paths and a
    /// `modules.dep` covering them.
    pub modules: PathBuf,
}

impl Kernel {
    fn at(dir: &Path) -> Option<Kernel> {
        let release = dir.file_name()?.to_str()?.to_string();
        let k = Kernel {
            release,
            vmlinuz: dir.join("vmlinuz"),
            modules: dir.join("modules"),
        };
        let dep = fs::read_to_string(k.modules.join("modules.dep")).ok()?;
        let kept: BTreeSet<String> = dep
            .lines()
            .filter_map(|l| l.split(':').next())
            .map(module_name)
            .collect();
        // A kernel kept by an older runner, with fewer modules, is fetched again.
        (k.vmlinuz.is_file() && KERNEL_MODULES.iter().all(|m| kept.contains(*m))).then_some(k)
    }
}

/// Orders kernel releases by their numeric parts (`6.1.0-9` before `6.1.0-41`).
pub(crate) fn release_key(release: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut digits = String::new();
    let mut other = String::new();
    for ch in release.chars().chain(std::iter::once('.')) {
        if ch.is_ascii_digit() {
            if !other.is_empty() {
                key.push((0, std::mem::take(&mut other)));
            }
            digits.push(ch);
        } else {
            if !digits.is_empty() {
                key.push((digits.parse().unwrap_or(u64::MAX), String::new()));
                digits.clear();
            }
            other.push(ch);
        }
    }
    key
}

/// The newest kernel already in the cache.
fn cached_kernel(cache: &Path) -> Option<Kernel> {
    let entries = fs::read_dir(cache.join("kernels")).ok()?;
    entries
        .filter_map(|e| Kernel::at(&e.ok()?.path()))
        .max_by_key(|k| release_key(&k.release))
}

/// The kernel in the cache, fetched first if the cache has none.
pub fn ensure_kernel(cache: &Path) -> Result<Kernel, VmError> {
    match cached_kernel(cache) {
        Some(k) => Ok(k),
        None => fetch_kernel(cache),
    }
}

/// Parses `apt-cache depends linux-image-cloud-amd64` output into the kernel package name.
pub(crate) fn parse_kernel_package(depends: &str) -> Option<String> {
    depends.lines().find_map(|l| {
        let name = l.trim().strip_prefix("Depends:")?.trim();
        let name = name.trim_start_matches('|').trim();
        (name.starts_with("linux-image-") && name.ends_with("-cloud-amd64"))
            .then(|| name.to_string())
    })
}

fn current_kernel_package() -> Result<String, VmError> {
    let query = || -> Result<Option<String>, VmError> {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_META])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| VmError::io("run apt-cache", e))?;
        Ok(parse_kernel_package(&String::from_utf8_lossy(&out.stdout)))
    };
    if let Some(p) = query()? {
        return Ok(p);
    }
    if !is_root() {
        return Err(VmError::Kernel(format!(
            "apt-cache does not know {KERNEL_META}; run `apt-get update` as root (or `rnvme vm fetch` as root)"
        )));
    }
    apt_update_once(&mut APT.lock().unwrap_or_else(|p| p.into_inner()))?;
    query()?.ok_or_else(|| {
        VmError::Kernel(format!(
            "apt-cache does not list a kernel package for {KERNEL_META} even after apt-get update"
        ))
    })
}

/// Downloads the current Debian cloud kernel package (`apt-get download`, never installed),
/// unpacks it, and keeps `vmlinuz` and the VFIO modules (decompressed) in
/// `CACHE/kernels/<release>/`. The kernel is prepared in a temporary directory inside the cache
/// and renamed into place, so concurrent runners never see a half-built kernel.
pub fn fetch_kernel(cache: &Path) -> Result<Kernel, VmError> {
    let package = current_kernel_package()?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let kernels = cache.join("kernels");
    let dest = kernels.join(&release);
    if let Some(k) = Kernel::at(&dest) {
        return Ok(k);
    }
    fs::create_dir_all(&kernels)
        .map_err(|e| VmError::io(format!("create {}", kernels.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix("fetch-")
        .tempdir_in(cache)
        .map_err(|e| VmError::io(format!("create a directory in {}", cache.display()), e))?;
    let work = tmp.path();
    log::info!("downloading {package}");
    run_command(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(work),
    )?;
    let deb = fs::read_dir(work)
        .map_err(|e| VmError::io(format!("list {}", work.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .ok_or_else(|| VmError::Kernel(format!("apt-get download {package} left no .deb")))?;
    let unpacked = work.join("x");
    run_command(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;

    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        return Err(VmError::Kernel(format!(
            "{package} has no boot/vmlinuz-{release}"
        )));
    }
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d).join(&release))
        .find(|d| d.join("kernel").is_dir())
        .ok_or_else(|| VmError::Kernel(format!("{package} has no lib/modules/{release}/kernel")))?;
    let index = index_modules(&moddir)?;

    let staged = work.join("kernel");
    let staged_mods = staged.join("modules");
    fs::create_dir_all(&staged_mods)
        .map_err(|e| VmError::io(format!("create {}", staged_mods.display()), e))?;
    fs::copy(&vmlinuz, staged.join("vmlinuz"))
        .map_err(|e| VmError::io(format!("copy {}", vmlinuz.display()), e))?;
    // The package ships no modules.dep (depmod makes it on installation): follow the
    // `depends=` of each module's .modinfo instead, and write a modules.dep for the kept ones.
    let mut pending: Vec<String> = KERNEL_MODULES.iter().map(|m| m.replace('-', "_")).collect();
    let mut kept: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    while let Some(name) = pending.pop() {
        if kept.contains_key(&name) {
            continue;
        }
        let rel = index
            .get(&name)
            .ok_or_else(|| VmError::Kernel(format!("{package} has no module {name}")))?;
        let plain = strip_compression(rel);
        let target = staged_mods.join(&plain);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| VmError::io(format!("create {}", parent.display()), e))?;
        }
        decompress_module(&moddir.join(rel), &target)?;
        let bytes =
            fs::read(&target).map_err(|e| VmError::io(format!("read {}", target.display()), e))?;
        let deps = modinfo_depends(&bytes);
        pending.extend(deps.iter().cloned());
        kept.insert(name, (plain, deps));
    }
    let mut dep_out = String::new();
    for (name, (plain, deps)) in &kept {
        let paths: Result<Vec<String>, VmError> = deps
            .iter()
            .map(|d| {
                kept.get(d).map(|(p, _)| p.clone()).ok_or_else(|| {
                    VmError::Kernel(format!("{name} needs {d}, which {package} lacks"))
                })
            })
            .collect();
        dep_out.push_str(&format!("{plain}: {}\n", paths?.join(" ")));
    }
    fs::write(staged_mods.join("modules.dep"), dep_out)
        .map_err(|e| VmError::io("write modules.dep", e))?;
    if dest.exists() && Kernel::at(&dest).is_none() {
        // Kept by an older runner with fewer modules.
        fs::remove_dir_all(&dest)
            .map_err(|e| VmError::io(format!("remove the stale {}", dest.display()), e))?;
    }
    match fs::rename(&staged, &dest) {
        Ok(()) => {}
        // Another runner finished first: use its copy.
        Err(_) if Kernel::at(&dest).is_some() => {}
        Err(e) => {
            return Err(VmError::io(
                format!("move the kernel to {}", dest.display()),
                e,
            ))
        }
    }
    log::info!("guest kernel {release} ready in {}", dest.display());
    Kernel::at(&dest).ok_or_else(|| VmError::Kernel(format!("{} is incomplete", dest.display())))
}

/// Every module file under `moddir/kernel`, by normalised name, as a path relative to `moddir`.
fn index_modules(moddir: &Path) -> Result<BTreeMap<String, String>, VmError> {
    fn walk(base: &Path, rel: &Path, out: &mut BTreeMap<String, String>) -> Result<(), VmError> {
        let dir = base.join(rel);
        let entries =
            fs::read_dir(&dir).map_err(|e| VmError::io(format!("list {}", dir.display()), e))?;
        for e in entries.filter_map(|e| e.ok()) {
            let r = rel.join(e.file_name());
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &r, out)?;
            } else if strip_compression(&name).ends_with(".ko") {
                out.insert(module_name(&name), r.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(moddir, Path::new("kernel"), &mut out)?;
    Ok(out)
}

/// The `depends=` list of a module's `.modinfo` section, names normalised.
pub(crate) fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(pos) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[pos + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// `kernel/x/y.ko.xz` → `kernel/x/y.ko`.
pub(crate) fn strip_compression(path: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(p) = path.strip_suffix(ext) {
            return p.to_string();
        }
    }
    path.to_string()
}

fn decompress_module(src: &Path, dst: &Path) -> Result<(), VmError> {
    let tool = match src.extension().and_then(OsStr::to_str) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => {
            return fs::copy(src, dst)
                .map(|_| ())
                .map_err(|e| VmError::io(format!("copy {}", src.display()), e));
        }
    };
    let out = run_command(Command::new(tool).arg("-dc").arg(src))?;
    fs::write(dst, out.stdout).map_err(|e| VmError::io(format!("write {}", dst.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_from_apt_cache() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-41-cloud-amd64\n";
        assert_eq!(
            parse_kernel_package(out).as_deref(),
            Some("linux-image-6.1.0-41-cloud-amd64")
        );
        assert_eq!(parse_kernel_package("linux-image-cloud-amd64\n"), None);
        assert_eq!(
            parse_kernel_package(
                "x\n  Depends: libc6\n  Depends: linux-image-6.1.0-7-cloud-amd64\n"
            )
            .as_deref(),
            Some("linux-image-6.1.0-7-cloud-amd64")
        );
    }

    #[test]
    fn releases_sort_numerically() {
        let mut r = vec![
            "6.1.0-41-cloud-amd64",
            "6.1.0-9-cloud-amd64",
            "6.10.0-1-cloud-amd64",
        ];
        r.sort_by_key(|s| release_key(s));
        assert_eq!(
            r,
            [
                "6.1.0-9-cloud-amd64",
                "6.1.0-41-cloud-amd64",
                "6.10.0-1-cloud-amd64"
            ]
        );
    }

    #[test]
    fn modinfo_dependencies() {
        let m = b"\x7fELF...\0license=GPL v2\0depends=vfio-pci-core,vfio\0retpoline=Y\0";
        assert_eq!(modinfo_depends(m), ["vfio_pci_core", "vfio"]);
        assert!(modinfo_depends(b"\0license=GPL\0depends=\0name=vfio\0").is_empty());
        assert!(modinfo_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn module_index() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("kernel/drivers/vfio/pci")).unwrap();
        fs::write(d.join("kernel/drivers/vfio/pci/vfio-pci.ko.xz"), "").unwrap();
        fs::write(d.join("kernel/drivers/vfio/vfio.ko"), "").unwrap();
        fs::write(d.join("kernel/drivers/vfio/README"), "").unwrap();
        let idx = index_modules(d).unwrap();
        assert_eq!(idx.len(), 2);
        assert_eq!(idx["vfio_pci"], "kernel/drivers/vfio/pci/vfio-pci.ko.xz");
        assert_eq!(idx["vfio"], "kernel/drivers/vfio/vfio.ko");
    }

    #[test]
    fn compression_suffixes() {
        assert_eq!(strip_compression("kernel/a/b.ko.xz"), "kernel/a/b.ko");
        assert_eq!(strip_compression("kernel/a/b.ko.zst"), "kernel/a/b.ko");
        assert_eq!(strip_compression("kernel/a/b.ko"), "kernel/a/b.ko");
    }

    fn elf(interp: bool) -> Vec<u8> {
        let mut d = vec![0u8; 64 + 2 * 56];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        d[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        d[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        d[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let second: u32 = if interp { 3 } else { 4 };
        d[120..124].copy_from_slice(&second.to_le_bytes());
        d
    }

    #[test]
    fn elf_interpreter_detection() {
        assert_eq!(elf_has_interp(&elf(true)), Some(true));
        assert_eq!(elf_has_interp(&elf(false)), Some(false));
        assert_eq!(elf_has_interp(b"#!/bin/sh\n"), None);
        let truncated = &elf(true)[..100];
        assert_eq!(elf_has_interp(truncated), None);
    }

    #[test]
    fn static_detection_on_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("s");
        let d = dir.path().join("d");
        fs::write(&s, elf(false)).unwrap();
        fs::write(&d, elf(true)).unwrap();
        assert!(is_static_elf(&s));
        assert!(!is_static_elf(&d));
        assert!(!is_static_elf(&dir.path().join("missing")));
    }

    #[test]
    fn find_binary_by_path_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prog");
        fs::write(&p, "x").unwrap();
        assert_eq!(find_binary(p.to_str().unwrap()), Some(p.clone()));
        assert_eq!(find_binary(dir.path().join("nope").to_str().unwrap()), None);
        assert!(find_binary("sh").is_some());
        assert_eq!(find_binary("surely-no-such-program-rnvme"), None);
    }
}
