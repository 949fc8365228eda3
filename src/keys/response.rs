//! The HTTP response a key's outcome may carry (`response_status`,
//! `response_headers`, `response_body` of `idem_finish` and `idem_fail`),
//! checked before it is stored, so that a replay can send it as it is:
//! a final status code, headers that cannot split or reframe a response,
//! and a body of any bytes.
use crate::canonical::jsonb::JsonbTree;
use crate::canonical::{Node, Tree};
use crate::ledger::Response;
use crate::pg::errors::{error, name_key, Code};
use crate::pg::fmgr::Args;
use pgrx::pg_sys;

/// The response given in arguments `first` (status), `first + 1` (headers)
/// and `first + 2` (body).
pub fn from_args(args: &Args, first: usize, key: &str, scope: &str) -> Response {
    let response = Response {
        status: args.i32(first),
        headers: args.datum(first + 1),
        body: args.datum(first + 2),
    };
    match response.status {
        Some(200..=599) => {}
        Some(status) => invalid(
            key,
            scope,
            format!("response_status {status} is not the status code of a final HTTP response"),
            "Pass a status code from 200 to 599.",
        ),
        None if response.headers.is_some() || response.body.is_some() => invalid(
            key,
            scope,
            "a response needs a response_status".into(),
            "Pass response_status with response_headers or response_body.",
        ),
        None => {}
    }
    if let Some(headers) = response.headers {
        check_headers(headers, key, scope);
    }
    response
}

fn invalid(key: &str, scope: &str, what: String, hint: &str) -> ! {
    error(
        Code::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("{what}, for {}", name_key(key, scope)),
    )
    .hint(hint)
    .raise()
}

/// Fields that frame a message or belong to one connection: the server sets
/// them for each response it sends, so a stored one could contradict the
/// replayed body's length or the replaying connection.
const PER_CONNECTION: [&[u8]; 8] = [
    b"connection",
    b"content-length",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

/// An object whose member names are HTTP field names (RFC 9110 tokens),
/// distinct when compared as HTTP does (ignoring case) and none of
/// `PER_CONNECTION`, and whose values are strings, or arrays of strings for
/// a field given more than once, of visible ASCII characters, spaces and
/// tabs: every HTTP library sends those as they are, where a control
/// character could end the header and other characters are refused or
/// re-encoded by some.
fn check_headers(headers: pg_sys::Datum, key: &str, scope: &str) {
    const HINT: &str = "Pass an object such as {\"content-type\": \"application/json\"}, with an array of strings for a header sent more than once.";
    // SAFETY: the argument is declared jsonb (checked by Args::new); the
    // detoasted value lives in the call's memory context until it ends.
    let tree = unsafe {
        JsonbTree::new(pg_sys::pg_detoast_datum(headers.cast_mut_ptr()) as *const pg_sys::Jsonb)
    };
    let Node::Object(object) = tree.root() else {
        invalid(
            key,
            scope,
            "response_headers must be a JSON object".into(),
            HINT,
        )
    };
    let mut members = Vec::new();
    tree.members(object, &mut members);
    let mut names: Vec<Vec<u8>> = members
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        invalid(
            key,
            scope,
            format!(
                "response header \"{}\" is given twice (header names ignore case)",
                String::from_utf8_lossy(&twice[0])
            ),
            "Give a header sent more than once as one name with an array of values.",
        );
    }
    for (name, value) in members {
        let shown = String::from_utf8_lossy(name);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            invalid(
                key,
                scope,
                format!("response header name \"{shown}\" is not an HTTP field name"),
                "Header names are tokens: letters, digits and !#$%&'*+-.^_`|~.",
            );
        }
        if PER_CONNECTION.iter().any(|h| name.eq_ignore_ascii_case(h)) {
            invalid(
                key,
                scope,
                format!("response header \"{shown}\" is set for each response by the server that sends it"),
                "Leave framing and per-connection headers (content-length, transfer-encoding, connection, ...) out of response_headers.",
            );
        }
        // One value: a string of the characters a header value can hold.
        let check_value = |node| {
            match node {
                Node::String(v) if v.iter().all(|&b| is_value_byte(b)) => {}
                Node::String(_) => invalid(
                    key,
                    scope,
                    format!("response header \"{shown}\" has a character that a header value cannot hold"),
                    "Header values are visible ASCII characters, spaces and tabs; encode others (RFC 8187) first.",
                ),
                _ => invalid(
                    key,
                    scope,
                    format!("response header \"{shown}\" has a value that is not a string"),
                    HINT,
                ),
            }
        };
        match value {
            Node::Array(items) => tree.items(items).for_each(check_value),
            one => check_value(one),
        }
    }
}

/// Visible ASCII, space or tab: RFC 9110 `field-vchar` without `obs-text`.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b)
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::{is_tchar, is_value_byte};

    #[test]
    fn field_name_characters() {
        for b in b"Content-Type X_Custom.1 a!#$%&'*+-.^_`|~".iter() {
            assert_eq!(is_tchar(*b), *b != b' ', "{}", *b as char);
        }
        for b in b" :\"(),/;<=>?@[\\]{}\t\r\n\x00\x7f\xc3".iter() {
            assert!(!is_tchar(*b), "{:?}", *b as char);
        }
    }

    #[test]
    fn field_value_characters() {
        for b in b"text/html; charset=utf-8\t<https://a.example/?q=1>; rel=\"next\"~".iter() {
            assert!(is_value_byte(*b), "{:?}", *b as char);
        }
        // Controls (a bare CR or LF ends a header), DEL, and the bytes of
        // non-ASCII characters.
        for b in b"\x00\x01\x08\n\x0b\x0c\r\x1b\x1f\x7f\x80\xc3\xa9\xff".iter() {
            assert!(!is_value_byte(*b), "{:#x}", *b);
        }
    }
}
