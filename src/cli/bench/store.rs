//! The bench's own event store: a database beside the configured one, created for the run
//! and dropped after it.
//!
//! The bench appends hundreds of thousands of synthetic events. In the deployment's event
//! store they would stay for good: every later `rebuild-projection` would project them into
//! the real read models, and each run would replay all earlier runs' events too (one local
//! store had grown to 9.3 GB, and the rebuild figures with it). In a database of its own,
//! every run starts from an empty store and leaves nothing behind.

use anyhow::Context;
use projector::config::Config;
use projector::store::EventStore;

/// A database the bench created (dropped by [`BenchStore::drop_now`]).
pub(super) struct BenchStore {
    /// The configured event store, from which the bench's database is created and dropped.
    admin_url: String,
    name: String,
}

/// `url` with its database replaced by `name` (`None` for a URL that names none, such as a
/// `key=value` connection string).
fn with_database(url: &str, name: &str) -> Option<String> {
    let mut u = url::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "postgres" | "postgresql") || u.path().trim_matches('/').is_empty() {
        return None;
    }
    u.set_path(&format!("/{name}"));
    Some(u.into())
}

/// Run one statement on the configured server (`DROP DATABASE`, once the bench is done).
async fn admin(url: &str, sql: &str) -> Result<(), String> {
    let admin = EventStore::connect(url).await.map_err(|e| e.to_string())?;
    admin
        .client()
        .batch_execute(sql)
        .await
        .map_err(|e| e.to_string())
}

/// A quoted identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl BenchStore {
    /// Create `<database>_<id>` and point `cfg` (and so every worker the bench spawns) at it.
    /// Without the right to create a database, the bench says so and uses the configured
    /// event store as before. An event store that does not answer is an error: every phase
    /// needs it, and its stages would otherwise retry in silence for as long as it is down.
    pub(super) async fn create(cfg: &mut Config, id: &str) -> anyhow::Result<Option<BenchStore>> {
        let admin_url = cfg.postgres.url.clone();
        let server = EventStore::connect(&admin_url)
            .await
            .with_context(|| format!("connecting to the event store at {admin_url}"))?;
        let database = url::Url::parse(&admin_url)
            .ok()
            .map(|u| u.path().trim_matches('/').to_owned())
            .filter(|d| !d.is_empty());
        let Some((name, url)) = database.and_then(|database| {
            let name = format!("{database}_{id}");
            with_database(&admin_url, &name).map(|url| (name, url))
        }) else {
            return Ok(None);
        };
        let create = format!("CREATE DATABASE {}", quoted(&name));
        if let Err(why) = server.client().batch_execute(&create).await {
            println!(
                "  (the bench's events go to the configured event store and stay there: no \
                 database of its own could be created: {why})"
            );
            return Ok(None);
        }
        let own = BenchStore { admin_url, name };
        // The schema first: the stages read parks and pointers before any worker migrates.
        let migrated = match EventStore::connect(&url).await {
            Ok(mut store) => store.migrate().await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(why) = migrated {
            own.drop_now().await;
            println!(
                "  (the bench's own event store could not be migrated, so it uses the configured \
                 one: {why})"
            );
            return Ok(None);
        }
        cfg.postgres.url = url;
        Ok(Some(own))
    }

    /// Drop the bench's database (its connections are closed by the drop).
    pub(super) async fn drop_now(&self) {
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quoted(&self.name)
        );
        if let Err(why) = admin(&self.admin_url, &sql).await {
            println!(
                "  (the bench's database {} was not dropped: {why})",
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_database_sits_beside_the_configured_one() {
        assert_eq!(
            with_database(
                "postgres://projector@127.0.0.1:15432/projector",
                "projector_b1"
            )
            .as_deref(),
            Some("postgres://projector@127.0.0.1:15432/projector_b1")
        );
        assert_eq!(
            with_database("postgresql://u:p@db/events?sslmode=disable", "events_b1").as_deref(),
            Some("postgresql://u:p@db/events_b1?sslmode=disable")
        );
        assert_eq!(with_database("host=db dbname=events", "x"), None);
        assert_eq!(with_database("postgres://db:5432", "x"), None);
        assert_eq!(quoted(r#"a"b"#), r#""a""b""#);
    }
}
