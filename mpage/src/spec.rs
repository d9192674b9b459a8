//! MAP.json: a block map plus the device and file it is traced on.
//!
//! ```json
//! {"block_size":1024,"lba_size":512,"max_transfer":524288,"file_size":10000,
//!  "extents":[{"file_block":0,"disk_block":100,"blocks":4,"boundary":false,"uptodate":false}],
//!  "errors":[12],"allocate_from":700}
//! ```
//!
//! Disk blocks are in `block_size` units; `boundary` marks the extent's last block; `errors`
//! lists file blocks whose mapping fails; `allocate_from` is where `create` allocates (one
//! block per call, ascending). `max_transfer` (bytes) may be left out or `null` for no limit.
//! Unknown fields are refused, and every error names the field at fault.

use serde_json::{Map, Value};

use crate::map::{Extent, ExtentMap};
use crate::pool::PAGE_SIZE;

/// A parsed and checked MAP.json.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapSpec {
    /// File block size in bytes.
    pub block_size: u32,
    /// Device LBA size in bytes.
    pub lba_size: u32,
    /// Largest transfer of one command in bytes, or no limit.
    pub max_transfer: Option<u32>,
    /// File size in bytes.
    pub file_size: u64,
    /// The file's extents.
    pub extents: Vec<Extent>,
    /// File blocks whose mapping fails.
    pub errors: Vec<u64>,
    /// First disk block `create` allocates, or None when the map cannot allocate.
    pub allocate_from: Option<u64>,
}

/// What is wrong with a MAP.json.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not JSON at all.
    #[error("MAP.json is not valid JSON: {0}")]
    Syntax(String),
    /// A field is missing, unknown, of the wrong type or out of range.
    #[error("MAP.json: `{field}`: {problem}")]
    Field { field: String, problem: String },
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> SpecError {
    SpecError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Reads the fields of one JSON object, refusing unknown ones.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(path: &str, v: &'a Value, known: &[&str]) -> Result<Obj<'a>, SpecError> {
        let map = v
            .as_object()
            .ok_or_else(|| field_err(path, format!("expected an object, found {}", kind(v))))?;
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(field_err(
                join(path, k),
                format!("unknown field; the known fields are {}", known.join(", ")),
            ));
        }
        Ok(Obj {
            path: path.to_string(),
            map,
        })
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn u64_opt(&self, name: &str) -> Result<Option<u64>, SpecError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                field_err(
                    join(&self.path, name),
                    format!("expected a non-negative integer, found {}", kind(v)),
                )
            }),
        }
    }

    fn u64(&self, name: &str) -> Result<u64, SpecError> {
        self.u64_opt(name)?
            .ok_or_else(|| field_err(join(&self.path, name), "missing (required)"))
    }

    fn u32(&self, name: &str) -> Result<u32, SpecError> {
        let v = self.u64(name)?;
        u32::try_from(v).map_err(|_| {
            field_err(
                join(&self.path, name),
                format!("{v} is too large (at most {})", u32::MAX),
            )
        })
    }

    fn bool_or_false(&self, name: &str) -> Result<bool, SpecError> {
        match self.get(name) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| {
                field_err(
                    join(&self.path, name),
                    format!("expected true or false, found {}", kind(v)),
                )
            }),
        }
    }

    fn array(&self, name: &str) -> Result<&'a [Value], SpecError> {
        match self.get(name) {
            None => Ok(&[]),
            Some(v) => v.as_array().map(Vec::as_slice).ok_or_else(|| {
                field_err(
                    join(&self.path, name),
                    format!("expected an array, found {}", kind(v)),
                )
            }),
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

const TOP: &[&str] = &[
    "block_size",
    "lba_size",
    "max_transfer",
    "file_size",
    "extents",
    "errors",
    "allocate_from",
];
const EXTENT: &[&str] = &["file_block", "disk_block", "blocks", "boundary", "uptodate"];

impl MapSpec {
    /// Parse and check a MAP.json text.
    pub fn from_json(text: &str) -> Result<MapSpec, SpecError> {
        let v: Value = serde_json::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
        let top = Obj::new("", &v, TOP)?;
        let lba_size = top.u32("lba_size")?;
        if !lba_size.is_power_of_two() || !(512..=PAGE_SIZE as u32).contains(&lba_size) {
            return Err(field_err(
                "lba_size",
                format!("{lba_size} is not a power of two from 512 to 4096"),
            ));
        }
        let block_size = top.u32("block_size")?;
        check_block_size(block_size, lba_size).map_err(|why| field_err("block_size", why))?;
        let max_transfer = match top.u64_opt("max_transfer")? {
            None => None,
            Some(m) if m < PAGE_SIZE as u64 => {
                return Err(field_err(
                    "max_transfer",
                    format!(
                        "{m} bytes is less than one 4096-byte page (leave it out for no limit)"
                    ),
                ))
            }
            Some(m) => Some(u32::try_from(m).map_err(|_| {
                field_err(
                    "max_transfer",
                    format!("{m} is too large (at most {})", u32::MAX),
                )
            })?),
        };
        let file_size = top.u64("file_size")?;
        let mut extents = Vec::new();
        for (i, ev) in top.array("extents")?.iter().enumerate() {
            let path = format!("extents[{i}]");
            let o = Obj::new(&path, ev, EXTENT)?;
            let e = Extent {
                file_block: o.u64("file_block")?,
                disk_block: o.u64("disk_block")?,
                blocks: o.u64("blocks")?,
                boundary: o.bool_or_false("boundary")?,
                uptodate: o.bool_or_false("uptodate")?,
            };
            if e.blocks == 0 {
                return Err(field_err(format!("{path}.blocks"), "must be at least 1"));
            }
            extents.push(e);
        }
        let mut errors = Vec::new();
        for (i, ev) in top.array("errors")?.iter().enumerate() {
            errors.push(ev.as_u64().ok_or_else(|| {
                field_err(
                    format!("errors[{i}]"),
                    format!("expected a file block number, found {}", kind(ev)),
                )
            })?);
        }
        let allocate_from = top.u64_opt("allocate_from")?;
        let spec = MapSpec {
            block_size,
            lba_size,
            max_transfer,
            file_size,
            extents,
            errors,
            allocate_from,
        };
        // Overlaps are found by building the map.
        spec.extent_map()?;
        Ok(spec)
    }

    /// The extent map this spec describes.
    pub fn extent_map(&self) -> Result<ExtentMap, SpecError> {
        let mut m = ExtentMap::new(self.block_size);
        for (i, e) in self.extents.iter().enumerate() {
            m.add_extent(e.clone())
                .map_err(|err| field_err(format!("extents[{i}]"), err.to_string()))?;
        }
        for &b in &self.errors {
            m.fail_block(b);
        }
        if let Some(a) = self.allocate_from {
            m.set_allocation_range(a..u64::MAX);
        }
        Ok(m)
    }
}

/// Whether files of `block_size` work on a device of `lba_size`: a power of two, at least
/// one LBA (so a multiple of it), at most one page. Returns the reason when not.
pub fn check_block_size(block_size: u32, lba_size: u32) -> Result<(), String> {
    if !block_size.is_power_of_two() {
        return Err(format!("{block_size} is not a power of two"));
    }
    if block_size < lba_size || !block_size.is_multiple_of(lba_size) {
        return Err(format!(
            "{block_size} is not a multiple of the {lba_size}-byte LBA size"
        ));
    }
    if block_size as usize > PAGE_SIZE {
        return Err(format!("{block_size} is larger than the 4096-byte page"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"block_size":1024,"lba_size":512,"max_transfer":524288,"file_size":10000,
        "extents":[{"file_block":0,"disk_block":100,"blocks":4,"boundary":false,"uptodate":false}],
        "errors":[12],"allocate_from":700}"#;

    #[test]
    fn the_documented_example_parses() {
        let s = MapSpec::from_json(GOOD).unwrap();
        assert_eq!(
            (s.block_size, s.lba_size, s.max_transfer, s.file_size),
            (1024, 512, Some(524288), 10000)
        );
        assert_eq!(s.extents, vec![Extent::new(0, 100, 4)]);
        assert_eq!((s.errors.clone(), s.allocate_from), (vec![12], Some(700)));
    }

    fn err(text: &str) -> String {
        MapSpec::from_json(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"block_size":1024,"lba_size":512,"file_size":1,"bogus":1}"#,
                "`bogus`: unknown field",
            ),
            (r#"{"lba_size":512,"file_size":1}"#, "`block_size`: missing"),
            (
                r#"{"block_size":"4k","lba_size":512,"file_size":1}"#,
                "`block_size`: expected a non-negative integer, found the string \"4k\"",
            ),
            (
                r#"{"block_size":1000,"lba_size":512,"file_size":1}"#,
                "`block_size`: 1000 is not a power of two",
            ),
            (
                r#"{"block_size":512,"lba_size":4096,"file_size":1}"#,
                "`block_size`: 512 is not a multiple of the 4096-byte LBA size",
            ),
            (
                r#"{"block_size":8192,"lba_size":4096,"file_size":1}"#,
                "`block_size`: 8192 is larger than the 4096-byte page",
            ),
            (
                r#"{"block_size":4096,"lba_size":520,"file_size":1}"#,
                "`lba_size`: 520 is not a power of two",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"max_transfer":512}"#,
                "`max_transfer`: 512 bytes",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":-1}"#,
                "`file_size`: expected a non-negative integer",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"extents":[{"file_block":0,"disk_block":1}]}"#,
                "`extents[0].blocks`: missing",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"extents":[{"file_block":0,"disk_block":1,"blocks":1,"boundry":true}]}"#,
                "`extents[0].boundry`: unknown field",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"extents":[{"file_block":0,"disk_block":1,"blocks":0}]}"#,
                "`extents[0].blocks`: must be at least 1",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"extents":[{"file_block":0,"disk_block":1,"blocks":4},{"file_block":2,"disk_block":9,"blocks":1}]}"#,
                "`extents[1]`: extent at file blocks 2..3 overlaps",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"extents":[{"file_block":0,"disk_block":1,"blocks":4},{"file_block":8,"disk_block":3,"blocks":1}]}"#,
                "`extents[1]`: extent at disk blocks 3..4 overlaps",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"errors":["x"]}"#,
                "`errors[0]`: expected a file block number",
            ),
            (
                r#"{"block_size":4096,"lba_size":4096,"file_size":1,"extents":{}}"#,
                "`extents`: expected an array",
            ),
            (r#"[1]"#, "expected an object"),
            (r#"{"block_size":4096"#, "not valid JSON"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "for {text}\n got: {got}\nwant: {want}");
        }
    }
}
