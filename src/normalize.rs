//! Canonical path and query: one spelling per resource, so routing, keys and purges agree.
//!
//! Ambiguous paths (an encoded '/' or '\', dot segments, empty segments, bad escapes) are
//! refused rather than guessed at: an upstream that decodes them differently than we do
//! could be reached past a rule's auth, or poison another path's cache entry. This module
//! never allocates for a path that is already canonical.

use std::borrow::Cow;

/// Longest path (in bytes) accepted; longer ones get 414.
pub const MAX_PATH: usize = 8 * 1024;

/// Why a request target was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with '/'")]
    NotOriginForm,
    #[error("the path contains an encoded '/' or '\\'")]
    EncodedSeparator,
    #[error("the path contains a '.' or '..' segment")]
    DotSegment,
    #[error("the path contains an empty segment ('//')")]
    EmptySegment,
    #[error("the path contains a malformed percent-escape")]
    BadEscape,
    #[error("the path contains a backslash or a control character")]
    BadCharacter,
    #[error("the path contains a ';' (path parameters are read differently by different servers)")]
    PathParameter,
    #[error("the path is longer than 8 KiB")]
    TooLong,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// May this byte appear literally in a path segment (RFC 3986 `pchar` minus '%')?
fn is_pchar(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,;=:@".contains(&b)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Normalize percent-escapes (RFC 3986 §6.2.2): decode unreserved characters, upper-case the
/// hex of the others. Returns `None` for a malformed escape. `forbid` lists decoded bytes
/// that make the input ambiguous (reported as `Err(byte)`).
fn normalize_escapes<'a>(
    input: &'a str,
    forbid: &[u8],
    escape_raw: bool,
) -> Result<Cow<'a, str>, Option<u8>> {
    let bytes = input.as_bytes();
    let needs_work = |b: &u8| {
        *b == b'%'
            || *b >= 0x80
            || (escape_raw && b.is_ascii_graphic() && !is_pchar(*b) && *b != b'/')
    };
    let Some(first) = bytes.iter().position(needs_work) else {
        return Ok(Cow::Borrowed(input));
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    let mut changed = false;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            if b >= 0x80
                || (b.is_ascii_graphic() && !is_pchar(b) && b != b'/' && b != b'%' && escape_raw)
            {
                // Raw bytes outside pchar (UTF-8, '"', '{', ...) get their escaped spelling,
                // the one every other client sends for the same resource.
                out.extend_from_slice(&[
                    b'%',
                    HEX_UPPER[(b >> 4) as usize],
                    HEX_UPPER[(b & 15) as usize],
                ]);
                changed = true;
            } else {
                out.push(b);
            }
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(None);
        };
        let v = h * 16 + l;
        if forbid.contains(&v) {
            return Err(Some(v));
        }
        if is_unreserved(v) {
            out.push(v);
            changed = true;
        } else {
            let upper = [
                b'%',
                HEX_UPPER[(v >> 4) as usize],
                HEX_UPPER[(v & 15) as usize],
            ];
            changed |= upper[1] != bytes[i + 1] || upper[2] != bytes[i + 2];
            out.extend_from_slice(&upper);
        }
        i += 3;
    }
    if !changed {
        return Ok(Cow::Borrowed(input));
    }
    // Only ASCII was written: escapes stay escaped unless they decode to unreserved ASCII.
    Ok(Cow::Owned(String::from_utf8(out).map_err(|_| None)?))
}

/// The canonical form of a request path, or why it is refused.
pub fn canonical_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if raw.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return Err(PathError::BadCharacter);
    }
    if raw.contains(';') {
        return Err(PathError::PathParameter);
    }
    let path = normalize_escapes(raw, b"/\\", true).map_err(|e| match e {
        Some(_) => PathError::EncodedSeparator,
        None => PathError::BadEscape,
    })?;
    if path.len() > 1 {
        // Every segment between slashes; a trailing slash is allowed (it is its own resource).
        let inner = path[1..].strip_suffix('/').unwrap_or(&path[1..]);
        for seg in inner.split('/') {
            match seg {
                "" => return Err(PathError::EmptySegment),
                "." | ".." => return Err(PathError::DotSegment),
                _ => {}
            }
        }
    }
    Ok(path)
}

/// Decode every percent-escape of a single path segment; `None` when malformed or not UTF-8.
pub fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let h = hex(*bytes.get(i + 1)?)?;
            let l = hex(*bytes.get(i + 2)?)?;
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A query parameter name and value in normalized (escape-canonical) spelling.
struct Pair<'a> {
    name: Cow<'a, str>,
    whole: Cow<'a, str>,
}

/// Which parameters survive into the key.
pub enum QueryKeep<'a> {
    All,
    None,
    Only(&'a [String]),
}

/// Normalize a query for the cache key: escapes canonical, empty pairs dropped, parameters
/// filtered by `keep` and sorted by name (the order of repeated names is kept, since
/// `a=1&a=2` and `a=2&a=1` may mean different lists). Malformed escapes are kept verbatim:
/// the query is never used for routing, only hashed.
pub fn normalized_query(raw: Option<&str>, keep: QueryKeep<'_>, out: &mut String) {
    out.clear();
    let Some(raw) = raw else { return };
    if matches!(keep, QueryKeep::None) || raw.is_empty() {
        return;
    }
    let mut pairs: Vec<Pair<'_>> = Vec::new();
    for piece in raw.split('&') {
        if piece.is_empty() {
            continue;
        }
        let whole = normalize_escapes(piece, &[], false).unwrap_or(Cow::Borrowed(piece));
        let name_end = whole.find('=').unwrap_or(whole.len());
        let name = match &whole {
            Cow::Borrowed(s) => Cow::Borrowed(&s[..name_end]),
            Cow::Owned(s) => Cow::Owned(s[..name_end].to_string()),
        };
        if let QueryKeep::Only(list) = keep
            && list.binary_search_by(|n| n.as_str().cmp(&name)).is_err()
        {
            continue;
        }
        pairs.push(Pair { name, whole });
    }
    pairs.sort_by(|a, b| a.name.cmp(&b.name));
    for (i, p) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&p.whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        assert_eq!(canonical_path("/user/42").unwrap(), "/user/42");
        assert!(matches!(
            canonical_path("/user/42").unwrap(),
            Cow::Borrowed(_)
        ));
        assert_eq!(canonical_path("/user/%34%32").unwrap(), "/user/42");
        assert_eq!(canonical_path("/a%2a").unwrap(), "/a%2A");
        assert_eq!(canonical_path("/").unwrap(), "/");
        assert_eq!(canonical_path("/user/42/").unwrap(), "/user/42/");
        assert_eq!(canonical_path("/caf%C3%A9").unwrap(), "/caf%C3%A9");
        assert_eq!(
            canonical_path("/café").unwrap(),
            "/caf%C3%A9",
            "raw UTF-8 gets its escaped spelling"
        );
        assert_eq!(canonical_path("/a\"b{c}").unwrap(), "/a%22b%7Bc%7D");
        assert_eq!(
            canonical_path("/a:b@c!$&'()*+,=").unwrap(),
            "/a:b@c!$&'()*+,="
        );
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(canonical_path("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(canonical_path("/a%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(canonical_path("/a%5Cb"), Err(PathError::EncodedSeparator));
        assert_eq!(canonical_path("/a/../b"), Err(PathError::DotSegment));
        assert_eq!(canonical_path("/a/./b"), Err(PathError::DotSegment));
        assert_eq!(canonical_path("/a/%2e%2e/b"), Err(PathError::DotSegment));
        assert_eq!(canonical_path("/a//b"), Err(PathError::EmptySegment));
        assert_eq!(canonical_path("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(canonical_path("/a%4"), Err(PathError::BadEscape));
        assert_eq!(canonical_path("*"), Err(PathError::NotOriginForm));
        assert_eq!(canonical_path("/a\\b"), Err(PathError::BadCharacter));
        assert_eq!(
            canonical_path("/pub/..;/admin"),
            Err(PathError::PathParameter)
        );
        assert_eq!(canonical_path("/r/42;x"), Err(PathError::PathParameter));
        assert_eq!(
            canonical_path("/r/42%3Bx").unwrap(),
            "/r/42%3Bx",
            "an escaped ';' is data"
        );
        let long = format!("/{}", "a".repeat(MAX_PATH));
        assert_eq!(canonical_path(&long), Err(PathError::TooLong));
    }

    #[test]
    fn segments_decode() {
        assert_eq!(
            percent_decode("alice%40example.com").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(percent_decode("42").as_deref(), Some("42"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    fn q(raw: &str, keep: QueryKeep<'_>) -> String {
        let mut out = String::new();
        normalized_query(Some(raw), keep, &mut out);
        out
    }

    #[test]
    fn query_policies() {
        assert_eq!(q("b=2&a=1", QueryKeep::All), "a=1&b=2");
        assert_eq!(q("a=2&b=1&a=1", QueryKeep::All), "a=2&a=1&b=1");
        assert_eq!(q("&&a=%7e&", QueryKeep::All), "a=~");
        assert_eq!(q("a=%2f", QueryKeep::All), "a=%2F");
        assert_eq!(q("b=2&a=1", QueryKeep::None), "");
        let keep = vec!["page".to_string(), "size".to_string()];
        assert_eq!(
            q("utm=x&size=10&page=2", QueryKeep::Only(&keep)),
            "page=2&size=10"
        );
        assert_eq!(q("bad=%zz", QueryKeep::All), "bad=%zz");
    }
}
