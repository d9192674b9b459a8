//! The guest's initramfs: busybox, VFIO modules, host binaries with their libraries, files, the
//! script, and `/init`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use super::host::{find_binary, run_command};
use super::{Kernel, Markers, VmError};

/// Modules the guest loads, named as in `modules.dep`; their dependencies come along.
pub(crate) const VFIO_MODULES: &[&str] = &["vfio_iommu_type1", "vfio_pci"];

/// Where the script lives in the guest.
const GUEST_SCRIPT: &str = "/rnvme/script.sh";
/// Where modules live in the guest.
const GUEST_MODULES: &str = "/lib/modules/rnvme";
/// Where host binaries go in the guest (first in `PATH`).
const GUEST_BIN: &str = "/usr/local/bin";

/// One module line of `modules.dep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModInfo {
    /// Normalised name (`vfio_pci`).
    pub name: String,
    /// Path relative to the modules directory.
    pub path: String,
    /// Paths of every module it needs (the full closure, as depmod writes it).
    pub deps: Vec<String>,
}

/// `kernel/drivers/vfio/pci/vfio-pci.ko.xz` → `vfio_pci`.
pub(crate) fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Parses `modules.dep` into modules keyed by normalised name.
pub(crate) fn parse_modules_dep(text: &str) -> BTreeMap<String, ModInfo> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            let path = path.trim();
            (!path.is_empty()).then(|| {
                let name = module_name(path);
                (
                    name.clone(),
                    ModInfo {
                        name,
                        path: path.to_string(),
                        deps: deps.split_whitespace().map(str::to_string).collect(),
                    },
                )
            })
        })
        .collect()
}

/// `roots` and everything they need, in an order `insmod` accepts (dependencies first).
pub(crate) fn module_closure<'a>(
    deps: &'a BTreeMap<String, ModInfo>,
    roots: &[&str],
) -> Result<Vec<&'a ModInfo>, String> {
    fn visit<'a>(
        deps: &'a BTreeMap<String, ModInfo>,
        name: &str,
        needed_by: Option<&str>,
        done: &mut BTreeSet<String>,
        active: &mut BTreeSet<String>,
        order: &mut Vec<&'a ModInfo>,
    ) -> Result<(), String> {
        if done.contains(name) {
            return Ok(());
        }
        let m = deps.get(name).ok_or_else(|| match needed_by {
            Some(p) => format!("module {name} (needed by {p}) is not in modules.dep"),
            None => format!("module {name} is not in modules.dep"),
        })?;
        if !active.insert(name.to_string()) {
            return Err(format!("circular module dependency through {name}"));
        }
        for d in &m.deps {
            visit(deps, &module_name(d), Some(name), done, active, order)?;
        }
        active.remove(name);
        done.insert(name.to_string());
        order.push(m);
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut active = BTreeSet::new();
    let mut order = Vec::new();
    for r in roots {
        visit(
            deps,
            &r.replace('-', "_"),
            None,
            &mut done,
            &mut active,
            &mut order,
        )?;
    }
    Ok(order)
}

/// Shared-library paths in `ldd` output (the loader included, the vDSO left out).
pub(crate) fn parse_ldd(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if line.is_empty() || line.contains("statically linked") || line.contains("not a dynamic") {
            continue;
        }
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("library {} not found", name.trim()));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if target.starts_with('/') {
            libs.push(PathBuf::from(target));
        }
    }
    Ok(libs)
}

/// What goes into one run's initramfs besides the kernel's modules.
pub(crate) struct Params<'a> {
    pub token: &'a str,
    pub hugepages: u32,
    pub bdfs: &'a [String],
    pub host_binaries: &'a [String],
    pub files: &'a [(PathBuf, String)],
    pub script: &'a str,
}

/// The guest's `/init`.
pub(crate) fn init_script(p: &Params<'_>, module_paths: &[String]) -> String {
    let markers = Markers::new(p.token);
    let mut s = String::from(
        "#!/bin/sh\n\
         # Generated by rnvme: sets the guest up, runs the script, powers off.\n\
         export PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin\n\
         export HOME=/root\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         exec </dev/console >/dev/console 2>&1\n\
         mkdir -p /dev/pts /dev/shm /dev/hugepages /tmp /run /root\n\
         mount -t devpts devpts /dev/pts\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t tmpfs tmpfs /dev/shm\n\
         mount -t hugetlbfs hugetlbfs /dev/hugepages\n",
    );
    for m in module_paths {
        s.push_str(&format!(
            "insmod {m} || echo \"rnvme-init: insmod {m} failed\"\n"
        ));
    }
    if p.hugepages > 0 {
        s.push_str(&format!(
            "echo {n} > /proc/sys/vm/nr_hugepages\n\
             got=$(cat /proc/sys/vm/nr_hugepages)\n\
             [ \"$got\" = {n} ] || echo \"rnvme-init: only $got of {n} hugepages reserved\"\n",
            n = p.hugepages
        ));
    }
    for (i, bdf) in p.bdfs.iter().enumerate() {
        s.push_str(&format!("export NVME{i}={bdf}\n"));
    }
    s.push_str(&format!(
        "# The script's output goes to the second serial port (raw), through a pipe so that\n\
         # programs see captured output, not a terminal. The script runs in its own session;\n\
         # whatever it leaves running is killed when it exits, so the pipe ends.\n\
         export TERM=dumb NO_COLOR=1\n\
         exec 3>/dev/ttyS1\n\
         stty -F /dev/ttyS1 raw -echo\n\
         mkfifo /run/rnvme-output\n\
         cat /run/rnvme-output >&3 &\n\
         cat_pid=$!\n\
         cd /root\n\
         printf '{start}' >&3\n\
         setsid /bin/sh {GUEST_SCRIPT} </dev/null >/run/rnvme-output 2>&1 &\n\
         script_pid=$!\n\
         wait $script_pid\n\
         rc=$?\n\
         kill -KILL -- -$script_pid 2>/dev/null\n\
         wait $cat_pid\n\
         cd /\n\
         sync\n\
         printf '{exit}%s\\n' \"$rc\" >&3\n\
         exec 3>&-\n\
         echo \"rnvme-init: script exited with status $rc\"\n\
         poweroff -f\n",
        start = printf_literal(&markers.start),
        exit = printf_literal(&markers.exit_prefix),
    ));
    s
}

/// `text` as a printf format that prints it literally (inside single quotes).
fn printf_literal(text: &str) -> String {
    text.replace('%', "%%")
        .replace('\n', "\\n")
        .replace('\'', "")
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let what = format!("{what} {}", path.display());
    move |e| VmError::io(what, e)
}

/// `root` joined with an absolute guest path.
fn in_root(root: &Path, guest: &str) -> PathBuf {
    let rel: PathBuf = Path::new(guest)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.join(rel)
}

fn mkdir_parent(path: &Path) -> Result<(), VmError> {
    match path.parent() {
        Some(p) => fs::create_dir_all(p).map_err(io_err("create", p)),
        None => Ok(()),
    }
}

/// Copies a file's content (symlinks followed) to `dst`, keeping its mode.
fn copy_file(src: &Path, dst: &Path) -> Result<(), VmError> {
    mkdir_parent(dst)?;
    if dst.exists() {
        fs::remove_file(dst).map_err(io_err("replace", dst))?;
    }
    fs::copy(src, dst).map_err(io_err("copy", src)).map(|_| ())
}

/// Copies a file or directory tree (symlinks followed).
fn copy_tree(src: &Path, dst: &Path) -> Result<(), VmError> {
    let meta = fs::metadata(src).map_err(io_err("read", src))?;
    if meta.is_dir() {
        fs::create_dir_all(dst).map_err(io_err("create", dst))?;
        for e in fs::read_dir(src).map_err(io_err("list", src))? {
            let e = e.map_err(io_err("list", src))?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        Ok(())
    } else {
        copy_file(src, dst)
    }
}

/// Copies a host binary to `GUEST_BIN` and its libraries (plus the loader) to their own paths.
fn add_host_binary(
    root: &Path,
    name: &str,
    libs_done: &mut BTreeSet<PathBuf>,
) -> Result<(), VmError> {
    let path = find_binary(name)
        .ok_or_else(|| VmError::Config(format!("host binary {name:?} not found")))?;
    let file_name = Path::new(name)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string());
    copy_file(&path, &in_root(root, &format!("{GUEST_BIN}/{file_name}")))?;
    let out = Command::new("ldd")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VmError::io("run ldd", e))?;
    let libs = parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| VmError::Config(format!("{}: {e}", path.display())))?;
    for lib in libs {
        if libs_done.insert(lib.clone()) {
            copy_file(&lib, &in_root(root, &lib.to_string_lossy()))?;
        }
    }
    Ok(())
}

fn write_executable(path: &Path, content: &str) -> Result<(), VmError> {
    mkdir_parent(path)?;
    fs::write(path, content).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", path))
}

/// Every path under `root`, relative, parents before children.
fn list_tree(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), VmError> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(io_err("list", &dir))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        out.push(r.clone());
        let ft = e.file_type().map_err(io_err("stat", &e.path()))?;
        if ft.is_dir() {
            list_tree(root, &r, out)?;
        }
    }
    Ok(())
}

/// Stages the initramfs in `staging` and writes it as a cpio archive to `out`.
pub(crate) fn build(
    kernel: &Kernel,
    p: &Params<'_>,
    staging: &Path,
    out: &Path,
) -> Result<(), VmError> {
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "etc",
        "lib/modules/rnvme",
    ] {
        let dir = staging.join(d);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    }

    // busybox and its applets.
    let busybox = find_binary("busybox")
        .ok_or_else(|| VmError::Config("busybox not found on the host".into()))?;
    copy_file(&busybox, &staging.join("bin/busybox"))?;
    let list = run_command(Command::new(&busybox).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "linuxrc" || applet == "bin/busybox" {
            continue;
        }
        let link = in_root(staging, applet);
        mkdir_parent(&link)?;
        if !link.exists() {
            symlink("/bin/busybox", &link).map_err(io_err("link", &link))?;
        }
    }
    fs::write(
        staging.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    )
    .map_err(io_err("write", &staging.join("etc/passwd")))?;
    fs::write(staging.join("etc/group"), "root:x:0:\n")
        .map_err(io_err("write", &staging.join("etc/group")))?;

    // VFIO modules, in load order.
    let dep_path = kernel.modules.join("modules.dep");
    let dep_text = fs::read_to_string(&dep_path).map_err(io_err("read", &dep_path))?;
    let deps = parse_modules_dep(&dep_text);
    let mods = module_closure(&deps, VFIO_MODULES)
        .map_err(|e| VmError::Kernel(format!("{}: {e}", kernel.release)))?;
    let mut module_paths = Vec::new();
    for m in mods {
        let base = m.path.rsplit('/').next().unwrap_or(&m.path);
        let guest = format!("{GUEST_MODULES}/{base}");
        copy_file(&kernel.modules.join(&m.path), &in_root(staging, &guest))?;
        module_paths.push(guest);
    }

    let mut libs_done = BTreeSet::new();
    for b in p.host_binaries {
        add_host_binary(staging, b, &mut libs_done)?;
    }
    for (host, guest) in p.files {
        copy_tree(host, &in_root(staging, guest))?;
    }
    write_executable(&in_root(staging, GUEST_SCRIPT), p.script)?;
    write_executable(&staging.join("init"), &init_script(p, &module_paths))?;

    write_cpio(staging, out)
}

/// `cpio -o -H newc` of everything under `staging`, owned by root.
///
/// The archive is left uncompressed: the guest kernel would spend seconds inflating a
/// gzip-compressed one under TCG (about 2 s for the 80 MiB that fio and its libraries take),
/// while QEMU loads an uncompressed one at host speed.
fn write_cpio(staging: &Path, out: &Path) -> Result<(), VmError> {
    let mut entries = Vec::new();
    list_tree(staging, Path::new(""), &mut entries)?;
    let mut names = String::new();
    for e in &entries {
        names.push_str(&e.to_string_lossy());
        names.push('\n');
    }
    let out_file = File::create(out).map_err(io_err("create", out))?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(staging)
        .stdin(Stdio::piped())
        .stdout(out_file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| VmError::io("start cpio", e))?;
    if let Some(mut stdin) = cpio.stdin.take() {
        stdin
            .write_all(names.as_bytes())
            .map_err(|e| VmError::io("feed cpio", e))?;
    }
    let o = cpio
        .wait_with_output()
        .map_err(|e| VmError::io("wait for cpio", e))?;
    if !o.status.success() {
        return Err(VmError::Command {
            command: "cpio -o -H newc (initramfs)".into(),
            detail: format!(
                "{} ({})",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/vfio/vfio.ko.xz:
kernel/drivers/vfio/vfio_iommu_type1.ko.xz: kernel/drivers/vfio/vfio.ko.xz
kernel/drivers/vfio/vfio_virqfd.ko.xz:
kernel/virt/lib/irqbypass.ko.xz:
kernel/drivers/vfio/pci/vfio-pci-core.ko.xz: kernel/drivers/vfio/vfio_virqfd.ko.xz kernel/virt/lib/irqbypass.ko.xz kernel/drivers/vfio/vfio.ko.xz
kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz kernel/drivers/vfio/vfio_virqfd.ko.xz kernel/virt/lib/irqbypass.ko.xz kernel/drivers/vfio/vfio.ko.xz
kernel/drivers/net/dummy.ko.xz:
";

    fn names(v: &[&ModInfo]) -> Vec<String> {
        v.iter().map(|m| m.name.clone()).collect()
    }

    #[test]
    fn module_names_are_normalised() {
        assert_eq!(
            module_name("kernel/drivers/vfio/pci/vfio-pci.ko.xz"),
            "vfio_pci"
        );
        assert_eq!(module_name("kernel/virt/lib/irqbypass.ko"), "irqbypass");
        assert_eq!(module_name("vfio_iommu_type1.ko.zst"), "vfio_iommu_type1");
    }

    #[test]
    fn closure_puts_dependencies_first() {
        let deps = parse_modules_dep(DEP);
        assert_eq!(deps.len(), 7);
        let order = module_closure(&deps, VFIO_MODULES).unwrap();
        let n = names(&order);
        assert_eq!(
            n,
            [
                "vfio",
                "vfio_iommu_type1",
                "vfio_virqfd",
                "irqbypass",
                "vfio_pci_core",
                "vfio_pci"
            ]
        );
        // Every module comes after all of its dependencies.
        for (i, m) in order.iter().enumerate() {
            for d in &m.deps {
                let pos = n.iter().position(|x| *x == module_name(d)).unwrap();
                assert!(pos < i, "{} loaded before its dependency {d}", m.name);
            }
        }
        assert_eq!(order[5].path, "kernel/drivers/vfio/pci/vfio-pci.ko.xz");
    }

    #[test]
    fn closure_reports_missing_modules() {
        let deps = parse_modules_dep("a.ko: b.ko\n");
        let e = module_closure(&deps, &["a"]).unwrap_err();
        assert!(e.contains("b (needed by a)"), "{e}");
        let e = module_closure(&deps, &["vfio-pci"]).unwrap_err();
        assert!(e.contains("vfio_pci is not in modules.dep"), "{e}");
        let cyc = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n");
        assert!(module_closure(&cyc, &["a"])
            .unwrap_err()
            .contains("circular"));
    }

    #[test]
    fn ldd_output_parsing() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibnvme.so.1 => /lib/x86_64-linux-gnu/libnvme.so.1 (0x00007f98)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f98)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f98)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libnvme.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n")
            .unwrap()
            .is_empty());
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
        let e = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(e.contains("libfoo.so.1"), "{e}");
    }

    fn params<'a>(bdfs: &'a [String], hugepages: u32) -> Params<'a> {
        Params {
            token: "t0k",
            hugepages,
            bdfs,
            host_binaries: &[],
            files: &[],
            script: "echo hi",
        }
    }

    #[test]
    fn init_script_sets_up_runs_and_powers_off() {
        let bdfs = vec!["0000:00:04.0".to_string(), "0000:00:05.0".to_string()];
        let mods = vec![
            "/lib/modules/rnvme/vfio.ko".to_string(),
            "/lib/modules/rnvme/vfio-pci.ko".to_string(),
        ];
        let s = init_script(&params(&bdfs, 300), &mods);
        let pos = |needle: &str| {
            s.find(needle)
                .unwrap_or_else(|| panic!("init script lacks {needle:?}:\n{s}"))
        };
        assert!(s.starts_with("#!/bin/sh\n"));
        let order = [
            "mount -t proc proc /proc",
            "mount -t sysfs sysfs /sys",
            "mount -t devtmpfs devtmpfs /dev",
            "mount -t tmpfs tmpfs /tmp",
            "insmod /lib/modules/rnvme/vfio.ko ",
            "insmod /lib/modules/rnvme/vfio-pci.ko ",
            "echo 300 > /proc/sys/vm/nr_hugepages",
            "export NVME0=0000:00:04.0\n",
            "export NVME1=0000:00:05.0\n",
            "export TERM=dumb NO_COLOR=1",
            "exec 3>/dev/ttyS1",
            "stty -F /dev/ttyS1 raw -echo",
            "cat /run/rnvme-output >&3 &",
            "printf 'RNVME-START-t0k\\n' >&3",
            "setsid /bin/sh /rnvme/script.sh </dev/null >/run/rnvme-output 2>&1 &\nscript_pid=$!\nwait $script_pid\nrc=$?\n",
            "kill -KILL -- -$script_pid",
            "wait $cat_pid",
            "sync\n",
            "printf '\\nRNVME-EXIT-t0k %s\\n' \"$rc\" >&3",
            "poweroff -f",
        ];
        let positions: Vec<usize> = order.iter().map(|n| pos(n)).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "steps out of order: {positions:?}\n{s}"
        );
    }

    #[test]
    fn init_script_without_hugepages_or_controllers() {
        let s = init_script(&params(&[], 0), &[]);
        assert!(!s.contains("nr_hugepages"));
        assert!(!s.contains("NVME0"));
        assert!(!s.contains("insmod"));
        assert!(s.contains("poweroff -f"));
    }

    /// The markers the init script prints are the ones the host parses.
    #[test]
    fn init_script_markers_round_trip_through_sh() {
        let s = init_script(&params(&[], 0), &[]);
        let start_line = s.lines().find(|l| l.contains("RNVME-START")).unwrap();
        let exit_line = s.lines().find(|l| l.contains("RNVME-EXIT")).unwrap();
        let sh =
            format!("exec 3>&1\n{start_line}\necho out\nprintf 'no newline'\nrc=7\n{exit_line}\n");
        let out = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
        let m = Markers::new("t0k");
        assert_eq!(
            m.parse(&out.stdout),
            Some(("out\nno newline".to_string(), 7))
        );
    }

    #[test]
    fn guest_paths_stay_inside_the_staging_root() {
        let r = Path::new("/stage");
        assert_eq!(in_root(r, "/usr/bin/x"), PathBuf::from("/stage/usr/bin/x"));
        assert_eq!(in_root(r, "/../etc/x"), PathBuf::from("/stage/etc/x"));
    }

    #[test]
    fn cpio_archive_holds_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let stage = dir.path().join("s");
        fs::create_dir_all(stage.join("a/b")).unwrap();
        fs::write(stage.join("a/b/f"), "content").unwrap();
        symlink("/bin/busybox", stage.join("a/l")).unwrap();
        let out = dir.path().join("o.cpio");
        write_cpio(&stage, &out).unwrap();
        let listing = Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&out)
            .output()
            .unwrap();
        let names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(names, ["a", "a/b", "a/b/f", "a/l"]);
    }
}
