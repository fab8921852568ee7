//! Just enough DER to read two fields of an X.509 certificate: the serial number and the
//! URI entries of the subject alternative name (where a SPIFFE ID lives).
//!
//! rustls and webpki validate chains and DNS/IP names but expose neither field, and a full
//! X.509 parser (`x509-parser` brings `nom`, `asn1-rs`, `der-parser`, `oid-registry`, `time`
//! and their proc-macros) would more than double the TLS part of the build for two lookups.
//! The walk below reads only definite-length TLVs, never allocates, and answers `None` on
//! anything unexpected. It runs on certificates that webpki has already parsed and verified,
//! or on our own files, so "unexpected" means "not there".

/// One TLV: its tag, its content and what follows it.
fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags do not occur in the fields walked here
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The content of the next TLV if it has tag `tag`, and what follows it.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match next(input)? {
        (t, content, rest) if t == tag => Some((content, rest)),
        _ => None,
    }
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// `[0] EXPLICIT Version` in TBSCertificate.
const VERSION: u8 = 0xa0;
/// `[3] EXPLICIT Extensions` in TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
/// `uniformResourceIdentifier [6] IMPLICIT IA5String` in GeneralName.
const GENERAL_NAME_URI: u8 = 0x86;
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: [u8; 3] = [0x55, 0x1d, 0x11];

/// The contents of TBSCertificate, starting at the serial number.
fn tbs_from_serial(cert: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    match next(tbs)? {
        (VERSION, _, rest) => Some(rest),
        _ => Some(tbs),
    }
}

/// The certificate's serial number: the big-endian bytes of the DER INTEGER (a leading zero
/// byte is kept where DER needs one).
pub fn serial(cert: &[u8]) -> Option<&[u8]> {
    expect(tbs_from_serial(cert)?, INTEGER).map(|(serial, _)| serial)
}

/// The serial number as lowercase hex pairs joined by `:`, as `openssl x509 -serial` shows
/// it (minus the DER sign byte), for logs.
pub fn serial_hex(cert: &[u8]) -> Option<String> {
    let s = serial(cert)?;
    let s = match s {
        [0, rest @ ..] if !rest.is_empty() => rest,
        s => s,
    };
    Some(
        s.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Every URI in the certificate's subject alternative name extension, in order.
pub fn uri_sans(cert: &[u8]) -> Vec<&str> {
    let mut out = Vec::new();
    let Some(san) = extension(cert, &SUBJECT_ALT_NAME) else {
        return out;
    };
    let Some((mut names, _)) = expect(san, SEQUENCE) else {
        return out;
    };
    while let Some((tag, value, rest)) = next(names) {
        if tag == GENERAL_NAME_URI {
            if let Ok(uri) = std::str::from_utf8(value) {
                out.push(uri);
            }
        }
        names = rest;
    }
    out
}

/// The value (inside its OCTET STRING) of the extension with this OID.
fn extension<'a>(cert: &'a [u8], oid: &[u8]) -> Option<&'a [u8]> {
    let (_, mut fields) = expect(tbs_from_serial(cert)?, INTEGER)?;
    // signature, issuer, validity, subject, subjectPublicKeyInfo, then optional
    // [1] issuerUniqueID, [2] subjectUniqueID, [3] extensions.
    let mut exts = None;
    while let Some((tag, content, rest)) = next(fields) {
        if tag == EXTENSIONS {
            exts = Some(content);
            break;
        }
        fields = rest;
    }
    let (mut list, _) = expect(exts?, SEQUENCE)?;
    while let Some((ext, rest)) = expect(list, SEQUENCE) {
        list = rest;
        let Some((id, mut after)) = expect(ext, OID) else {
            continue;
        };
        if id != oid {
            continue;
        }
        if let Some((_, rest)) = expect(after, BOOLEAN) {
            after = rest; // `critical`
        }
        return expect(after, OCTET_STRING).map(|(value, _)| value);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(uris: &[&str], dns: &[&str], serial: u64) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for u in uris {
            params.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*u).unwrap(),
            ));
        }
        for d in dns {
            params.subject_alt_names.push(rcgen::SanType::DnsName(
                rcgen::string::Ia5String::try_from(*d).unwrap(),
            ));
        }
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_uri_sans_among_other_names() {
        let der = cert(
            &["spiffe://td/ns/a/sa/b", "https://example.com/x"],
            &["a.example"],
            7,
        );
        assert_eq!(
            uri_sans(&der),
            vec!["spiffe://td/ns/a/sa/b", "https://example.com/x"]
        );
        assert!(uri_sans(&cert(&[], &["only.dns"], 7)).is_empty());
    }

    #[test]
    fn reads_serial_numbers() {
        assert_eq!(
            serial_hex(&cert(&[], &["x"], 0x1234)).as_deref(),
            Some("12:34")
        );
        // High bit set: DER adds a zero byte, which the hex form drops.
        let der = cert(&[], &["x"], 0x80);
        assert_eq!(serial(&der), Some(&[0x00, 0x80][..]));
        assert_eq!(serial_hex(&der).as_deref(), Some("80"));
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        let der = cert(&["spiffe://td/x"], &[], 1);
        for cut in 0..der.len() {
            let _ = uri_sans(&der[..cut]);
            let _ = serial(&der[..cut]);
        }
        assert!(uri_sans(b"\x30\x84\xff\xff\xff\xff").is_empty());
        assert_eq!(serial(&[]), None);
    }
}
