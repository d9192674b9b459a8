//! Identify data and log pages in the JSON nvme-cli prints (`nvme id-ctrl -o json`, `id-ns`,
//! `smart-log`, `error-log`, `list`), so that a script written against nvme-cli reads rnvme's
//! `-o json` unchanged: the same keys in the same order, the same shapes, the same values.
//!
//! The keys and shapes are those of nvme-cli 2.3 (`nvme-print.c`, the version Debian 12
//! ships), which reads the same structures: every field of the structure, not only those the
//! driver uses, so each encoder takes the raw bytes. Like nvme-cli: text fields keep their
//! padding (up to the first NUL), 128-bit counters are decimal strings, 64-bit values numbers.
//! One deliberate difference: nvme-cli 2.3 passes 32-bit fields through a signed 32-bit JSON
//! integer, so a value of 2^31 or more would come out negative there; here it stays unsigned.

use serde_json::{json, Map, Value};

/// Size of an Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;
/// Size of the SMART / Health Information log page.
pub const SMART_LEN: usize = 512;
/// Size of one Error Information log entry.
pub const ERROR_ENTRY_LEN: usize = 64;
/// Error log entries nvme-cli asks for at most (it takes fewer when ELPE says so).
pub const ERROR_ENTRIES_MAX: usize = 64;

/// Little-endian reads that see zeros past the end of a short buffer.
struct Raw<'a>(&'a [u8]);

impl Raw<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if off < self.0.len() {
            let end = (off + N).min(self.0.len());
            out[..end - off].copy_from_slice(&self.0[off..end]);
        }
        out
    }
    fn u8(&self, off: usize) -> u8 {
        self.bytes::<1>(off)[0]
    }
    fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes(self.bytes(off))
    }
    fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes(off))
    }
    fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bytes(off))
    }
    /// A 128-bit counter as nvme-cli prints it: a decimal string.
    fn u128s(&self, off: usize) -> String {
        u128::from_le_bytes(self.bytes(off)).to_string()
    }
    /// A text field as nvme-cli prints it: every byte up to the first NUL, padding kept.
    fn text(&self, off: usize, len: usize) -> String {
        let start = off.min(self.0.len());
        let field = &self.0[start..(off + len).min(self.0.len())];
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        String::from_utf8_lossy(&field[..end]).into_owned()
    }
    fn hex(&self, off: usize, len: usize) -> String {
        (off..off + len)
            .map(|i| format!("{:02x}", self.u8(i)))
            .collect()
    }
}

/// A UUID as libnvme writes it: `00000000-0000-0000-0000-000000000000`.
fn uuid(r: &Raw, off: usize) -> String {
    let h = r.hex(off, 16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `nvme id-ctrl -o json` of an Identify Controller data structure (4096 bytes).
pub fn id_ctrl(data: &[u8]) -> Value {
    let r = Raw(data);
    let ieee = u32::from(r.u8(75)) << 16 | u32::from(r.u8(74)) << 8 | u32::from(r.u8(73));
    let mut m = object(json!({
        "vid": r.u16(0),
        "ssvid": r.u16(2),
        "sn": r.text(4, 20),
        "mn": r.text(24, 40),
        "fr": r.text(64, 8),
        "rab": r.u8(72),
        "ieee": ieee,
        "cmic": r.u8(76),
        "mdts": r.u8(77),
        "cntlid": r.u16(78),
        "ver": r.u32(80),
        "rtd3r": r.u32(84),
        "rtd3e": r.u32(88),
        "oaes": r.u32(92),
        "ctratt": r.u32(96),
        "rrls": r.u16(100),
        "cntrltype": r.u8(111),
        "fguid": uuid(&r, 112),
    }));
    // (In pieces: one json! of every key would exceed the macro recursion limit.)
    m.extend(object(json!({
        "crdt1": r.u16(128),
        "crdt2": r.u16(130),
        "crdt3": r.u16(132),
        "nvmsr": r.u8(253),
        "vwci": r.u8(254),
        "mec": r.u8(255),
        "oacs": r.u16(256),
        "acl": r.u8(258),
        "aerl": r.u8(259),
        "frmw": r.u8(260),
        "lpa": r.u8(261),
        "elpe": r.u8(262),
        "npss": r.u8(263),
        "avscc": r.u8(264),
        "apsta": r.u8(265),
        "wctemp": r.u16(266),
        "cctemp": r.u16(268),
        "mtfa": r.u16(270),
    })));
    m.extend(object(json!({
        "hmpre": r.u32(272),
        "hmmin": r.u32(276),
        "tnvmcap": r.u128s(280),
        "unvmcap": r.u128s(296),
        "rpmbs": r.u32(312),
        "edstt": r.u16(316),
        "dsto": r.u8(318),
        "fwug": r.u8(319),
        "kas": r.u16(320),
        "hctma": r.u16(322),
        "mntmt": r.u16(324),
        "mxtmt": r.u16(326),
        "sanicap": r.u32(328),
        "hmminds": r.u32(332),
        "hmmaxd": r.u16(336),
        "nsetidmax": r.u16(338),
        "endgidmax": r.u16(340),
        "anatt": r.u8(342),
        "anacap": r.u8(343),
        "anagrpmax": r.u32(344),
        "nanagrpid": r.u32(348),
        "pels": r.u32(352),
        "domainid": r.u16(356),
    })));
    m.extend(object(json!({
        "megcap": r.u128s(368),
        "sqes": r.u8(512),
        "cqes": r.u8(513),
        "maxcmd": r.u16(514),
        "nn": r.u32(516),
        "oncs": r.u16(520),
        "fuses": r.u16(522),
        "fna": r.u8(524),
        "vwc": r.u8(525),
        "awun": r.u16(526),
        "awupf": r.u16(528),
        "icsvscc": r.u8(530),
        "nwpc": r.u8(531),
        "acwu": r.u16(532),
        "ocfs": r.u16(534),
        "sgls": r.u32(536),
        "mnan": r.u32(540),
        "maxdna": r.u128s(544),
        "maxcna": r.u32(560),
    })));
    // nvme-cli leaves out an empty NQN.
    let subnqn = r.text(768, 256);
    if !subnqn.is_empty() {
        m.insert("subnqn".into(), subnqn.into());
    }
    m.extend(object(json!({
        "ioccsz": r.u32(1792),
        "iorcsz": r.u32(1796),
        "icdoff": r.u16(1800),
        "fcatt": r.u8(1802),
        "msdbd": r.u8(1803),
        "ofcs": r.u16(1804),
    })));
    // Power state descriptors: NPSS + 1 of 32 (32 bytes each from byte 2048).
    let psds: Vec<Value> = (0..=usize::from(r.u8(263)).min(31))
        .map(|i| {
            let p = 2048 + 32 * i;
            json!({
                "max_power": r.u16(p),
                "flags": r.u8(p + 3),
                "entry_lat": r.u32(p + 4),
                "exit_lat": r.u32(p + 8),
                "read_tput": r.u8(p + 12),
                "read_lat": r.u8(p + 13),
                "write_tput": r.u8(p + 14),
                "write_lat": r.u8(p + 15),
                "idle_power": r.u16(p + 16),
                "idle_scale": r.u8(p + 18) >> 6,
                "active_power": r.u16(p + 20),
                "active_power_work": r.u8(p + 22) & 7,
                "active_scale": r.u8(p + 22) >> 6,
            })
        })
        .collect();
    m.insert("psds".into(), psds.into());
    Value::Object(m)
}

/// `nvme id-ns -o json` of an Identify Namespace data structure (4096 bytes).
pub fn id_ns(data: &[u8]) -> Value {
    let r = Raw(data);
    let nsfeat = r.u8(24);
    let mut m = object(json!({
        "nsze": r.u64(0),
        "ncap": r.u64(8),
        "nuse": r.u64(16),
        "nsfeat": nsfeat,
        "nlbaf": r.u8(25),
        "flbas": r.u8(26),
        "mc": r.u8(27),
        "dpc": r.u8(28),
        "dps": r.u8(29),
        "nmic": r.u8(30),
        "rescap": r.u8(31),
        "fpi": r.u8(32),
        "dlfeat": r.u8(33),
        "nawun": r.u16(34),
        "nawupf": r.u16(36),
        "nacwu": r.u16(38),
        "nabsn": r.u16(40),
        "nabo": r.u16(42),
        "nabspf": r.u16(44),
        "noiob": r.u16(46),
        "nvmcap": r.u128s(48),
        "nsattr": r.u8(99),
        "nvmsetid": r.u16(100),
    }));
    // The optimal I/O fields are there when NSFEAT says they are valid.
    if nsfeat & 0x10 != 0 {
        m.extend(object(json!({
            "npwg": r.u16(64),
            "npwa": r.u16(66),
            "npdg": r.u16(68),
            "npda": r.u16(70),
            "nows": r.u16(72),
        })));
    }
    m.extend(object(json!({
        "mssrl": r.u16(74),
        "mcl": r.u32(76),
        "msrc": r.u8(80),
        "nulbaf": r.u8(82),
        "anagrpid": r.u32(92),
        "endgid": r.u16(102),
        "eui64": r.hex(120, 8),
        "nguid": r.hex(104, 16),
    })));
    let lbafs: Vec<Value> = (0..=usize::from(r.u8(25)).min(63))
        .map(|i| {
            let p = 128 + 4 * i;
            json!({ "ms": r.u16(p), "ds": r.u8(p + 2), "rp": r.u8(p + 3) })
        })
        .collect();
    m.insert("lbafs".into(), lbafs.into());
    Value::Object(m)
}

/// `nvme smart-log -o json` of the SMART / Health Information log page (512 bytes).
pub fn smart_log(data: &[u8]) -> Value {
    let r = Raw(data);
    let mut m = object(json!({
        "critical_warning": r.u8(0),
        "temperature": r.u16(1),
        "avail_spare": r.u8(3),
        "spare_thresh": r.u8(4),
        "percent_used": r.u8(5),
        "endurance_grp_critical_warning_summary": r.u8(6),
        "data_units_read": r.u128s(32),
        "data_units_written": r.u128s(48),
        "host_read_commands": r.u128s(64),
        "host_write_commands": r.u128s(80),
        "controller_busy_time": r.u128s(96),
        "power_cycles": r.u128s(112),
        "power_on_hours": r.u128s(128),
        "unsafe_shutdowns": r.u128s(144),
        "media_errors": r.u128s(160),
        "num_err_log_entries": r.u128s(176),
        "warning_temp_time": r.u32(192),
        "critical_comp_time": r.u32(196),
    }));
    // Temperature sensors that report (nvme-cli leaves out those reading 0).
    for i in 0..8 {
        let t = r.u16(200 + 2 * i);
        if t != 0 {
            m.insert(format!("temperature_sensor_{}", i + 1), t.into());
        }
    }
    m.extend(object(json!({
        "thm_temp1_trans_count": r.u32(216),
        "thm_temp2_trans_count": r.u32(220),
        "thm_temp1_total_time": r.u32(224),
        "thm_temp2_total_time": r.u32(228),
    })));
    Value::Object(m)
}

/// Entries nvme-cli reads from the error log: ELPE + 1, at most [`ERROR_ENTRIES_MAX`].
pub fn error_log_entries(elpe: u8) -> usize {
    (usize::from(elpe) + 1).min(ERROR_ENTRIES_MAX)
}

/// `nvme error-log -o json` of an Error Information log page: every 64-byte entry, the
/// empty ones (error count 0) too, as nvme-cli prints them.
pub fn error_log(data: &[u8]) -> Value {
    let errors: Vec<Value> = data
        .chunks_exact(ERROR_ENTRY_LEN)
        .map(|e| {
            let r = Raw(e);
            let status = r.u16(12);
            json!({
                "error_count": r.u64(0),
                "sqid": r.u16(8),
                "cmdid": r.u16(10),
                "status_field": status >> 1,
                "phase_tag": status & 1,
                "parm_error_location": r.u16(14),
                "lba": r.u64(16),
                "nsid": r.u32(24),
                "vs": r.u8(28),
                "trtype": r.u8(29),
                "cs": r.u64(32),
                "trtype_spec_info": r.u16(40),
            })
        })
        .collect();
    json!({ "errors": errors })
}

/// One namespace of `nvme list -o json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListItem {
    /// Namespace id.
    pub nsid: u32,
    /// Where to reach it: `/dev/nvme0n1` for nvme-cli; for rnvme the `BDF/NSID` its commands
    /// take.
    pub device_path: String,
    /// Firmware revision, model and serial number, without their padding.
    pub firmware: String,
    /// Model number.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// NUSE, NSZE (LBAs) and the LBA size in bytes.
    pub nuse: u64,
    /// Namespace size in LBAs.
    pub nsze: u64,
    /// LBA data size in bytes.
    pub lba_size: u32,
}

/// `nvme list -o json`: `{"Devices": [...]}`, one object per namespace.
pub fn list(items: &[ListItem]) -> Value {
    let devices: Vec<Value> = items
        .iter()
        .map(|i| {
            let lba = u64::from(i.lba_size);
            json!({
                "NameSpace": i.nsid,
                "DevicePath": i.device_path,
                "Firmware": i.firmware,
                "ModelNumber": i.model,
                "SerialNumber": i.serial,
                "UsedBytes": i.nuse.saturating_mul(lba),
                "MaximumLBA": i.nsze,
                "PhysicalSize": i.nsze.saturating_mul(lba),
                "SectorSize": i.lba_size,
            })
        })
        .collect();
    json!({ "Devices": devices })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    /// The keys of `nvme id-ctrl -o json` (nvme-cli 2.3) on QEMU's controller, in order.
    const ID_CTRL_KEYS: &str = "vid ssvid sn mn fr rab ieee cmic mdts cntlid ver rtd3r rtd3e \
        oaes ctratt rrls cntrltype fguid crdt1 crdt2 crdt3 nvmsr vwci mec oacs acl aerl frmw lpa \
        elpe npss avscc apsta wctemp cctemp mtfa hmpre hmmin tnvmcap unvmcap rpmbs edstt dsto fwug \
        kas hctma mntmt mxtmt sanicap hmminds hmmaxd nsetidmax endgidmax anatt anacap anagrpmax \
        nanagrpid pels domainid megcap sqes cqes maxcmd nn oncs fuses fna vwc awun awupf icsvscc \
        nwpc acwu ocfs sgls mnan maxdna maxcna subnqn ioccsz iorcsz icdoff fcatt msdbd ofcs psds";

    #[test]
    fn id_ctrl_fields_at_their_offsets() {
        let mut d = vec![0u8; IDENTIFY_LEN];
        put(&mut d, 0, &0x1b36u16.to_le_bytes());
        put(&mut d, 2, &0x1af4u16.to_le_bytes());
        put(&mut d, 4, b"rnvme0              ");
        put(&mut d, 24, b"QEMU NVMe Ctrl                          ");
        put(&mut d, 64, b"7.2.22  ");
        put(&mut d, 73, &[0x00, 0x54, 0x52]);
        d[77] = 7;
        put(&mut d, 80, &0x10400u32.to_le_bytes());
        put(&mut d, 112, &[0xab; 16]);
        put(&mut d, 280, &(u128::from(u64::MAX) + 1).to_le_bytes());
        d[263] = 1; // two power states
        put(&mut d, 520, &0x15du16.to_le_bytes());
        put(&mut d, 536, &0x8000_0001u32.to_le_bytes());
        put(&mut d, 768, b"nqn.2019-08.org.qemu:rnvme0");
        put(&mut d, 2048 + 32, &2500u16.to_le_bytes());
        d[2048 + 32 + 18] = 0x80;
        d[2048 + 32 + 22] = 0x46;
        let v = id_ctrl(&d);
        assert_eq!(
            keys(&v),
            ID_CTRL_KEYS.split_whitespace().collect::<Vec<_>>()
        );
        assert_eq!(v["vid"], 6966);
        assert_eq!(v["ssvid"], 0x1af4);
        assert_eq!(v["sn"], "rnvme0              ");
        assert_eq!(v["mn"], "QEMU NVMe Ctrl                          ");
        assert_eq!(v["fr"], "7.2.22  ");
        assert_eq!(v["ieee"], 5395456);
        assert_eq!(v["mdts"], 7);
        assert_eq!(v["ver"], 66560);
        assert_eq!(v["fguid"], "abababab-abab-abab-abab-abababababab");
        assert_eq!(v["tnvmcap"], "18446744073709551616");
        assert_eq!(v["unvmcap"], "0");
        assert_eq!(v["oncs"], 349);
        assert_eq!(v["sgls"], 0x8000_0001u32);
        assert_eq!(v["subnqn"], "nqn.2019-08.org.qemu:rnvme0");
        let ps = v["psds"].as_array().unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[1]["max_power"], 2500);
        assert_eq!(ps[1]["idle_scale"], 2);
        assert_eq!(ps[1]["active_power_work"], 6);
        assert_eq!(ps[1]["active_scale"], 1);
        // No NQN: no key.
        put(&mut d, 768, &[0; 32]);
        assert!(id_ctrl(&d).get("subnqn").is_none());
    }

    #[test]
    fn id_ns_fields_and_lba_formats() {
        let mut d = vec![0u8; IDENTIFY_LEN];
        put(&mut d, 0, &131072u64.to_le_bytes());
        put(&mut d, 8, &131000u64.to_le_bytes());
        put(&mut d, 16, &4096u64.to_le_bytes());
        d[24] = 0x14;
        d[25] = 1; // two formats
        d[26] = 0x11;
        put(&mut d, 68, &7u16.to_le_bytes());
        put(&mut d, 76, &128u32.to_le_bytes());
        put(&mut d, 104, &[0x11; 16]);
        put(&mut d, 120, &[1, 2, 3, 4, 5, 6, 7, 8]);
        put(&mut d, 128, &[0, 0, 9, 0]);
        put(&mut d, 132, &[8, 0, 12, 2]);
        let v = id_ns(&d);
        assert_eq!(
            keys(&v),
            "nsze ncap nuse nsfeat nlbaf flbas mc dpc dps nmic rescap fpi dlfeat nawun nawupf \
             nacwu nabsn nabo nabspf noiob nvmcap nsattr nvmsetid npwg npwa npdg npda nows mssrl \
             mcl msrc nulbaf anagrpid endgid eui64 nguid lbafs"
                .split_whitespace()
                .collect::<Vec<_>>()
        );
        assert_eq!(
            (v["nsze"].as_u64(), v["ncap"].as_u64()),
            (Some(131072), Some(131000))
        );
        assert_eq!(v["nuse"], 4096);
        assert_eq!(v["flbas"], 0x11);
        assert_eq!(v["npdg"], 7);
        assert_eq!(v["mcl"], 128);
        assert_eq!(v["nvmcap"], "0");
        assert_eq!(v["eui64"], "0102030405060708");
        assert_eq!(v["nguid"], "11111111111111111111111111111111");
        assert_eq!(
            v["lbafs"],
            json!([{"ms": 0, "ds": 9, "rp": 0}, {"ms": 8, "ds": 12, "rp": 2}])
        );
        // Without NSFEAT bit 4 the optimal I/O fields are left out.
        d[24] = 0x04;
        assert!(id_ns(&d).get("npwg").is_none());
    }

    #[test]
    fn smart_log_counters_are_strings_and_silent_sensors_left_out() {
        let mut d = vec![0u8; SMART_LEN];
        d[0] = 2;
        put(&mut d, 1, &323u16.to_le_bytes());
        d[3] = 100;
        d[4] = 10;
        put(&mut d, 32, &12345u128.to_le_bytes());
        put(&mut d, 64, &u128::MAX.to_le_bytes());
        put(&mut d, 196, &5u32.to_le_bytes());
        put(&mut d, 202, &300u16.to_le_bytes());
        let v = smart_log(&d);
        assert_eq!(
            keys(&v),
            "critical_warning temperature avail_spare spare_thresh percent_used \
             endurance_grp_critical_warning_summary data_units_read data_units_written \
             host_read_commands host_write_commands controller_busy_time power_cycles \
             power_on_hours unsafe_shutdowns media_errors num_err_log_entries warning_temp_time \
             critical_comp_time temperature_sensor_2 thm_temp1_trans_count thm_temp2_trans_count \
             thm_temp1_total_time thm_temp2_total_time"
                .split_whitespace()
                .collect::<Vec<_>>()
        );
        assert_eq!(v["critical_warning"], 2);
        assert_eq!(v["temperature"], 323);
        assert_eq!(v["data_units_read"], "12345");
        assert_eq!(v["host_read_commands"], u128::MAX.to_string());
        assert_eq!(v["critical_comp_time"], 5);
        assert_eq!(v["temperature_sensor_2"], 300);
    }

    #[test]
    fn error_log_keeps_every_entry() {
        let mut d = vec![0u8; 2 * ERROR_ENTRY_LEN];
        put(&mut d, 0, &7u64.to_le_bytes());
        put(&mut d, 8, &1u16.to_le_bytes());
        put(&mut d, 10, &0x42u16.to_le_bytes());
        // Unrecovered Read Error (sct 2, sc 0x81), phase 1.
        put(&mut d, 12, &(((2u16 << 8 | 0x81) << 1) | 1).to_le_bytes());
        put(&mut d, 16, &99u64.to_le_bytes());
        put(&mut d, 24, &1u32.to_le_bytes());
        let v = error_log(&d);
        let e = v["errors"].as_array().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            keys(&e[0]),
            "error_count sqid cmdid status_field phase_tag parm_error_location lba nsid vs \
             trtype cs trtype_spec_info"
                .split_whitespace()
                .collect::<Vec<_>>()
        );
        assert_eq!(e[0]["error_count"], 7);
        assert_eq!(e[0]["cmdid"], 0x42);
        assert_eq!(e[0]["status_field"], 0x281);
        assert_eq!(e[0]["phase_tag"], 1);
        assert_eq!(e[0]["lba"], 99);
        assert_eq!(e[1]["error_count"], 0);
        assert_eq!(error_log_entries(0), 1);
        assert_eq!(error_log_entries(255), 64);
    }

    #[test]
    fn list_in_nvme_cli_shape() {
        let v = list(&[ListItem {
            nsid: 1,
            device_path: "0000:00:04.0/1".into(),
            firmware: "7.2.22".into(),
            model: "QEMU NVMe Ctrl".into(),
            serial: "rnvme0".into(),
            nuse: 100,
            nsze: 131072,
            lba_size: 512,
        }]);
        assert_eq!(
            v,
            json!({"Devices": [{
                "NameSpace": 1, "DevicePath": "0000:00:04.0/1", "Firmware": "7.2.22",
                "ModelNumber": "QEMU NVMe Ctrl", "SerialNumber": "rnvme0", "UsedBytes": 51200,
                "MaximumLBA": 131072, "PhysicalSize": 67108864, "SectorSize": 512
            }]})
        );
        assert_eq!(
            keys(&v["Devices"][0]),
            [
                "NameSpace",
                "DevicePath",
                "Firmware",
                "ModelNumber",
                "SerialNumber",
                "UsedBytes",
                "MaximumLBA",
                "PhysicalSize",
                "SectorSize"
            ]
        );
    }

    #[test]
    fn short_buffers_read_as_zeros() {
        let v = id_ctrl(&[0x36, 0x1b]);
        assert_eq!(v["vid"], 0x1b36);
        assert_eq!(v["sn"], "");
        assert_eq!(v["psds"].as_array().unwrap().len(), 1);
        assert_eq!(id_ns(&[])["lbafs"].as_array().unwrap().len(), 1);
    }
}
