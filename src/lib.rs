//! atelier: a self-hosted FLUX.1 generation server with its own metering.

pub mod accounts;
pub mod bench;
pub mod cli;
pub mod config;
pub mod datasets;
pub mod db;
pub mod emoji_eval;
pub mod engine;
pub mod jobs;
pub mod ledger;
pub mod loras;
pub mod models;
pub mod private_files;
pub mod secret;
pub mod server;
pub mod spec;
pub mod train;
