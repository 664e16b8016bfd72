//! Secrets never reach a log line or an error message: connection URLs are printed with
//! their password masked.

/// `scheme://user:secret@host/db` → `scheme://user:***@host/db` (anything that is not a URL
/// with a password is returned unchanged).
pub fn url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => text.to_owned(),
    }
}

/// An error's message with `secret_url` (and its password alone) masked, in case the
/// driver echoes what it was given.
pub fn error(e: &dyn std::fmt::Display, secret_url: &str) -> String {
    let mut msg = e.to_string();
    if let Ok(u) = url::Url::parse(secret_url)
        && let Some(p) = u.password()
        && !p.is_empty()
    {
        msg = msg.replace(secret_url, &url(secret_url)).replace(p, "***");
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_nothing_else_changes() {
        assert_eq!(
            url("postgres://app:s3cret@db:5432/events"),
            "postgres://app:***@db:5432/events"
        );
        assert_eq!(url("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
        assert_eq!(url("not a url"), "not a url");
        let e = "could not connect to postgres://app:s3cret@db/x: password s3cret rejected";
        let m = error(&e, "postgres://app:s3cret@db/x");
        assert!(!m.contains("s3cret"), "{m}");
    }
}
