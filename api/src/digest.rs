//! A small, stable content digest (64-bit FNV-1a) that names configuration versions
//! and the files a controller loaded. Not cryptographic: it tells versions apart, it
//! does not authenticate them.

/// Digest of everything fed to it, in order.
#[derive(Clone, Copy, Debug)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Sixteen lowercase hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// The digest of `bytes` as sixteen hex digits.
pub fn of(bytes: &[u8]) -> String {
    Digest::new().update(bytes).hex()
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_values_and_order_matter() {
        // FNV-1a 64 reference values.
        assert_eq!(super::of(b""), "cbf29ce484222325");
        assert_eq!(super::of(b"a"), "af63dc4c8601ec8c");
        assert_ne!(super::of(b"ab"), super::of(b"ba"));
    }
}
