//! The request fingerprint: SHA-256 over what makes two requests "the same request".

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

/// Length of a fingerprint in bytes (SHA-256).
pub const FINGERPRINT_LEN: usize = 32;

/// A domain tag, so that a fingerprint of this layer can never equal one computed another way;
/// bump the version if the composition below changes.
const DOMAIN: &[u8] = b"idemstore-http-fingerprint-v1";

/// SHA-256 over, in order: a domain tag, the method, the path and query exactly as received,
/// each fingerprinted header (in the configured order: its name, then every value in order,
/// so a missing header differs from an empty one), and the body. Every part is length-prefixed,
/// so moving bytes from one part to the next changes the fingerprint.
pub(crate) fn fingerprint(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    fingerprinted: &[HeaderName],
    body: &[u8],
) -> [u8; FINGERPRINT_LEN] {
    let mut hasher = Sha256::new();
    part(&mut hasher, DOMAIN);
    part(&mut hasher, method.as_str().as_bytes());
    part(
        &mut hasher,
        uri.path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    for name in fingerprinted {
        part(&mut hasher, name.as_str().as_bytes());
        let values = headers.get_all(name);
        hasher.update((values.iter().count() as u64).to_be_bytes());
        for value in values {
            part(&mut hasher, value.as_bytes());
        }
    }
    part(&mut hasher, body);
    hasher.finalize().into()
}

fn part(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(method: &str, uri: &str, body: &[u8]) -> [u8; 32] {
        let method = Method::from_bytes(method.as_bytes()).expect("valid test method");
        let uri: Uri = uri.parse().expect("valid test uri");
        fingerprint(&method, &uri, &HeaderMap::new(), &[], body)
    }

    #[test]
    fn each_part_changes_the_fingerprint() {
        let base = fp("POST", "/v1/charges?x=1", b"amount=1");
        assert_eq!(base, fp("POST", "/v1/charges?x=1", b"amount=1"));
        assert_ne!(base, fp("PATCH", "/v1/charges?x=1", b"amount=1"));
        assert_ne!(base, fp("POST", "/v1/charges?x=2", b"amount=1"));
        assert_ne!(base, fp("POST", "/v1/charges?x=1", b"amount=2"));
    }

    #[test]
    fn fingerprinted_headers_count_missing_and_present_differently() {
        let uri: Uri = "/".parse().expect("valid test uri");
        let name = HeaderName::from_static("x-tenant");
        let mut with = HeaderMap::new();
        with.insert(&name, http::HeaderValue::from_static(""));
        let names = [name];
        let a = fingerprint(&Method::POST, &uri, &HeaderMap::new(), &names, b"");
        let b = fingerprint(&Method::POST, &uri, &with, &names, b"");
        assert_ne!(a, b);
    }
}
