//! Settings: a TOML file from `config/`, overridden by `PROJECTOR_<SECTION>__<KEY>` variables.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

/// The file used when neither `--config` nor `PROJECTOR_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "config/local.toml";

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Config {
    /// The deployment this process belongs to (`PROJECTOR_DEPLOYMENT`): version pointers,
    /// parks, rebuild checkpoints, retired versions and the published live version are its
    /// own, shared by all of its consumer groups (one per read model), its rebuilds and its
    /// read service. Consumer groups only divide partitions.
    #[serde(default = "default_deployment")]
    pub deployment: String,
    pub kafka: KafkaConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub mongo: MongoConfig,
    pub clickhouse: ClickHouseConfig,
    pub views: ViewsConfig,
    pub worker: WorkerConfig,
    #[serde(default)]
    pub read: ReadConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

fn default_deployment() -> String {
    "projector".into()
}

/// Traces: exported over OTLP/HTTP (protobuf) only when an endpoint is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct TelemetryConfig {
    /// The collector's base URL (e.g. `http://otel-collector:4318`; `/v1/traces` is added
    /// unless the URL already ends with it). Empty: no exporter is installed.
    pub otlp_endpoint: String,
}

impl TelemetryConfig {
    /// Where spans are POSTed, or `None` when export is off.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.trim();
        if base.is_empty() {
            return None;
        }
        let base = base.trim_end_matches('/');
        Some(if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        })
    }
}

/// The read service (`projector serve`): agents' HTTP API and MCP tools.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ReadConfig {
    pub http_addr: String,
    /// Bearer tokens accepted, from the environment only (`PROJECTOR_READ__TOKENS`,
    /// comma-separated), never from a committed file.
    #[serde(skip_serializing)]
    pub tokens: Option<String>,
    /// A file of accepted tokens, one per line (e.g. a mounted Kubernetes secret).
    pub token_file: Option<std::path::PathBuf>,
    /// Requests served at once; more wait up to a second, then get 503.
    pub max_concurrent: usize,
    /// The longest a read-your-writes request may wait for its event.
    pub max_wait_ms: u64,
    /// Orders per page at most (and the default page is 20).
    pub max_page: usize,
    /// Rows an analytics answer holds at most.
    pub max_rows: usize,
    /// Bytes of one answer's data at most (a page stops early, with a cursor).
    pub max_bytes: usize,
    /// How long pointers and lag are reused before being read again.
    pub cache_ms: u64,
    /// `Host` headers the MCP endpoint accepts (a DNS-rebinding guard); empty: loopback
    /// names only. Add the service's own name when it is reached through one.
    pub allowed_hosts: Vec<String>,
    /// The consumer group of each read model's workers (projection → group), when they run
    /// in groups of their own (the Kubernetes layout): an answer's freshness carries the lag
    /// of the group that writes it. A projection not named here: `kafka.group_id`.
    pub groups: std::collections::BTreeMap<String, String>,
}

impl Default for ReadConfig {
    fn default() -> Self {
        ReadConfig {
            http_addr: "127.0.0.1:8080".into(),
            tokens: None,
            token_file: None,
            max_concurrent: 64,
            max_wait_ms: 10_000,
            max_page: 100,
            max_rows: 1_000,
            max_bytes: 1 << 20,
            cache_ms: 1_000,
            allowed_hosts: Vec::new(),
            groups: Default::default(),
        }
    }
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
    /// A window (the unit of batching, writing and committing) closes at this many messages…
    #[serde(default = "default_window_size")]
    pub window_size: usize,
    /// …or this long after its first message, whichever comes first.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// …but when nothing else is in flight (every earlier window written), this long after
    /// its first message: an idle pipeline takes what has come at once instead of waiting
    /// out `window_ms`, and a busy one still batches up to it (each write then carries what
    /// came while the last one ran). 0 turns it off.
    #[serde(default = "default_window_idle_ms")]
    pub window_idle_ms: u64,
    /// Bytes of messages (keys, values, headers) a window holds at most: it closes before a
    /// message would take it past this.
    #[serde(default = "default_window_max_bytes")]
    pub window_max_bytes: usize,
    /// Messages polled but not yet committed, at most: beyond it the partitions are paused
    /// (the consumer keeps polling, so it stays in its group) until writes catch up.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Bytes of those messages (keys, values, headers) at most, checked with the count: the
    /// windows in flight, decoded, are most of the worker's memory under load.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Shards per document projector (views split by key across cores); 0 = one per core.
    #[serde(default)]
    pub shards: usize,
    /// Bytes of typed views the worker keeps in memory (each weighed by its encoded size),
    /// split evenly among its document stages (projector × shard), so the common case writes
    /// without a load. The views the batch being folded and the one being written touch are
    /// kept even past it.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: usize,
    /// The same for a replay (`rebuild-projection`, unparking): it is the only writer of its
    /// version, so a view it evicted is read back from the store when next touched. Bounds
    /// what a rebuild caches, whatever the event store holds.
    #[serde(default = "default_replay_cache_bytes")]
    pub replay_cache_bytes: usize,
    /// Replaced by `cache_bytes` (a count of views said nothing about memory); ignored, with
    /// a warning.
    #[serde(default, skip_serializing)]
    pub cache_entries: Option<usize>,
    /// How long a rebalance waits for the revoked partitions' windows to be written and
    /// committed before it lets them go (their new owner then redelivers; guards absorb it).
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Offsets are committed at most this often (a crash redelivers at most this much).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// `/healthz` fails when messages wait and nothing was committed for this long.
    #[serde(default = "default_liveness_stall_secs")]
    pub liveness_stall_secs: u64,
    /// How often every member looks at the whole group (committed offsets, watermarks and
    /// the coordinator's assignment of every partition).
    #[serde(default = "default_group_watch_ms")]
    pub group_watch_ms: u64,
    /// A partition whose committed offset has not moved for this long while messages wait
    /// on it is stalled (`projector_group_stalled_partitions`).
    #[serde(default = "default_partition_stall_secs")]
    pub partition_stall_secs: u64,
    /// A member whose assignment disagrees with the coordinator's this long (longer than a
    /// rebalance takes) re-creates its consumer.
    #[serde(default = "default_assignment_mismatch_secs")]
    pub assignment_mismatch_secs: u64,
    /// Streams whose last sequence passed on is remembered (least recently seen forgotten
    /// first), to find events lost or reordered on the wire; 0 turns that check off.
    #[serde(default = "default_sequence_streams")]
    pub sequence_streams: usize,
    /// How long a gap on the wire waits for the event store to hold the missing events
    /// (an outbox commits before it publishes) before the stream is held.
    #[serde(default = "default_gap_wait_secs")]
    pub gap_wait_secs: u64,
    /// Record, per consumer group and stream, the last sequence every stage made durable
    /// (`stream_positions` in PostgreSQL), and start a stream seen for the first time (after
    /// a restart, a reassignment, a new consumer) from there, so an event lost or swapped on
    /// the wire right at that point is filled in. Off: such an event is taken as it comes.
    #[serde(default = "default_true")]
    pub stream_positions: bool,
    /// How often durable stream positions are written (sooner past 10,000 streams).
    #[serde(default = "default_position_flush_ms")]
    pub position_flush_ms: u64,
    /// The projectors this worker runs (empty: all). One read model per consumer group lets
    /// each scale on its own; all of them stay in one `deployment`.
    #[serde(default)]
    pub projectors: Vec<String>,
    pub http_addr: String,
}

fn default_window_size() -> usize {
    5_000
}
fn default_window_ms() -> u64 {
    100
}
fn default_window_idle_ms() -> u64 {
    5
}
fn default_window_max_bytes() -> usize {
    16 << 20
}
fn default_max_in_flight() -> usize {
    20_000
}
fn default_max_in_flight_bytes() -> usize {
    16 << 20
}
fn default_cache_bytes() -> usize {
    16 << 20
}
fn default_replay_cache_bytes() -> usize {
    128 << 20
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}
fn default_commit_interval_ms() -> u64 {
    500
}
fn default_liveness_stall_secs() -> u64 {
    120
}
fn default_group_watch_ms() -> u64 {
    2_000
}
fn default_partition_stall_secs() -> u64 {
    30
}
fn default_assignment_mismatch_secs() -> u64 {
    20
}
fn default_sequence_streams() -> usize {
    200_000
}
fn default_gap_wait_secs() -> u64 {
    10
}
fn default_true() -> bool {
    true
}
fn default_position_flush_ms() -> u64 {
    1_000
}

impl WorkerConfig {
    /// Shards per document projector, resolved.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .clamp(1, 64)
    }
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
    /// The group's limit between polls. The worker polls continuously on its own thread
    /// whatever the stores do, so only a wedged process ever exceeds it.
    #[serde(default = "default_max_poll_interval")]
    pub max_poll_interval_ms: u32,
    /// Static group membership (e.g. the pod name of a StatefulSet): a restarted worker takes
    /// its partitions back at once instead of waiting for its old session to expire.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The client id of the worker's consumers. Unset (the default): one of its own per
    /// consumer, `projector-<instance>-<uuid>`. Members that share one are told apart by the
    /// coordinator's member id only, and the local broker hands a rejoining static member
    /// another member's partitions when they do.
    #[serde(default)]
    pub client_id: Option<String>,
    /// librdkafka's `debug` contexts for the worker's consumers (e.g. `cgrp` for the group
    /// protocol), logged at debug level under the `librdkafka` target. Unset: none.
    #[serde(default)]
    pub debug: Option<String>,
    /// Dead letters larger than this keep only the head of their payload (the original stays
    /// in the source topic at the offset the headers name).
    #[serde(default = "default_dlq_max_bytes")]
    pub dlq_max_bytes: usize,
    /// The largest response the client accepts. The local broker ignores fetch limits, so it
    /// is large by default; with Apache Kafka it can be set near `fetch_max_bytes`.
    #[serde(default = "default_receive_max")]
    pub receive_message_max_bytes: u64,
    /// Bytes per fetch response (honoured by Apache Kafka).
    #[serde(default = "default_fetch_max")]
    pub fetch_max_bytes: u64,
    /// How long the broker may hold a fetch that has less than `fetch.min.bytes` to return
    /// (librdkafka `fetch.wait.max.ms`): the `broker` step of the latency budget at low
    /// rates. Shorter means fresher answers and more fetch requests.
    #[serde(default = "default_fetch_wait")]
    pub fetch_wait_max_ms: u32,
    /// The least a fetch response should carry before the broker answers it (librdkafka
    /// `fetch.min.bytes`), unless `fetch_wait_max_ms` passes first. 1 answers at the first
    /// message: under a trickle, a fetch per handful of messages, each paid per partition by
    /// the broker and by librdkafka's fetcher.
    #[serde(default = "default_fetch_min")]
    pub fetch_min_bytes: u32,
    /// For a broker that answers empty fetches at once instead of holding them for
    /// `fetch_wait_max_ms` (the local one): once every owned partition has reported its end,
    /// the member pauses them this long before it fetches again, instead of sending
    /// thousands of empty fetches a second (see `source::pace`). At most this much is added
    /// to the `broker` step. 0 (the default, right for Apache Kafka): never pause.
    #[serde(default = "default_idle_pause")]
    pub idle_pause_ms: u64,
}

fn default_fetch_min() -> u32 {
    1
}
fn default_idle_pause() -> u64 {
    0
}

fn default_fetch_wait() -> u32 {
    500
}

fn default_receive_max() -> u64 {
    1_000_000_000
}

fn default_fetch_max() -> u64 {
    16 * 1024 * 1024
}

fn default_assignment() -> String {
    "cooperative-sticky".into()
}

fn default_session_timeout() -> u32 {
    6_000
}

fn default_max_poll_interval() -> u32 {
    30_000
}

fn default_dlq_max_bytes() -> usize {
    900_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PostgresConfig {
    pub url: String,
    #[serde(default = "default_pg_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
}

fn default_pg_timeout() -> u64 {
    10_000
}
fn default_connect_timeout() -> u64 {
    3_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RedisConfig {
    /// The server; with `cluster`, seed nodes separated by commas.
    pub url: String,
    /// Redis Cluster: commands route by key slot and loads are split per slot.
    #[serde(default)]
    pub cluster: bool,
    /// Response timeout of every request.
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
}

fn default_redis_timeout() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MongoConfig {
    pub uri: String,
    pub database: String,
    #[serde(default = "default_store_timeout")]
    pub timeout_ms: u64,
    /// Server selection and connection timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// How many members acknowledge a write before the worker counts it durable (and may
    /// commit its offsets): `"majority"` (the default; a write a failover can roll back was
    /// never acknowledged) or a number of members. Always journaled (`j: true`).
    #[serde(default)]
    pub write_concern: MongoWriteConcern,
}

/// `w` of MongoDB's write concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "RawW", into = "RawW")]
pub enum MongoWriteConcern {
    #[default]
    Majority,
    Nodes(u32),
}

/// As written in a file or the environment: `"majority"` or a number.
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum RawW {
    Nodes(u32),
    Text(String),
}

impl TryFrom<RawW> for MongoWriteConcern {
    type Error = String;
    fn try_from(r: RawW) -> Result<Self, String> {
        match r {
            RawW::Nodes(n) if n > 0 => Ok(MongoWriteConcern::Nodes(n)),
            RawW::Text(s) if s.eq_ignore_ascii_case("majority") => Ok(MongoWriteConcern::Majority),
            RawW::Text(s) if s.parse::<u32>().is_ok_and(|n| n > 0) => {
                Ok(MongoWriteConcern::Nodes(s.parse().unwrap_or(1)))
            }
            _ => Err("mongo.write_concern: \"majority\" or a number of members (1 or more)".into()),
        }
    }
}

impl From<MongoWriteConcern> for RawW {
    fn from(w: MongoWriteConcern) -> RawW {
        match w {
            MongoWriteConcern::Majority => RawW::Text("majority".into()),
            MongoWriteConcern::Nodes(n) => RawW::Nodes(n),
        }
    }
}

fn default_store_timeout() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    #[serde(default)]
    pub user: Option<String>,
    /// From the environment only (`PROJECTOR_CLICKHOUSE__PASSWORD`).
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    #[serde(default = "default_store_timeout")]
    pub timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(#[from] crate::versions::VersionError),
}

impl Config {
    /// The consumer group whose workers write `projection` (`read.groups`, else the
    /// configured group).
    pub fn group_of(&self, projection: &str) -> &str {
        self.read
            .groups
            .get(projection)
            .map_or(self.kafka.group_id.as_str(), String::as_str)
    }

    /// Every consumer group of the deployment (one per read model when they run apart),
    /// sorted, each once.
    pub fn groups(&self) -> Vec<String> {
        let mut g: Vec<String> = projectors::registry::infos()
            .iter()
            .map(|i| self.group_of(i.name).to_owned())
            .collect();
        g.sort();
        g.dedup();
        g
    }

    /// Load `path` (or the default file), then apply environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PROJECTOR_CONFIG").map(Into::into))
            .unwrap_or_else(|| DEFAULT_CONFIG.into());
        let cfg: Config = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed("PROJECTOR_").split("__").ignore(&["config"]))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        crate::versions::validate_deployment(&cfg.deployment)?;
        Ok(cfg)
    }

    /// A copy whose deployment, topics, group, dead-letter topic and read models are all
    /// named after `id`, so a test or benchmark run shares nothing with any other.
    pub fn isolated(&self, id: &str) -> Config {
        let mut c = self.clone();
        c.deployment = id.to_owned();
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

    /// The Redis key naming this deployment's live Customer-360 version, for agents that
    /// read Redis directly: `c360:current@<deployment>` beside `c360:live:`. Never under any
    /// version's prefix (`c360:<version>:`; a version name has no `@`), and one per
    /// deployment, so deployments sharing a Redis never read each other's.
    pub fn redis_pointer_key(&self) -> String {
        let v = &self.views;
        match v.redis_prefix.strip_suffix("live:") {
            Some(base) => format!("{base}current@{}", self.deployment),
            None => format!(
                "{}@current@{}",
                v.redis_prefix.trim_end_matches(':'),
                self.deployment
            ),
        }
    }

    /// The `PROJECTOR_*` variables that give a child process these names and batch size
    /// (its HTTP endpoint on an ephemeral port).
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PROJECTOR_DEPLOYMENT", self.deployment.clone()),
            ("PROJECTOR_POSTGRES__URL", self.postgres.url.clone()),
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
                "PROJECTOR_WORKER__WINDOW_SIZE",
                self.worker.window_size.to_string(),
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
    fn mongo_write_concern_reads_majority_or_a_count() {
        #[derive(Deserialize)]
        struct T {
            w: MongoWriteConcern,
        }
        let w = |text: &str| toml_w(text).map(|t: T| t.w);
        fn toml_w<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
            figment::Figment::from(figment::providers::Toml::string(text))
                .extract()
                .map_err(|e| e.to_string())
        }
        assert_eq!(w("w = \"majority\""), Ok(MongoWriteConcern::Majority));
        assert_eq!(w("w = 2"), Ok(MongoWriteConcern::Nodes(2)));
        assert_eq!(w("w = \"1\""), Ok(MongoWriteConcern::Nodes(1)));
        assert!(w("w = 0").is_err());
        assert!(w("w = \"all\"").is_err());
        assert_eq!(MongoWriteConcern::default(), MongoWriteConcern::Majority);
    }

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
                window_size = 10
                window_ms = 5
                http_addr = "127.0.0.1:0"
                "#,
            )?;
            jail.set_env("PROJECTOR_POSTGRES__URL", "postgres://env");
            jail.set_env("PROJECTOR_KAFKA__PARTITIONS", "12");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                c.telemetry.traces_url(),
                None,
                "trace export is off by default"
            );
            jail.set_env(
                "PROJECTOR_TELEMETRY__OTLP_ENDPOINT",
                "http://collector:4318/",
            );
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                c.telemetry.traces_url().as_deref(),
                Some("http://collector:4318/v1/traces")
            );
            assert_eq!(c.postgres.url, "postgres://env");
            assert_eq!(c.deployment, "projector", "the default deployment");
            jail.set_env("PROJECTOR_DEPLOYMENT", "blue");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.deployment, "blue");
            assert_eq!(c.redis_pointer_key(), "c@current@blue");
            jail.set_env("PROJECTOR_DEPLOYMENT", "a/b");
            assert!(
                Config::load(Some(Path::new("c.toml"))).is_err(),
                "a deployment name that could cross scopes is refused"
            );
            jail.set_env("PROJECTOR_DEPLOYMENT", "blue");
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
        assert_eq!(
            isolated.deployment, "t1",
            "each test run is its own deployment"
        );
        assert_eq!(cfg.redis_pointer_key(), "c360:current@projector");
        assert_ne!(cfg.redis_pointer_key(), isolated.redis_pointer_key());
        // A pointer key is never under a version's prefix (retiring it would delete it).
        assert!(
            !cfg.redis_pointer_key()
                .starts_with(&cfg.versioned_views("current").redis_prefix)
        );
    }

    #[test]
    fn a_missing_file_is_an_error_not_defaults() {
        assert!(Config::load(Some(Path::new("/nonexistent/x.toml"))).is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error
    fn the_committed_configs_parse() {
        // In a jail: the other tests' jails set PROJECTOR_* variables for the whole process
        // (a deployment "a/b" among them), and a jail waits for them to be restored.
        figment::Jail::expect_with(|_| {
            for f in ["config/local.toml", "config/compose.toml"] {
                let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
                Config::load(Some(&p)).unwrap_or_else(|e| panic!("{f}: {e}"));
            }
            Ok(())
        });
    }
}
