//! Each store's raw write capacity, through the write path its sink really uses.

use std::time::Instant;

use contract::EventEnvelope;
use projector::config::Config;
use projector::sinks::clickhouse::ClickHouseSink;
use projector::sinks::mongo::MongoSink;
use projector::sinks::redis::RedisSink;
use projector::sinks::{DocStore, DocWrite, FactStore, new_rev};

use super::rate;

pub(super) struct RawCapacity {
    pub(super) redis: f64,
    pub(super) redis_everysec: f64,
    pub(super) redis_cluster: Option<f64>,
    pub(super) mongo_insert: f64,
    pub(super) mongo_update: f64,
    pub(super) clickhouse: f64,
}

impl RawCapacity {
    pub(super) fn of(&self, store: &str) -> f64 {
        match store {
            "redis" => self.redis,
            "mongo" => self.mongo_insert.min(self.mongo_update),
            _ => self.clickhouse,
        }
    }
}

/// Documents of a realistic size through the sinks' own write path (compare-and-set
/// scripts, insert/update commands, RowBinary inserts), no projection.
pub(super) async fn raw_capacity(
    cfg: &Config,
    history: &[EventEnvelope],
    n: usize,
    cluster: Option<&str>,
) -> anyhow::Result<RawCapacity> {
    #[derive(serde::Serialize, serde::Deserialize, Default, Clone)]
    struct Blob {
        customer_id: String,
        blob: String,
    }
    let doc = |i: usize, rev: u64| projectors::Doc {
        view: Blob {
            customer_id: format!("c{i}"),
            blob: "y".repeat(1200),
        },
        guard: Default::default(),
        rev,
    };
    let writes = |store: &dyn Fn(&projectors::Doc<Blob>) -> Vec<u8>,
                  expected: &[u64]|
     -> (Vec<DocWrite>, Vec<u64>) {
        let mut revs = Vec::with_capacity(n);
        let ws = (0..n)
            .map(|i| {
                let rev = new_rev();
                revs.push(rev);
                DocWrite {
                    key: format!("k{i}"),
                    expected: expected.get(i).copied(),
                    rev,
                    body: store(&doc(i, rev)).into(),
                    finished: Vec::new(),
                }
            })
            .collect();
        (ws, revs)
    };
    let window = cfg.worker.window_size.max(1);

    let redis = RedisSink::connect(&cfg.redis, &format!("{}raw:", cfg.views.redis_prefix)).await?;
    let mut con = redis.connection();
    let old: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    let set_fsync = |policy: String| {
        let mut con = con.clone();
        async move {
            let _: Result<(), _> = redis::cmd("CONFIG")
                .arg("SET")
                .arg("appendfsync")
                .arg(policy)
                .query_async(&mut con)
                .await;
        }
    };
    let redis_rate = |policy: &'static str| {
        let redis = redis.clone();
        let set_fsync = &set_fsync;
        let (ws, _) = writes(&|d| redis.encode(d).unwrap_or_default(), &[]);
        async move {
            set_fsync(policy.to_owned()).await;
            redis.delete_all().await?;
            let t = Instant::now();
            for c in ws.chunks(window) {
                redis.write(c).await?;
            }
            Ok::<_, anyhow::Error>(rate(ws.len() as f64, t.elapsed()))
        }
    };
    let redis_everysec = redis_rate("everysec").await?;
    let redis_always = redis_rate("always").await?;
    if let Some(policy) = old.get(1) {
        set_fsync(policy.clone()).await;
    }
    redis.delete_all().await?;

    let redis_cluster = match cluster {
        Some(urls) => {
            let c = projector::config::RedisConfig {
                url: urls.to_owned(),
                cluster: true,
                ..cfg.redis.clone()
            };
            let sink = RedisSink::connect(&c, &format!("{}raw:", cfg.views.redis_prefix)).await?;
            let (ws, _) = writes(&|d| sink.encode(d).unwrap_or_default(), &[]);
            sink.delete_all().await?;
            let t = Instant::now();
            for c in ws.chunks(window) {
                sink.write(c).await?;
            }
            let r = rate(ws.len() as f64, t.elapsed());
            sink.delete_all().await?;
            Some(r)
        }
        None => None,
    };

    let mongo =
        MongoSink::connect(&cfg.mongo, &format!("{}_raw", cfg.views.mongo_collection)).await?;
    let (ws, revs) = writes(&|d| mongo.encode(d).unwrap_or_default(), &[]);
    let t = Instant::now();
    for c in ws.chunks(window) {
        mongo.write(c).await?;
    }
    let mongo_insert = rate(ws.len() as f64, t.elapsed());
    let (ws, _) = writes(&|d| mongo.encode(d).unwrap_or_default(), &revs);
    let t = Instant::now();
    for c in ws.chunks(window) {
        let out = mongo.write(c).await?;
        anyhow::ensure!(out.conflicts.is_empty(), "raw update conflicted");
    }
    let mongo_update = rate(ws.len() as f64, t.elapsed());
    mongo.drop_collection().await?;

    let ch = ClickHouseSink::connect(
        &cfg.clickhouse,
        &format!("{}_raw", cfg.views.clickhouse_table),
    )
    .await?;
    let facts: Vec<projectors::analytics::Fact> = history
        .iter()
        .cycle()
        .take(n)
        .filter_map(|e| {
            projectors::FactProjector::fact(
                &projectors::analytics::AnalyticsProjector,
                &e.clone().into_event().ok()?,
            )
            .ok()
        })
        .collect();
    let t = Instant::now();
    for c in facts.chunks(window) {
        ch.insert(c).await?;
    }
    let clickhouse = rate(facts.len() as f64, t.elapsed());
    ch.drop_table().await?;
    println!(
        "raw capacity ({n} documents/rows, {window} per call): redis {redis_always:.0}/s fsync always ({redis_everysec:.0}/s everysec: durable acknowledgements cost {:.0}%), \
         mongo insert {mongo_insert:.0}/s update {mongo_update:.0}/s, clickhouse {clickhouse:.0}/s",
        100.0 * (1.0 - redis_always / redis_everysec.max(1e-9))
    );
    Ok(RawCapacity {
        redis: redis_always,
        redis_everysec,
        redis_cluster,
        mongo_insert,
        mongo_update,
        clickhouse,
    })
}
