//! The server end to end: a real `atelier serve` on loopback, real SQLite files in a temporary
//! folder, the shipped tiny demo models, and HTTP from this process.

mod access;
mod common;
mod crash;
mod datasets;
mod files;
mod first_start;
mod flow;
mod hardening;
mod limits;
mod loras;
mod memory;
mod models;
mod openai;
mod queue_order;
mod training;
