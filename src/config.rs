//! Settings: a TOML file from `config/`, overridden by `PROJECTOR_<SECTION>__<KEY>` variables.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

/// The file used when neither `--config` nor `PROJECTOR_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "config/local.toml";

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub mongo: MongoConfig,
    pub clickhouse: ClickHouseConfig,
    pub views: ViewsConfig,
    pub worker: WorkerConfig,
}

/// Names of the live read models (a rebuild writes a new version beside them).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ViewsConfig {
    pub redis_prefix: String,
    pub mongo_collection: String,
    pub clickhouse_table: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerConfig {
    pub batch_size: usize,
    pub batch_wait_ms: u64,
    pub http_addr: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub topic_prefix: String,
    pub dlq_topic: String,
    pub partitions: i32,
    /// `cooperative-sticky` (incremental rebalances) or an eager one (`range`, `roundrobin`).
    #[serde(default = "default_assignment")]
    pub assignment_strategy: String,
    /// How long a silent (killed) member keeps its partitions.
    #[serde(default = "default_session_timeout")]
    pub session_timeout_ms: u32,
    /// Static group membership (e.g. the pod name of a StatefulSet): a restarted worker takes
    /// its partitions back at once instead of waiting for its old session to expire.
    #[serde(default)]
    pub instance_id: Option<String>,
}

fn default_assignment() -> String {
    "cooperative-sticky".into()
}

fn default_session_timeout() -> u32 {
    6_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PostgresConfig {
    pub url: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RedisConfig {
    pub url: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MongoConfig {
    pub uri: String,
    pub database: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

impl Config {
    /// Load `path` (or the default file), then apply environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PROJECTOR_CONFIG").map(Into::into))
            .unwrap_or_else(|| DEFAULT_CONFIG.into());
        Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed("PROJECTOR_").split("__").ignore(&["config"]))
            .extract()
            .map_err(|e| ConfigError(Box::new(e)))
    }

    /// A copy whose topics, group, dead-letter topic and read models are all named after
    /// `id`, so a test or benchmark run shares nothing with any other.
    pub fn isolated(&self, id: &str) -> Config {
        let mut c = self.clone();
        c.kafka.topic_prefix = format!("{id}.");
        c.kafka.dlq_topic = format!("{id}.dlq");
        c.kafka.group_id = format!("{id}-group");
        c.views.redis_prefix = format!("{id}:c360:");
        c.views.mongo_collection = format!("{id}_orders");
        c.views.clickhouse_table = format!("{id}_facts");
        c
    }

    /// The read models of a rebuilt `version`, beside the live ones: `c360:<version>:`,
    /// `order_views_<version>`, `event_facts_<version>`.
    pub fn versioned_views(&self, version: &str) -> ViewsConfig {
        let v = &self.views;
        // Never nested under the live prefix: retiring one version must not touch another.
        let redis_prefix = match v.redis_prefix.strip_suffix("live:") {
            Some(base) => format!("{base}{version}:"),
            None => format!("{}@{version}:", v.redis_prefix.trim_end_matches(':')),
        };
        ViewsConfig {
            redis_prefix,
            mongo_collection: format!("{}_{version}", v.mongo_collection),
            clickhouse_table: format!("{}_{version}", v.clickhouse_table),
        }
    }

    /// The `PROJECTOR_*` variables that give a child process these names and batch size
    /// (its HTTP endpoint on an ephemeral port).
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "PROJECTOR_KAFKA__TOPIC_PREFIX",
                self.kafka.topic_prefix.clone(),
            ),
            ("PROJECTOR_KAFKA__DLQ_TOPIC", self.kafka.dlq_topic.clone()),
            ("PROJECTOR_KAFKA__GROUP_ID", self.kafka.group_id.clone()),
            (
                "PROJECTOR_VIEWS__REDIS_PREFIX",
                self.views.redis_prefix.clone(),
            ),
            (
                "PROJECTOR_VIEWS__MONGO_COLLECTION",
                self.views.mongo_collection.clone(),
            ),
            (
                "PROJECTOR_VIEWS__CLICKHOUSE_TABLE",
                self.views.clickhouse_table.clone(),
            ),
            (
                "PROJECTOR_WORKER__BATCH_SIZE",
                self.worker.batch_size.to_string(),
            ),
            ("PROJECTOR_WORKER__HTTP_ADDR", "127.0.0.1:0".into()),
        ]
    }

    /// Load for tests and tools run from anywhere inside the repository.
    pub fn load_for_tests() -> Result<Config, ConfigError> {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG);
        Config::load(Some(&file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
                [kafka]
                brokers = "a:1"
                group_id = "g"
                topic_prefix = "events."
                dlq_topic = "events.dlq"
                partitions = 3
                [postgres]
                url = "postgres://file"
                [redis]
                url = "redis://file"
                [mongo]
                uri = "mongodb://file"
                database = "p"
                [clickhouse]
                url = "http://file"
                database = "a"
                [views]
                redis_prefix = "c:"
                mongo_collection = "o"
                clickhouse_table = "f"
                [worker]
                batch_size = 10
                batch_wait_ms = 5
                http_addr = "127.0.0.1:0"
                "#,
            )?;
            jail.set_env("PROJECTOR_POSTGRES__URL", "postgres://env");
            jail.set_env("PROJECTOR_KAFKA__PARTITIONS", "12");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.postgres.url, "postgres://env");
            assert_eq!(c.kafka.partitions, 12);
            assert_eq!(c.redis.url, "redis://file");
            Ok(())
        });
    }

    #[test]
    fn version_names_never_nest_under_the_live_ones() {
        let cfg = Config::load_for_tests().unwrap();
        assert_eq!(cfg.versioned_views("v1").redis_prefix, "c360:v1:");
        let isolated = cfg.isolated("t1");
        let v = isolated.versioned_views("v1");
        assert!(
            !v.redis_prefix.starts_with(&isolated.views.redis_prefix),
            "{}",
            v.redis_prefix
        );
        assert_eq!(v.mongo_collection, "t1_orders_v1");
    }

    #[test]
    fn a_missing_file_is_an_error_not_defaults() {
        assert!(Config::load(Some(Path::new("/nonexistent/x.toml"))).is_err());
    }

    #[test]
    fn the_committed_configs_parse() {
        for f in ["config/local.toml", "config/compose.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::load(Some(&p)).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
