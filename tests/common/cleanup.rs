//! Deleting what one isolated test left in the shared servers, once it passed: its Redis keys,
//! MongoDB collections, ClickHouse tables and PostgreSQL rows (its events, pointers,
//! checkpoints, parks and stream positions). Every name an isolated deployment writes holds
//! its id (`Config::isolated`), which holds the time, the process and a counter, so nothing
//! another test or the demo writes matches.
//!
//! Measured before this existed: after a few suite runs the dev servers held 539 MongoDB
//! collections (371,632 documents), 531 ClickHouse tables, 203,247 Redis keys and 2.66 M
//! events, and every later run wrote into stores that large.

use projector::config::Config;

/// Delete the isolated deployment `id` (events of namespace `ns`) from the stores `cfg`
/// names, side by side; one store that fails or hangs leaves only its own data.
pub async fn delete_deployment(cfg: &Config, id: &str, ns: &str) {
    let (r, m, c, p) = tokio::join!(
        redis_keys(cfg, id),
        mongo_collections(cfg, id),
        clickhouse_tables(cfg, id),
        postgres_rows(cfg, id, ns),
    );
    for (store, outcome) in [
        ("redis", r),
        ("mongo", m),
        ("clickhouse", c),
        ("postgres", p),
    ] {
        if let Err(e) = outcome {
            eprintln!("cleanup of {id}: {store} left as it is: {e}");
        }
    }
}

async fn redis_keys(cfg: &Config, id: &str) -> Result<(), String> {
    if cfg.redis.cluster {
        // The cluster test's nodes are its own and stopped with it.
        return Ok(());
    }
    let client = redis::Client::open(cfg.redis.url.as_str()).map_err(|e| e.to_string())?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let mut cursor = 0u64;
    let mut keys: Vec<String> = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{id}*"))
            .arg("COUNT")
            .arg(5_000)
            .query_async(&mut con)
            .await
            .map_err(|e| e.to_string())?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    for chunk in keys.chunks(1_000) {
        let _: i64 = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(&mut con)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn mongo_collections(cfg: &Config, id: &str) -> Result<(), String> {
    let client = mongodb::Client::with_uri_str(&cfg.mongo.uri)
        .await
        .map_err(|e| e.to_string())?;
    let db = client.database(&cfg.mongo.database);
    let names = db
        .list_collection_names()
        .filter(mongodb::bson::doc! {"name": {"$regex": format!("^{id}_")}})
        .await
        .map_err(|e| e.to_string())?;
    for name in names {
        db.collection::<mongodb::bson::Document>(&name)
            .drop()
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn clickhouse_tables(cfg: &Config, id: &str) -> Result<(), String> {
    let client = projector::sinks::clickhouse::root_client(&cfg.clickhouse);
    let names: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = ? AND startsWith(name, ?)")
        .bind(cfg.clickhouse.database.as_str())
        .bind(format!("{id}_"))
        .fetch_all()
        .await
        .map_err(|e| e.to_string())?;
    for name in names {
        client
            .query(&format!(
                "DROP TABLE IF EXISTS `{}`.`{name}` SYNC",
                cfg.clickhouse.database
            ))
            .execute()
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn postgres_rows(cfg: &Config, id: &str, ns: &str) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(&cfg.postgres.url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let like = projector::store::like_prefix;
    let (scope, deployment, events) = (like(&format!("{id}/")), like(id), like(ns));
    let statements: [(&str, &String); 6] = [
        (
            "DELETE FROM projection_checkpoints WHERE projection LIKE $1",
            &scope,
        ),
        (
            "DELETE FROM projection_versions WHERE projection LIKE $1",
            &scope,
        ),
        (
            "DELETE FROM parked_streams WHERE scope LIKE $1",
            &deployment,
        ),
        (
            "DELETE FROM released_streams WHERE scope LIKE $1",
            &deployment,
        ),
        (
            "DELETE FROM stream_positions WHERE group_id LIKE $1",
            &deployment,
        ),
        ("DELETE FROM events WHERE aggregate_id LIKE $1", &events),
    ];
    let mut outcome = Ok(());
    for (sql, pattern) in statements {
        if let Err(e) = client.execute(sql, &[pattern]).await {
            outcome = Err(format!("{sql}: {e}"));
            break;
        }
    }
    drop(client);
    let _ = driver.await;
    outcome
}
