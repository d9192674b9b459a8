//! Directory entries. Linear directories and htree directories are read the same way, block
//! by block: an htree's index blocks look like blocks holding one empty entry, so a linear
//! reader skips them (the `dir_index` feature is compatible for that reason).

use super::inode::FileType;
use super::le::{u16_at, u32_at};

/// Bytes of an entry before its name.
const HEADER: usize = 8;

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name's bytes (ext names need not be UTF-8).
    pub name: Vec<u8>,
    /// Its inode.
    pub ino: u32,
    /// The type the entry records (`Unknown` without the `filetype` feature).
    pub file_type: FileType,
}

impl DirEntry {
    /// The name for display (invalid UTF-8 replaced).
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// `.` or `..`.
    pub fn is_dot(&self) -> bool {
        self.name == b"." || self.name == b".."
    }
}

/// Parse the entries of one directory block (or of an inline directory's area) into `out`.
/// `Err` says what is malformed and where.
pub(crate) fn parse_entries(
    data: &[u8],
    filetype: bool,
    out: &mut Vec<DirEntry>,
) -> Result<(), String> {
    let mut at = 0;
    while at < data.len() {
        if at + HEADER > data.len() {
            return Err(format!(
                "directory entry at byte {at} is cut off by the end of the block"
            ));
        }
        let ino = u32_at(data, at);
        let rec_len = u16_at(data, at + 4) as usize;
        let name_len = if filetype {
            data[at + 6] as usize
        } else {
            u16_at(data, at + 6) as usize
        };
        if rec_len < HEADER || !rec_len.is_multiple_of(4) || at + rec_len > data.len() {
            return Err(format!(
                "directory entry at byte {at} has record length {rec_len}"
            ));
        }
        if ino != 0 {
            if HEADER + name_len > rec_len || name_len == 0 {
                return Err(format!(
                    "directory entry at byte {at}: a {name_len}-byte name in a {rec_len}-byte record"
                ));
            }
            out.push(DirEntry {
                name: data[at + HEADER..at + HEADER + name_len].to_vec(),
                ino,
                file_type: if filetype {
                    FileType::from_dirent(data[at + 7])
                } else {
                    FileType::Unknown
                },
            });
        }
        at += rec_len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ino: u32, name: &[u8], rec_len: u16, ftype: u8) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ino.to_le_bytes());
        v.extend_from_slice(&rec_len.to_le_bytes());
        v.push(name.len() as u8);
        v.push(ftype);
        v.extend_from_slice(name);
        v.resize(rec_len as usize, 0);
        v
    }

    #[test]
    fn entries_skip_deleted_records_and_check_lengths() {
        let mut block = entry(2, b".", 12, 2);
        block.extend(entry(0, b"gone", 16, 1));
        block.extend(entry(12, b"file", 36, 1));
        let mut out = Vec::new();
        parse_entries(&block, true, &mut out).unwrap();
        let names: Vec<String> = out.iter().map(DirEntry::name_lossy).collect();
        assert_eq!(names, [".", "file"]);
        assert_eq!(out[1].file_type, FileType::Regular);
        assert!(out[0].is_dot() && !out[1].is_dot());

        let mut bad = entry(2, b".", 12, 2);
        bad.extend(entry(12, b"file", 16, 1));
        bad[16..18].copy_from_slice(&40u16.to_le_bytes());
        let e = parse_entries(&bad, true, &mut Vec::new()).unwrap_err();
        assert!(
            e.contains("byte 12") && e.contains("record length 40"),
            "{e}"
        );
        let mut long_name = entry(12, b"ab", 12, 1);
        long_name[6] = 9;
        assert!(parse_entries(&long_name, true, &mut Vec::new()).is_err());
    }
}
