//! The analytics path's peer: ClickHouse's own Kafka table engine draining the same backlog.

use std::time::{Duration, Instant};

use projector::config::Config;
use projector::kafka;
use projector::sinks::clickhouse::ClickHouseSink;

use super::rate;

/// ClickHouse's Kafka table engine drains the same backlog (a consumer group of its own)
/// through a materialized view into a ReplacingMergeTree of the same facts; rows/s from the
/// first row to the last.
pub(super) async fn clickhouse_engine(cfg: &Config, id: &str, n: u64) -> anyhow::Result<f64> {
    let ch = ClickHouseSink::connect(&cfg.clickhouse, &format!("{id}_kengine_facts")).await?;
    let c = ch.client();
    let topics = kafka::event_topics(&cfg.kafka).join(",");
    let exec = |sql: String| async move { c.query(&sql).execute().await };
    // The local engine answers CREATE of a Kafka table with "Shutdown was called" though it
    // creates it: believe the catalogue.
    let created = exec(format!(
        "CREATE TABLE {id}_kqueue (raw String) ENGINE = Kafka SETTINGS \
         kafka_broker_list = '{}', kafka_topic_list = '{topics}', kafka_group_name = '{id}-clickhouse', \
         kafka_format = 'JSONAsString', kafka_num_consumers = 1, kafka_flush_interval_ms = 200, \
         kafka_max_block_size = 65536",
        cfg.kafka.brokers
    ))
    .await;
    if let Err(e) = created {
        let exists: u8 = c
            .query(&format!("EXISTS TABLE {id}_kqueue"))
            .fetch_one()
            .await
            .unwrap_or(0);
        anyhow::ensure!(exists == 1, "creating the Kafka table: {e}");
    }
    let t = Instant::now();
    exec(format!(
        "CREATE MATERIALIZED VIEW {id}_kmv TO {id}_kengine_facts AS SELECT \
           JSONExtractString(raw, 'event_id') AS event_id, \
           JSONExtractString(raw, 'event_type') AS event_type, \
           JSONExtractString(raw, 'aggregate_type') AS aggregate_type, \
           JSONExtractString(raw, 'aggregate_id') AS aggregate_id, \
           JSONExtractString(raw, 'event_data', 'customer_id') AS customer_id, \
           JSONExtractInt(raw, 'sequence_number') AS sequence_number, \
           JSONExtractInt(raw, 'global_position') AS global_position, \
           parseDateTime64BestEffort(JSONExtractString(raw, 'timestamp'), 3) AS ts, \
           toInt64(round(multiIf(event_type = 'order.placed', JSONExtractFloat(raw, 'event_data', 'total_amount'), \
             event_type = 'order.payment_confirmed', JSONExtractFloat(raw, 'event_data', 'amount'), 0) * 100)) AS amount_cents, \
           JSONExtractString(raw, 'event_data', 'interaction_type') AS interaction_type, \
           if(JSONHas(raw, 'event_data', 'sentiment_score'), JSONExtractFloat(raw, 'event_data', 'sentiment_score'), -1) AS sentiment \
         FROM {id}_kqueue"
    ))
    .await?;
    let count = || async move {
        c.query(&format!("SELECT count() FROM {id}_kengine_facts"))
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
    };
    let mut first: Option<Instant> = None;
    let deadline = t + Duration::from_secs(600);
    loop {
        let have = count().await;
        if have > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if have >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the Kafka engine stalled at {have} of {n} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = first.map_or(t.elapsed(), |f| f.elapsed());
    // A Kafka table left behind would keep consuming, and the local engine cannot even start
    // with one whose topics are gone: drop it until it is really gone.
    for table in [format!("{id}_kmv"), format!("{id}_kqueue")] {
        let mut gone = false;
        for _ in 0..10 {
            let _ = exec(format!("DROP TABLE IF EXISTS {table} SYNC")).await;
            let exists: u8 = c
                .query(&format!("EXISTS TABLE {table}"))
                .fetch_one()
                .await
                .unwrap_or(1);
            if exists == 0 {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::ensure!(
            gone,
            "could not drop the benchmark's table {table}: drop it by hand"
        );
    }
    let _ = ch.drop_table().await;
    Ok(rate(n as f64, took))
}
