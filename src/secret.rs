//! Unguessable identifiers and the hashes tokens are stored under.

use sha2::{Digest, Sha256};

/// `bytes` random bytes from the operating system, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // The OS generator failing is not something a server can go on without.
    getrandom::fill(&mut buf).expect("the operating system's random generator works");
    hex(&buf)
}

/// A random u32 (seeds the user did not choose).
pub fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    getrandom::fill(&mut buf).expect("the operating system's random generator works");
    u32::from_le_bytes(buf)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a token, in hex: sessions and API keys are stored only as this, so a copy of the
/// database does not log anyone in.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_long_and_distinct() {
        let a = super::random_hex(16);
        assert_eq!(a.len(), 32);
        assert_ne!(a, super::random_hex(16));
        assert!(super::constant_time_eq(&a, &a.clone()));
        assert!(!super::constant_time_eq(&a, &super::random_hex(16)));
    }
}
