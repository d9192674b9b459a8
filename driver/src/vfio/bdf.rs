//! PCI addresses: the forms of a BDF and its check.

use super::*;

/// The shape of a PCI address, ignoring case.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BdfShape {
    /// `dddd:bb:dd.f`
    Full,
    /// `bb:dd.f` (what `lspci` prints without `-D`)
    Short,
    Bad,
}

pub(super) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `dd.f`: device 00..1f, function 0..7.
pub(super) fn is_dev_fn(s: &str) -> bool {
    let Some((dev, func)) = s.split_once('.') else {
        return false;
    };
    is_hex(dev, 2)
        && u8::from_str_radix(dev, 16).is_ok_and(|d| d <= 0x1f)
        && func.len() == 1
        && matches!(func.as_bytes()[0], b'0'..=b'7')
}

pub(super) fn bdf_shape(s: &str) -> BdfShape {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        [domain, bus, dev_fn] if is_hex(domain, 4) && is_hex(bus, 2) && is_dev_fn(dev_fn) => {
            BdfShape::Full
        }
        [bus, dev_fn] if is_hex(bus, 2) && is_dev_fn(dev_fn) => BdfShape::Short,
        _ => BdfShape::Bad,
    }
}

/// Check that `bdf` is a PCI address in the full form sysfs uses, `dddd:bb:dd.f` in lowercase
/// hex. A short form such as `00:03.0`, upper case, or stray blanks give an error that suggests
/// the full form (`0000:00:03.0`).
pub fn check_bdf(bdf: &str) -> Result<(), VfioSetupError> {
    if bdf_shape(bdf) == BdfShape::Full && !bdf.bytes().any(|b| b.is_ascii_uppercase()) {
        return Ok(());
    }
    let cleaned = bdf.trim().to_ascii_lowercase();
    let suggestion = match bdf_shape(&cleaned) {
        BdfShape::Full => Some(cleaned),
        BdfShape::Short => Some(format!("0000:{cleaned}")),
        BdfShape::Bad => None,
    };
    Err(VfioSetupError::BadBdf {
        bdf: bdf.to_string(),
        suggestion,
    })
}
