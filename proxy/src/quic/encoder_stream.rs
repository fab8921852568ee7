//! Checks a peer's QPACK encoder stream (RFC 9204 §4.3) against the dynamic table Spur
//! allows: none. Spur's HTTP/3 settings leave `SETTINGS_QPACK_MAX_TABLE_CAPACITY` at its
//! default of 0 (h3 decodes field sections without a dynamic table), so the only
//! instruction a peer may send on its encoder stream is "Set Dynamic Table Capacity 0".
//! Anything else is a connection error of type `QPACK_ENCODER_STREAM_ERROR` (§4.3.1: a
//! capacity above the maximum; §3.2.2 / §4.3.2–4.3.4: an insertion or duplication into a
//! table that can hold nothing). h3 itself never reads this stream, so without this check
//! such instructions were ignored (and their bytes sat in the stream's receive window).
//!
//! The check is fed the stream's bytes as they arrive, in chunks of any size: an
//! instruction's integer may straddle two chunks.

/// Why a peer's encoder stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncoderStreamError {
    /// RFC 9204 §4.3.1 (the value saturates at `u64::MAX` when it does not fit).
    #[error("set dynamic table capacity {0} above the advertised maximum of 0")]
    CapacityAboveMax(u64),
    /// RFC 9204 §4.3.2 and §4.3.3.
    #[error("insert into a dynamic table of capacity 0")]
    Insert,
    /// RFC 9204 §4.3.4: there is no entry to duplicate.
    #[error("duplicate of an entry in an empty dynamic table")]
    Duplicate,
}

/// The state of the encoder stream between two chunks.
#[derive(Debug, Default)]
pub struct EncoderStreamCheck {
    /// Inside a Set Dynamic Table Capacity whose 5-bit prefix was full (value ≥ 31): the
    /// value so far and the shift of the next continuation byte (RFC 9204 §4.1.1).
    capacity: Option<(u64, u32)>,
}

/// `001xxxxx`: Set Dynamic Table Capacity, with a 5-bit prefix integer.
const SET_CAPACITY: u8 = 0b0010_0000;
const PREFIX_MASK: u8 = 0b0001_1111;

impl EncoderStreamCheck {
    /// Takes the next bytes of the stream; `Err` at the first instruction Spur refuses.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), EncoderStreamError> {
        for &b in bytes {
            match self.capacity.take() {
                Some((value, shift)) => self.continue_capacity(value, shift, b)?,
                None => self.instruction(b)?,
            }
        }
        Ok(())
    }

    /// The first byte of an instruction.
    fn instruction(&mut self, b: u8) -> Result<(), EncoderStreamError> {
        if b & 0b1000_0000 != 0 || b & 0b0100_0000 != 0 {
            // `1xxxxxxx` Insert With Name Reference, `01xxxxxx` Insert With Literal Name.
            return Err(EncoderStreamError::Insert);
        }
        if b & SET_CAPACITY == 0 {
            // `000xxxxx` Duplicate.
            return Err(EncoderStreamError::Duplicate);
        }
        match b & PREFIX_MASK {
            0 => Ok(()),
            PREFIX_MASK => {
                self.capacity = Some((u64::from(PREFIX_MASK), 0));
                Ok(())
            }
            n => Err(EncoderStreamError::CapacityAboveMax(u64::from(n))),
        }
    }

    /// A continuation byte of the capacity: 7 bits of value, the top bit says more follow.
    /// The value is at least 31 already, so it is refused once complete; reading it to its
    /// end only makes the error name it.
    fn continue_capacity(
        &mut self,
        value: u64,
        shift: u32,
        b: u8,
    ) -> Result<(), EncoderStreamError> {
        let add = u64::from(b & 0x7f)
            .checked_shl(shift)
            .filter(|a| a >> shift == u64::from(b & 0x7f));
        let value = match add.and_then(|a| value.checked_add(a)) {
            Some(v) => v,
            None => return Err(EncoderStreamError::CapacityAboveMax(u64::MAX)),
        };
        if b & 0x80 == 0 {
            return Err(EncoderStreamError::CapacityAboveMax(value));
        }
        self.capacity = Some((value, shift + 7));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8]) -> Result<(), EncoderStreamError> {
        EncoderStreamCheck::default().feed(bytes)
    }

    #[test]
    fn capacity_zero_is_the_only_instruction_allowed() {
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(check(&[0x20, 0x20, 0x20]), Ok(()));
    }

    #[test]
    fn a_capacity_above_zero_is_refused_with_its_value() {
        assert_eq!(check(&[0x21]), Err(EncoderStreamError::CapacityAboveMax(1)));
        assert_eq!(
            check(&[0x3e]),
            Err(EncoderStreamError::CapacityAboveMax(30))
        );
        // 4096 = 31 + 4065; 4065 = 0x7e1 -> 0xe1 0x1f (RFC 9204 §4.1.1, RFC 7541 §5.1).
        assert_eq!(
            check(&[0x20, 0x3f, 0xe1, 0x1f]),
            Err(EncoderStreamError::CapacityAboveMax(4096))
        );
    }

    #[test]
    fn an_integer_split_across_chunks_is_read_whole() {
        let mut c = EncoderStreamCheck::default();
        assert_eq!(c.feed(&[0x20, 0x3f]), Ok(()));
        assert_eq!(c.feed(&[0xe1]), Ok(()));
        assert_eq!(
            c.feed(&[0x1f]),
            Err(EncoderStreamError::CapacityAboveMax(4096))
        );
    }

    #[test]
    fn an_endless_integer_saturates() {
        let mut bytes = vec![0x3f];
        bytes.extend([0xff; 12]);
        assert_eq!(
            check(&bytes),
            Err(EncoderStreamError::CapacityAboveMax(u64::MAX))
        );
    }

    #[test]
    fn inserts_and_duplicates_are_refused() {
        // Insert With Name Reference (static table, index 17 = `:method GET`), value "x".
        assert_eq!(check(&[0xd1, 0x01, b'x']), Err(EncoderStreamError::Insert));
        // Insert With Literal Name, name "a", value "b".
        assert_eq!(
            check(&[0x41, b'a', 0x01, b'b']),
            Err(EncoderStreamError::Insert)
        );
        assert_eq!(check(&[0x20, 0x00]), Err(EncoderStreamError::Duplicate));
    }
}
