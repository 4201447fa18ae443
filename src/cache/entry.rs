//! The stored form of one cached response: a versioned binary envelope.
//!
//! Layout (little-endian), version 1:
//! ```text
//! "CGE" version:u8 | key:16 | status:u16 | flags:u16 | stored_at_ms:u64 | age_at_store_s:u32
//! | fresh_until_ms:u64 | swr_until_ms:u64 | sie_until_ms:u64
//! | gens:u16 x (tag:16 gen:u64) | vary:u16 x (name_len:u16 name) | headers:u16 x (name_len:u16 name value_len:u32 value)
//! | body_len:u32 body
//! ```
//! Decoding never panics and never trusts a length: anything malformed, truncated, of
//! another version, or filed under a different key is an error the caller treats as a miss.
//! A decoded entry's body and header values share the stored buffer (no copy).

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::key::Id;

const MAGIC: &[u8; 3] = b"CGE";
const VERSION: u8 = 1;

/// Entry flags.
pub mod flags {
    /// The origin asked for revalidation before every reuse (`no-cache`).
    pub const NO_CACHE: u16 = 1;
    /// Stale reuse is forbidden (`must-revalidate` / `proxy-revalidate` / s-maxage).
    pub const MUST_REVALIDATE: u16 = 2;
    /// Not a response: a marker saying the origin varies on `vary`, whose variants are
    /// stored under keys that include those request headers.
    pub const VARY_INDEX: u16 = 4;
}

/// One cached response and its bookkeeping.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The entry key this was stored under; checked on decode.
    pub key: Id,
    pub status: StatusCode,
    pub flags: u16,
    /// Unix milliseconds when the response was received from the origin.
    pub stored_at_ms: u64,
    /// Age the response already had when it was received (origin `Age`, RFC 9111 §4.2.3).
    pub age_at_store_s: u32,
    pub fresh_until_ms: u64,
    /// End of the stale-while-revalidate window.
    pub swr_until_ms: u64,
    /// End of the stale-if-error window.
    pub sie_until_ms: u64,
    /// The tag generations current when the fill began.
    pub gens: Vec<(Id, u64)>,
    /// Request header names the origin's `Vary` named (lower-case, sorted).
    pub vary: Vec<HeaderName>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why stored bytes are not a usable entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a cachegate entry")]
    Foreign,
    #[error("entry version {0} is not supported")]
    Version(u8),
    #[error("entry is truncated or malformed")]
    Malformed,
    #[error("entry was filed under another key")]
    WrongKey,
}

impl Entry {
    /// The last instant any reuse of this entry is allowed.
    pub fn usable_until_ms(&self) -> u64 {
        self.fresh_until_ms
            .max(self.swr_until_ms)
            .max(self.sie_until_ms)
    }

    /// Encode into one buffer.
    pub fn encode(&self) -> Bytes {
        let header_bytes: usize = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.as_str().len() + v.len())
            .sum();
        let vary_bytes: usize = self.vary.iter().map(|n| 2 + n.as_str().len()).sum();
        let mut b = BytesMut::with_capacity(
            64 + self.gens.len() * 24 + vary_bytes + header_bytes + self.body.len() + 16,
        );
        b.put_slice(MAGIC);
        b.put_u8(VERSION);
        b.put_slice(&self.key.0);
        b.put_u16_le(self.status.as_u16());
        b.put_u16_le(self.flags);
        b.put_u64_le(self.stored_at_ms);
        b.put_u32_le(self.age_at_store_s);
        b.put_u64_le(self.fresh_until_ms);
        b.put_u64_le(self.swr_until_ms);
        b.put_u64_le(self.sie_until_ms);
        b.put_u16_le(self.gens.len().min(u16::MAX as usize) as u16);
        for (tag, generation) in self.gens.iter().take(u16::MAX as usize) {
            b.put_slice(&tag.0);
            b.put_u64_le(*generation);
        }
        b.put_u16_le(self.vary.len().min(u16::MAX as usize) as u16);
        for name in self.vary.iter().take(u16::MAX as usize) {
            b.put_u16_le(name.as_str().len() as u16);
            b.put_slice(name.as_str().as_bytes());
        }
        let count = self.headers.len().min(u16::MAX as usize);
        b.put_u16_le(count as u16);
        for (name, value) in self.headers.iter().take(count) {
            b.put_u16_le(name.as_str().len() as u16);
            b.put_slice(name.as_str().as_bytes());
            b.put_u32_le(value.len() as u32);
            b.put_slice(value.as_bytes());
        }
        b.put_u32_le(self.body.len() as u32);
        b.put_slice(&self.body);
        b.freeze()
    }

    /// Decode bytes read under `expected_key`.
    pub fn decode(buf: Bytes, expected_key: &Id) -> Result<Entry, DecodeError> {
        let mut r = Reader { buf: &buf, pos: 0 };
        if r.take(3).map_err(|_| DecodeError::Foreign)? != MAGIC {
            return Err(DecodeError::Foreign);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(r.take(16)?);
        if key != expected_key.0 {
            return Err(DecodeError::WrongKey);
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Malformed)?;
        let flags = r.u16()?;
        let stored_at_ms = r.u64()?;
        let age_at_store_s = r.u32()?;
        let fresh_until_ms = r.u64()?;
        let swr_until_ms = r.u64()?;
        let sie_until_ms = r.u64()?;
        let n = r.u16()? as usize;
        let mut gens = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let mut tag = [0u8; 16];
            tag.copy_from_slice(r.take(16)?);
            gens.push((Id(tag), r.u64()?));
        }
        let n = r.u16()? as usize;
        let mut vary = Vec::with_capacity(n.min(16));
        for _ in 0..n {
            let len = r.u16()? as usize;
            vary.push(HeaderName::from_bytes(r.take(len)?).map_err(|_| DecodeError::Malformed)?);
        }
        let n = r.u16()? as usize;
        let mut headers = HeaderMap::with_capacity(n.min(128));
        for _ in 0..n {
            let len = r.u16()? as usize;
            let name = HeaderName::from_bytes(r.take(len)?).map_err(|_| DecodeError::Malformed)?;
            let len = r.u32()? as usize;
            let start = r.pos;
            r.take(len)?;
            let value = HeaderValue::from_maybe_shared(buf.slice(start..start + len))
                .map_err(|_| DecodeError::Malformed)?;
            headers.append(name, value);
        }
        let len = r.u32()? as usize;
        let start = r.pos;
        r.take(len)?;
        if r.pos != buf.len() {
            return Err(DecodeError::Malformed);
        }
        let body = buf.slice(start..start + len);
        Ok(Entry {
            key: Id(key),
            status,
            flags,
            stored_at_ms,
            age_at_store_s,
            fresh_until_ms,
            swr_until_ms,
            sie_until_ms,
            gens,
            vary,
            headers,
            body,
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Malformed)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Malformed)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Entry {
            key: Id([7; 16]),
            status: StatusCode::OK,
            flags: flags::NO_CACHE,
            stored_at_ms: 1_700_000_000_000,
            age_at_store_s: 3,
            fresh_until_ms: 1_700_000_060_000,
            swr_until_ms: 1_700_000_090_000,
            sie_until_ms: 1_700_000_600_000,
            gens: vec![(Id([1; 16]), 42), (Id([2; 16]), 7)],
            vary: vec![HeaderName::from_static("accept-language")],
            headers,
            body: Bytes::from_static(b"{\"id\":42}"),
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let d = Entry::decode(e.encode(), &e.key).unwrap();
        assert_eq!(d.status, e.status);
        assert_eq!(d.flags, e.flags);
        assert_eq!(d.stored_at_ms, e.stored_at_ms);
        assert_eq!(d.age_at_store_s, 3);
        assert_eq!(d.fresh_until_ms, e.fresh_until_ms);
        assert_eq!(d.swr_until_ms, e.swr_until_ms);
        assert_eq!(d.sie_until_ms, e.sie_until_ms);
        assert_eq!(d.gens, e.gens);
        assert_eq!(d.vary, e.vary);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.body, e.body);
        assert_eq!(d.usable_until_ms(), 1_700_000_600_000);
    }

    #[test]
    fn garbage_truncation_and_foreign_keys_are_errors() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(
            Entry::decode(Bytes::from_static(b"hello"), &e.key).unwrap_err(),
            DecodeError::Foreign
        );
        assert_eq!(
            Entry::decode(Bytes::new(), &e.key).unwrap_err(),
            DecodeError::Foreign
        );
        assert_eq!(
            Entry::decode(bytes.clone(), &Id([8; 16])).unwrap_err(),
            DecodeError::WrongKey
        );
        for cut in 4..bytes.len() {
            assert!(
                Entry::decode(bytes.slice(..cut), &e.key).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(
            Entry::decode(Bytes::from(longer), &e.key).unwrap_err(),
            DecodeError::Malformed
        );
        let mut v2 = bytes.to_vec();
        v2[3] = 2;
        assert_eq!(
            Entry::decode(Bytes::from(v2), &e.key).unwrap_err(),
            DecodeError::Version(2)
        );
    }

    #[test]
    fn every_single_byte_corruption_is_handled() {
        let e = sample();
        let bytes = e.encode().to_vec();
        for i in 0..bytes.len() {
            let mut c = bytes.clone();
            c[i] ^= 0xff;
            // Must not panic; may decode (e.g. a changed timestamp) or fail.
            let _ = Entry::decode(Bytes::from(c), &e.key);
        }
    }
}
