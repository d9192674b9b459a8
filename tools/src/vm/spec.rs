//! The `--ctrl SPEC` syntax of `rnvme vm run`.

use std::path::PathBuf;

use super::{BlkdebugRule, ControllerSpec, DriveAio, NamespaceSpec, MAX_NAMESPACE_MIB};

/// Help text for the controller SPEC syntax.
pub const SPEC_HELP: &str = "\
Controller SPEC: comma-separated KEY=VALUE, all optional:
  ns=N           namespaces on this controller (default 1)
  size=SIZE      size of each namespace: MiB, or with a suffix M, G or T (default 256M)
  lba=BYTES      logical block size of each namespace, 512 or 4096 (default 512)
  ms=BYTES       metadata bytes per logical block (default 0), kept in the image
  mset=0|1       metadata interleaved with each block (1, extended LBAs) or in a separate
                 buffer (0, the default)
  pi=0..3        protection information type (default 0; needs ms=8 or more)
  backend=B      file (an image, the default) or null (QEMU's null-co: no storage, reads
                 return zeros, writes are dropped; for measuring the drivers alone)
  mdts=M         maximum data transfer size, 2^M pages (QEMU default 7)
  qpairs=Q       maximum number of I/O queue pairs (QEMU default 64)
  serial=S       serial number (default rnvme<i>)
  image=PATH     keep namespace 1 in PATH (created if missing; only with ns=1)
  fail=EVENT:ERRNO[@SECTOR][:once]
                 inject errors with QEMU blkdebug into every namespace of the controller;
                 EVENT is read or write, SECTOR counts 512-byte sectors; may repeat
  aio=MODE       how QEMU reads and writes the images: threads (QEMU's default) or
                 io_uring (no thread hop per command); not with fail=
Example: --ctrl lba=4096,size=1G,mdts=2,ns=2 --ctrl fail=read:5@2048:once
";

/// Parses a size in MiB: `256`, `256M`, `256MiB`, `1G`, `1GiB`, `1T`, `1TiB`; at most
/// [`MAX_NAMESPACE_MIB`].
fn parse_size_mib(v: &str) -> Result<u64, String> {
    let lower = v.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower
        .strip_suffix("tib")
        .or_else(|| lower.strip_suffix("t"))
    {
        (n, 1024 * 1024)
    } else if let Some(n) = lower
        .strip_suffix("gib")
        .or_else(|| lower.strip_suffix("g"))
    {
        (n, 1024)
    } else if let Some(n) = lower
        .strip_suffix("mib")
        .or_else(|| lower.strip_suffix("m"))
    {
        (n, 1)
    } else {
        (lower.as_str(), 1)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {v:?} is not a number of MiB (like 256M or 1G)"))?;
    let mib = n
        .checked_mul(mult)
        .filter(|&m| m <= MAX_NAMESPACE_MIB)
        .ok_or_else(|| {
            format!("size {v:?} is too large: at most {MAX_NAMESPACE_MIB} MiB (8 EiB), the largest file")
        })?;
    if mib == 0 {
        return Err(format!("size {v:?} must be at least 1 MiB"));
    }
    Ok(mib)
}

/// Parses `EVENT:ERRNO[@SECTOR][:once]`.
fn parse_fail(v: &str) -> Result<BlkdebugRule, String> {
    let bad = || format!("fail={v:?} is not EVENT:ERRNO[@SECTOR][:once]");
    let mut parts = v.split(':');
    let event = match parts.next() {
        Some("read") | Some("read_aio") => "read_aio",
        Some("write") | Some("write_aio") => "write_aio",
        _ => return Err(bad()),
    };
    let errno_sector = parts.next().ok_or_else(bad)?;
    let (errno, sector) = match errno_sector.split_once('@') {
        Some((e, s)) => (e, Some(s.parse::<u64>().map_err(|_| bad())?)),
        None => (errno_sector, None),
    };
    let errno: i32 = errno.parse().map_err(|_| bad())?;
    if errno <= 0 {
        return Err(bad());
    }
    let once = match parts.next() {
        None => false,
        Some("once") => true,
        Some(_) => return Err(bad()),
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(BlkdebugRule {
        event: event.to_string(),
        errno,
        sector,
        once,
    })
}

/// Parses a controller SPEC (see [`SPEC_HELP`]).
pub fn parse_controller_spec(spec: &str) -> Result<ControllerSpec, String> {
    let mut ctrl = ControllerSpec::default();
    let mut ns_count = 1usize;
    let mut template = NamespaceSpec::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not KEY=VALUE"))?;
        let num = |what: &str| format!("{key}={value:?}: {what}");
        match key {
            "ns" => {
                ns_count = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=256).contains(n))
                    .ok_or_else(|| num("expected a namespace count from 1 to 256"))?;
            }
            "size" => template.size_mib = parse_size_mib(value)?,
            "lba" => {
                template.lba_size = value
                    .parse()
                    .ok()
                    .filter(|l: &u32| l.is_power_of_two() && (512..=65536).contains(l))
                    .ok_or_else(|| num("expected a power of two from 512, such as 512 or 4096"))?;
            }
            "backend" => {
                template.null = match value {
                    "file" => false,
                    "null" => true,
                    _ => return Err(num("expected file or null")),
                }
            }
            "ms" => {
                template.metadata = value
                    .parse()
                    .ok()
                    .filter(|m: &u16| *m <= 128)
                    .ok_or_else(|| num("expected metadata bytes per block from 0 to 128"))?;
            }
            "mset" => {
                template.extended = match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(num("expected 0 (separate buffer) or 1 (extended LBAs)")),
                }
            }
            "pi" => {
                template.pi = value
                    .parse()
                    .ok()
                    .filter(|p: &u8| *p <= 3)
                    .ok_or_else(|| num("expected a protection information type from 0 to 3"))?;
            }
            "mdts" => {
                ctrl.mdts = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|m| *m <= 20)
                        .ok_or_else(|| num("expected a number from 0 to 20"))?,
                )
            }
            "qpairs" | "max_ioqpairs" => {
                ctrl.max_ioqpairs = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|q| *q >= 1)
                        .ok_or_else(|| num("expected a number from 1 to 65535"))?,
                )
            }
            "serial" => {
                if value.is_empty()
                    || value.len() > 20
                    || !value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                {
                    return Err(num("expected 1 to 20 characters of [A-Za-z0-9._-]"));
                }
                ctrl.serial = value.to_string();
            }
            "image" => {
                if value.is_empty() {
                    return Err(num("expected a path"));
                }
                template.image = Some(PathBuf::from(value));
            }
            "fail" => template.blkdebug.push(parse_fail(value)?),
            "aio" => {
                ctrl.aio = Some(
                    DriveAio::ALL
                        .into_iter()
                        .find(|a| a.name() == value)
                        .ok_or_else(|| num("expected threads or io_uring"))?,
                )
            }
            _ => {
                return Err(format!(
                "unknown key {key:?} (expected ns, size, lba, ms, mset, pi, backend, mdts, qpairs, serial, image, fail or aio)"
            ))
            }
        }
    }
    if ctrl.aio.is_some() && !template.blkdebug.is_empty() {
        return Err("aio= cannot be combined with fail= (fault injection uses QEMU's blkdebug, which takes no aio=)".into());
    }
    if template.null && (template.image.is_some() || !template.blkdebug.is_empty()) {
        return Err(
            "backend=null keeps no image: it cannot be combined with image= or fail=".into(),
        );
    }
    if template.pi != 0 && template.metadata < 8 {
        return Err(format!(
            "pi={} needs ms=8 or more: protection information takes 8 bytes of metadata",
            template.pi
        ));
    }
    if template.extended && template.metadata == 0 {
        return Err("mset=1 needs ms= above 0: there is no metadata to interleave".into());
    }
    if template.image.is_some() && ns_count != 1 {
        return Err("image= can only be used with ns=1".into());
    }
    ctrl.namespaces = vec![template; ns_count];
    Ok(ctrl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_spec_is_the_default_controller() {
        assert_eq!(
            parse_controller_spec("").unwrap(),
            ControllerSpec::default()
        );
    }

    #[test]
    fn full_spec() {
        let c =
            parse_controller_spec("lba=4096,size=1G,mdts=2,ns=2,qpairs=4,serial=abc-1").unwrap();
        assert_eq!(c.serial, "abc-1");
        assert_eq!(c.mdts, Some(2));
        assert_eq!(c.max_ioqpairs, Some(4));
        assert_eq!(c.namespaces.len(), 2);
        for ns in &c.namespaces {
            assert_eq!(ns.size_mib, 1024);
            assert_eq!(ns.lba_size, 4096);
            assert_eq!(ns.image, None);
            assert!(ns.blkdebug.is_empty());
        }
    }

    #[test]
    fn sizes() {
        for (s, mib) in [
            ("256", 256),
            ("256M", 256),
            ("64MiB", 64),
            ("2G", 2048),
            ("1gib", 1024),
            ("3T", 3 << 20),
            ("1TiB", 1 << 20),
            ("8796093022207", MAX_NAMESPACE_MIB),
        ] {
            assert_eq!(parse_size_mib(s), Ok(mib), "{s}");
        }
        for s in ["", "0", "1K", "x", "-1M", "1.5G"] {
            assert!(parse_size_mib(s).is_err(), "{s} accepted");
        }
        // Sizes whose bytes do not fit a file (or a u64) are refused, not wrapped.
        for s in [
            "99999999999T",
            "99999999999G",
            "8796093022208",
            "8388608T",
            "18446744073709551615",
            "18446744073709551615G",
        ] {
            let e = parse_size_mib(s).unwrap_err();
            assert!(e.contains("too large") && e.contains("8 EiB"), "{s}: {e}");
        }
        let e = parse_controller_spec("size=99999999999T").unwrap_err();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn fail_rules() {
        let c = parse_controller_spec("ns=2,fail=read:5@2048:once,fail=write:28").unwrap();
        let want = vec![
            BlkdebugRule {
                event: "read_aio".into(),
                errno: 5,
                sector: Some(2048),
                once: true,
            },
            BlkdebugRule {
                event: "write_aio".into(),
                errno: 28,
                sector: None,
                once: false,
            },
        ];
        assert_eq!(c.namespaces[0].blkdebug, want);
        assert_eq!(c.namespaces[1].blkdebug, want);
        for bad in [
            "flush:5",
            "read",
            "read:x",
            "read:0",
            "read:5@x",
            "read:5:twice",
            "read:5:once:x",
        ] {
            assert!(parse_fail(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn aio_modes_and_not_with_fault_injection() {
        assert_eq!(parse_controller_spec("").unwrap().aio, None);
        let c = parse_controller_spec("ms=8,mset=1,pi=1,lba=4096").unwrap();
        let ns = &c.namespaces[0];
        assert_eq!((ns.metadata, ns.extended, ns.pi), (8, true, 1));
        for (spec, needle) in [
            ("pi=1", "ms=8"),
            ("ms=4,pi=2", "ms=8"),
            ("mset=1", "ms= above 0"),
            ("mset=2,ms=8", "expected 0"),
            ("pi=4,ms=8", "0 to 3"),
            ("backend=tape", "file or null"),
            ("backend=null,fail=read:5", "image= or fail="),
            ("ms=300", "0 to 128"),
        ] {
            let e = parse_controller_spec(spec).unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        let c = parse_controller_spec("aio=io_uring,ns=2").unwrap();
        assert_eq!(c.aio, Some(DriveAio::IoUring));
        assert_eq!(
            parse_controller_spec("aio=threads").unwrap().aio,
            Some(DriveAio::Threads)
        );
        let e = parse_controller_spec("aio=native").unwrap_err();
        assert!(
            e.contains("aio=") && e.contains("threads or io_uring"),
            "{e}"
        );
        let e = parse_controller_spec("aio=io_uring,fail=read:5").unwrap_err();
        assert!(e.contains("blkdebug"), "{e}");
    }

    #[test]
    fn image_only_with_one_namespace() {
        let c = parse_controller_spec("image=/tmp/a.img").unwrap();
        assert_eq!(c.namespaces[0].image, Some(PathBuf::from("/tmp/a.img")));
        let e = parse_controller_spec("image=/tmp/a.img,ns=2").unwrap_err();
        assert!(e.contains("ns=1"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        for (spec, needle) in [
            ("lba=1000", "lba="),
            ("lba=256", "lba="),
            ("ns=0", "ns="),
            ("mdts=21", "mdts="),
            ("qpairs=0", "qpairs="),
            ("serial=a b", "serial="),
            ("bogus=1", "unknown key \"bogus\""),
            ("lba", "not KEY=VALUE"),
            ("size=x", "size"),
        ] {
            let e = parse_controller_spec(spec).unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }
}
