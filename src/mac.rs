//! MAC addresses, the identity of a node's hardware, in the forms operators and iPXE write them.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address. Displays as lower-case `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Accepts `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` (iPXE's `hexhyp`) and `aabbccddeeff`, any case.
    pub fn parse(s: &str) -> Option<Mac> {
        let groups: Vec<&str> = s.split([':', '-']).collect();
        let grouped_ok = groups.len() == 6 && groups.iter().all(|g| g.len() == 2);
        if !(grouped_ok || (groups.len() == 1 && s.len() == 12)) {
            return None;
        }
        let hex = groups.concat();
        if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 6];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Mac(out))
    }

    /// From the first six bytes of a DHCP `chaddr`.
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        Some(Mac(b.get(..6)?.try_into().ok()?))
    }

    /// iPXE's `hexhyp` form, used in URLs: `aa-bb-cc-dd-ee-ff`.
    pub fn hyphenated(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Mac::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not a MAC address")))
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Mac::parse(s).ok_or_else(|| format!("`{s}` is not a MAC address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let m = Mac([0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        for s in ["52:54:00:ab:cd:ef", "52-54-00-AB-CD-EF", "525400abcdef"] {
            assert_eq!(Mac::parse(s), Some(m), "{s}");
        }
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(m.hyphenated(), "52-54-00-ab-cd-ef");
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:eg",
            "5:25:40:0a:bc:def",
            "52:54:00:ab:cd:ef:00",
        ] {
            assert_eq!(Mac::parse(s), None, "{s}");
        }
    }
}
