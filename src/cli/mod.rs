//! Subcommands of the binary that are tools rather than the product: the benchmark.

pub mod bench;
pub mod dlq;
