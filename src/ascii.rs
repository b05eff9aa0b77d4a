//! Byte classes as lookup tables: the checks that run over every byte of
//! a request's host or channel name test one table entry per byte instead
//! of a chain of comparisons.

/// The table of ASCII letters, digits and the bytes of `extra`: entry `b`
/// is true when byte `b` is one of them.
pub const fn alphanumeric_and(extra: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
}

/// Whether every byte of `bytes` is in `table` (true for none).
pub fn all_in(bytes: &[u8], table: &[bool; 256]) -> bool {
    first_outside(bytes, table).is_none()
}

/// Where the first byte of `bytes` outside `table` is (None when all are in).
pub fn first_outside(bytes: &[u8], table: &[bool; 256]) -> Option<usize> {
    bytes.iter().position(|&b| !table[usize::from(b)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds_letters_digits_and_the_extra_bytes_only() {
        const T: [bool; 256] = alphanumeric_and(b"-.");
        let inside: Vec<u8> = (0..=255u8).filter(|&b| T[usize::from(b)]).collect();
        let mut want: Vec<u8> = (b'0'..=b'9')
            .chain(b'A'..=b'Z')
            .chain(b'a'..=b'z')
            .collect();
        want.extend_from_slice(b"-.");
        want.sort_unstable();
        assert_eq!(inside, want);
        assert!(all_in(b"ab-c.9", &T) && all_in(b"", &T));
        assert_eq!(first_outside(b"ab-c.9", &T), None);
        assert_eq!(first_outside(b"ab c", &T), Some(2));
        assert_eq!(first_outside("é".as_bytes(), &T), Some(0));
    }
}
