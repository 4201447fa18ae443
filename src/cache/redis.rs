//! The Redis store: the only module that imports the `redis` crate.
//!
//! One shared multiplexed connection (redis-rs `ConnectionManager`) carries every request's
//! commands, so concurrent requests are pipelined on the wire; there is no pool checkout per
//! request. Each trait method is one pipeline, i.e. one round trip. Timeouts and the circuit
//! breaker are applied by the caller (`store::Guarded`); reconnection is the manager's job.
//! Lookups read all their keys with one MGET (much cheaper for Redis than a GET per key);
//! every other command touches one key, and scripts never more than one, so a cluster
//! version only has to group the MGET's keys by slot.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, Pipeline, Value};

use super::store::{BoxFut, Store, StoreError};

/// A Redis-backed store.
pub struct RedisStore {
    conn: ConnectionManager,
}

impl RedisStore {
    /// Build the store without connecting: a Redis that is down at start only bypasses the
    /// cache until it comes up.
    pub fn connect_lazy(
        url: &str,
        password: Option<&str>,
        timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let mut info = url
            .into_connection_info()
            .map_err(|e| StoreError::Backend(format!("invalid Redis URL: {e}")))?;
        if let Some(pw) = password {
            let settings = info.redis_settings().clone().set_password(pw);
            info = info.set_redis_settings(settings);
        }
        let client = Client::open(info).map_err(|e| StoreError::Backend(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
            .set_response_timeout(Some(timeout))
            // Reconnection is retried a few times quickly; the caller's breaker and health
            // probe take over after that, so requests never wait on a long backoff.
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?;
        Ok(RedisStore { conn })
    }

    async fn run(&self, pipe: Pipeline) -> Result<Vec<Value>, StoreError> {
        let mut conn = self.conn.clone();
        pipe.query_async::<Vec<Value>>(&mut conn)
            .await
            .map_err(backend)
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else {
        StoreError::Backend(e.to_string())
    }
}

/// A GET reply as bytes. A value of another type (a hash where an entry should be, say:
/// WRONGTYPE) reads as absent, so the caller treats it as a miss and overwrites it. Any
/// other error reply (LOADING after a restart, BUSY, MASTERDOWN...) is a store fault: it
/// must never read as "no session" (a 401) or "no generation" (a wildcard).
fn bytes_of(v: Value) -> Result<Option<Bytes>, StoreError> {
    match v {
        Value::BulkString(b) => Ok(Some(Bytes::from(b))),
        Value::SimpleString(s) => Ok(Some(Bytes::from(s))),
        Value::Int(i) => Ok(Some(Bytes::from(i.to_string()))),
        Value::ServerError(e) if e.code() == "WRONGTYPE" => Ok(None),
        Value::ServerError(e) => Err(StoreError::Backend(format!(
            "{} {}",
            e.code(),
            e.details().unwrap_or_default()
        ))),
        _ => Ok(None),
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

impl Store for RedisStore {
    fn get_many<'a>(
        &'a self,
        keys: Vec<Vec<u8>>,
    ) -> BoxFut<'a, Result<Vec<Option<Bytes>>, StoreError>> {
        // One MGET, not a GET per key: for Redis, one command of five keys costs far less
        // than five commands. A value of another type reads as nil. (On a cluster the keys
        // would have to be grouped by slot.)
        let mut pipe = redis::pipe();
        pipe.cmd("MGET").arg(&keys);
        Box::pin(async move {
            match self.run(pipe).await?.pop() {
                Some(Value::Array(values)) if values.len() == keys.len() => {
                    values.into_iter().map(bytes_of).collect()
                }
                other => Err(StoreError::Backend(format!(
                    "unexpected MGET reply {other:?}"
                ))),
            }
        })
    }

    fn put<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
        touch: Vec<Vec<u8>>,
        touch_ttl: Duration,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        for (key, value) in &items {
            pipe.cmd("SET")
                .arg(key)
                .arg(value.as_ref())
                .arg("PX")
                .arg(ms(ttl))
                .ignore();
        }
        for k in &touch {
            pipe.cmd("PEXPIRE").arg(k).arg(ms(touch_ttl)).ignore();
        }
        Box::pin(async move { self.run(pipe).await.map(|_| ()) })
    }

    fn init_many<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<Vec<Option<Bytes>>, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (k, v) in &items {
            pipe.cmd("SET")
                .arg(k)
                .arg(v.as_ref())
                .arg("NX")
                .arg("PX")
                .arg(ms(ttl))
                .ignore();
            pipe.cmd("GET").arg(k);
        }
        Box::pin(async move { self.run(pipe).await?.into_iter().map(bytes_of).collect() })
    }

    fn set_many<'a>(
        &'a self,
        items: Vec<(Vec<u8>, Bytes)>,
        ttl: Option<Duration>,
    ) -> BoxFut<'a, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        for (k, v) in &items {
            let cmd = pipe.cmd("SET").arg(k).arg(v.as_ref());
            if let Some(ttl) = ttl {
                cmd.arg("PX").arg(ms(ttl));
            }
            cmd.ignore();
        }
        Box::pin(async move { self.run(pipe).await.map(|_| ()) })
    }

    fn set_nx<'a>(
        &'a self,
        key: Vec<u8>,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&key)
            .arg(value.as_ref())
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl));
        Box::pin(async move {
            let r = self.run(pipe).await?;
            Ok(matches!(
                r.first(),
                Some(Value::Okay) | Some(Value::SimpleString(_))
            ))
        })
    }

    fn del<'a>(&'a self, key: Vec<u8>) -> BoxFut<'a, Result<bool, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&key);
        Box::pin(async move {
            Ok(matches!(self.run(pipe).await?.first(), Some(Value::Int(n)) if *n > 0))
        })
    }

    fn del_if_equals<'a>(
        &'a self,
        key: Vec<u8>,
        value: Bytes,
    ) -> BoxFut<'a, Result<bool, StoreError>> {
        // One key per script: safe on a cluster.
        const SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(SCRIPT)
            .arg(1)
            .arg(&key)
            .arg(value.as_ref());
        Box::pin(async move {
            Ok(matches!(self.run(pipe).await?.first(), Some(Value::Int(n)) if *n > 0))
        })
    }

    fn pttl<'a>(
        &'a self,
        key: Vec<u8>,
    ) -> BoxFut<'a, Result<Option<Option<Duration>>, StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("PTTL").arg(&key);
        Box::pin(async move {
            match self.run(pipe).await?.first() {
                Some(Value::Int(-2)) => Ok(None),
                Some(Value::Int(-1)) => Ok(Some(None)),
                Some(Value::Int(n)) if *n >= 0 => Ok(Some(Some(Duration::from_millis(*n as u64)))),
                other => Err(StoreError::Backend(format!(
                    "unexpected PTTL reply {other:?}"
                ))),
            }
        })
    }

    fn ping(&self) -> BoxFut<'_, Result<(), StoreError>> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        Box::pin(async move { self.run(pipe).await.map(|_| ()) })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
