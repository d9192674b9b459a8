//! Translating VFIO errors into what to do about them.

use super::*;

/// Turn a failure of opening the container or the device into the error that says what to do.
/// `root` is re-read when the kernel finds the group not viable, to name the device at fault.
pub(super) fn open_error(
    root: &Path,
    bdf: &str,
    group: u32,
    step: &'static str,
    e: VfioError,
) -> VfioSetupError {
    let bdf_s = bdf.to_string();
    let errno_of = |e: &io::Error| e.raw_os_error().unwrap_or(0);
    match e {
        VfioError::OpenContainer(src) if src.kind() == io::ErrorKind::NotFound => {
            VfioSetupError::NoVfioModule { bdf: bdf_s }
        }
        VfioError::OpenContainer(src) if matches!(errno_of(&src), libc::EACCES | libc::EPERM) => {
            VfioSetupError::Permission {
                bdf: bdf_s,
                path: DEV_VFIO_CONTAINER.into(),
                source: src,
            }
        }
        VfioError::VfioExtension | VfioError::VfioType1V2 => {
            VfioSetupError::NoType1Iommu { bdf: bdf_s }
        }
        VfioError::OpenGroup(src, _) => match errno_of(&src) {
            libc::EBUSY => VfioSetupError::Busy { bdf: bdf_s, group },
            libc::EACCES | libc::EPERM => VfioSetupError::Permission {
                bdf: bdf_s,
                path: format!("/dev/vfio/{group}"),
                source: src,
            },
            libc::ENOENT => VfioSetupError::NoGroupNode { bdf: bdf_s, group },
            _ => VfioSetupError::Vfio {
                bdf: bdf_s,
                step,
                source: VfioError::OpenGroup(src, group.to_string()),
            },
        },
        VfioError::GroupGetDeviceFD(ref se) if se.errno() == libc::EBUSY => {
            VfioSetupError::Busy { bdf: bdf_s, group }
        }
        VfioError::ContainerSetIOMMU(ref se) if se.errno() == libc::EPERM => {
            VfioSetupError::InterruptRemapping { bdf: bdf_s }
        }
        VfioError::GroupViable => {
            // Name the device at fault if sysfs shows one (it may have changed since the
            // checks before opening).
            match probe_at(root, bdf) {
                Ok(info) => match offending_member(&info) {
                    Some((other, driver)) => VfioSetupError::GroupNotViable {
                        bdf: bdf_s,
                        group,
                        other: other.to_string(),
                        driver: driver.to_string(),
                    },
                    None => VfioSetupError::GroupNotViableKernel { bdf: bdf_s, group },
                },
                Err(_) => VfioSetupError::GroupNotViableKernel { bdf: bdf_s, group },
            }
        }
        other => VfioSetupError::Vfio {
            bdf: bdf_s,
            step,
            source: other,
        },
    }
}

/// The RLIMIT_MEMLOCK soft limit in bytes (`u64::MAX` when unlimited). (rustix, already in the
/// dependency tree, reads it safely; nix would add a crate for the same call.)
pub(super) fn memlock_limit() -> Option<u64> {
    let l = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    Some(l.current.unwrap_or(u64::MAX))
}

pub(super) fn format_ranges(ranges: &[Range<u64>]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| format!("{:#x}..{:#x}", r.start, r.end))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// What to do about a failed `VFIO_IOMMU_MAP_DMA` of `len` bytes at `iova`: the hint of
/// [`HwError::Map`] (empty when there is nothing useful to say).
pub(super) fn dma_map_hint(
    errno: i32,
    len: usize,
    iova: Iova,
    ranges: &[Range<u64>],
    is_root: bool,
    memlock: Option<u64>,
) -> String {
    match errno {
        libc::ENOMEM | libc::EPERM if !is_root => {
            let limit = match memlock {
                Some(u64::MAX) => ", now unlimited".to_string(),
                Some(l) => format!(", now {l} bytes"),
                None => String::new(),
            };
            format!(
                "; VFIO pins DMA memory and counts it against the locked-memory limit \
                 (RLIMIT_MEMLOCK{limit}), which does not leave room for the {len} bytes asked: \
                 raise it (`ulimit -l`, or a memlock line in /etc/security/limits.conf) or run \
                 as root"
            )
        }
        libc::EINVAL | libc::EFAULT => {
            let end = iova.0.saturating_add(len as u64);
            let inside = ranges.iter().any(|r| r.start <= iova.0 && end <= r.end);
            let where_ = if inside {
                "it is inside them"
            } else {
                "it is outside them"
            };
            format!(
                "; the IOVA range {iova}..{end:#x} must lie inside the ranges the IOMMU reports \
                 {} ({where_}), and the address, length and IOVA must be 4 KiB aligned",
                format_ranges(ranges)
            )
        }
        libc::EEXIST => format!("; IOVA {iova} overlaps an existing mapping: unmap it first"),
        libc::ENOSPC => "; too many DMA mappings for vfio_iommu_type1 (module parameter \
                         dma_entry_limit): map fewer, larger buffers"
            .to_string(),
        _ => String::new(),
    }
}
