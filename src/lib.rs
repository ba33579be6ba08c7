//! atelier: a self-hosted FLUX.1 generation server with its own metering.

pub mod bench;
pub mod config;
pub mod engine;
pub mod ledger;
