//! The store's key layout, in one place: entry, tag generation and lease keys are stable
//! 128-bit blake3 hashes, hex-encoded under the prefix; session keys are exactly what the
//! session template renders. Each kind has its own type, so a store never has to guess what
//! a key is from its bytes.
//!
//! Every part is streamed into the hasher with its length, so no two different requests
//! can produce the same input, and no request byte ever appears in a Redis key or pattern.
//! The hash is pinned by a golden test: changing it silently empties every deployed cache.

use http::HeaderMap;
use http::HeaderName;
use http::header::{ACCEPT_ENCODING, ACCEPT_LANGUAGE};

/// Domain separation for entry keys; bump the suffix only with a deliberate key migration.
const KEY_DOMAIN: &[u8] = b"cachegate/entry/v1";
/// Domain separation for tag generation keys.
const TAG_DOMAIN: &[u8] = b"cachegate/tag/v1";

/// A 128-bit identity (of a cached request, or of a tag).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Id(pub [u8; 16]);

impl Id {
    /// Lower-case hex, 32 characters.
    pub fn hex(&self) -> [u8; 32] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
        out
    }

    fn from_hasher(h: &blake3::Hasher) -> Id {
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Id(id)
    }

    /// The Redis key `{prefix}{kind}:{hex}`.
    pub fn redis_key(&self, prefix: &str, kind: u8) -> Vec<u8> {
        let mut key = Vec::with_capacity(prefix.len() + 34);
        key.extend_from_slice(prefix.as_bytes());
        key.push(kind);
        key.push(b':');
        key.extend_from_slice(&self.hex());
        key
    }
}

/// Key kinds within the prefix.
pub const ENTRY: u8 = b'e';
pub const GENERATION: u8 = b'g';
pub const LOCK: u8 = b'l';

/// The store key of a cached response: `{prefix}e:{hex}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey(pub Vec<u8>);

/// The store key of a tag's generation: `{prefix}g:{hex}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GenKey(pub Vec<u8>);

/// The store key of a fill lease across instances: `{prefix}l:{hex}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseKey(pub Vec<u8>);

/// The store key of a user's session, exactly as `[auth] session_key` renders it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey(pub String);

/// Builds the hashed keys under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn entry(&self, id: &Id) -> EntryKey {
        EntryKey(id.redis_key(&self.prefix, ENTRY))
    }

    pub fn generation(&self, tag: &Id) -> GenKey {
        GenKey(tag.redis_key(&self.prefix, GENERATION))
    }

    /// The start every generation key shares: `{prefix}g:`.
    pub fn generation_prefix(&self) -> Vec<u8> {
        let mut p = self.prefix.as_bytes().to_vec();
        p.push(GENERATION);
        p.push(b':');
        p
    }

    pub fn lease(&self, id: &Id) -> LeaseKey {
        LeaseKey(id.redis_key(&self.prefix, LOCK))
    }
}

fn part(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The parts of a request that select a cached response.
pub struct KeyParts<'a> {
    pub scheme: &'a str,
    /// Host as the client sent it, lower-cased by the caller.
    pub host: &'a str,
    pub path: &'a str,
    /// Normalized per the rule's query policy.
    pub query: &'a str,
    /// The rule's (and the origin's) varying header names, sorted.
    pub vary: &'a [HeaderName],
    pub headers: &'a HeaderMap,
    /// The verified subject when the rule is user-scoped.
    pub scope: Option<&'a str>,
}

impl KeyParts<'_> {
    /// The entry identity. Header values are fed in order of appearance; a header that is
    /// absent differs from one that is present and empty.
    pub fn id(&self) -> Id {
        let mut h = blake3::Hasher::new();
        h.update(KEY_DOMAIN);
        part(&mut h, self.scheme.as_bytes());
        part(&mut h, self.host.as_bytes());
        part(&mut h, self.path.as_bytes());
        part(&mut h, self.query.as_bytes());
        h.update(&(self.vary.len() as u64).to_le_bytes());
        for name in self.vary {
            part(&mut h, name.as_str().as_bytes());
            if name == ACCEPT_ENCODING {
                // A few buckets, not every spelling browsers send, so variants don't explode.
                h.update(&1u64.to_le_bytes());
                part(&mut h, accept_encoding_bucket(self.headers).as_bytes());
                continue;
            }
            // Field lines are combined and spaces around commas dropped (RFC 9110 §5.3),
            // so spellings of the same list share one entry; absent differs from empty.
            let mut values = self.headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                h.update(&0u64.to_le_bytes());
                continue;
            }
            let mut combined: Vec<u8> = Vec::new();
            for v in values {
                for member in v.as_bytes().split(|b| *b == b',') {
                    if !combined.is_empty() {
                        combined.push(b',');
                    }
                    combined.extend_from_slice(member.trim_ascii());
                }
            }
            if name == ACCEPT_LANGUAGE {
                // Language tags are case-insensitive (RFC 4647).
                combined.make_ascii_lowercase();
            }
            h.update(&1u64.to_le_bytes());
            part(&mut h, &combined);
        }
        match self.scope {
            None => {
                h.update(&[0]);
            }
            Some(sub) => {
                h.update(&[1]);
                part(&mut h, sub.as_bytes());
            }
        }
        Id::from_hasher(&h)
    }
}

/// The coding a client's `Accept-Encoding` is bucketed into: `gzip` when it accepts gzip,
/// else `br` when it accepts brotli, else `identity`. Fills forward the bucket, so a stored
/// variant is always one every client of its bucket can decode.
pub fn accept_encoding_bucket(headers: &HeaderMap) -> &'static str {
    let mut gzip = false;
    let mut br = false;
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if refused {
                continue;
            }
            match coding.as_str() {
                "gzip" | "x-gzip" | "*" => gzip = true,
                "br" => br = true,
                _ => {}
            }
        }
    }
    if gzip {
        "gzip"
    } else if br {
        "br"
    } else {
        "identity"
    }
}

/// The identity of a tag such as `user:42`.
pub fn tag_id(tag: &str) -> Id {
    let mut h = blake3::Hasher::new();
    h.update(TAG_DOMAIN);
    part(&mut h, tag.as_bytes());
    Id::from_hasher(&h)
}

/// The global tag every entry carries: bumping it purges the whole cache. Its text, `*`, is
/// refused as a configured tag.
pub fn global_tag() -> Id {
    static GLOBAL: std::sync::LazyLock<Id> = std::sync::LazyLock::new(|| tag_id("*"));
    *GLOBAL
}

/// The implicit tag every entry of a canonical path carries (RFC 9111 §4.4).
pub fn path_tag(path: &str) -> Id {
    let mut h = blake3::Hasher::new();
    h.update(TAG_DOMAIN);
    // Same framing as `tag_id("path:" + path)`, without building the string.
    h.update(&((path.len() + 5) as u64).to_le_bytes());
    h.update(b"path:");
    h.update(path.as_bytes());
    Id::from_hasher(&h)
}

/// The tag of everything cached for one session subject.
pub fn subject_tag(sub: &str) -> Id {
    let mut h = blake3::Hasher::new();
    h.update(TAG_DOMAIN);
    h.update(&((sub.len() + 4) as u64).to_le_bytes());
    h.update(b"sub:");
    h.update(sub.as_bytes());
    Id::from_hasher(&h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parts<'a>(
        headers: &'a HeaderMap,
        vary: &'a [HeaderName],
        scope: Option<&'a str>,
    ) -> KeyParts<'a> {
        KeyParts {
            scheme: "http",
            host: "api.example.com",
            path: "/user/42",
            query: "a=1&b=2",
            vary,
            headers,
            scope,
        }
    }

    /// Pins the key function: if this changes, every deployed cache is silently emptied
    /// and two releases sharing a Redis stop sharing entries. The expected values were
    /// computed outside this code base (Python `blake3` over the framing documented above:
    /// domain, then each part as u64-LE length + bytes, vary count, values, scope byte).
    #[test]
    fn golden_key() {
        let mut headers = HeaderMap::new();
        headers.insert("accept-language", HeaderValue::from_static("fr"));
        let vary = [HeaderName::from_static("accept-language")];
        let key = parts(&headers, &vary, None)
            .id()
            .redis_key("cachegate:", ENTRY);
        assert_eq!(
            String::from_utf8(key).unwrap(),
            "cachegate:e:1b5bb600a82a89b80b92682207e69fd6"
        );
        assert_eq!(
            String::from_utf8(tag_id("user:42").redis_key("cachegate:", GENERATION)).unwrap(),
            "cachegate:g:87e7bbc3dd5a2a006a008b746cfccdab"
        );
    }

    #[test]
    fn parts_are_framed() {
        let headers = HeaderMap::new();
        let a = KeyParts {
            path: "/ab",
            query: "c",
            ..parts(&headers, &[], None)
        }
        .id();
        let b = KeyParts {
            path: "/a",
            query: "bc",
            ..parts(&headers, &[], None)
        }
        .id();
        assert_ne!(a, b);
        assert_ne!(
            parts(&headers, &[], Some("1")).id(),
            parts(&headers, &[], Some("2")).id()
        );
        assert_ne!(
            parts(&headers, &[], None).id(),
            parts(&headers, &[], Some("")).id()
        );
    }

    #[test]
    fn vary_values_split_keys_and_absence_differs_from_empty() {
        let vary = [HeaderName::from_static("accept-language")];
        let none = HeaderMap::new();
        let mut empty = HeaderMap::new();
        empty.insert("accept-language", HeaderValue::from_static(""));
        let mut fr = HeaderMap::new();
        fr.insert("accept-language", HeaderValue::from_static("fr"));
        let ids = [&none, &empty, &fr].map(|h| parts(h, &vary, None).id());
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[1], ids[2]);
    }

    #[test]
    fn vary_values_are_normalized() {
        let vary = [
            HeaderName::from_static("accept-language"),
            HeaderName::from_static("x-list"),
        ];
        let mk = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            m
        };
        let a = mk(&[("accept-language", "fr, en"), ("x-list", "a,b")]);
        let b = mk(&[
            ("accept-language", "FR,en"),
            ("x-list", "a"),
            ("x-list", "b"),
        ]);
        assert_eq!(parts(&a, &vary, None).id(), parts(&b, &vary, None).id());
        let c = mk(&[("accept-language", "fr, en"), ("x-list", "A,b")]);
        assert_ne!(
            parts(&a, &vary, None).id(),
            parts(&c, &vary, None).id(),
            "other headers keep their case"
        );
    }

    #[test]
    fn accept_encoding_is_bucketed() {
        let bucket = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(ACCEPT_ENCODING, http::HeaderValue::from_static(v));
            accept_encoding_bucket(&h)
        };
        assert_eq!(bucket("gzip, deflate, br"), "gzip");
        assert_eq!(bucket("br"), "br");
        assert_eq!(bucket("gzip;q=0, br"), "br");
        assert_eq!(bucket("deflate"), "identity");
        assert_eq!(accept_encoding_bucket(&HeaderMap::new()), "identity");
        let vary = [ACCEPT_ENCODING];
        let mut a = HeaderMap::new();
        a.insert(
            ACCEPT_ENCODING,
            http::HeaderValue::from_static("gzip, deflate"),
        );
        let mut b = HeaderMap::new();
        b.insert(
            ACCEPT_ENCODING,
            http::HeaderValue::from_static("deflate, gzip;q=0.8"),
        );
        assert_eq!(
            parts(&a, &vary, None).id(),
            parts(&b, &vary, None).id(),
            "same bucket, same entry"
        );
    }

    #[test]
    fn implicit_tags_match_their_spelled_out_form() {
        assert_eq!(path_tag("/user/42"), tag_id("path:/user/42"));
        assert_eq!(subject_tag("42"), tag_id("sub:42"));
    }
}
