//! QEMU command line: pure functions from a [`VmConfig`] and the run's file paths.

use std::path::{Path, PathBuf};

use super::{BlkdebugRule, VmConfig, VmError, FIRST_SLOT, LAST_SLOT, MAX_NAMESPACE_MIB};

/// The backing of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backing {
    pub image: PathBuf,
    /// blkdebug rule file, if the namespace has fault-injection rules.
    pub rules: Option<PathBuf>,
}

/// Files of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Paths {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub console_log: PathBuf,
    pub output_log: PathBuf,
    /// One per namespace, controllers in order, namespaces in order within each.
    pub backings: Vec<Backing>,
}

/// Checks what QEMU would otherwise reject with a less helpful message.
pub(crate) fn validate(config: &VmConfig) -> Result<(), VmError> {
    let bad = |m: String| Err(VmError::Config(m));
    if config.memory_mib < 256 {
        return bad(format!(
            "{} MiB of memory is too little (at least 256)",
            config.memory_mib
        ));
    }
    if config.cpus == 0 {
        return bad("at least one CPU is needed".into());
    }
    if config.timeout.is_zero() {
        return bad("the timeout must be above zero".into());
    }
    let hugepage_mib = u64::from(config.hugepages) * 2;
    if hugepage_mib + 128 > u64::from(config.memory_mib) {
        return bad(format!(
            "{} hugepages ({hugepage_mib} MiB) do not fit in {} MiB of guest memory",
            config.hugepages, config.memory_mib
        ));
    }
    let max = usize::from(LAST_SLOT - FIRST_SLOT) + 1;
    if config.controllers.len() > max {
        return bad(format!(
            "{} controllers given, at most {max}",
            config.controllers.len()
        ));
    }
    for (i, c) in config.controllers.iter().enumerate() {
        let serial = serial_of(i, &c.serial);
        if serial.len() > 20
            || !serial
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
        {
            return bad(format!(
                "controller {i}: serial {serial:?} must be 1 to 20 characters of [A-Za-z0-9._-]"
            ));
        }
        if c.mdts.is_some_and(|m| m > 20) {
            return bad(format!("controller {i}: mdts must be at most 20"));
        }
        if c.max_ioqpairs == Some(0) {
            return bad(format!("controller {i}: max_ioqpairs must be at least 1"));
        }
        if c.namespaces.is_empty() {
            return bad(format!("controller {i}: needs at least one namespace"));
        }
        for (n, ns) in c.namespaces.iter().enumerate() {
            let what = format!("controller {i} namespace {}", n + 1);
            if !ns.lba_size.is_power_of_two() || !(512..=65536).contains(&ns.lba_size) {
                return bad(format!(
                    "{what}: block size {} is not a power of two from 512 to 65536",
                    ns.lba_size
                ));
            }
            if ns.size_mib == 0 {
                return bad(format!("{what}: size must be at least 1 MiB"));
            }
            if ns.size_mib > MAX_NAMESPACE_MIB {
                return bad(format!(
                    "{what}: size {} MiB is more than the largest file, {MAX_NAMESPACE_MIB} MiB",
                    ns.size_mib
                ));
            }
            if u64::from(ns.lba_size) > ns.size_mib << 20 {
                return bad(format!("{what}: smaller than one block"));
            }
            for r in &ns.blkdebug {
                if r.event != "read_aio" && r.event != "write_aio" {
                    return bad(format!(
                        "{what}: blkdebug event {:?} is not read_aio or write_aio",
                        r.event
                    ));
                }
                if r.errno <= 0 {
                    return bad(format!("{what}: blkdebug errno must be positive"));
                }
            }
            if !ns.blkdebug.is_empty() {
                if let Some(img) = &ns.image {
                    if img.to_string_lossy().contains(':') {
                        return bad(format!(
                            "{what}: an image path with ':' cannot be used with blkdebug rules"
                        ));
                    }
                }
            }
        }
    }
    for (host, guest) in &config.files {
        if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
            return bad(format!(
                "guest path {guest:?} for {} must be absolute without '..'",
                host.display()
            ));
        }
    }
    Ok(())
}

/// The serial number controller `index` gets.
pub(crate) fn serial_of(index: usize, serial: &str) -> String {
    if serial.is_empty() {
        format!("rnvme{index}")
    } else {
        serial.to_string()
    }
}

/// Escapes a value for QEMU's comma-separated option syntax.
fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_opt(p: &Path) -> String {
    opt(&p.to_string_lossy())
}

/// The blkdebug rule file for `rules`.
pub(crate) fn blkdebug_conf(rules: &[BlkdebugRule]) -> String {
    let mut s = String::new();
    for r in rules {
        s.push_str("[inject-error]\n");
        s.push_str(&format!("event = \"{}\"\n", r.event));
        s.push_str(&format!("errno = \"{}\"\n", r.errno));
        if let Some(sector) = r.sector {
            s.push_str(&format!("sector = \"{sector}\"\n"));
        }
        if r.once {
            s.push_str("once = \"on\"\n");
        }
        s.push('\n');
    }
    s
}

/// The arguments after `qemu-system-x86_64`.
pub(crate) fn args(config: &VmConfig, paths: &Paths) -> Vec<String> {
    // init_on_alloc=0: the kernel would otherwise zero every reserved hugepage, which costs
    // seconds under TCG (the pages are zeroed again when a process faults them in anyway).
    // no_timer_check: on a busy host the kernel's boot-time check of the timer through the
    // interrupt-remapped IO-APIC can time out under TCG and panic, though the timer works.
    // loglevel=5 after quiet: the console (kept in console.log, its last line in a timeout's
    // error) shows warnings and worse, such as a driver's command timeouts or a hung task, and
    // not the boot's informational lines.
    let mut cmdline = String::from(
        "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=5 init_on_alloc=0 no_timer_check",
    );
    for a in &config.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    let mut a: Vec<String> = [
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-m",
        &config.memory_mib.to_string(),
        "-smp",
        &config.cpus.to_string(),
        // Named threads ("CPU 0/TCG", "worker"): a profile of the host shows where time goes.
        "-name",
        "rnvme-guest,debug-threads=on",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-monitor",
        "none",
        "-kernel",
        &paths.kernel.to_string_lossy(),
        "-initrd",
        &paths.initrd.to_string_lossy(),
        "-append",
        &cmdline,
        // ttyS0: kernel console; ttyS1: the script's output.
        "-chardev",
        &format!("file,id=console,path={}", path_opt(&paths.console_log)),
        "-serial",
        "chardev:console",
        "-chardev",
        &format!("file,id=output,path={}", path_opt(&paths.output_log)),
        "-serial",
        "chardev:output",
        // The IOMMU must come before the devices it translates for.
        "-device",
        "intel-iommu,intremap=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut backings = paths.backings.iter();
    let mut drive = 0usize;
    for (c, ctrl) in config.controllers.iter().enumerate() {
        let mut dev = format!(
            "nvme,serial={},id=c{c},bus=pcie.0,addr={:#x}",
            opt(&serial_of(c, &ctrl.serial)),
            usize::from(FIRST_SLOT) + c
        );
        if let Some(m) = ctrl.mdts {
            dev.push_str(&format!(",mdts={m}"));
        }
        if let Some(q) = ctrl.max_ioqpairs {
            dev.push_str(&format!(",max_ioqpairs={q}"));
        }
        a.push("-device".into());
        a.push(dev);
        for (n, ns) in ctrl.namespaces.iter().enumerate() {
            let Some(b) = backings.next() else { break };
            let file = match &b.rules {
                Some(rules) => format!("blkdebug:{}:{}", path_opt(rules), path_opt(&b.image)),
                None => path_opt(&b.image),
            };
            a.push("-drive".into());
            // discard=unmap: without it QEMU ignores Dataset Management deallocate, although
            // the namespace reports (DLFEAT) that deallocated blocks read as zeros.
            let aio = match (ctrl.aio, &b.rules) {
                (Some(aio), None) => format!(",aio={}", aio.name()),
                _ => String::new(),
            };
            if ns.null {
                a.push(format!(
                    "driver=null-co,size={},read-zeroes=on,if=none,id=ns{drive}",
                    ns.size_mib << 20
                ));
            } else {
                a.push(format!(
                    "file={file},if=none,id=ns{drive},format=raw,discard=unmap{aio}"
                ));
            }
            a.push("-device".into());
            let meta = if ns.metadata > 0 {
                format!(
                    ",ms={},mset={},pi={}",
                    ns.metadata, ns.extended as u8, ns.pi
                )
            } else {
                String::new()
            };
            a.push(format!(
                "nvme-ns,drive=ns{drive},bus=c{c},nsid={},logical_block_size={l},physical_block_size={l}{meta}",
                n + 1,
                l = ns.lba_size
            ));
            drive += 1;
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{ControllerSpec, DriveAio, NamespaceSpec};
    use std::time::Duration;

    fn paths(n: usize) -> Paths {
        Paths {
            kernel: "/c/vmlinuz".into(),
            initrd: "/c/run/initrd.cpio".into(),
            console_log: "/c/run/console.log".into(),
            output_log: "/c/run/output.log".into(),
            backings: (0..n)
                .map(|i| Backing {
                    image: format!("/c/run/{i}.img").into(),
                    rules: None,
                })
                .collect(),
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn base_arguments() {
        let cfg = VmConfig {
            memory_mib: 1024,
            cpus: 3,
            kernel_args: vec!["foo=1".into(), "bar".into()],
            ..VmConfig::default()
        };
        let a = args(&cfg, &paths(0));
        assert_eq!(value_after(&a, "-m"), ["1024"]);
        assert_eq!(value_after(&a, "-smp"), ["3"]);
        assert_eq!(value_after(&a, "-machine"), ["q35,accel=tcg"]);
        assert_eq!(value_after(&a, "-kernel"), ["/c/vmlinuz"]);
        assert_eq!(value_after(&a, "-initrd"), ["/c/run/initrd.cpio"]);
        assert_eq!(
            value_after(&a, "-append"),
            ["console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=5 init_on_alloc=0 no_timer_check foo=1 bar"]
        );
        assert_eq!(
            value_after(&a, "-serial"),
            ["chardev:console", "chardev:output"]
        );
        assert_eq!(
            value_after(&a, "-chardev"),
            [
                "file,id=console,path=/c/run/console.log",
                "file,id=output,path=/c/run/output.log"
            ]
        );
        assert_eq!(value_after(&a, "-device"), ["intel-iommu,intremap=on"]);
        assert!(a.contains(&"-no-reboot".to_string()));
        assert!(a.contains(&"-nographic".to_string()));
    }

    #[test]
    fn metadata_and_null_namespaces() {
        let cfg = VmConfig {
            controllers: vec![ControllerSpec {
                namespaces: vec![
                    NamespaceSpec {
                        lba_size: 4096,
                        metadata: 8,
                        extended: true,
                        pi: 1,
                        ..NamespaceSpec::default()
                    },
                    NamespaceSpec {
                        size_mib: 64,
                        null: true,
                        ..NamespaceSpec::default()
                    },
                ],
                ..ControllerSpec::default()
            }],
            ..VmConfig::default()
        };
        let p = paths(2);
        let a = args(&cfg, &p);
        let devices = value_after(&a, "-device");
        assert!(
            devices
                .iter()
                .any(|d| d.starts_with("nvme-ns,drive=ns0") && d.ends_with(",ms=8,mset=1,pi=1")),
            "{devices:?}"
        );
        let drives = value_after(&a, "-drive");
        assert_eq!(
            drives[1],
            "driver=null-co,size=67108864,read-zeroes=on,if=none,id=ns1"
        );
        assert!(drives[0].starts_with("file=/c/run/0.img,"), "{drives:?}");
    }

    #[test]
    fn controllers_and_namespaces_in_fixed_slots() {
        let cfg = VmConfig {
            controllers: vec![
                ControllerSpec {
                    serial: "first".into(),
                    mdts: Some(2),
                    max_ioqpairs: Some(4),
                    namespaces: vec![
                        NamespaceSpec {
                            lba_size: 4096,
                            ..NamespaceSpec::default()
                        },
                        NamespaceSpec::default(),
                    ],
                    aio: Some(DriveAio::IoUring),
                },
                ControllerSpec::default(),
            ],
            ..VmConfig::default()
        };
        let mut p = paths(3);
        p.backings[2].rules = Some("/c/run/r.conf".into());
        let a = args(&cfg, &p);
        assert_eq!(
            value_after(&a, "-device"),
            [
                "intel-iommu,intremap=on",
                "nvme,serial=first,id=c0,bus=pcie.0,addr=0x4,mdts=2,max_ioqpairs=4",
                "nvme-ns,drive=ns0,bus=c0,nsid=1,logical_block_size=4096,physical_block_size=4096",
                "nvme-ns,drive=ns1,bus=c0,nsid=2,logical_block_size=512,physical_block_size=512",
                "nvme,serial=rnvme1,id=c1,bus=pcie.0,addr=0x5",
                "nvme-ns,drive=ns2,bus=c1,nsid=1,logical_block_size=512,physical_block_size=512",
            ]
        );
        assert_eq!(
            value_after(&a, "-drive"),
            [
                "file=/c/run/0.img,if=none,id=ns0,format=raw,discard=unmap,aio=io_uring",
                "file=/c/run/1.img,if=none,id=ns1,format=raw,discard=unmap,aio=io_uring",
                "file=blkdebug:/c/run/r.conf:/c/run/2.img,if=none,id=ns2,format=raw,discard=unmap",
            ]
        );
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let cfg = VmConfig {
            controllers: vec![ControllerSpec::default()],
            ..VmConfig::default()
        };
        let mut p = paths(1);
        p.backings[0].image = "/a,b/x.img".into();
        p.console_log = "/l,og".into();
        let a = args(&cfg, &p);
        assert_eq!(
            value_after(&a, "-drive"),
            ["file=/a,,b/x.img,if=none,id=ns0,format=raw,discard=unmap"]
        );
        assert_eq!(
            value_after(&a, "-chardev")[0],
            "file,id=console,path=/l,,og"
        );
    }

    #[test]
    fn blkdebug_rule_file() {
        let rules = [
            BlkdebugRule {
                event: "read_aio".into(),
                errno: 5,
                sector: Some(2048),
                once: false,
            },
            BlkdebugRule {
                event: "write_aio".into(),
                errno: 28,
                sector: None,
                once: true,
            },
        ];
        assert_eq!(
            blkdebug_conf(&rules),
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"2048\"\n\n\
             [inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nonce = \"on\"\n\n"
        );
    }

    #[test]
    fn validation_rejects_bad_configs() {
        let ok = VmConfig {
            controllers: vec![ControllerSpec::default()],
            ..VmConfig::default()
        };
        assert!(validate(&ok).is_ok());
        let check = |f: &dyn Fn(&mut VmConfig), needle: &str| {
            let mut c = ok.clone();
            f(&mut c);
            let e = validate(&c).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        };
        check(&|c| c.hugepages = 1024, "do not fit");
        check(&|c| c.cpus = 0, "CPU");
        check(&|c| c.controllers[0].serial = "a,b".into(), "serial");
        check(&|c| c.controllers[0].serial = "x".repeat(21), "serial");
        check(
            &|c| c.controllers[0].namespaces.clear(),
            "at least one namespace",
        );
        check(
            &|c| c.controllers[0].namespaces[0].lba_size = 1000,
            "power of two",
        );
        check(
            &|c| c.controllers[0].namespaces[0].lba_size = 256,
            "power of two",
        );
        check(&|c| c.controllers[0].namespaces[0].size_mib = 0, "size");
        check(
            &|c| c.controllers[0].namespaces[0].size_mib = MAX_NAMESPACE_MIB + 1,
            "more than the largest file",
        );
        check(
            &|c| c.controllers[0].namespaces[0].size_mib = u64::MAX,
            "more than the largest file",
        );
        check(&|c| c.timeout = Duration::ZERO, "timeout");
        check(&|c| c.controllers[0].max_ioqpairs = Some(0), "max_ioqpairs");
        check(
            &|c| {
                c.controllers[0].namespaces[0].blkdebug.push(BlkdebugRule {
                    event: "flush".into(),
                    errno: 5,
                    sector: None,
                    once: false,
                })
            },
            "read_aio",
        );
        check(
            &|c| c.controllers = vec![ControllerSpec::default(); 28],
            "at most 27",
        );
        check(
            &|c| c.files.push(("/x".into(), "relative".into())),
            "absolute",
        );
        check(
            &|c| c.files.push(("/x".into(), "/a/../b".into())),
            "absolute",
        );
        let mut max = ok.clone();
        max.controllers = vec![ControllerSpec::default(); 27];
        assert!(validate(&max).is_ok());
    }
}
