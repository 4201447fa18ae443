//! The fixed vocabularies that describe what happened: a request's `Outcome` and `Reason`,
//! and the labels of store calls, purges, session checks and background refreshes.
//!
//! One value of each feeds the access log, the metric label and (for requests) the
//! `Cache-Status` header alike, through `as_str`. A leaf: it imports nothing from the crate,
//! so the metrics sit below every module that counts.

/// A vocabulary whose every value is known and has a stable name.
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
    /// Position in `ALL`.
    fn index(self) -> usize;
}

macro_rules! label {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant,)+];

            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            fn index(self) -> usize {
                self as usize
            }
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                Label::as_str(self)
            }
        }
    };
}

label! {
    /// What happened to one request.
    Outcome {
        /// Served from a fresh stored entry.
        Hit => "hit",
        /// Fetched from the upstream and stored (or being stored).
        Miss => "miss",
        /// Served from a stale entry (while revalidating, or because the upstream failed).
        Stale => "stale",
        /// The cache was not consulted (no cache rule, unsafe method, store unavailable...).
        Bypass => "bypass",
        /// Fetched from the upstream; the response may not be stored.
        Uncacheable => "uncacheable",
        /// cachegate answered with an error.
        Error => "error",
        /// A stale entry was revalidated with the upstream (304) and served.
        Revalidated => "revalidated",
        /// Served from another request's concurrent fill.
        Coalesced => "coalesced",
    }
}

label! {
    /// Why: the `detail` of `Cache-Status`, decided by the phase that decided.
    Reason {
        /// A rule matched, but it does not cache this request (no ttl, not GET/HEAD).
        NotCached => "not-cached",
        /// No rule matches the path.
        NoRule => "no-rule",
        /// Answered from the in-process tier over Redis (no store command).
        L1 => "l1",
        /// A method or URL override header: never cached.
        Override => "override",
        /// The request carries Authorization and the entry would be shared.
        Authorization => "authorization",
        /// The request carries a credential header and the entry would be shared.
        Credentials => "credentials",
        /// Purges wait for the store: reads bypass it until they land.
        PurgePending => "purge-pending",
        /// The store could not be asked.
        StoreUnavailable => "store-unavailable",
        /// Waiting on another request's fill gave nothing usable.
        CoalesceFailed => "coalesce-failed",
        /// The request said `no-store`.
        RequestNoStore => "request-no-store",
        /// The entry was filled before one of its tags was purged.
        Purged => "purged",
        /// The stored bytes are not a valid entry.
        UnreadableEntry => "unreadable-entry",
        /// Served stale while one background refresh runs.
        StaleWhileRevalidate => "stale-while-revalidate",
        /// Served stale because the upstream failed.
        StaleIfError => "stale-if-error",
        /// A write succeeded but its purge waits for the store.
        PurgeQueued => "purge-queued",
        /// The status may not be stored.
        Status => "status",
        /// The response sets a cookie.
        SetCookie => "set-cookie",
        /// `Vary: *`.
        VaryStar => "vary-star",
        /// `Cache-Control: private`.
        Private => "private",
        /// `Cache-Control: no-store`.
        NoStore => "no-store",
        /// `origin_cache_control = "only"` and the origin gave no freshness.
        NoExplicitFreshness => "no-explicit-freshness",
        /// `no-cache` without a validator: every reuse would be a full refetch.
        NoCacheWithoutValidator => "no-cache-without-validator",
        /// Already stale when it arrived.
        StaleOnArrival => "stale-on-arrival",
        /// Larger than `max_object_size`.
        TooLarge => "too-large",
        /// The origin varies on a credential a fill may not send.
        VaryCredential => "vary-credential",
        /// cachegate answered with an error (its code is in the body).
        Error => "error",
    }
}

label! {
    /// A store operation, as labelled in `cachegate_store_*` metrics.
    StoreOp {
        Lookup => "lookup",
        Put => "put",
        Init => "init",
        Bump => "bump",
        Session => "session",
        Lock => "lock",
        Ping => "ping",
    }
}

label! {
    /// Why a purge happened, as labelled in `cachegate_purges_total`.
    Trigger {
        Write => "write",
        Admin => "admin",
        Logout => "logout",
    }
}

label! {
    /// A session gate decision, as labelled in `cachegate_auth_total`.
    AuthResult {
        Valid => "valid",
        MissingToken => "missing_token",
        Malformed => "malformed",
        InvalidSignature => "invalid_signature",
        Expired => "expired",
        Superseded => "superseded",
        SessionMissing => "session_missing",
        StoreError => "store_error",
    }
}

label! {
    /// How a background refresh ended, as labelled in `cachegate_background_refreshes_total`.
    RefreshResult {
        Refreshed => "refreshed",
        NotModified => "not_modified",
        Uncacheable => "uncacheable",
        Error => "error",
    }
}

label! {
    /// How a configuration reload ended, as labelled in `cachegate_config_reloads_total`.
    ReloadResult {
        Success => "success",
        Failure => "failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distinct<L: Label>() {
        let mut names: Vec<&str> = L::ALL.iter().map(|l| l.as_str()).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "label names are distinct");
        for (i, l) in L::ALL.iter().enumerate() {
            assert_eq!(l.index(), i);
        }
    }

    #[test]
    fn every_vocabulary_has_distinct_names_in_index_order() {
        distinct::<Outcome>();
        distinct::<Reason>();
        distinct::<StoreOp>();
        distinct::<Trigger>();
        distinct::<AuthResult>();
        distinct::<RefreshResult>();
        distinct::<ReloadResult>();
    }
}
