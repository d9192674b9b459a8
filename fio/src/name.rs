//! The filenames of fio jobs: which controller and namespace a `filename=` names.

use std::fmt;

/// A namespace of a PCIe controller, as a job file names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The controller's PCI address, `DDDD:BB:DD.F`.
    pub bdf: String,
    /// The namespace.
    pub nsid: u32,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} namespace {}", self.bdf, self.nsid)
    }
}

/// Parses a filename in the SPDK plugin's form, `trtype=PCIe traddr=0000.04.00.0 ns=1` (fio
/// splits filenames at `:`, so the address is written with dots; colons escaped as `\:` are
/// accepted too), or the short form `0000.04.00.0/1`. The namespace defaults to 1.
pub fn parse(name: &str) -> Result<Target, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err(
            "empty filename: give `trtype=PCIe traddr=0000.04.00.0 ns=1` or `0000.04.00.0/1`"
                .into(),
        );
    }
    if name.contains('=') {
        return parse_keyed(name);
    }
    let (addr, ns) = match name.split_once('/') {
        Some((a, n)) => (a, Some(n)),
        None => (name, None),
    };
    let bdf = bdf(addr).map_err(|e| format!("filename {name:?}: {e}"))?;
    let nsid = match ns {
        Some(n) => nsid(n).map_err(|e| format!("filename {name:?}: {e}"))?,
        None => 1,
    };
    Ok(Target { bdf, nsid })
}

fn parse_keyed(name: &str) -> Result<Target, String> {
    let (mut addr, mut ns) = (None, None);
    for part in name.split_whitespace() {
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("filename {name:?}: {part:?} is not key=value"));
        };
        match k.to_ascii_lowercase().as_str() {
            "trtype" if v.eq_ignore_ascii_case("pcie") => {}
            "trtype" => {
                return Err(format!(
                    "filename {name:?}: transport {v:?} is not served here: only trtype=PCIe"
                ))
            }
            "traddr" => addr = Some(bdf(v).map_err(|e| format!("filename {name:?}: {e}"))?),
            "ns" => ns = Some(nsid(v).map_err(|e| format!("filename {name:?}: {e}"))?),
            _ => {
                return Err(format!(
                    "filename {name:?}: unknown key {k:?} (known: trtype, traddr, ns)"
                ))
            }
        }
    }
    let bdf = addr.ok_or_else(|| format!("filename {name:?}: no traddr=DDDD.BB.DD.F"))?;
    Ok(Target {
        bdf,
        nsid: ns.unwrap_or(1),
    })
}

/// `DDDD.BB.DD.F`, `DDDD:BB:DD.F` (or with `\:`), or without the domain, as `DDDD:BB:DD.F`.
fn bdf(s: &str) -> Result<String, String> {
    let s = s.replace("\\:", ":");
    let parts: Vec<&str> = s.split(['.', ':']).collect();
    let parts: Vec<&str> = match parts.len() {
        4 => parts,
        3 => [&["0000"][..], &parts].concat(),
        _ => return Err(format!("{s:?} is not a PCI address (DDDD.BB.DD.F)")),
    };
    let widths = [4, 2, 2, 1];
    let limits = [0xffff, 0xff, 0x1f, 7];
    let mut v = [0u32; 4];
    for i in 0..4 {
        let p = parts[i];
        if p.is_empty() || p.len() > widths[i] || !p.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a PCI address (DDDD.BB.DD.F)"));
        }
        v[i] = u32::from_str_radix(p, 16).map_err(|e| e.to_string())?;
        if v[i] > limits[i] {
            return Err(format!("{s:?} is not a PCI address (DDDD.BB.DD.F)"));
        }
    }
    Ok(format!("{:04x}:{:02x}:{:02x}.{:x}", v[0], v[1], v[2], v[3]))
}

fn nsid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n > 0 && n != u32::MAX => Ok(n),
        _ => Err(format!("{s:?} is not a namespace ID (1, 2, ...)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(bdf: &str, nsid: u32) -> Target {
        Target {
            bdf: bdf.into(),
            nsid,
        }
    }

    #[test]
    fn spdk_form() {
        assert_eq!(
            parse("trtype=PCIe traddr=0000.04.00.0 ns=1"),
            Ok(t("0000:04:00.0", 1))
        );
        assert_eq!(
            parse("trtype=pcie traddr=0000.0a.1f.7 ns=3"),
            Ok(t("0000:0a:1f.7", 3))
        );
        assert_eq!(parse("traddr=0000\\:04\\:00.0"), Ok(t("0000:04:00.0", 1)));
        assert!(parse("trtype=TCP traddr=10.0.0.1 ns=1")
            .unwrap_err()
            .contains("only trtype=PCIe"));
        assert!(parse("trtype=PCIe ns=1").unwrap_err().contains("no traddr"));
        assert!(parse("trtype=PCIe traddr=0000.04.00.0 ns=0")
            .unwrap_err()
            .contains("namespace ID"));
        assert!(parse("trtype=PCIe traddr=0000.04.00.0 subnqn=x")
            .unwrap_err()
            .contains("unknown key"));
    }

    #[test]
    fn short_form() {
        assert_eq!(parse("0000.04.00.0/1"), Ok(t("0000:04:00.0", 1)));
        assert_eq!(parse("0000:04:00.0/2"), Ok(t("0000:04:00.0", 2)));
        assert_eq!(parse("04.00.0"), Ok(t("0000:04:00.0", 1)));
        for bad in [
            "",
            "/dev/nvme0n1",
            "0000.04.00.0/x",
            "0000.04.20.0/1",
            "0000.04.00.8",
            "1.2",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,60}") {
            let _ = parse(&s);
        }

        #[test]
        fn addresses_round_trip(d in 0u32..=0xffff, b in 0u32..=0xff, dev in 0u32..=0x1f, f in 0u32..=7, ns in 1u32..1000) {
            let want = t(&format!("{d:04x}:{b:02x}:{dev:02x}.{f:x}"), ns);
            proptest::prop_assert_eq!(parse(&format!("{d:04x}.{b:02x}.{dev:02x}.{f:x}/{ns}")), Ok(want.clone()));
            proptest::prop_assert_eq!(parse(&format!("trtype=PCIe traddr={d:04x}.{b:02x}.{dev:02x}.{f:x} ns={ns}")), Ok(want));
        }
    }
}
