//! The admin CLI, mounted into an outer clap command the way the `atelier` binary mounts it,
//! run against a temporary data directory.
use atelier::ledger;

use std::path::PathBuf;
use std::sync::Arc;

use atelier::cli::admin::{self, LedgerCommand};
use chrono::{Duration, TimeZone, Utc};
use clap::{Parser, Subcommand};
use ledger::{PlansConfig, TestClock};

/// Stand-in for the binary's own CLI: a global `--data` and the ledger's commands flattened
/// next to its others.
#[derive(Debug, Parser)]
#[command(name = "atelier")]
struct Cli {
    #[arg(long, global = true, default_value = "data")]
    data: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// (the binary's own command)
    Serve,
    #[command(flatten)]
    Ledger(LedgerCommand),
}

struct Env {
    dir: tempfile::TempDir,
    clock: TestClock,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            clock: TestClock::new(Utc.with_ymd_and_hms(2026, 5, 4, 9, 0, 0).unwrap()),
        }
    }

    fn try_run(&self, args: &str, stdin: &str) -> anyhow::Result<String> {
        let data = self.dir.path().join("data");
        let mut argv = vec!["atelier".to_string(), "--data".into(), data.display().to_string()];
        argv.extend(args.split_whitespace().map(String::from));
        let cli = Cli::try_parse_from(&argv)?;
        let Command::Ledger(cmd) = cli.command else { anyhow::bail!("not a ledger command") };
        assert_eq!(cli.data, data);
        admin::run(
            &cli.data,
            &cmd,
            Arc::new(PlansConfig::defaults()),
            Arc::new(self.clock.clone()),
            &mut std::io::Cursor::new(stdin.as_bytes().to_vec()),
        )
    }

    fn run(&self, args: &str) -> String {
        self.try_run(args, "").unwrap_or_else(|e| panic!("{args}: {e:#}"))
    }

    fn show(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.run(&format!("user show {name} --json"))).unwrap()
    }

    fn err(&self, args: &str) -> String {
        format!("{:#}", self.try_run(args, "").expect_err(args))
    }
}

#[test]
fn user_lifecycle_through_the_cli() {
    let env = Env::new();
    let out = env.try_run("user add alice --admin --password-stdin", "hunter22\n").unwrap();
    assert!(out.contains("alice") && out.contains("50"), "{out}");
    assert!(env.dir.path().join("data/atelier.db").exists());
    env.try_run("user passwd alice", "hunter23\n").unwrap();
    let mut l = ledger::Ledger::open_data_dir(
        &env.dir.path().join("data"),
        Arc::new(PlansConfig::defaults()),
        Arc::new(env.clock.clone()),
    )
    .unwrap();
    assert!(l.verify_password("alice", "hunter23").unwrap() && !l.verify_password("alice", "hunter22").unwrap());
    assert!(env.try_run("user passwd alice", "\n").is_err());
    assert!(env.try_run("user passwd nobody", "x\n").is_err());

    let v = env.show("alice");
    assert_eq!(v["plan"], "free");
    assert_eq!(v["period"], serde_json::Value::Null);
    assert_eq!(v["admin"], true);
    assert_eq!(v["credits_available"], 50);
    assert_eq!(v["credits_held"], 0);
    assert_eq!(v["grants"][0]["amount"], 50);
    assert_eq!(v["grants"][0]["remaining"], 50);
    assert_eq!(v["grants"][0]["expires_at"], serde_json::Value::Null);
    assert_eq!(v["allowance"]["week_left"], 0);
    assert_eq!(v["allowance"]["year_left"], 0);
    assert_eq!(v["entitlements"]["parameters"], "basic");
    assert_eq!(v["entitlements"]["models"]["dev"], "limited");
    assert_eq!(v["quotas"]["dev"]["left"], 5);

    env.run("user set-plan alice pro --weekly");
    let v = env.show("alice");
    assert_eq!(v["plan"], "pro");
    assert_eq!(v["period"], "weekly");
    assert_eq!(v["credits_available"], 500);
    assert_eq!(v["allowance"]["week_left"], 1);
    assert_eq!(v["entitlements"]["queue"], "priority");
    assert_eq!(v["grants"][1]["expires_at"], "2026-05-11T09:00:00Z");

    env.run("user set-plan alice max --yearly");
    let v = env.show("alice");
    assert_eq!((v["plan"].as_str(), v["period"].as_str()), (Some("max"), Some("yearly")));
    assert_eq!(v["credits_available"], 50 + 450 + 104_000);
    assert_eq!(v["allowance"]["year_left"], 100);
    assert_eq!(v["allowance"]["week_left"], 1, "last week's allowance keeps its expiry");
    assert_eq!(v["entitlements"]["max_batch"], serde_json::Value::Null);

    let out = env.run("user grant alice 25 --expires 2026-06-01T00:00:00Z");
    assert!(out.contains("25"), "{out}");
    let v = env.show("alice");
    let g = v["grants"].as_array().unwrap().iter().find(|g| g["amount"] == 25).unwrap().clone();
    assert_eq!(g["expires_at"], "2026-06-01T00:00:00Z");
    assert_eq!(g["remaining"], 25);
    env.run("user grant alice 7");

    let out = env.run("user cancel alice");
    assert!(out.contains("2027-05-04"), "{out}");
    let v = env.show("alice");
    assert_eq!(v["status"], "cancel_at_period_end");
    assert_eq!(v["plan"], "max");
    // After the year: back on free, no new 50.
    env.clock.advance(Duration::days(366));
    let v = env.show("alice");
    assert_eq!(v["plan"], "free");
    assert_eq!(v["period"], serde_json::Value::Null);
    assert_eq!(v["credits_available"], 50 + 7);

    let text = env.run("user show alice");
    assert!(text.contains("free") && text.contains("57 available"), "{text}");
}

#[test]
fn cli_errors_are_clear_and_non_zero() {
    let env = Env::new();
    env.run("user add bob");
    assert!(env.err("user show nobody --json").contains("unknown user \"nobody\""));
    assert!(env.err("user set-plan nobody pro").contains("unknown user"));
    let e = env.err("user set-plan bob gold");
    assert!(e.contains("unknown plan \"gold\"") && e.contains("free, starter, pro, ultra, max"), "{e}");
    assert!(env.err("user grant bob -5").contains("positive whole number"));
    assert!(env.err("user grant bob 0").contains("positive whole number"));
    assert!(env.err("user grant bob lots").contains("positive whole number"));
    assert!(env.err("user grant bob 5 --expires tomorrow").contains("RFC 3339"));
    assert!(env.err("user grant bob 5 --expires 2020-01-01T00:00:00Z").contains("not in the future"));
    assert!(env.err("user grant nobody 5").contains("unknown user"));
    assert!(env.err("user add bob").contains("already exists"));
    assert!(env.err("user set-plan bob pro --yearly --weekly").contains("cannot be used with"));
    assert!(env.err("user set-plan bob free --yearly").contains("no billing period"));
    let e = format!("{:#}", env.try_run("user add carol --password-stdin", "").unwrap_err());
    assert!(e.contains("no password"), "{e}");
    assert!(env.err("price --model sdxl --width 512 --height 512 --steps 20 --batch 1").contains("unknown model"));
    assert!(env.err("price --model flux-dev --width 0 --height 512 --steps 20 --batch 1").contains("width"));
    // Nothing was half-done: bob still has exactly his 50.
    assert_eq!(env.show("bob")["credits_available"], 50);
}

#[test]
fn plan_list_and_price() {
    let env = Env::new();
    let plans: serde_json::Value = serde_json::from_str(&env.run("plan list --json")).unwrap();
    let ids: Vec<&str> = plans.as_array().unwrap().iter().map(|p| p["plan"].as_str().unwrap()).collect();
    assert_eq!(ids, ["free", "starter", "pro", "ultra", "max"]);
    assert_eq!(plans[1]["credits_weekly"], 200);
    assert_eq!(plans[1]["credits_yearly"], 10_400);
    assert_eq!(plans[4]["max_batch"], serde_json::Value::Null);
    let loras: Vec<serde_json::Value> = plans.as_array().unwrap().iter().map(|p| p["max_loras"].clone()).collect();
    assert_eq!(loras, [0.into(), 1.into(), 3.into(), 5.into(), serde_json::Value::Null]);
    let text = env.run("plan list");
    assert!(text.lines().count() == 6 && text.contains("50 once") && text.contains("104000"), "{text}");
    assert!(!env.dir.path().join("data/atelier.db").exists(), "plan list needs no database");

    assert_eq!(env.run("price --model flux-dev --width 1024 --height 1024 --steps 28 --batch 1").trim(), "34");
    assert_eq!(env.run("price --model flux-dev --width 1024 --height 1024 --steps 28 --batch 4").trim(), "136");
    assert_eq!(env.run("price --model flux-schnell --width 1024 --height 1024 --steps 4 --batch 1").trim(), "10");
    assert_eq!(env.run("price --model flux-dev --width 2048 --height 2048 --steps 100 --batch 1").trim(), "200");
    let v: serde_json::Value =
        serde_json::from_str(&env.run("price --model flux-dev --width 1024 --height 1024 --batch 2 --json")).unwrap();
    assert_eq!((v["credits"].as_i64(), v["per_item"].as_i64(), v["steps"].as_i64()), (Some(68), Some(34), Some(28)));
    assert_eq!(v["tags"][0], "dev");
}
