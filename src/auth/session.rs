//! Sessions in the store: the one valid token of each user, read, set (login capture),
//! ended (logout: only while it still holds the token presented) or deleted (admin), always
//! through the guarded store, so an outage is an error the caller turns into a 503, never
//! a "no session" that would be a 401.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::cache::key::SessionKey;
use crate::cache::store::{Guarded, StoreError};

/// Typed session operations over the guarded store.
#[derive(Clone)]
pub struct SessionStore {
    store: Arc<Guarded>,
}

impl SessionStore {
    pub fn new(store: Arc<Guarded>) -> SessionStore {
        SessionStore { store }
    }

    /// The token stored for a session, if any (bounded read).
    pub async fn get(&self, key: &SessionKey) -> Result<Option<Bytes>, StoreError> {
        Ok(self.store.lookup(None, Some(key), &[]).await?.session)
    }

    /// Make `token` the session's one valid token.
    pub async fn set(
        &self,
        key: &SessionKey,
        token: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.store
            .session_set(key, Bytes::copy_from_slice(token.as_bytes()), ttl)
            .await
    }

    /// End the session only while it holds `token` (an old token cannot end a newer login).
    pub async fn end(&self, key: &SessionKey, token: &str) -> Result<bool, StoreError> {
        self.store
            .session_end(key, Bytes::copy_from_slice(token.as_bytes()))
            .await
    }

    /// End the session whatever it holds (admin force logout).
    pub async fn delete(&self, key: &SessionKey) -> Result<bool, StoreError> {
        self.store.session_delete(key).await
    }

    /// `None`: no session; `Some(None)`: one without expiry.
    pub async fn ttl(&self, key: &SessionKey) -> Result<Option<Option<Duration>>, StoreError> {
        self.store.session_ttl(key).await
    }
}
