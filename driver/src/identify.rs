//! Parsers for the Identify data structures and the log pages the driver reads.
//!
//! Every parser takes a plain `&[u8]` that the caller has already copied out of DMA memory, so
//! nothing here can observe the device changing the data. The parsers never panic: a buffer
//! that is too short or a structure that contradicts itself gives an [`IdentifyError`].
//!
//! Offsets come from the NVM Express Base Specification 2.0 (Figure 275, Identify Controller;
//! Figure 205, Error Information log entry; Figure 207, SMART / Health Information log page) and
//! the NVM Command Set Specification 1.0 (Figure 97, Identify Namespace). All fields are
//! little-endian.

use std::fmt;

use crate::status::NvmeStatus;

/// Size of every Identify data structure.
pub const IDENTIFY_DATA_LEN: usize = 4096;
/// Size of the SMART / Health Information log page.
pub const SMART_LOG_LEN: usize = 512;
/// Size of one Error Information log entry.
pub const ERROR_LOG_ENTRY_LEN: usize = 64;
/// Number of namespace identifiers in an active namespace list.
pub const ACTIVE_NAMESPACE_LIST_ENTRIES: usize = IDENTIFY_DATA_LEN / 4;
/// Most LBA formats an Identify Namespace structure can describe (NLBAF is 0-based).
pub const MAX_LBA_FORMATS: usize = 64;
/// Smallest supported logical block size exponent (512 bytes).
pub const MIN_LBADS: u8 = 9;
/// Largest supported logical block size exponent (64 KiB).
pub const MAX_LBADS: u8 = 16;

/// The structure a parser was given, named in errors.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Structure {
    /// Identify Controller data (CNS 01h).
    IdentifyController,
    /// Identify Namespace data (CNS 00h).
    IdentifyNamespace,
    /// SMART / Health Information log page (LID 02h).
    SmartLog,
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Structure::IdentifyController => "Identify Controller data",
            Structure::IdentifyNamespace => "Identify Namespace data",
            Structure::SmartLog => "SMART / Health Information log page",
        })
    }
}

/// Why an Identify structure or log page could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentifyError {
    /// The buffer is shorter than the structure.
    #[error(
        "{structure} is only {got} bytes, expected {expected}: pass the whole buffer the command \
         transferred"
    )]
    TooShort {
        /// Which structure.
        structure: Structure,
        /// Its size.
        expected: usize,
        /// Length of the buffer given.
        got: usize,
    },
    /// Identify Namespace returned all zeros: the namespace identifier is not active.
    #[error(
        "namespace {nsid} is not active (Identify Namespace returned all zeros): use a namespace \
         from the active namespace list, or attach this one first"
    )]
    InactiveNamespace {
        /// The namespace asked for.
        nsid: u32,
    },
    /// NLBAF claims more LBA formats than the structure holds.
    #[error(
        "Identify Namespace data of namespace {nsid} reports {} LBA formats (NLBAF {nlbaf}), more \
         than the {MAX_LBA_FORMATS} the structure holds: the controller returned corrupt data",
        *nlbaf as usize + 1
    )]
    TooManyLbaFormats {
        /// The namespace.
        nsid: u32,
        /// NLBAF as read (0-based).
        nlbaf: u8,
    },
    /// FLBAS selects an LBA format beyond NLBAF.
    #[error(
        "Identify Namespace data of namespace {nsid}: FLBAS {flbas:#04x} selects LBA format \
         {index}, but only formats 0 to {nlbaf} exist: the namespace format is inconsistent, \
         format the namespace again"
    )]
    LbaFormatIndex {
        /// The namespace.
        nsid: u32,
        /// FLBAS as read.
        flbas: u8,
        /// The format index FLBAS selects.
        index: u8,
        /// NLBAF as read (0-based).
        nlbaf: u8,
    },
    /// The selected LBA format has a block size the driver does not handle.
    #[error(
        "namespace {nsid} uses LBA format {index} with LBADS {lbads}; only 512-byte to 64 KiB \
         blocks (LBADS {MIN_LBADS} to {MAX_LBADS}) are supported: format the namespace with \
         another LBA format"
    )]
    UnsupportedLbaSize {
        /// The namespace.
        nsid: u32,
        /// The selected format index.
        index: u8,
        /// Its LBA data size exponent.
        lbads: u8,
    },
}

/// SGL support for NVM command set I/O (Identify Controller SGLS bits 1:0).
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SglSupport {
    /// SGLs are not supported (also the reading of the reserved value 11b).
    None,
    /// SGLs are supported with no alignment or granularity requirement.
    Supported,
    /// SGLs are supported; Data Block addresses and lengths must be dword aligned.
    DwordAligned,
}

/// The fields of the Identify Controller data structure the driver uses (Base spec Figure 275).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ControllerInfo {
    /// PCI Vendor ID.
    pub vid: u16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum Data Transfer Size as reported: a power of two in units of the minimum memory
    /// page size, 0 = no limit. See [`ControllerInfo::max_transfer_bytes`].
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version (major 31:16, minor 15:8, tertiary 7:0); 0 on controllers before 1.2.
    pub version: u32,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Abort Command Limit, 0-based.
    pub acl: u8,
    /// Asynchronous Event Request Limit, 0-based.
    pub aerl: u8,
    /// Error Log Page Entries, 0-based.
    pub elpe: u8,
    /// Number of Power States Support, 0-based.
    pub npss: u8,
    /// Submission Queue Entry Size: required 3:0, maximum 7:4 (powers of two).
    pub sqes: u8,
    /// Completion Queue Entry Size: required 3:0, maximum 7:4 (powers of two).
    pub cqes: u8,
    /// Maximum Outstanding Commands (0 = not reported).
    pub maxcmd: u16,
    /// Number of Namespaces: the largest namespace identifier.
    pub nn: u32,
    /// Optional NVM Command Support: bit 0 Compare, bit 2 Dataset Management, bit 3 Write
    /// Zeroes.
    pub oncs: u16,
    /// Volatile Write Cache: bit 0 = present.
    pub vwc: u8,
    /// SGL Support.
    pub sgls: u32,
    /// IEEE OUI Identifier.
    pub ieee: [u8; 3],
    /// NVM Subsystem NVMe Qualified Name.
    pub subnqn: String,
}

/// ONCS bit: Compare command.
const ONCS_COMPARE: u16 = 1 << 0;
/// ONCS bit: Dataset Management command.
const ONCS_DSM: u16 = 1 << 2;
/// ONCS bit: Write Zeroes command.
const ONCS_WRITE_ZEROES: u16 = 1 << 3;
/// VWC bit: a volatile write cache is present.
const VWC_PRESENT: u8 = 1 << 0;

impl ControllerInfo {
    /// Parse the 4096-byte Identify Controller data structure. Bytes beyond 4096 are ignored.
    pub fn parse(data: &[u8]) -> Result<ControllerInfo, IdentifyError> {
        check_len(Structure::IdentifyController, data, IDENTIFY_DATA_LEN)?;
        Ok(ControllerInfo {
            vid: le16(data, 0),
            ssvid: le16(data, 2),
            serial: ascii_field(field(data, 4, 20)),
            model: ascii_field(field(data, 24, 40)),
            firmware: ascii_field(field(data, 64, 8)),
            ieee: array(data, 73),
            mdts: byte(data, 77),
            cntlid: le16(data, 78),
            version: le32(data, 80),
            oacs: le16(data, 256),
            acl: byte(data, 258),
            aerl: byte(data, 259),
            elpe: byte(data, 262),
            npss: byte(data, 263),
            sqes: byte(data, 512),
            cqes: byte(data, 513),
            maxcmd: le16(data, 514),
            nn: le32(data, 516),
            oncs: le16(data, 520),
            vwc: byte(data, 525),
            sgls: le32(data, 536),
            subnqn: nqn_field(field(data, 768, 256)),
        })
    }

    /// The largest data transfer of one command in bytes: 2^MDTS × 2^(12 + `mpsmin`), with
    /// `mpsmin` from CAP.MPSMIN. `None` when MDTS is 0 (no limit) or when the limit does not
    /// fit in 64 bits, which is no limit either.
    pub fn max_transfer_bytes(&self, mpsmin: u8) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        let shift = u32::from(self.mdts) + 12 + u32::from(mpsmin);
        1u64.checked_shl(shift)
    }

    /// Whether the Compare command is supported.
    pub fn supports_compare(&self) -> bool {
        self.oncs & ONCS_COMPARE != 0
    }

    /// Whether the Dataset Management command (deallocate) is supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & ONCS_DSM != 0
    }

    /// Whether the Write Zeroes command is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & ONCS_WRITE_ZEROES != 0
    }

    /// Whether the controller has a volatile write cache (so Flush matters).
    pub fn has_volatile_write_cache(&self) -> bool {
        self.vwc & VWC_PRESENT != 0
    }

    /// SGL support for NVM command set I/O (SGLS bits 1:0).
    pub fn sgl_support(&self) -> SglSupport {
        match self.sgls & 3 {
            1 => SglSupport::Supported,
            2 => SglSupport::DwordAligned,
            // 00b: not supported; 11b: reserved, so SGLs are not used.
            _ => SglSupport::None,
        }
    }
}

/// One LBA Format entry (NVM Command Set Figure 98).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LbaFormat {
    /// Metadata Size in bytes per LBA.
    pub ms: u16,
    /// LBA Data Size exponent: the block is 2^LBADS bytes (0 = format not available).
    pub lbads: u8,
    /// Relative Performance (0 = best).
    pub rp: u8,
}

impl LbaFormat {
    fn from_dword(dw: u32) -> LbaFormat {
        LbaFormat {
            ms: dw as u16,
            lbads: (dw >> 16) as u8,
            rp: ((dw >> 24) & 3) as u8,
        }
    }
}

/// The fields of the Identify Namespace data structure the driver uses (NVM Command Set
/// Figure 97).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NamespaceInfo {
    /// The namespace identifier the structure was read for.
    pub nsid: u32,
    /// Namespace Size (NSZE) in logical blocks.
    pub size_lbas: u64,
    /// Namespace Capacity (NCAP) in logical blocks.
    pub capacity_lbas: u64,
    /// Namespace Utilization (NUSE) in logical blocks.
    pub utilization_lbas: u64,
    /// Formatted LBA Size as reported.
    pub flbas: u8,
    /// The NLBAF + 1 supported LBA formats.
    pub lba_formats: Vec<LbaFormat>,
    /// Logical block size in bytes of the format in use.
    pub lba_size: u32,
    /// Metadata bytes per logical block of the format in use.
    pub metadata_size: u16,
    /// Namespace Features.
    pub nsfeat: u8,
    /// End-to-end Data Protection Type Settings (DPS): bits 2:0 the protection information
    /// type (0 = none), bit 3 PI in the first bytes of the metadata.
    pub dps: u8,
    /// Namespace Globally Unique Identifier (all zero when not reported).
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (all zero when not reported).
    pub eui64: [u8; 8],
}

/// FLBAS bit 4: metadata is transferred at the end of each logical block.
const FLBAS_EXTENDED: u8 = 1 << 4;

impl NamespaceInfo {
    /// Parse the 4096-byte Identify Namespace data structure of namespace `nsid`. Bytes beyond
    /// 4096 are ignored.
    ///
    /// The format in use is LBAF[FLBAS 3:0], with FLBAS 6:5 as the high bits of the index when
    /// NLBAF is above 16. An index beyond NLBAF, or a block size outside 512 B..=64 KiB, is an
    /// error; so is an all-zero structure, which is what a controller returns for an inactive
    /// namespace.
    pub fn parse(nsid: u32, data: &[u8]) -> Result<NamespaceInfo, IdentifyError> {
        check_len(Structure::IdentifyNamespace, data, IDENTIFY_DATA_LEN)?;
        if field(data, 0, IDENTIFY_DATA_LEN).iter().all(|&b| b == 0) {
            return Err(IdentifyError::InactiveNamespace { nsid });
        }
        let nlbaf = byte(data, 25);
        if usize::from(nlbaf) >= MAX_LBA_FORMATS {
            return Err(IdentifyError::TooManyLbaFormats { nsid, nlbaf });
        }
        let flbas = byte(data, 26);
        let mut index = flbas & 0xf;
        if nlbaf > 16 {
            index |= ((flbas >> 5) & 3) << 4;
        }
        if index > nlbaf {
            return Err(IdentifyError::LbaFormatIndex {
                nsid,
                flbas,
                index,
                nlbaf,
            });
        }
        let lba_formats: Vec<LbaFormat> = (0..=usize::from(nlbaf))
            .map(|i| LbaFormat::from_dword(le32(data, 128 + 4 * i)))
            .collect();
        let in_use = lba_formats
            .get(usize::from(index))
            .copied()
            .unwrap_or(LbaFormat {
                ms: 0,
                lbads: 0,
                rp: 0,
            });
        if !(MIN_LBADS..=MAX_LBADS).contains(&in_use.lbads) {
            return Err(IdentifyError::UnsupportedLbaSize {
                nsid,
                index,
                lbads: in_use.lbads,
            });
        }
        Ok(NamespaceInfo {
            nsid,
            size_lbas: le64(data, 0),
            capacity_lbas: le64(data, 8),
            utilization_lbas: le64(data, 16),
            nsfeat: byte(data, 24),
            dps: byte(data, 29),
            flbas,
            lba_size: 1u32 << in_use.lbads,
            metadata_size: in_use.ms,
            lba_formats,
            nguid: array(data, 104),
            eui64: array(data, 120),
        })
    }

    /// Index into [`NamespaceInfo::lba_formats`] of the format in use.
    pub fn lba_format_index(&self) -> usize {
        let mut index = usize::from(self.flbas & 0xf);
        if self.lba_formats.len() > 17 {
            index |= usize::from((self.flbas >> 5) & 3) << 4;
        }
        index
    }

    /// Whether metadata is transferred at the end of each logical block (FLBAS bit 4) rather
    /// than in a separate buffer.
    pub fn extended_lba(&self) -> bool {
        self.flbas & FLBAS_EXTENDED != 0
    }

    /// Protection information type in use (DPS bits 2:0): 0 for none, 1 to 3.
    pub fn pi_type(&self) -> u8 {
        self.dps & 7
    }

    /// How data and metadata of this namespace's logical blocks move, or why the driver
    /// cannot move them.
    pub fn layout(&self) -> Result<DataLayout, String> {
        let ms = u32::from(self.metadata_size);
        let lba = self.lba_size;
        let pi = self.pi_type();
        if ms == 0 {
            return Ok(DataLayout::plain(lba));
        }
        if pi != 0 {
            if ms == 8 {
                // The 8 bytes are the protection information and nothing else: the controller
                // inserts it on writes and checks and strips it on reads (PRACT), so only the
                // data moves.
                return Ok(DataLayout {
                    data_per_lba: lba,
                    metadata_per_lba: 0,
                    pract: true,
                    pi_type: pi,
                });
            }
            return Err(format!(
                "namespace {} has protection information type {pi} inside {ms} bytes of metadata \
                 per LBA; rnvme lets the controller insert and strip protection information only \
                 when it is the whole metadata (8 bytes): format it with --lbaf of an 8-byte or \
                 metadata-free format",
                self.nsid
            ));
        }
        Ok(if self.extended_lba() {
            DataLayout {
                data_per_lba: lba + ms,
                ..DataLayout::plain(lba)
            }
        } else {
            DataLayout {
                metadata_per_lba: ms,
                ..DataLayout::plain(lba)
            }
        })
    }

    /// Namespace size in bytes (saturating).
    pub fn size_bytes(&self) -> u64 {
        self.size_lbas.saturating_mul(u64::from(self.lba_size))
    }
}

/// How the logical blocks of a namespace move between host memory and the device.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DataLayout {
    /// Bytes of the data buffer per logical block: the block, plus its metadata on an
    /// extended-LBA format.
    pub data_per_lba: u32,
    /// Bytes of the separate metadata buffer (MPTR) per logical block; 0 when there is none.
    pub metadata_per_lba: u32,
    /// The controller inserts and strips protection information (PRACT): Read, Write and
    /// Compare carry PRACT, the guard check and, for types 1 and 2, the reference tag (the
    /// command's first LBA).
    pub pract: bool,
    /// The protection information type (0 for none).
    pub pi_type: u8,
}

impl DataLayout {
    /// Blocks of `lba_size` bytes and nothing else.
    pub fn plain(lba_size: u32) -> DataLayout {
        DataLayout {
            data_per_lba: lba_size,
            metadata_per_lba: 0,
            pract: false,
            pi_type: 0,
        }
    }
}

/// The namespace identifiers of an active namespace list (Identify CNS 02h), in the order
/// given, up to the first 0. Reads at most 1024 entries; a trailing partial entry is ignored.
pub fn parse_active_namespace_list(data: &[u8]) -> Vec<u32> {
    data.chunks_exact(4)
        .take(ACTIVE_NAMESPACE_LIST_ENTRIES)
        .map(|c| le32(c, 0))
        .take_while(|&nsid| nsid != 0)
        .collect()
}

/// The SMART / Health Information log page (Base spec Figure 207).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SmartLog {
    /// Critical Warning bits.
    pub critical_warning: u8,
    /// Composite Temperature in kelvin.
    pub temperature_kelvin: u16,
    /// Available Spare, percent.
    pub available_spare: u8,
    /// Available Spare Threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage Used (may exceed 100).
    pub percentage_used: u8,
    /// Data Units Read, in thousands of 512-byte units.
    pub data_units_read: u128,
    /// Data Units Written, in thousands of 512-byte units.
    pub data_units_written: u128,
    /// Host Read Commands.
    pub host_read_commands: u128,
    /// Host Write Commands.
    pub host_write_commands: u128,
    /// Controller Busy Time, minutes.
    pub controller_busy_time: u128,
    /// Power Cycles.
    pub power_cycles: u128,
    /// Power On Hours.
    pub power_on_hours: u128,
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors.
    pub media_errors: u128,
    /// Number of Error Information Log Entries over the controller's life.
    pub num_err_log_entries: u128,
    /// Warning Composite Temperature Time, minutes.
    pub warning_temp_time: u32,
    /// Critical Composite Temperature Time, minutes.
    pub critical_temp_time: u32,
}

impl SmartLog {
    /// Parse the 512-byte SMART / Health Information log page. Bytes beyond 512 are ignored.
    pub fn parse(data: &[u8]) -> Result<SmartLog, IdentifyError> {
        check_len(Structure::SmartLog, data, SMART_LOG_LEN)?;
        Ok(SmartLog {
            critical_warning: byte(data, 0),
            temperature_kelvin: le16(data, 1),
            available_spare: byte(data, 3),
            available_spare_threshold: byte(data, 4),
            percentage_used: byte(data, 5),
            data_units_read: le128(data, 32),
            data_units_written: le128(data, 48),
            host_read_commands: le128(data, 64),
            host_write_commands: le128(data, 80),
            controller_busy_time: le128(data, 96),
            power_cycles: le128(data, 112),
            power_on_hours: le128(data, 128),
            unsafe_shutdowns: le128(data, 144),
            media_errors: le128(data, 160),
            num_err_log_entries: le128(data, 176),
            warning_temp_time: le32(data, 192),
            critical_temp_time: le32(data, 196),
        })
    }

    /// Composite temperature in degrees Celsius (rounded down from kelvin − 273.15).
    pub fn temperature_celsius(&self) -> i32 {
        (i32::from(self.temperature_kelvin) * 100 - 27315).div_euclid(100)
    }
}

/// One Error Information log entry (Base spec Figure 205).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ErrorLogEntry {
    /// Error Count: a unique, increasing number for this error.
    pub error_count: u64,
    /// Submission Queue ID of the failed command.
    pub sqid: u16,
    /// Command ID of the failed command.
    pub cid: u16,
    /// Its completion status.
    pub status: NvmeStatus,
    /// Parameter Error Location: byte 7:0 and bit 10:8 in the command (0xffff = not
    /// applicable).
    pub parameter_error_location: u16,
    /// The first LBA that had the error.
    pub lba: u64,
    /// The namespace of the error.
    pub nsid: u32,
    /// Vendor Specific Information Available: log page identifier with more detail, or 0.
    pub vendor_specific: u8,
}

/// The entries of an Error Information log page, in the order given. Each entry is 64 bytes;
/// entries with an error count of 0 are empty and skipped, as is a trailing partial entry.
pub fn parse_error_log(data: &[u8]) -> Vec<ErrorLogEntry> {
    data.chunks_exact(ERROR_LOG_ENTRY_LEN)
        .filter_map(|e| {
            let error_count = le64(e, 0);
            (error_count != 0).then(|| ErrorLogEntry {
                error_count,
                sqid: le16(e, 8),
                cid: le16(e, 10),
                // Bit 0 is the phase tag of the completion; the status field is 15:1.
                status: NvmeStatus::from_field(le16(e, 12) >> 1),
                parameter_error_location: le16(e, 14),
                lba: le64(e, 16),
                nsid: le32(e, 24),
                vendor_specific: byte(e, 28),
            })
        })
        .collect()
}

fn check_len(structure: Structure, data: &[u8], expected: usize) -> Result<(), IdentifyError> {
    if data.len() < expected {
        return Err(IdentifyError::TooShort {
            structure,
            expected,
            got: data.len(),
        });
    }
    Ok(())
}

/// `len` bytes at `off`, or fewer if the buffer ends first (callers check lengths first; this
/// keeps the readers free of panics regardless).
fn field(data: &[u8], off: usize, len: usize) -> &[u8] {
    let start = off.min(data.len());
    let end = off.saturating_add(len).min(data.len());
    &data[start..end]
}

/// `N` bytes at `off`, zero filled past the end of the buffer.
fn array<const N: usize>(data: &[u8], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    let src = field(data, off, N);
    out[..src.len()].copy_from_slice(src);
    out
}

fn byte(data: &[u8], off: usize) -> u8 {
    data.get(off).copied().unwrap_or(0)
}

fn le16(data: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(array(data, off))
}

fn le32(data: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(array(data, off))
}

fn le64(data: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(array(data, off))
}

fn le128(data: &[u8], off: usize) -> u128 {
    u128::from_le_bytes(array(data, off))
}

/// A space-padded ASCII field: trailing spaces and NULs removed, every byte that is not
/// printable ASCII shown as '?'.
fn ascii_field(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    bytes[..end]
        .iter()
        .map(|&b| {
            if (0x20..=0x7e).contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

/// A NUL-terminated NQN field: everything from the first NUL on dropped, then as
/// [`ascii_field`].
fn nqn_field(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    ascii_field(&bytes[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A zeroed buffer written field by field at the offsets of the specification.
    struct Buf(Vec<u8>);

    impl Buf {
        fn new(len: usize) -> Buf {
            Buf(vec![0; len])
        }
        fn bytes(&mut self, off: usize, b: &[u8]) -> &mut Buf {
            self.0[off..off + b.len()].copy_from_slice(b);
            self
        }
        fn u8(&mut self, off: usize, v: u8) -> &mut Buf {
            self.bytes(off, &[v])
        }
        fn u16(&mut self, off: usize, v: u16) -> &mut Buf {
            self.bytes(off, &v.to_le_bytes())
        }
        fn u32(&mut self, off: usize, v: u32) -> &mut Buf {
            self.bytes(off, &v.to_le_bytes())
        }
        fn u64(&mut self, off: usize, v: u64) -> &mut Buf {
            self.bytes(off, &v.to_le_bytes())
        }
        fn u128(&mut self, off: usize, v: u128) -> &mut Buf {
            self.bytes(off, &v.to_le_bytes())
        }
        /// A space-padded string field of `len` bytes.
        fn str(&mut self, off: usize, len: usize, s: &str) -> &mut Buf {
            let mut f = vec![b' '; len];
            f[..s.len()].copy_from_slice(s.as_bytes());
            self.bytes(off, &f)
        }
    }

    fn controller_buf() -> Buf {
        let mut b = Buf::new(IDENTIFY_DATA_LEN);
        b.u16(0, 0x1b36)
            .u16(2, 0x1af4)
            .str(4, 20, "rnvme0")
            .str(24, 40, "QEMU NVMe Ctrl")
            .str(64, 8, "7.2.0")
            .u8(72, 6) // RAB, not parsed: must not leak into IEEE
            .bytes(73, &[0x00, 0x54, 0x52])
            .u8(76, 0x0a) // CMIC, not parsed: must not leak into MDTS
            .u8(77, 7)
            .u16(78, 0x1234)
            .u32(80, 0x0001_0400)
            .u16(256, 0x000a)
            .u8(258, 3)
            .u8(259, 4)
            .u8(260, 0x55) // FRMW, LPA: not parsed
            .u8(261, 0x66)
            .u8(262, 63)
            .u8(263, 2)
            .u8(512, 0x66)
            .u8(513, 0x44)
            .u16(514, 0x0100)
            .u32(516, 256)
            .u16(520, 0x015d)
            .u8(525, 0x07)
            .u32(536, 0x0010_0001)
            .bytes(768, b"nqn.2019-08.org.qemu:rnvme0");
        b
    }

    #[test]
    fn controller_every_field() {
        let c = ControllerInfo::parse(&controller_buf().0).unwrap();
        assert_eq!(c.vid, 0x1b36);
        assert_eq!(c.ssvid, 0x1af4);
        assert_eq!(c.serial, "rnvme0");
        assert_eq!(c.model, "QEMU NVMe Ctrl");
        assert_eq!(c.firmware, "7.2.0");
        assert_eq!(c.ieee, [0x00, 0x54, 0x52]);
        assert_eq!(c.mdts, 7);
        assert_eq!(c.cntlid, 0x1234);
        assert_eq!(c.version, 0x0001_0400);
        assert_eq!(c.oacs, 0x000a);
        assert_eq!(c.acl, 3);
        assert_eq!(c.aerl, 4);
        assert_eq!(c.elpe, 63);
        assert_eq!(c.npss, 2);
        assert_eq!(c.sqes, 0x66);
        assert_eq!(c.cqes, 0x44);
        assert_eq!(c.maxcmd, 0x0100);
        assert_eq!(c.nn, 256);
        assert_eq!(c.oncs, 0x015d);
        assert_eq!(c.vwc, 0x07);
        assert_eq!(c.sgls, 0x0010_0001);
        assert_eq!(c.subnqn, "nqn.2019-08.org.qemu:rnvme0");
        // 0x015d: bits 0, 2, 3 set.
        assert!(c.supports_compare() && c.supports_dsm() && c.supports_write_zeroes());
        assert!(c.has_volatile_write_cache());
        assert_eq!(c.sgl_support(), SglSupport::Supported);
    }

    #[test]
    fn controller_feature_bits_individually() {
        let mut b = controller_buf();
        b.u16(520, 1 << 2).u8(525, 0).u32(536, 2);
        let c = ControllerInfo::parse(&b.0).unwrap();
        assert!(!c.supports_compare() && c.supports_dsm() && !c.supports_write_zeroes());
        assert!(!c.has_volatile_write_cache());
        assert_eq!(c.sgl_support(), SglSupport::DwordAligned);
        b.u16(520, 1 << 3).u32(536, 0);
        let c = ControllerInfo::parse(&b.0).unwrap();
        assert!(!c.supports_compare() && !c.supports_dsm() && c.supports_write_zeroes());
        assert_eq!(c.sgl_support(), SglSupport::None);
        b.u16(520, 1).u32(536, 3);
        let c = ControllerInfo::parse(&b.0).unwrap();
        assert!(c.supports_compare() && !c.supports_dsm() && !c.supports_write_zeroes());
        assert_eq!(c.sgl_support(), SglSupport::None, "11b is reserved");
    }

    #[test]
    fn controller_max_transfer() {
        let mut b = controller_buf();
        let c = ControllerInfo::parse(&b.0).unwrap();
        assert_eq!(c.max_transfer_bytes(0), Some(512 * 1024));
        assert_eq!(c.max_transfer_bytes(1), Some(1024 * 1024));
        b.u8(77, 0);
        assert_eq!(
            ControllerInfo::parse(&b.0).unwrap().max_transfer_bytes(0),
            None
        );
        b.u8(77, 1);
        assert_eq!(
            ControllerInfo::parse(&b.0).unwrap().max_transfer_bytes(0),
            Some(8192)
        );
        b.u8(77, 51);
        assert_eq!(
            ControllerInfo::parse(&b.0).unwrap().max_transfer_bytes(0),
            Some(1 << 63)
        );
        b.u8(77, 52);
        assert_eq!(
            ControllerInfo::parse(&b.0).unwrap().max_transfer_bytes(0),
            None
        );
        b.u8(77, 255);
        assert_eq!(
            ControllerInfo::parse(&b.0).unwrap().max_transfer_bytes(15),
            None
        );
    }

    #[test]
    fn controller_strings_are_cleaned() {
        let mut b = controller_buf();
        b.bytes(4, b"  AB\x01C\xff\0   \0\0\0\0\0\0\0\0\0") // leading spaces kept
            .bytes(24, &[0u8; 40])
            .bytes(64, b"1.0\0\0\0\0\0")
            .bytes(768, b"nqn.x\0garbage");
        let c = ControllerInfo::parse(&b.0).unwrap();
        assert_eq!(c.serial, "  AB?C?");
        assert_eq!(c.model, "");
        assert_eq!(c.firmware, "1.0");
        assert_eq!(c.subnqn, "nqn.x");
    }

    #[test]
    fn controller_short_buffer_rejected() {
        let b = controller_buf();
        for len in [0, 1, 1023, 1024, 4095] {
            let err = ControllerInfo::parse(&b.0[..len]).unwrap_err();
            assert_eq!(
                err,
                IdentifyError::TooShort {
                    structure: Structure::IdentifyController,
                    expected: 4096,
                    got: len
                }
            );
        }
        let msg = ControllerInfo::parse(&b.0[..100]).unwrap_err().to_string();
        assert!(
            msg.contains("Identify Controller data") && msg.contains("100") && msg.contains("4096"),
            "{msg}"
        );
        // Longer buffers are fine.
        let mut long = b.0.clone();
        long.extend_from_slice(&[0xff; 100]);
        assert_eq!(
            ControllerInfo::parse(&long).unwrap(),
            ControllerInfo::parse(&b.0).unwrap()
        );
    }

    fn namespace_buf() -> Buf {
        let mut b = Buf::new(IDENTIFY_DATA_LEN);
        b.u64(0, 0x1_0000_0001)
            .u64(8, 0x1_0000_0000)
            .u64(16, 0x8000)
            .u8(24, 0x14)
            .u8(25, 2) // three formats
            .u8(26, 0x11) // format 1, extended LBA
            .bytes(
                104,
                &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
            )
            .bytes(120, &[0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8])
            .u32(128, 9 << 16 | 2 << 24) // 512 B, no metadata, RP 2
            .u32(132, 12 << 16 | 8) // 4 KiB, 8 bytes metadata, RP 0
            .u32(136, 12 << 16 | 64 | 1 << 24 | 0xfc << 24); // RP 1 (bits above 25 ignored)
        b
    }

    #[test]
    fn namespace_every_field() {
        let n = NamespaceInfo::parse(5, &namespace_buf().0).unwrap();
        assert_eq!(n.nsid, 5);
        assert_eq!(n.size_lbas, 0x1_0000_0001);
        assert_eq!(n.capacity_lbas, 0x1_0000_0000);
        assert_eq!(n.utilization_lbas, 0x8000);
        assert_eq!(n.nsfeat, 0x14);
        assert_eq!(n.flbas, 0x11);
        assert_eq!(
            n.lba_formats,
            vec![
                LbaFormat {
                    ms: 0,
                    lbads: 9,
                    rp: 2
                },
                LbaFormat {
                    ms: 8,
                    lbads: 12,
                    rp: 0
                },
                LbaFormat {
                    ms: 64,
                    lbads: 12,
                    rp: 1
                },
            ]
        );
        assert_eq!(n.lba_size, 4096);
        assert_eq!(n.metadata_size, 8);
        assert_eq!(
            n.nguid,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        assert_eq!(n.eui64, [0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8]);
        assert_eq!(n.lba_format_index(), 1);
        assert!(n.extended_lba());
        assert_eq!(n.size_bytes(), 0x1_0000_0001 * 4096);
    }

    #[test]
    fn namespace_layouts_of_every_metadata_format() {
        let layout = |flbas: u8, dps: u8| {
            let mut b = namespace_buf();
            b.u8(26, flbas).u8(29, dps);
            NamespaceInfo::parse(1, &b.0).unwrap().layout()
        };
        let plain = |d, m| DataLayout {
            data_per_lba: d,
            metadata_per_lba: m,
            pract: false,
            pi_type: 0,
        };
        // No metadata.
        assert_eq!(layout(0x00, 0), Ok(plain(512, 0)));
        // 8 bytes per block, interleaved (extended LBAs) or in a separate buffer.
        assert_eq!(layout(0x11, 0), Ok(plain(4104, 0)));
        assert_eq!(layout(0x01, 0), Ok(plain(4096, 8)));
        // 8 bytes of protection information: inserted and stripped by the controller,
        // whichever way the metadata would travel.
        for flbas in [0x01, 0x11] {
            assert_eq!(
                layout(flbas, 1),
                Ok(DataLayout {
                    data_per_lba: 4096,
                    metadata_per_lba: 0,
                    pract: true,
                    pi_type: 1
                })
            );
        }
        // Protection information inside 64 bytes of metadata: refused, and said why.
        let e = layout(0x02, 3).unwrap_err();
        assert!(e.contains("type 3") && e.contains("64 bytes"), "{e}");
    }

    #[test]
    fn namespace_format_zero() {
        let mut b = namespace_buf();
        b.u8(26, 0x00);
        let n = NamespaceInfo::parse(1, &b.0).unwrap();
        assert_eq!(
            (n.lba_size, n.metadata_size, n.lba_format_index()),
            (512, 0, 0)
        );
        assert!(!n.extended_lba());
    }

    #[test]
    fn namespace_flbas_index_beyond_nlbaf_rejected() {
        let mut b = namespace_buf();
        b.u8(26, 0x03);
        assert_eq!(
            NamespaceInfo::parse(7, &b.0).unwrap_err(),
            IdentifyError::LbaFormatIndex {
                nsid: 7,
                flbas: 0x03,
                index: 3,
                nlbaf: 2
            }
        );
        let msg = NamespaceInfo::parse(7, &b.0).unwrap_err().to_string();
        assert!(
            msg.contains("namespace 7") && msg.contains("LBA format 3") && msg.contains("0 to 2"),
            "{msg}"
        );
        b.u8(26, 0x0f);
        assert!(matches!(
            NamespaceInfo::parse(7, &b.0),
            Err(IdentifyError::LbaFormatIndex { index: 15, .. })
        ));
    }

    #[test]
    fn namespace_flbas_high_bits_only_above_16_formats() {
        // NLBAF 16 (17 formats): bits 6:5 are ignored, so 0x21 selects format 1.
        let mut b = namespace_buf();
        b.u8(25, 16).u8(26, 0x21);
        for i in 3..=16 {
            b.u32(128 + 4 * i, 9 << 16);
        }
        let n = NamespaceInfo::parse(1, &b.0).unwrap();
        assert_eq!(
            (n.lba_formats.len(), n.lba_format_index(), n.lba_size),
            (17, 1, 4096)
        );

        // NLBAF 40 (41 formats): 0x21 selects format 0x11 = 17, 0x48 selects 0x28 = 40.
        b.u8(25, 40);
        for i in 17..=40 {
            b.u32(128 + 4 * i, (9 + (i as u32 % 8)) << 16 | i as u32);
        }
        let n = NamespaceInfo::parse(1, &b.0).unwrap();
        assert_eq!(n.lba_formats.len(), 41);
        assert_eq!(n.lba_format_index(), 17);
        // LBADS 9 + 17 % 8 = 10.
        assert_eq!((n.lba_size, n.metadata_size), (1024, 17));
        b.u8(26, 0x48);
        let n = NamespaceInfo::parse(1, &b.0).unwrap();
        assert_eq!(n.lba_format_index(), 40);
        // LBADS 9 + 40 % 8 = 9.
        assert_eq!((n.lba_size, n.metadata_size), (512, 40));
        // 0x69 selects 0x39 = 57 > 40.
        b.u8(26, 0x69);
        assert!(matches!(
            NamespaceInfo::parse(1, &b.0),
            Err(IdentifyError::LbaFormatIndex {
                index: 57,
                nlbaf: 40,
                ..
            })
        ));
    }

    #[test]
    fn namespace_nlbaf_beyond_64_formats_rejected() {
        let mut b = namespace_buf();
        b.u8(25, 64);
        assert_eq!(
            NamespaceInfo::parse(2, &b.0).unwrap_err(),
            IdentifyError::TooManyLbaFormats { nsid: 2, nlbaf: 64 }
        );
        b.u8(25, 63);
        assert_eq!(NamespaceInfo::parse(2, &b.0).unwrap().lba_formats.len(), 64);
    }

    #[test]
    fn namespace_bad_lbads_rejected() {
        for lbads in [0u8, 8, 17, 31, 255] {
            let mut b = namespace_buf();
            b.u32(132, u32::from(lbads) << 16);
            assert_eq!(
                NamespaceInfo::parse(3, &b.0).unwrap_err(),
                IdentifyError::UnsupportedLbaSize {
                    nsid: 3,
                    index: 1,
                    lbads
                }
            );
        }
        for lbads in 9u8..=16 {
            let mut b = namespace_buf();
            b.u32(132, u32::from(lbads) << 16);
            assert_eq!(NamespaceInfo::parse(3, &b.0).unwrap().lba_size, 1 << lbads);
        }
        // Unused formats may hold anything.
        let mut b = namespace_buf();
        b.u32(136, 0);
        assert!(NamespaceInfo::parse(3, &b.0).is_ok());
    }

    #[test]
    fn namespace_inactive_and_short() {
        let zeros = vec![0u8; IDENTIFY_DATA_LEN];
        assert_eq!(
            NamespaceInfo::parse(9, &zeros).unwrap_err(),
            IdentifyError::InactiveNamespace { nsid: 9 }
        );
        assert!(NamespaceInfo::parse(9, &zeros)
            .unwrap_err()
            .to_string()
            .contains("namespace 9 is not active"));
        // One non-zero byte anywhere makes it active (and then it is judged on its fields).
        let mut b = Buf::new(IDENTIFY_DATA_LEN);
        b.u8(4095, 1).u32(128, 9 << 16);
        assert_eq!(NamespaceInfo::parse(9, &b.0).unwrap().lba_size, 512);
        for len in [0, 25, 127, 4095] {
            assert_eq!(
                NamespaceInfo::parse(1, &namespace_buf().0[..len]).unwrap_err(),
                IdentifyError::TooShort {
                    structure: Structure::IdentifyNamespace,
                    expected: 4096,
                    got: len
                }
            );
        }
    }

    #[test]
    fn active_namespace_list() {
        let mut b = Buf::new(IDENTIFY_DATA_LEN);
        b.u32(0, 1).u32(4, 2).u32(8, 0x10).u32(12, 0).u32(16, 7);
        assert_eq!(parse_active_namespace_list(&b.0), vec![1, 2, 0x10]);
        assert_eq!(parse_active_namespace_list(&[]), Vec::<u32>::new());
        assert_eq!(parse_active_namespace_list(&b.0[..4]), vec![1]);
        // A partial last entry is not read.
        assert_eq!(parse_active_namespace_list(&b.0[..7]), vec![1]);
        // A full list holds 1024 entries, and nothing past them is read.
        let full: Vec<u8> = (1..=1100u32).flat_map(u32::to_le_bytes).collect();
        let list = parse_active_namespace_list(&full);
        assert_eq!(list.len(), 1024);
        assert_eq!((list[0], list[1023]), (1, 1024));
    }

    #[test]
    fn smart_log_every_field() {
        let mut b = Buf::new(SMART_LOG_LEN);
        b.u8(0, 0x05)
            .u16(1, 310)
            .u8(3, 97)
            .u8(4, 10)
            .u8(5, 120)
            .u128(32, 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10)
            .u128(48, 2)
            .u128(64, 3)
            .u128(80, 4)
            .u128(96, 5)
            .u128(112, 6)
            .u128(128, 7)
            .u128(144, 8)
            .u128(160, 9)
            .u128(176, u128::MAX)
            .u32(192, 11)
            .u32(196, 0xdead_beef);
        let s = SmartLog::parse(&b.0).unwrap();
        assert_eq!(s.critical_warning, 0x05);
        assert_eq!(s.temperature_kelvin, 310);
        assert_eq!(s.temperature_celsius(), 36);
        assert_eq!(s.available_spare, 97);
        assert_eq!(s.available_spare_threshold, 10);
        assert_eq!(s.percentage_used, 120);
        assert_eq!(s.data_units_read, 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        assert_eq!(s.data_units_written, 2);
        assert_eq!(s.host_read_commands, 3);
        assert_eq!(s.host_write_commands, 4);
        assert_eq!(s.controller_busy_time, 5);
        assert_eq!(s.power_cycles, 6);
        assert_eq!(s.power_on_hours, 7);
        assert_eq!(s.unsafe_shutdowns, 8);
        assert_eq!(s.media_errors, 9);
        assert_eq!(s.num_err_log_entries, u128::MAX);
        assert_eq!(s.warning_temp_time, 11);
        assert_eq!(s.critical_temp_time, 0xdead_beef);
    }

    #[test]
    fn smart_log_short_and_temperature() {
        for len in [0, 1, 199, 511] {
            assert_eq!(
                SmartLog::parse(&vec![0xff; len]).unwrap_err(),
                IdentifyError::TooShort {
                    structure: Structure::SmartLog,
                    expected: 512,
                    got: len
                }
            );
        }
        let mut b = Buf::new(SMART_LOG_LEN);
        b.u16(1, 273);
        assert_eq!(SmartLog::parse(&b.0).unwrap().temperature_celsius(), -1);
        b.u16(1, 274);
        assert_eq!(SmartLog::parse(&b.0).unwrap().temperature_celsius(), 0);
        b.u16(1, 0);
        assert_eq!(SmartLog::parse(&b.0).unwrap().temperature_celsius(), -274);
    }

    #[test]
    fn error_log_entries() {
        let mut b = Buf::new(ERROR_LOG_ENTRY_LEN * 3 + 10);
        // Entry 0: unrecovered read error with DNR, phase bit set.
        let status = NvmeStatus::UNRECOVERED_READ_ERROR.with_dnr(true).to_field();
        b.u64(0, 42)
            .u16(8, 3)
            .u16(10, 0x0abc)
            .u16(12, (status << 1) | 1)
            .u16(14, 0xffff)
            .u64(16, 0x1234_5678_9abc)
            .u32(24, 1)
            .u8(28, 0xc0)
            .u8(29, 0xee); // transport type etc., not parsed
                           // Entry 1: empty (error count 0) despite other bytes.
        b.u16(64 + 8, 9).u16(64 + 12, 0x2);
        // Entry 2: invalid field, phase bit clear.
        b.u64(128, 41)
            .u16(128 + 12, NvmeStatus::INVALID_FIELD.to_field() << 1)
            .u16(128 + 14, 0x0128);
        // A trailing partial entry with a non-zero count is not read.
        b.u8(192, 1);
        let log = parse_error_log(&b.0);
        assert_eq!(
            log,
            vec![
                ErrorLogEntry {
                    error_count: 42,
                    sqid: 3,
                    cid: 0x0abc,
                    status: NvmeStatus::UNRECOVERED_READ_ERROR.with_dnr(true),
                    parameter_error_location: 0xffff,
                    lba: 0x1234_5678_9abc,
                    nsid: 1,
                    vendor_specific: 0xc0,
                },
                ErrorLogEntry {
                    error_count: 41,
                    sqid: 0,
                    cid: 0,
                    status: NvmeStatus::INVALID_FIELD,
                    parameter_error_location: 0x0128,
                    lba: 0,
                    nsid: 0,
                    vendor_specific: 0,
                },
            ]
        );
        assert!(parse_error_log(&[]).is_empty());
        assert!(parse_error_log(&[0xff; 63]).is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..5000), nsid in any::<u32>()) {
            let _ = ControllerInfo::parse(&data).map(|c| (c.max_transfer_bytes(15), c.sgl_support()));
            let _ = SmartLog::parse(&data).map(|s| s.temperature_celsius());
            let list = parse_active_namespace_list(&data);
            prop_assert!(list.len() <= ACTIVE_NAMESPACE_LIST_ENTRIES && !list.contains(&0));
            let log = parse_error_log(&data);
            prop_assert!(log.len() <= data.len() / ERROR_LOG_ENTRY_LEN);
            prop_assert!(log.iter().all(|e| e.error_count != 0));
            if let Ok(n) = NamespaceInfo::parse(nsid, &data) {
                prop_assert!(data.len() >= IDENTIFY_DATA_LEN);
                prop_assert!((512..=65536).contains(&n.lba_size) && n.lba_size.is_power_of_two());
                prop_assert!(n.lba_format_index() < n.lba_formats.len());
                let _ = (n.size_bytes(), n.extended_lba());
            }
        }

        /// A well-formed namespace with random format fields: either parses consistently or is
        /// rejected with the error that names the inconsistency.
        #[test]
        fn namespace_format_fields(nlbaf in any::<u8>(), flbas in any::<u8>(), lbaf in prop::collection::vec(any::<u32>(), 64), nsze in 1u64..) {
            let mut b = Buf::new(IDENTIFY_DATA_LEN);
            b.u64(0, nsze).u8(25, nlbaf).u8(26, flbas);
            for (i, dw) in lbaf.iter().enumerate() {
                b.u32(128 + 4 * i, *dw);
            }
            match NamespaceInfo::parse(1, &b.0) {
                Ok(n) => {
                    prop_assert_eq!(n.lba_formats.len(), usize::from(nlbaf) + 1);
                    let f = n.lba_formats[n.lba_format_index()];
                    prop_assert_eq!(n.lba_size, 1u32 << f.lbads);
                    prop_assert_eq!(n.metadata_size, f.ms);
                    prop_assert_eq!(n.size_lbas, nsze);
                }
                Err(IdentifyError::TooManyLbaFormats { nlbaf: got, .. }) => prop_assert!(got >= 64 && got == nlbaf),
                Err(IdentifyError::LbaFormatIndex { index, .. }) => prop_assert!(index > nlbaf),
                Err(IdentifyError::UnsupportedLbaSize { lbads, .. }) => prop_assert!(!(9..=16).contains(&lbads)),
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
    }
}
