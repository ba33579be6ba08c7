//! The metering ledger on real SQLite files. (The crash test runs as its own binary,
//! `tests/ledger_crash.rs`, because it re-runs itself as the process it kills.)

mod basics;
mod cli;
mod concurrency;
mod periods;
mod properties;
mod throughput;
