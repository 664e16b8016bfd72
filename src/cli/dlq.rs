//! `projector dlq`: read the dead-letter topic, show a letter, send chosen originals again
//! through the normal guarded path, unpark a stream. Safe while workers run.

use projector::config::Config;
use projector::resilience::dlq_tools::{self, Letter, Message};

pub enum DlqCommand {
    List {
        kind: Option<String>,
        limit: usize,
    },
    Show {
        id: String,
    },
    Replay {
        ids: Vec<String>,
    },
    Unpark {
        stream: String,
        projectors: Vec<String>,
    },
}

async fn letters(cfg: &Config) -> anyhow::Result<Vec<Letter>> {
    let k = cfg.kafka.clone();
    Ok(tokio::task::spawn_blocking(move || dlq_tools::read_letters(&k)).await??)
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn find<'a>(all: &'a [Letter], id: &str) -> anyhow::Result<&'a Letter> {
    all.iter().find(|l| l.id() == id).ok_or_else(|| {
        anyhow::anyhow!(
            "no letter {id} in {} (ids are partition:offset, see `dlq list`)",
            "the dead-letter topic"
        )
    })
}

pub async fn run(cfg: &Config, cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List { kind, limit } => {
            let all = letters(cfg).await?;
            let shown: Vec<&Letter> = all
                .iter()
                .filter(|l| kind.as_deref().is_none_or(|k| l.kind == k))
                .take(limit)
                .collect();
            println!(
                "{} letters in {} ({} shown)",
                all.len(),
                cfg.kafka.dlq_topic,
                shown.len()
            );
            println!(
                "{:<10} {:<14} {:<12} {:<40} {:<24} {:<22} reason",
                "id", "kind", "projector", "stream #sequence", "event type", "source"
            );
            for l in shown {
                let stream = match (&l.stream, l.sequence) {
                    (Some(s), Some(q)) => format!("{s} #{q}"),
                    (Some(s), None) => s.clone(),
                    _ => "-".into(),
                };
                println!(
                    "{:<10} {:<14} {:<12} {:<40} {:<24} {:<22} {}",
                    l.id(),
                    l.kind,
                    if l.projector.is_empty() {
                        "-"
                    } else {
                        &l.projector
                    },
                    stream,
                    l.event_type.as_deref().unwrap_or("-"),
                    format!(
                        "{}:{}@{}",
                        l.source_topic, l.source_partition, l.source_offset
                    ),
                    cut(&l.reason, 90)
                );
            }
        }
        DlqCommand::Show { id } => {
            let all = letters(cfg).await?;
            let l = find(&all, &id)?;
            println!("letter     {} of {}", l.id(), cfg.kafka.dlq_topic);
            println!("kind       {}", l.kind);
            println!(
                "projector  {}",
                if l.projector.is_empty() {
                    "-"
                } else {
                    &l.projector
                }
            );
            println!("reason     {}", l.reason);
            println!(
                "source     {} partition {} offset {}",
                l.source_topic, l.source_partition, l.source_offset
            );
            if let Some(s) = &l.stream {
                println!(
                    "stream     {s} #{}",
                    l.sequence.map_or("?".into(), |q| q.to_string())
                );
            }
            for (k, v) in l.message.original_headers() {
                println!(
                    "header     {k} = {}",
                    v.map_or("(null)".into(), |v| String::from_utf8_lossy(&v)
                        .into_owned())
                );
            }
            if let Some(n) = l.truncated_from {
                println!(
                    "payload    truncated: the letter keeps the head of {n} bytes (the original is in the source topic)"
                );
            }
            match l.message.payload.as_deref() {
                None => println!("payload    (none)"),
                Some(p) => match serde_json::from_slice::<serde_json::Value>(p) {
                    Ok(v) => println!("payload\n{}", serde_json::to_string_pretty(&v)?),
                    Err(_) => println!("payload    (not JSON) {:?}", String::from_utf8_lossy(p)),
                },
            }
        }
        DlqCommand::Replay { ids } => {
            anyhow::ensure!(
                !ids.is_empty(),
                "name the letters to replay (partition:offset)"
            );
            let all = letters(cfg).await?;
            for id in ids {
                let l = find(&all, &id)?;
                // The letter's own copy is exact unless it was truncated; else the source's.
                let original = if l.truncated_from.is_none() && l.message.payload.is_some() {
                    Some(Message {
                        topic: l.source_topic.clone(),
                        partition: l.source_partition,
                        offset: l.source_offset,
                        key: l.message.key.clone(),
                        payload: l.message.payload.clone(),
                        headers: l.message.original_headers(),
                    })
                } else {
                    let (k, t, p, o) = (
                        cfg.kafka.clone(),
                        l.source_topic.clone(),
                        l.source_partition,
                        l.source_offset,
                    );
                    tokio::task::spawn_blocking(move || dlq_tools::read_message(&k, &t, p, o))
                        .await??
                };
                let Some(original) = original else {
                    anyhow::bail!(
                        "{id}: the letter is truncated and the original is gone from {}:{}@{}",
                        l.source_topic,
                        l.source_partition,
                        l.source_offset
                    );
                };
                dlq_tools::republish(&cfg.kafka, &original).await?;
                println!(
                    "{id}: sent again to {} ({} {}); the guards skip it if it was applied meanwhile",
                    original.topic,
                    l.stream.as_deref().unwrap_or("-"),
                    l.event_type.as_deref().unwrap_or("-")
                );
                if let Some(s) = &l.stream
                    && (l.kind == "parked" || l.kind == "rejected")
                {
                    println!(
                        "  its stream may be parked: `projector dlq unpark {s}` lets held events flow"
                    );
                }
            }
        }
        DlqCommand::Unpark { stream, projectors } => {
            let projections = if projectors.is_empty() {
                projectors::names()
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect()
            } else {
                projectors
            };
            let n = projector::rebuild::unpark_and_replay(cfg, &projections, &stream).await?;
            println!(
                "unparked {stream} for {projections:?}: {n} events replayed from the event store"
            );
        }
    }
    Ok(())
}
