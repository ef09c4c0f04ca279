//! The idempotency key of a request: which header carries it, and how it is read.

use http::{HeaderMap, HeaderName};

use crate::KEY_LEN_MAX;

/// The request header that carries the idempotency key, unless configured otherwise.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The idempotency key header of a request.
pub(crate) enum KeyHeader {
    Absent,
    Invalid(&'static str),
    Valid(String),
}

/// Reads the key: 1 to 255 visible ASCII characters (`!` to `~`), once. The IETF draft sends
/// it as a structured-field string (`"..."`); the quotes are removed, so `"k"` and `k` are
/// the same key.
///
/// A backend may accept shorter keys only: its refusal of a longer one is a 400 too, decided
/// when the claim is refused (see `claim::refused`).
pub(crate) fn read_key(headers: &HeaderMap, name: &HeaderName) -> KeyHeader {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return KeyHeader::Absent;
    };
    if values.next().is_some() {
        return KeyHeader::Invalid("the idempotency key header is sent more than once");
    }
    let bytes = match value.as_bytes() {
        [b'"', inner @ .., b'"'] => inner,
        bytes => bytes,
    };
    if bytes.is_empty() {
        return KeyHeader::Invalid("the idempotency key is empty");
    }
    if bytes.len() > KEY_LEN_MAX {
        return KeyHeader::Invalid("the idempotency key is longer than 255 characters");
    }
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return KeyHeader::Invalid(
            "the idempotency key may only contain visible ASCII characters (no spaces)",
        );
    }
    match String::from_utf8(bytes.to_vec()) {
        Ok(key) => KeyHeader::Valid(key),
        Err(_) => KeyHeader::Invalid("the idempotency key is not ASCII"),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn keys_are_checked_for_length_and_characters() {
        let name = HeaderName::from_static("idempotency-key");
        let check = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(&name, HeaderValue::from_bytes(value).expect("valid header"));
            read_key(&headers, &name)
        };
        assert!(matches!(check(b"abc-123"), KeyHeader::Valid(k) if k == "abc-123"));
        assert!(matches!(check(b"\"abc\""), KeyHeader::Valid(k) if k == "abc"));
        assert!(matches!(check(&[b'k'; 255]), KeyHeader::Valid(_)));
        assert!(matches!(check(&[b'k'; 256]), KeyHeader::Invalid(_)));
        assert!(matches!(check(b"has space"), KeyHeader::Invalid(_)));
        assert!(matches!(check(b"\"\""), KeyHeader::Invalid(_)));
        assert!(matches!(check(b"caf\xc3\xa9"), KeyHeader::Invalid(_)));
        assert!(matches!(
            read_key(&HeaderMap::new(), &name),
            KeyHeader::Absent
        ));
    }
}
