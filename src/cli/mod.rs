//! Subcommands of the binary that are tools rather than the product: the benchmark.

pub mod bench;
pub mod bench_hot;
mod bench_store;
pub mod dlq;
pub mod read_bench;
