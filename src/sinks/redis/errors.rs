//! Redis errors as the worker sees them: transient (wait and retry) or permanent (this
//! document's own problem).

use super::{STORE, SinkError};

/// A reply of another shape than the command's (a server of another version, say).
pub(super) fn unexpected(e: impl std::fmt::Display) -> SinkError {
    SinkError::transient(STORE, format!("unexpected reply: {e}"))
}

pub(super) fn classify(e: redis::RedisError) -> SinkError {
    // Credentials or permissions fail every write alike: the deployment's problem, not the
    // documents'. Wait (the circuit opens, the alert fires) rather than dead-letter them all.
    let deployment = matches!(
        e.kind(),
        redis::ErrorKind::AuthenticationFailed
            | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
    ) || e.code().is_some_and(transient_code);
    if deployment {
        return SinkError::transient(STORE, e);
    }
    match e.retry_method() {
        redis::RetryMethod::NoRetry if !e.is_timeout() && !e.is_io_error() => {
            SinkError::permanent(STORE, e)
        }
        _ => SinkError::transient(STORE, e),
    }
}

/// Server errors a later retry can get past (loading, busy script, out of memory for now).
pub(super) fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "BUSY"
            | "TRYAGAIN"
            | "MASTERDOWN"
            | "CLUSTERDOWN"
            | "OOM"
            | "READONLY"
            | "NOSCRIPT"
            | "MOVED"
            | "ASK"
            // The deployment's problems, not the document's: persistence failing (MISCONF),
            // credentials or permissions. Every write would fail alike; wait for them.
            | "MISCONF"
            | "NOAUTH"
            | "WRONGPASS"
            | "NOPERM"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_permissions_wait_rather_than_refuse() {
        let auth =
            redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "bad password"));
        assert!(classify(auth).is_transient());
        let noperm = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm),
            "no permissions to run 'evalsha'",
        ));
        assert!(classify(noperm).is_transient());
        let refused = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "string exceeds maximum allowed size",
        ));
        assert!(!classify(refused).is_transient());
    }
}
