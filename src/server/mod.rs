//! `atelier serve`: the HTTP server (actix-web on tokio) in front of the ledger and the jobs.

pub mod auth;
pub mod error;
pub mod multipart;
pub mod routes;
pub mod state;
pub mod views;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use anyhow::{Context, Result};

use crate::config::{Config, ModelEntry};
use crate::engine::device::{self, DeviceChoice};
use crate::engine::pipeline::Placement;
use crate::jobs::{ConnConfig, Pool};
use crate::jobs::{Jobs, Worker};
use crate::ledger::{Clock, Sweeper, SystemClock};
use crate::models::ModelRegistry;
use crate::server::state::{AppState, LoginLimiter};

pub struct ServeOptions {
    pub config: Config,
    pub data_dir: PathBuf,
    /// Overrides `server.listen`.
    pub listen: Option<String>,
    /// `--model <id>=<path>` entries.
    pub extra_models: Vec<(String, ModelEntry)>,
    /// Overrides `engine.device`.
    pub device: Option<String>,
    /// Overrides `engine.dtype`.
    pub dtype: Option<String>,
}

/// Creates the first admin when there is none: `admin` on `plan` (`[server] admin_plan`, so the
/// person who installed the server is not held to the Free plan's limits) with a random
/// password, written to `<data>/initial-admin-password` (readable by the owner only). The log
/// names only the file: logs are kept, shipped and read by more people than the data folder.
fn bootstrap_admin(pool: &Pool, plan: &str) -> Result<()> {
    pool.with(|c| -> Result<()> {
        if c.ledger.users()?.iter().any(|u| u.is_admin) {
            return Ok(());
        }
        let password = crate::secret::random_hex(12);
        let name = if c.ledger.user_by_name("admin").is_ok() { format!("admin-{}", &password[..4]) } else { "admin".into() };
        let admin = c.ledger.add_user(&name, true, Some(&password))?;
        // The plan's first billing period, renewed like anyone's.
        c.ledger.set_plan(admin.id, plan, None)?;
        let path = pool.config().data_dir.join("initial-admin-password");
        // Created 0600 by the open itself, so the password is never readable by others.
        crate::private_files::open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{name}\n{password}\n").as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        log::warn!(
            "no admin account existed: created {name:?} on the {plan:?} plan with the password in {}; log in and change it, or create your own with `atelier user add <name> --admin --password-stdin`",
            path.display()
        );
        Ok(())
    })?
}

/// The address links are built on: `[server] public_url`, else the one address the server
/// is bound to when it is a specific one. Listening on an unspecified address (`0.0.0.0`, the
/// LAN setting) gives no usable host, and a request's own `Host` header must not be trusted
/// for links, so links stay relative then.
fn public_url(cfg: &crate::config::ServerConfig, bound: &[std::net::SocketAddr]) -> Option<String> {
    if let Some(u) = &cfg.public_url {
        return Some(u.trim_end_matches('/').to_string());
    }
    match bound.first() {
        Some(a) if !bound.iter().any(|b| b.ip().is_unspecified()) => Some(format!("http://{a}")),
        _ => {
            log::warn!(
                "[server] public_url is not set and the server listens on {}: links the API hands out (the OpenAI route's `url`) are relative; set public_url to the address clients use",
                bound.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            );
            None
        }
    }
}

/// Runs the server until it is stopped (Ctrl-C / SIGTERM).
pub fn serve(opts: ServeOptions) -> Result<()> {
    let config = opts.config;
    let listen = opts.listen.unwrap_or_else(|| config.server.listen.clone());
    let (registry, plans) = ModelRegistry::build(&config, &opts.extra_models)?;
    for m in registry.models.values() {
        match &m.state {
            crate::models::ModelState::Ready => {
                log::info!("model {} ({}) ready", m.id, m.kind.map_or("?", |k| k.as_str()))
            }
            crate::models::ModelState::Missing { reason } => log::warn!("model {} missing: {reason}", m.id),
        }
    }
    let plans = Arc::new(plans);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let data_dir = opts.data_dir;
    let pool = Arc::new(Pool::new(ConnConfig::new(&data_dir, plans.clone(), clock.clone()))?);
    bootstrap_admin(&pool, &config.server.admin_plan)?;

    // Hashes of model and LoRA files (the PNG text's) are kept across restarts.
    crate::engine::filehash::set_cache_file(data_dir.join("file-hashes.json"));
    let loras = Arc::new(crate::loras::Library::new(config.engine.loras_dir(), &data_dir));
    loras.sweep_uploads();
    let datasets = Arc::new(crate::datasets::Datasets::new(&data_dir));
    datasets.sweep();
    let jobs = Arc::new(
        Jobs::new(
            Arc::new(registry),
            config.limits.clone(),
            config.queue.clone(),
            data_dir.join("images"),
            loras,
            datasets,
        )
        .with_training(config.training.clone(), data_dir.join("trainings")),
    );
    let settled = pool.with(|c| jobs.reconcile(c))??;
    if settled > 0 {
        log::warn!("settled {settled} credit holds left open by the last run");
    }
    let choice: DeviceChoice = match opts.device.as_deref() {
        Some(d) => d.parse()?,
        None => config.engine.device,
    };
    let dev = device::select(choice)?;
    log::info!("device: {}", dev.description);
    let requested = match opts.dtype.as_deref() {
        Some(d) => d.parse::<crate::config::Dtype>().map_err(anyhow::Error::msg)?,
        None => config.engine.dtype,
    };
    let (dtype, why) = device::compute_dtype(requested.burn(), &dev);
    log::info!("compute dtype {why}");
    let (memory_budget, budget_source) =
        crate::engine::memory::resolve(config.engine.memory_budget, dev.is_gpu, dev.memory_bytes);
    log::info!("memory budget {budget_source}");
    {
        let mut m = jobs.memory.lock().unwrap_or_else(|p| p.into_inner());
        m.memory_budget = memory_budget;
        m.memory_budget_source = budget_source;
    }
    let placement = Placement { keep_resident: config.queue.keep_resident, dtype, memory_budget, stream_blocks: false };
    let worker = Worker::spawn(jobs.clone(), pool.open()?, dev.device.clone(), placement);
    let sweeper =
        Sweeper::spawn(pool.config().data_dir.join(crate::ledger::DB_FILE), plans.clone(), clock.clone(), |e| {
            log::error!("ledger sweep: {e}")
        })?;

    let state = web::Data::new(AppState {
        pool: pool.clone(),
        jobs: jobs.clone(),
        limiter: LoginLimiter::new(config.server.login_attempts, Duration::from_secs(config.server.login_window_secs)),
        config: Arc::new(config),
        device: dev.description.clone(),
        dtype: format!("{dtype:?}").to_lowercase(),
        public_url: std::sync::OnceLock::new(),
        credentials: tokio::sync::watch::channel(0).0,
    });
    let bound_state = state.clone();
    let stop_jobs = jobs.clone();
    let system = actix_web::rt::System::new();
    let result = system.block_on(async move {
        let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(routes::configure))
            .bind(&listen)
            .with_context(|| format!("cannot listen on {listen}"))?
            // Progress streams stay open for a long time: keep-alive and shutdown must allow it.
            .shutdown_timeout(5)
            .backlog(2048)
            .max_connection_rate(1024)
            // Signals are ours (below): jobs must stop at once, not after the streams drain.
            .disable_signals();
        // Before the "listening" line, so whoever waits for that line also sees this warning.
        let _ = bound_state.public_url.set(public_url(&bound_state.config.server, &server.addrs()));
        for addr in server.addrs() {
            // Tests and scripts read this line to find the port (with --listen 127.0.0.1:0).
            println!("listening on http://{addr}");
            log::info!("listening on http://{addr}");
        }
        let running = server.run();
        let handle = running.handle();
        actix_web::rt::spawn(async move {
            let name = stop_signal().await;
            // The running job stops at its next step now (a training checkpoints and pauses),
            // while the HTTP server lets open progress streams see that for up to 5 s.
            log::info!("{name} received: stopping jobs, then the HTTP server");
            stop_jobs.stop();
            handle.stop(true).await;
        });
        running.await.context("running the HTTP server")
    });
    worker.stop();
    sweeper.stop();
    result
}

/// The first of SIGTERM, SIGINT or SIGQUIT (Ctrl-C elsewhere), by name.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use actix_web::rt::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::quit())) {
            (Ok(mut term), Ok(mut int), Ok(mut quit)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => "SIGQUIT",
            },
            _ => {
                log::warn!("cannot listen for stop signals; Ctrl-C only");
                let _ = actix_web::rt::signal::ctrl_c().await;
                "Ctrl-C"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = actix_web::rt::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
