//! IOVA ranges: what the IOMMU lets the device reach.

use super::*;

pub(super) fn field<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], String> {
    at.checked_add(N)
        .and_then(|end| buf.get(at..end))
        .map(|s| s.try_into().expect("slice has length N"))
        .ok_or_else(|| {
            format!(
                "capability chain truncated at offset {at} ({} bytes)",
                buf.len()
            )
        })
}

pub(super) fn rd_u16(buf: &[u8], at: usize) -> Result<u16, String> {
    field::<2>(buf, at).map(u16::from_ne_bytes)
}

pub(super) fn rd_u32(buf: &[u8], at: usize) -> Result<u32, String> {
    field::<4>(buf, at).map(u32::from_ne_bytes)
}

pub(super) fn rd_u64(buf: &[u8], at: usize) -> Result<u64, String> {
    field::<8>(buf, at).map(u64::from_ne_bytes)
}

/// Find the IOVA range capability (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`) in the buffer that
/// `VFIO_IOMMU_GET_INFO` filled (a `vfio_iommu_type1_info` followed by its capability chain,
/// native byte order) and return its ranges as half-open ranges (the kernel's inclusive
/// `start..=end` becomes `start..end + 1`; an end of `u64::MAX` stays `u64::MAX`).
///
/// `Ok(None)` when there is no such capability; `Err` with the reason when the chain is
/// malformed (truncated, pointing into the header, looping, or a range ending before it starts).
pub(super) fn parse_iova_ranges(buf: &[u8]) -> Result<Option<Vec<Range<u64>>>, String> {
    let header_size = size_of::<vfio_iommu_type1_info>();
    let flags = rd_u32(buf, offset_of!(vfio_iommu_type1_info, flags))?;
    if flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(None);
    }
    let mut at = rd_u32(buf, offset_of!(vfio_iommu_type1_info, cap_offset))? as usize;
    // Each capability takes at least a header, so a longer walk is a loop.
    let mut hops_left = buf.len() / size_of::<vfio_info_cap_header>();
    while at != 0 {
        if at < header_size {
            return Err(format!(
                "capability at offset {at} overlaps the {header_size}-byte header"
            ));
        }
        if hops_left == 0 {
            return Err("capability chain loops".to_string());
        }
        hops_left -= 1;
        let id = rd_u16(buf, at + offset_of!(vfio_info_cap_header, id))?;
        let next = rd_u32(buf, at + offset_of!(vfio_info_cap_header, next))?;
        if u32::from(id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let count = rd_u32(
                buf,
                at + offset_of!(vfio_iommu_type1_info_cap_iova_range, nr_iovas),
            )?;
            let first = at + offset_of!(vfio_iommu_type1_info_cap_iova_range, iova_ranges);
            let entry = size_of::<vfio_iova_range>();
            let mut ranges = Vec::with_capacity((count as usize).min(buf.len() / entry));
            for i in 0..count as usize {
                let base = first + i * entry;
                let start = rd_u64(buf, base + offset_of!(vfio_iova_range, start))?;
                let end = rd_u64(buf, base + offset_of!(vfio_iova_range, end))?;
                if end < start {
                    return Err(format!(
                        "IOVA range {i} ends ({end:#x}) before it starts ({start:#x})"
                    ));
                }
                ranges.push(start..end.saturating_add(1));
            }
            return Ok(Some(ranges));
        }
        at = next as usize;
    }
    Ok(None)
}

/// Call `VFIO_IOMMU_GET_INFO` on the container `fd`: once with the plain structure to learn the
/// size of the capability chain, then with a buffer that holds it. Returns the filled buffer.
pub(super) fn iommu_info(fd: RawFd) -> io::Result<Vec<u8>> {
    let header_size = size_of::<vfio_iommu_type1_info>();
    let mut info = vfio_iommu_type1_info {
        argsz: header_size as u32,
        ..Default::default()
    };
    // SAFETY: VFIO_IOMMU_GET_INFO reads argsz and writes at most argsz bytes (here the whole
    // structure) to the pointer, which is valid and exclusively borrowed for the call.
    let r = unsafe {
        libc::ioctl(
            fd,
            VFIO_IOMMU_GET_INFO as _,
            &mut info as *mut vfio_iommu_type1_info,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut size = (info.argsz as usize).max(header_size);
    // The chain does not change between calls; a few tries only guard against a kernel that
    // keeps asking for more.
    for _ in 0..4 {
        let mut buf = vec![0u8; size];
        buf[..4].copy_from_slice(&(size as u32).to_ne_bytes());
        // SAFETY: `buf` is `size` bytes long and argsz tells the kernel so: it writes at most
        // that many bytes into it.
        let r = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO as _, buf.as_mut_ptr()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let wanted = rd_u32(&buf, 0).map_err(io::Error::other)? as usize;
        if wanted <= size {
            return Ok(buf);
        }
        size = wanted;
    }
    Err(io::Error::other("the capability chain keeps growing"))
}

/// The IOVA ranges of the container, or the fallback window when the kernel does not report
/// them.
pub(super) fn iova_ranges_of(
    bdf: &str,
    container: &VfioContainer,
) -> Result<Vec<Range<u64>>, VfioSetupError> {
    let err = |reason: String| VfioSetupError::IommuInfo {
        bdf: bdf.to_string(),
        reason,
    };
    let buf =
        iommu_info(container.as_raw_fd()).map_err(|e| err(format!("VFIO_IOMMU_GET_INFO: {e}")))?;
    match parse_iova_ranges(&buf).map_err(err)? {
        Some(ranges) if ranges.is_empty() => {
            Err(err("the IOMMU reports no usable IOVA range".into()))
        }
        Some(ranges) => {
            log::debug!("{bdf}: IOVA ranges {}", format_ranges(&ranges));
            Ok(ranges)
        }
        None => {
            log::warn!(
                "{bdf}: the kernel does not report IOVA ranges (no IOVA range capability); \
                 assuming {:#x}..{:#x}",
                FALLBACK_IOVA_RANGE.start,
                FALLBACK_IOVA_RANGE.end
            );
            Ok(vec![FALLBACK_IOVA_RANGE])
        }
    }
}
