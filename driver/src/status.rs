//! NVMe completion status decoding.
//!
//! A completion entry carries a 15-bit status field (DW3 bits 31:17): Status Code (SC) 7:0,
//! Status Code Type (SCT) 10:8, Command Retry Delay (CRD) 12:11, More 13, Do Not Retry (DNR) 14.
//! [`NvmeStatus`] decodes it and gives every status code defined by the NVM Express Base
//! Specification 2.0 and the NVM Command Set Specification 1.0 a readable name, one table per
//! status code type.

use std::fmt;

/// A decoded completion status (Base spec §4.2.3).
///
/// The Command Retry Delay bits (12:11) are not kept: a controller sets them only when the host
/// enabled Advanced Command Retry (Host Behavior Support feature); otherwise they are zero.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct NvmeStatus {
    /// Status Code Type.
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// More information in the Error Information log page.
    pub more: bool,
    /// Do Not Retry.
    pub dnr: bool,
}

/// Status Code Type values (Base spec Figure 98).
pub mod sct {
    /// Generic Command Status.
    pub const GENERIC: u8 = 0;
    /// Command Specific Status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and Data Integrity Errors.
    pub const MEDIA: u8 = 2;
    /// Path Related Status.
    pub const PATH: u8 = 3;
    /// Vendor Specific.
    pub const VENDOR_SPECIFIC: u8 = 7;
}

/// Bit positions inside the 15-bit status field.
const SCT_SHIFT: u16 = 8;
const SCT_MASK: u16 = 0x7;
const MORE_BIT: u16 = 1 << 13;
const DNR_BIT: u16 = 1 << 14;

impl NvmeStatus {
    /// Successful Completion.
    pub const SUCCESS: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x00);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x01);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x02);
    /// Command ID Conflict.
    pub const COMMAND_ID_CONFLICT: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x03);
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x04);
    /// Internal Error.
    pub const INTERNAL_ERROR: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x06);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x07);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x08);
    /// Host Pathing Error (sct 3 / 0x70), with DNR: the driver's status for commands that
    /// can never complete because the device was removed.
    pub const DEVICE_REMOVED: NvmeStatus = NvmeStatus::new(sct::PATH, 0x70).with_dnr(true);
    /// Command Aborted By Host (sct 3 / 0x71): the driver's status for commands cancelled by
    /// a controller reset. Retryable: the data they carried was never confirmed.
    pub const ABORTED_BY_RESET: NvmeStatus = NvmeStatus::new(sct::PATH, 0x71);
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x0b);
    /// Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x0c);
    /// Invalid SGL Segment Descriptor.
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x0d);
    /// Invalid Number of SGL Descriptors.
    pub const INVALID_SGL_DESCRIPTOR_COUNT: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x0e);
    /// Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x0f);
    /// SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x11);
    /// PRP Offset Invalid.
    pub const PRP_OFFSET_INVALID: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x13);
    /// SGL Data Block Granularity Invalid.
    pub const SGL_DATA_BLOCK_GRANULARITY_INVALID: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x1e);
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x80);
    /// Capacity Exceeded.
    pub const CAPACITY_EXCEEDED: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x81);
    /// Namespace Not Ready.
    pub const NAMESPACE_NOT_READY: NvmeStatus = NvmeStatus::new(sct::GENERIC, 0x82);

    /// Completion Queue Invalid (Create I/O Submission Queue).
    pub const INVALID_COMPLETION_QUEUE: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x00);
    /// Invalid Queue Identifier.
    pub const INVALID_QUEUE_IDENTIFIER: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x01);
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x02);
    /// Abort Command Limit Exceeded.
    pub const ABORT_COMMAND_LIMIT_EXCEEDED: NvmeStatus =
        NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x03);
    /// Invalid Interrupt Vector.
    pub const INVALID_INTERRUPT_VECTOR: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x08);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x09);
    /// Invalid Format.
    pub const INVALID_FORMAT: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x0a);
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x0c);
    /// Conflicting Attributes (NVM command set).
    pub const CONFLICTING_ATTRIBUTES: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x80);
    /// Attempted Write to Read Only Range (NVM command set).
    pub const WRITE_TO_READ_ONLY_RANGE: NvmeStatus = NvmeStatus::new(sct::COMMAND_SPECIFIC, 0x82);

    /// Write Fault.
    pub const WRITE_FAULT: NvmeStatus = NvmeStatus::new(sct::MEDIA, 0x80);
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: NvmeStatus = NvmeStatus::new(sct::MEDIA, 0x81);
    /// Compare Failure.
    pub const COMPARE_FAILURE: NvmeStatus = NvmeStatus::new(sct::MEDIA, 0x85);
    /// Access Denied.
    pub const ACCESS_DENIED: NvmeStatus = NvmeStatus::new(sct::MEDIA, 0x86);
    /// Deallocated or Unwritten Logical Block.
    pub const DEALLOCATED_OR_UNWRITTEN_BLOCK: NvmeStatus = NvmeStatus::new(sct::MEDIA, 0x87);

    /// A status of type `sct` and code `sc`, with More and DNR clear.
    pub const fn new(sct: u8, sc: u8) -> NvmeStatus {
        NvmeStatus {
            sct,
            sc,
            more: false,
            dnr: false,
        }
    }

    /// Decode the 15-bit status field of a completion entry (DW3 bits 31:17).
    pub const fn from_field(field: u16) -> NvmeStatus {
        NvmeStatus {
            sc: field as u8,
            sct: ((field >> 8) & 7) as u8,
            more: field & (1 << 13) != 0,
            dnr: field & (1 << 14) != 0,
        }
    }

    /// Encode as the 15-bit status field: the inverse of [`NvmeStatus::from_field`] (CRD is
    /// written as zero; only the low three bits of `sct` fit the field).
    pub const fn to_field(&self) -> u16 {
        self.sc as u16
            | ((self.sct as u16 & SCT_MASK) << SCT_SHIFT)
            | if self.more { MORE_BIT } else { 0 }
            | if self.dnr { DNR_BIT } else { 0 }
    }

    /// The same status with Do Not Retry set to `dnr`.
    pub const fn with_dnr(self, dnr: bool) -> NvmeStatus {
        NvmeStatus { dnr, ..self }
    }

    /// The same status with More set to `more`.
    pub const fn with_more(self, more: bool) -> NvmeStatus {
        NvmeStatus { more, ..self }
    }

    /// Whether the command succeeded.
    pub const fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// Whether the command failed and may succeed if submitted again (DNR clear).
    pub const fn is_retryable(&self) -> bool {
        !self.is_success() && !self.dnr
    }

    /// The status code's name from the specification; "Vendor Specific" for vendor specific
    /// codes and "Unknown" for reserved ones.
    pub const fn name(&self) -> &'static str {
        match self.sct {
            sct::GENERIC => generic_name(self.sc),
            sct::COMMAND_SPECIFIC => command_specific_name(self.sc),
            sct::MEDIA => media_name(self.sc),
            sct::PATH => path_name(self.sc),
            sct::VENDOR_SPECIFIC => VENDOR_SPECIFIC,
            _ => UNKNOWN,
        }
    }
}

const VENDOR_SPECIFIC: &str = "Vendor Specific";
const UNKNOWN: &str = "Unknown";

/// Generic Command Status values (Base spec Figures 100 and 101, NVM Command Set Figure 40).
const fn generic_name(sc: u8) -> &'static str {
    match sc {
        0x00 => "Successful Completion",
        0x01 => "Invalid Command Opcode",
        0x02 => "Invalid Field in Command",
        0x03 => "Command ID Conflict",
        0x04 => "Data Transfer Error",
        0x05 => "Commands Aborted due to Power Loss Notification",
        0x06 => "Internal Error",
        0x07 => "Command Abort Requested",
        0x08 => "Command Aborted due to SQ Deletion",
        0x09 => "Command Aborted due to Failed Fused Command",
        0x0a => "Command Aborted due to Missing Fused Command",
        0x0b => "Invalid Namespace or Format",
        0x0c => "Command Sequence Error",
        0x0d => "Invalid SGL Segment Descriptor",
        0x0e => "Invalid Number of SGL Descriptors",
        0x0f => "Data SGL Length Invalid",
        0x10 => "Metadata SGL Length Invalid",
        0x11 => "SGL Descriptor Type Invalid",
        0x12 => "Invalid Use of Controller Memory Buffer",
        0x13 => "PRP Offset Invalid",
        0x14 => "Atomic Write Unit Exceeded",
        0x15 => "Operation Denied",
        0x16 => "SGL Offset Invalid",
        // Defined by revision 1.3, reserved since; older controllers still report it.
        0x17 => "SGL Sub Type Invalid",
        0x18 => "Host Identifier Inconsistent Format",
        0x19 => "Keep Alive Timer Expired",
        0x1a => "Keep Alive Timeout Invalid",
        0x1b => "Command Aborted due to Preempt and Abort",
        0x1c => "Sanitize Failed",
        0x1d => "Sanitize In Progress",
        0x1e => "SGL Data Block Granularity Invalid",
        0x1f => "Command Not Supported for Queue in CMB",
        0x20 => "Namespace is Write Protected",
        0x21 => "Command Interrupted",
        0x22 => "Transient Transport Error",
        0x23 => "Command Prohibited by Command and Feature Lockdown",
        0x24 => "Admin Command Media Not Ready",
        // I/O command set specific (NVM command set).
        0x80 => "LBA Out of Range",
        0x81 => "Capacity Exceeded",
        0x82 => "Namespace Not Ready",
        0x83 => "Reservation Conflict",
        0x84 => "Format In Progress",
        0xc0..=0xff => VENDOR_SPECIFIC,
        _ => UNKNOWN,
    }
}

/// Command Specific Status values (Base spec Figure 103, NVM Command Set Figure 41).
const fn command_specific_name(sc: u8) -> &'static str {
    match sc {
        0x00 => "Completion Queue Invalid",
        0x01 => "Invalid Queue Identifier",
        0x02 => "Invalid Queue Size",
        0x03 => "Abort Command Limit Exceeded",
        0x05 => "Asynchronous Event Request Limit Exceeded",
        0x06 => "Invalid Firmware Slot",
        0x07 => "Invalid Firmware Image",
        0x08 => "Invalid Interrupt Vector",
        0x09 => "Invalid Log Page",
        0x0a => "Invalid Format",
        0x0b => "Firmware Activation Requires Conventional Reset",
        0x0c => "Invalid Queue Deletion",
        0x0d => "Feature Identifier Not Saveable",
        0x0e => "Feature Not Changeable",
        0x0f => "Feature Not Namespace Specific",
        0x10 => "Firmware Activation Requires NVM Subsystem Reset",
        0x11 => "Firmware Activation Requires Controller Level Reset",
        0x12 => "Firmware Activation Requires Maximum Time Violation",
        0x13 => "Firmware Activation Prohibited",
        0x14 => "Overlapping Range",
        0x15 => "Namespace Insufficient Capacity",
        0x16 => "Namespace Identifier Unavailable",
        0x18 => "Namespace Already Attached",
        0x19 => "Namespace Is Private",
        0x1a => "Namespace Not Attached",
        0x1b => "Thin Provisioning Not Supported",
        0x1c => "Controller List Invalid",
        0x1d => "Device Self-test In Progress",
        0x1e => "Boot Partition Write Prohibited",
        0x1f => "Invalid Controller Identifier",
        0x20 => "Invalid Secondary Controller State",
        0x21 => "Invalid Number of Controller Resources",
        0x22 => "Invalid Resource Identifier",
        0x23 => "Sanitize Prohibited While Persistent Memory Region is Enabled",
        0x24 => "ANA Group Identifier Invalid",
        0x25 => "ANA Attach Failed",
        0x26 => "Insufficient Capacity",
        0x27 => "Namespace Attachment Limit Exceeded",
        0x28 => "Prohibition of Command Execution Not Supported",
        0x29 => "I/O Command Set Not Supported",
        0x2a => "I/O Command Set Not Enabled",
        0x2b => "I/O Command Set Combination Rejected",
        0x2c => "Invalid I/O Command Set",
        0x2d => "Identifier Unavailable",
        // I/O command set specific (NVM command set).
        0x80 => "Conflicting Attributes",
        0x81 => "Invalid Protection Information",
        0x82 => "Attempted Write to Read Only Range",
        0x83 => "Command Size Limit Exceeded",
        0xc0..=0xff => VENDOR_SPECIFIC,
        _ => UNKNOWN,
    }
}

/// Media and Data Integrity Errors values (Base spec Figure 104, NVM Command Set Figure 42).
const fn media_name(sc: u8) -> &'static str {
    match sc {
        0x80 => "Write Fault",
        0x81 => "Unrecovered Read Error",
        0x82 => "End-to-end Guard Check Error",
        0x83 => "End-to-end Application Tag Check Error",
        0x84 => "End-to-end Reference Tag Check Error",
        0x85 => "Compare Failure",
        0x86 => "Access Denied",
        0x87 => "Deallocated or Unwritten Logical Block",
        0x88 => "End-to-end Storage Tag Check Error",
        0xc0..=0xff => VENDOR_SPECIFIC,
        _ => UNKNOWN,
    }
}

/// Path Related Status values (Base spec Figure 105).
const fn path_name(sc: u8) -> &'static str {
    match sc {
        0x00 => "Internal Path Error",
        0x01 => "Asymmetric Access Persistent Loss",
        0x02 => "Asymmetric Access Inaccessible",
        0x03 => "Asymmetric Access Transition",
        0x60 => "Controller Pathing Error",
        0x70 => "Host Pathing Error",
        0x71 => "Command Aborted By Host",
        0xc0..=0xff => VENDOR_SPECIFIC,
        _ => UNKNOWN,
    }
}

impl fmt::Display for NvmeStatus {
    /// "Unrecovered Read Error (sct 2 / sc 0x81)", followed by ", do not retry" when DNR is set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (sct {} / sc {:#04x})",
            self.name(),
            self.sct,
            self.sc
        )?;
        if self.dnr {
            f.write_str(", do not retry")?;
        }
        Ok(())
    }
}

impl std::error::Error for NvmeStatus {}

#[cfg(test)]
mod tests {
    use super::*;

    const CRD_BITS: u16 = 3 << 11;

    #[test]
    fn field_round_trip_for_all_15_bit_values() {
        for field in 0..=0x7fffu16 {
            let status = NvmeStatus::from_field(field);
            // CRD is not kept: everything else comes back bit for bit.
            assert_eq!(status.to_field(), field & !CRD_BITS, "field {field:#06x}");
            assert_eq!(
                NvmeStatus::from_field(status.to_field()),
                status,
                "field {field:#06x}"
            );
        }
    }

    #[test]
    fn from_field_splits_the_bits() {
        let s = NvmeStatus::from_field(0x4281 | (1 << 13));
        assert_eq!((s.sct, s.sc, s.more, s.dnr), (2, 0x81, true, true));
        let s = NvmeStatus::from_field(0x0109);
        assert_eq!((s.sct, s.sc, s.more, s.dnr), (1, 0x09, false, false));
        assert_eq!(
            NvmeStatus::new(2, 0x81)
                .with_dnr(true)
                .with_more(true)
                .to_field(),
            0x6281
        );
        // Only three bits of SCT fit the field.
        assert_eq!(NvmeStatus::new(0xf, 0x01).to_field(), 0x0701);
    }

    #[test]
    fn constants_have_their_codes_and_dnr_clear() {
        let table = [
            (NvmeStatus::SUCCESS, 0, 0x00),
            (NvmeStatus::INVALID_OPCODE, 0, 0x01),
            (NvmeStatus::INVALID_FIELD, 0, 0x02),
            (NvmeStatus::DATA_TRANSFER_ERROR, 0, 0x04),
            (NvmeStatus::INTERNAL_ERROR, 0, 0x06),
            (NvmeStatus::ABORT_REQUESTED, 0, 0x07),
            (NvmeStatus::INVALID_NAMESPACE, 0, 0x0b),
            (NvmeStatus::DATA_SGL_LENGTH_INVALID, 0, 0x0f),
            (NvmeStatus::SGL_DESCRIPTOR_TYPE_INVALID, 0, 0x11),
            (NvmeStatus::PRP_OFFSET_INVALID, 0, 0x13),
            (NvmeStatus::LBA_OUT_OF_RANGE, 0, 0x80),
            (NvmeStatus::INVALID_COMPLETION_QUEUE, 1, 0x00),
            (NvmeStatus::INVALID_QUEUE_IDENTIFIER, 1, 0x01),
            (NvmeStatus::INVALID_QUEUE_SIZE, 1, 0x02),
            (NvmeStatus::INVALID_LOG_PAGE, 1, 0x09),
            (NvmeStatus::WRITE_FAULT, 2, 0x80),
            (NvmeStatus::UNRECOVERED_READ_ERROR, 2, 0x81),
            (NvmeStatus::COMPARE_FAILURE, 2, 0x85),
        ];
        for (status, sct, sc) in table {
            assert_eq!((status.sct, status.sc), (sct, sc), "{status}");
            assert!(!status.dnr && !status.more, "{status}");
        }
    }

    #[test]
    fn names_of_well_known_codes() {
        let table = [
            (0, 0x00, "Successful Completion"),
            (0, 0x01, "Invalid Command Opcode"),
            (0, 0x02, "Invalid Field in Command"),
            (0, 0x04, "Data Transfer Error"),
            (0, 0x06, "Internal Error"),
            (0, 0x07, "Command Abort Requested"),
            (0, 0x0b, "Invalid Namespace or Format"),
            (0, 0x0f, "Data SGL Length Invalid"),
            (0, 0x11, "SGL Descriptor Type Invalid"),
            (0, 0x13, "PRP Offset Invalid"),
            (0, 0x24, "Admin Command Media Not Ready"),
            (0, 0x80, "LBA Out of Range"),
            (0, 0x81, "Capacity Exceeded"),
            (0, 0x82, "Namespace Not Ready"),
            (1, 0x00, "Completion Queue Invalid"),
            (1, 0x01, "Invalid Queue Identifier"),
            (1, 0x02, "Invalid Queue Size"),
            (1, 0x03, "Abort Command Limit Exceeded"),
            (1, 0x09, "Invalid Log Page"),
            (1, 0x0a, "Invalid Format"),
            (1, 0x2d, "Identifier Unavailable"),
            (1, 0x80, "Conflicting Attributes"),
            (1, 0x81, "Invalid Protection Information"),
            (1, 0x82, "Attempted Write to Read Only Range"),
            (2, 0x80, "Write Fault"),
            (2, 0x81, "Unrecovered Read Error"),
            (2, 0x82, "End-to-end Guard Check Error"),
            (2, 0x83, "End-to-end Application Tag Check Error"),
            (2, 0x84, "End-to-end Reference Tag Check Error"),
            (2, 0x85, "Compare Failure"),
            (2, 0x86, "Access Denied"),
            (2, 0x87, "Deallocated or Unwritten Logical Block"),
            (3, 0x00, "Internal Path Error"),
            (3, 0x03, "Asymmetric Access Transition"),
            (3, 0x71, "Command Aborted By Host"),
        ];
        for (sct, sc, name) in table {
            assert_eq!(
                NvmeStatus::new(sct, sc).name(),
                name,
                "sct {sct} sc {sc:#x}"
            );
        }
    }

    #[test]
    fn reserved_and_vendor_codes() {
        // Reserved codes in each defined type.
        for (sct, sc) in [
            (0, 0x25),
            (0, 0x7f),
            (0, 0x85),
            (1, 0x04),
            (1, 0x17),
            (1, 0x84),
            (2, 0x00),
            (2, 0x89),
            (3, 0x04),
        ] {
            assert_eq!(
                NvmeStatus::new(sct, sc).name(),
                "Unknown",
                "sct {sct} sc {sc:#x}"
            );
        }
        // The vendor specific range of each defined type, and SCT 7 entirely.
        for sct in 0..=3 {
            assert_eq!(NvmeStatus::new(sct, 0xc0).name(), "Vendor Specific");
            assert_eq!(NvmeStatus::new(sct, 0xff).name(), "Vendor Specific");
        }
        for sc in [0x00, 0x01, 0x81, 0xff] {
            assert_eq!(NvmeStatus::new(7, sc).name(), "Vendor Specific");
        }
        // Reserved status code types.
        for sct in 4..=6 {
            assert_eq!(NvmeStatus::new(sct, 0x02).name(), "Unknown");
        }
    }

    #[test]
    fn every_code_of_the_defined_types_has_a_name_or_is_reserved() {
        let mut named = [0usize; 4];
        for sct in 0..4u8 {
            for sc in 0..=255u8 {
                let name = NvmeStatus::new(sct, sc).name();
                assert!(!name.is_empty());
                if name != "Unknown" && name != "Vendor Specific" {
                    named[sct as usize] += 1;
                }
            }
        }
        // 37 + 5 generic, 44 + 4 command specific, 9 media, 7 path.
        assert_eq!(named, [42, 48, 9, 7]);
    }

    #[test]
    fn display_text() {
        assert_eq!(
            NvmeStatus::UNRECOVERED_READ_ERROR.to_string(),
            "Unrecovered Read Error (sct 2 / sc 0x81)"
        );
        assert_eq!(
            NvmeStatus::UNRECOVERED_READ_ERROR
                .with_dnr(true)
                .to_string(),
            "Unrecovered Read Error (sct 2 / sc 0x81), do not retry"
        );
        assert_eq!(
            NvmeStatus::SUCCESS.to_string(),
            "Successful Completion (sct 0 / sc 0x00)"
        );
        assert_eq!(
            NvmeStatus::INVALID_QUEUE_SIZE.with_dnr(true).to_string(),
            "Invalid Queue Size (sct 1 / sc 0x02), do not retry"
        );
        assert_eq!(
            NvmeStatus::new(5, 0x3c).to_string(),
            "Unknown (sct 5 / sc 0x3c)"
        );
        // As a boxed error, the message is the same.
        let err: Box<dyn std::error::Error> = Box::new(NvmeStatus::WRITE_FAULT);
        assert_eq!(err.to_string(), "Write Fault (sct 2 / sc 0x80)");
    }

    #[test]
    fn retryable_and_success() {
        assert!(NvmeStatus::SUCCESS.is_success());
        assert!(!NvmeStatus::SUCCESS.is_retryable());
        // DNR on a success does not make it a failure.
        assert!(NvmeStatus::SUCCESS.with_dnr(true).is_success());
        assert!(NvmeStatus::ABORT_REQUESTED.is_retryable());
        assert!(!NvmeStatus::ABORT_REQUESTED.with_dnr(true).is_retryable());
        assert!(!NvmeStatus::ABORT_REQUESTED.is_success());
        assert!(!NvmeStatus::new(0, 0x00).with_more(true).is_retryable());
        let s = NvmeStatus::INVALID_FIELD.with_dnr(true).with_dnr(false);
        assert_eq!(s, NvmeStatus::INVALID_FIELD);
    }
}
