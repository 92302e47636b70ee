//! PCI function addresses as sysfs spells them: `DDDD:BB:DD.F` (the domain may be left out).

use std::fmt;
use std::str::FromStr;

use platform::PciAddress;

/// A PCI function: domain, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub device: u8,
    /// Function number, 0..8.
    pub function: u8,
}

impl Bdf {
    /// The address the driver uses (the domain is this platform's business).
    pub fn pci_address(&self) -> PciAddress {
        PciAddress {
            bus: self.bus,
            device: self.device,
            function: self.function,
        }
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for Bdf {
    type Err = String;

    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (hexadecimal, function decimal 0..8).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a PCI address like 0000:00:04.0");
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] => (*d, *b, *dev),
            [b, dev] => ("0", *b, *dev),
            _ => return Err(bad()),
        };
        let hex = |t: &str, max_len: usize| {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let domain = u16::try_from(hex(domain, 4)?).map_err(|_| bad())?;
        let bus = u8::try_from(hex(bus, 2)?).map_err(|_| bad())?;
        let device = u8::try_from(hex(device, 2)?).map_err(|_| bad())?;
        let function: u8 = match function {
            f if f.len() == 1 => f.parse().map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        if device >= 32 || function >= 8 {
            return Err(bad());
        }
        Ok(Bdf {
            domain,
            bus,
            device,
            function,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let b: Bdf = "0000:00:04.0".parse().expect("full form");
        assert_eq!(
            b,
            Bdf {
                domain: 0,
                bus: 0,
                device: 4,
                function: 0
            }
        );
        assert_eq!(b.to_string(), "0000:00:04.0");
        let b: Bdf = "3:1f.7".parse().expect("short form");
        assert_eq!(b.to_string(), "0000:03:1f.7");
        let b: Bdf = "abcd:ff:0A.1".parse().expect("hex");
        assert_eq!(
            (b.domain, b.bus, b.device, b.function),
            (0xabcd, 0xff, 10, 1)
        );
        assert_eq!(
            b.pci_address(),
            PciAddress {
                bus: 0xff,
                device: 10,
                function: 1
            }
        );
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "04.0",
            "00:20.0",
            "00:04.8",
            "00:04",
            "0:0:0:0.0",
            "00:04.00",
            "x:04.0",
            "100:04.0",
            "10000:00:04.0",
            "00:04.-1",
            "00:+4.0",
        ] {
            assert!(s.parse::<Bdf>().is_err(), "{s:?} parsed");
        }
    }
}
