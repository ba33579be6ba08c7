//! The admin commands: `user …` (the ledger's users, plans and credits, and the accounts'
//! API keys and sessions), `plan list` and `price`. The outer command owns the global
//! `--data <dir>` and mounts [`LedgerCommand`] with `#[command(flatten)]`; [`run`] does the
//! work and returns what to print (an `Err` is a clear message for a non-zero exit).
//!
//! ```text
//! atelier --data <dir> user add <name> [--admin] [--password-stdin]
//! atelier --data <dir> user set-plan <name> <free|starter|pro|ultra|max> [--yearly|--weekly]
//! atelier --data <dir> user grant <name> <credits> [--expires <RFC3339>]
//! atelier --data <dir> user cancel <name>
//! atelier --data <dir> user api-key <name> [--label <text>]
//! atelier --data <dir> user passwd <name>            (the password on standard input)
//! atelier --data <dir> user show <name> [--json]
//! atelier --data <dir> plan list [--json]
//! atelier --data <dir> price --model <id> --width <px> --height <px> [--steps <n>] [--batch <n>] [--seconds <s>] [--json]
//! ```

use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::ledger::plans::{JobParams, ModelKind, Period, PlansConfig, price};
use crate::ledger::{AccountSummary, Clock, GrantRequest, GrantSource, Ledger, Resource};

/// The ledger's top-level commands, to flatten into the binary's command enum.
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum LedgerCommand {
    /// Manage users, their plans and credits.
    #[command(subcommand)]
    User(UserCommand),
    /// Show the plans.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Price a job (credits).
    Price(PriceArgs),
}

#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum UserCommand {
    /// Create a user on the default plan (with its one-time sign-up credits).
    Add {
        name: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from the first line of standard input (stored as an argon2id hash).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's plan: upgrades now, downgrades at the end of the period.
    SetPlan {
        name: String,
        /// A plan id from the config (free, starter, pro, ultra, max by default).
        plan: String,
        /// Bill yearly.
        #[arg(long, conflicts_with = "weekly")]
        yearly: bool,
        /// Bill weekly.
        #[arg(long)]
        weekly: bool,
    },
    /// Grant credits (an admin grant).
    Grant {
        name: String,
        /// A positive whole number.
        #[arg(allow_hyphen_values = true)]
        credits: String,
        /// When the credits expire (RFC 3339, e.g. 2027-01-31T00:00:00Z); never by default.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Cancel the subscription at the end of its period.
    Cancel { name: String },
    /// Set a user's password (read from the first line of standard input).
    Passwd { name: String },
    /// Create an API key for the user (printed once; send it as `Authorization: Bearer <key>`).
    ApiKey {
        name: String,
        /// What the key is for (shown in the key list).
        #[arg(long, default_value = "cli")]
        label: String,
    },
    /// Show a user's plan, credits, grants, allowance and entitlements.
    Show {
        name: String,
        /// As a JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum PlanCommand {
    /// List the plans and what they include.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct PriceArgs {
    /// A model id from `[pricing.models]` (flux-schnell, flux-dev by default).
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value_t = 1024)]
    pub width: u32,
    #[arg(long, default_value_t = 1024)]
    pub height: u32,
    /// Sampling steps (default: the model's).
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// Video duration in seconds (video models; default: the model's).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Print a JSON object instead of the bare number of credits.
    #[arg(long)]
    pub json: bool,
}

/// Runs a ledger command against `<data_dir>/atelier.db`; returns the text for stdout.
/// `stdin` is read only by `user add --password-stdin`.
pub fn run(
    data_dir: &Path,
    cmd: &LedgerCommand,
    cfg: Arc<PlansConfig>,
    clock: Arc<dyn Clock>,
    stdin: &mut dyn BufRead,
) -> Result<String> {
    match cmd {
        LedgerCommand::User(u) => run_user_command(data_dir, u, cfg, clock, stdin),
        LedgerCommand::Plan(PlanCommand::List { json }) => plan_list(&cfg, *json),
        LedgerCommand::Price(p) => price_command(&cfg, p),
    }
}

/// Runs one `user …` command.
pub fn run_user_command(
    data_dir: &Path,
    cmd: &UserCommand,
    cfg: Arc<PlansConfig>,
    clock: Arc<dyn Clock>,
    stdin: &mut dyn BufRead,
) -> Result<String> {
    // Check what needs no database first, so bad input does not create one.
    if let UserCommand::SetPlan { plan, .. } = cmd {
        cfg.plan(plan)?;
    }
    let grant_args = match cmd {
        UserCommand::Grant { credits, expires, .. } => {
            Some((parse_credits(credits)?, parse_expiry(expires.as_deref())?))
        }
        _ => None,
    };
    let mut ledger = Ledger::open_data_dir(data_dir, cfg.clone(), clock)
        .with_context(|| format!("opening the ledger in {}", data_dir.display()))?;
    match cmd {
        UserCommand::ApiKey { name, label } => {
            let user = ledger.user_by_name(name)?;
            let conn = crate::ledger::schema::open_connection(ledger.path())?;
            crate::accounts::migrate(&conn).context("migrating the account tables")?;
            let now = ledger.clock().now().timestamp();
            let (key, _) = crate::accounts::create_api_key(&conn, user.id, label, now)?;
            Ok(key)
        }
        UserCommand::Passwd { name } => {
            let user = ledger.user_by_name(name)?;
            let pw = read_password(stdin)?;
            ledger.set_password(user.id, &pw)?;
            // A reset is often because of a leak: the old sessions end with it.
            let conn = crate::ledger::schema::open_connection(ledger.path())?;
            crate::accounts::migrate(&conn).context("migrating the account tables")?;
            let now = ledger.clock().now().timestamp();
            let (sessions, keys) = crate::accounts::end_credentials_after_password_change(&conn, user.id, None, now)?;
            Ok(format!("password of {} changed; {sessions} sessions ended, {keys} API keys revoked\n", user.name))
        }
        UserCommand::Add { name, admin, password_stdin } => {
            let password = if *password_stdin { Some(read_password(stdin)?) } else { None };
            let user = ledger.add_user(name, *admin, password.as_deref())?;
            let sub = ledger.subscription(user.id)?;
            let bal = ledger.balance(user.id, Resource::Credits)?;
            Ok(format!(
                "added user {}{} on plan {} with {} credits\n",
                user.name,
                if user.is_admin { " (admin)" } else { "" },
                sub.plan,
                bal.available
            ))
        }
        UserCommand::SetPlan { name, plan, yearly, weekly } => {
            let user = ledger.user_by_name(name)?;
            let period = match (yearly, weekly) {
                (true, _) => Some(Period::Yearly),
                (_, true) => Some(Period::Weekly),
                _ => None,
            };
            let change = ledger.set_plan(user.id, plan, period)?;
            Ok(format!("{}: {change}\n", user.name))
        }
        UserCommand::Grant { name, .. } => {
            let (amount, expires_at) = grant_args.context("grant arguments")?;
            let user = ledger.user_by_name(name)?;
            let g = ledger.grant(user.id, &GrantRequest::credits(amount, GrantSource::Admin, expires_at))?;
            let bal = ledger.balance(user.id, Resource::Credits)?;
            Ok(format!(
                "granted {} credits to {} (grant {}, {}); available now {}\n",
                g.amount,
                user.name,
                g.id,
                match g.expires_at {
                    Some(e) => format!("expires {}", e.to_rfc3339()),
                    None => "never expires".into(),
                },
                bal.available
            ))
        }
        UserCommand::Cancel { name } => {
            let user = ledger.user_by_name(name)?;
            let change = ledger.cancel(user.id)?;
            Ok(format!("{}: {change}\n", user.name))
        }
        UserCommand::Show { name, json } => {
            let v = show_json(&mut ledger, name)?;
            if *json { Ok(format!("{}\n", serde_json::to_string_pretty(&v)?)) } else { Ok(show_text(&v)) }
        }
    }
}

fn parse_credits(s: &str) -> Result<i64> {
    let n: i64 = s.trim().parse().map_err(|_| anyhow::anyhow!("credits must be a positive whole number, not {s:?}"))?;
    if n <= 0 {
        bail!("credits must be a positive whole number, not {n}");
    }
    Ok(n)
}

fn parse_expiry(s: Option<&str>) -> Result<Option<DateTime<Utc>>> {
    s.map(|s| {
        DateTime::parse_from_rfc3339(s.trim())
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| anyhow::anyhow!("--expires {s:?} is not an RFC 3339 time such as 2027-01-31T00:00:00Z ({e})"))
    })
    .transpose()
}

/// The first line of standard input, which must not be empty.
fn read_password(stdin: &mut dyn BufRead) -> Result<String> {
    let mut line = String::new();
    stdin.read_line(&mut line).context("reading the password from standard input")?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        bail!("--password-stdin: standard input held no password");
    }
    Ok(pw)
}

/// The `user show` summary (renewals caught up first).
pub fn show(ledger: &mut Ledger, name: &str) -> Result<AccountSummary> {
    let user = ledger.user_by_name(name)?;
    Ok(ledger.account_summary(&user)?)
}

/// The `user show --json` object (the keys in order, as `serde_json::Value` writes them).
pub fn show_json(ledger: &mut Ledger, name: &str) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(show(ledger, name)?)?)
}

fn show_text(v: &serde_json::Value) -> String {
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(out, "user      {} (#{}){}", s("name"), s("id"), if v["admin"] == true { " admin" } else { "" });
    let _ = writeln!(out, "plan      {} {} [{}]", s("plan"), s("period"), s("status"));
    if !v["pending_plan"].is_null() {
        let _ = writeln!(out, "pending   {} {} at {}", s("pending_plan"), s("pending_period"), s("period_end"));
    }
    let _ = writeln!(out, "renews    {}", s("next_renewal_at"));
    let _ = writeln!(
        out,
        "credits   {} available, {} held, {} spent, {} expired (of {} granted)",
        s("credits_available"),
        s("credits_held"),
        s("credits_spent"),
        s("credits_expired"),
        s("credits_granted")
    );
    let a = &v["allowance"];
    let _ = writeln!(out, "training  {} left this week, {} left this year", a["week_left"], a["year_left"]);
    if let Some(grants) = v["grants"].as_array() {
        for g in grants.iter().filter(|g| g["live"] == true) {
            let _ = writeln!(
                out,
                "  grant {:>4}  {:<7} {:>7} of {:>7}  expires {}",
                g["id"],
                g["source"].as_str().unwrap_or(""),
                g["remaining"],
                g["amount"],
                g["expires_at"].as_str().unwrap_or("never")
            );
        }
    }
    out
}

fn plan_list(cfg: &PlansConfig, json: bool) -> Result<String> {
    let mut list = Vec::new();
    for id in cfg.plan_ids_by_rank() {
        list.push(cfg.entitlements(&id, None)?);
    }
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&list)?));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<9} {:>15} {:>15} {:>9} {:<9} {:>6} {:>6} {:<9} models",
        "plan", "name", "credits/week", "credits/year", "training", "params", "batch", "loras", "queue"
    );
    for e in &list {
        let credits = |n: i64, on: bool| if on { n.to_string() } else { "-".into() };
        let models: Vec<String> = e
            .models
            .iter()
            .map(|(t, a)| {
                format!(
                    "{t}={}",
                    serde_json::to_value(a).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<10} {:<9} {:>15} {:>15} {:>9} {:<9} {:>6} {:>6} {:<9} {}",
            e.plan,
            e.name,
            if e.periods.is_empty() {
                format!("{} once", e.signup_credits)
            } else {
                credits(e.credits_weekly, e.periods.contains(&Period::Weekly))
            },
            credits(e.credits_yearly, e.periods.contains(&Period::Yearly)),
            format!("{}/{}", e.training_weekly, e.training_yearly),
            e.parameters.to_string(),
            e.max_batch.map(|b| b.to_string()).unwrap_or_else(|| "any".into()),
            e.max_loras.map(|b| b.to_string()).unwrap_or_else(|| "any".into()),
            e.queue.to_string(),
            models.join(" ")
        );
    }
    Ok(out)
}

/// The `price --json` object.
#[derive(Serialize)]
struct PriceJson<'a> {
    model: &'a str,
    kind: ModelKind,
    tags: &'a [String],
    width: u32,
    height: u32,
    steps: u32,
    batch: u32,
    seconds: Option<f64>,
    per_item: i64,
    credits: i64,
    plans_allowing: Vec<String>,
}

fn price_command(cfg: &PlansConfig, p: &PriceArgs) -> Result<String> {
    let model = cfg.model(&p.model).map_err(|e| {
        anyhow::anyhow!("{e} (models: {})", cfg.pricing.models.keys().cloned().collect::<Vec<_>>().join(", "))
    })?;
    let pr = price(&cfg.pricing, model, p.width, p.height, p.steps, p.batch, p.seconds)?;
    if p.json {
        let params = JobParams { steps: p.steps, ..JobParams::new(p.width, p.height).with_batch(p.batch) };
        let v = PriceJson {
            model: &p.model,
            kind: model.kind,
            tags: &model.tags,
            width: p.width,
            height: p.height,
            steps: p.steps.unwrap_or(model.default_steps),
            batch: p.batch,
            seconds: if model.kind == ModelKind::Video { p.seconds.or(model.default_seconds) } else { None },
            per_item: pr.per_item,
            credits: pr.total,
            plans_allowing: cfg.plans_allowing(model, &params, false, 0),
        };
        // Through a `Value`: the keys in the order it writes them (sorted), as always.
        return Ok(format!("{}\n", serde_json::to_string_pretty(&serde_json::to_value(&v)?)?));
    }
    Ok(format!("{}\n", pr.total))
}
