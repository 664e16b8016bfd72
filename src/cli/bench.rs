//! `projector bench` (being rewritten for the pipelined runtime).

use projector::config::Config;

pub struct BenchArgs {
    pub events: u64,
    pub raw_docs: usize,
    pub steady: bool,
    pub clickhouse_engine: bool,
}

pub async fn run(_cfg: &Config, _args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("TEMPORARY: bench under construction")
}
