//! What a generation request is ([`JobSpec`]) and the one check of it against [`Limits`]: the
//! server, the command line and the engine each call [`Limits::check`] (the server and the CLI
//! through [`JobSpec::validate`]) with the limits that are theirs. They differ on purpose:
//!
//! - the server refuses sides under 64 pixels and sides that are not multiples of 16;
//! - the CLI takes sides from 16 pixels and rounds them down to a multiple of 16 with a
//!   warning, as diffusers does;
//! - the engine, the last line for any caller, only refuses what it cannot run.
//!
//! The browser UI reads the server's limits from `GET /api/limits` instead of repeating them.

use serde::{Deserialize, Serialize};

/// What a user asked for. `steps` and `seed` are `None` when not given (then the model's
/// default steps and a random seed are used; asking for them needs the "standard" level).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub guidance: Option<f64>,
    #[serde(default = "one")]
    pub batch: u32,
}

fn one() -> u32 {
    1
}

/// Sides are multiples of this: the VAE's 8 × the transformer's 2×2 packing.
pub const SIZE_STEP: u32 = 16;
/// The most images one request makes.
pub const MAX_BATCH: u32 = 64;
/// The longest prompt, in UTF-8 bytes (T5 truncates long before; this bounds what is stored).
pub const MAX_PROMPT_BYTES: usize = 10_000;

/// How sides that are not multiples of [`SIZE_STEP`] are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sizes {
    /// Refused (the server: what is charged is what is made).
    Exact,
    /// Rounded down with a warning (the CLI and the engine, as diffusers does).
    RoundDown,
}

/// The largest distilled guidance accepted, by the engine and the server: far above what
/// FLUX.1-dev is used with (about 1–10).
pub const MAX_GUIDANCE: f32 = 30.0;

/// The `[limits]` section of `config.toml`: the largest image and step count this host takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfiguredLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_steps: u32,
}

impl Default for ConfiguredLimits {
    fn default() -> Self {
        ConfiguredLimits { max_width: 2048, max_height: 2048, max_steps: 100 }
    }
}

/// The bounds a request must keep, for one caller. `GET /api/limits` answers the server's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// The smallest side, in pixels (after rounding, where sides are rounded).
    pub min_side: u32,
    pub max_width: u32,
    pub max_height: u32,
    /// Sides are multiples of this.
    pub size_step: u32,
    pub sizes: Sizes,
    pub max_steps: u32,
    pub max_batch: u32,
    pub max_prompt_bytes: usize,
    pub max_guidance: f64,
    /// Messages name the command line's flags (`--steps`) rather than the fields (`steps`).
    #[serde(skip)]
    pub flags: bool,
}

impl Limits {
    /// The server's: sides from 64 pixels, multiples of 16, up to the configured maximum.
    pub fn server(config: &ConfiguredLimits) -> Limits {
        Limits {
            min_side: 64,
            max_width: config.max_width,
            max_height: config.max_height,
            size_step: SIZE_STEP,
            sizes: Sizes::Exact,
            max_steps: config.max_steps,
            max_batch: MAX_BATCH,
            max_prompt_bytes: MAX_PROMPT_BYTES,
            max_guidance: f64::from(MAX_GUIDANCE),
            flags: false,
        }
    }

    /// The command line's: sides from 16 pixels, rounded down to a multiple of 16 with a
    /// warning, up to the configured maximum.
    pub fn cli(config: &ConfiguredLimits) -> Limits {
        Limits { min_side: SIZE_STEP, sizes: Sizes::RoundDown, flags: true, ..Limits::server(config) }
    }

    /// The engine's own: only what it cannot run (no configured maximum applies).
    pub fn engine() -> Limits {
        Limits {
            min_side: SIZE_STEP,
            max_width: u32::MAX,
            max_height: u32::MAX,
            size_step: SIZE_STEP,
            sizes: Sizes::RoundDown,
            max_steps: u32::MAX,
            max_batch: u32::MAX,
            max_prompt_bytes: usize::MAX,
            max_guidance: f64::from(MAX_GUIDANCE),
            flags: false,
        }
    }

    fn name(&self, field: &str) -> String {
        if self.flags { format!("--{field}") } else { field.to_string() }
    }

    /// Checks a request's parts; on success, the size it will be made at (rounded down where
    /// these limits round) and the warnings rounding gave.
    pub fn check(&self, p: &Params<'_>) -> Result<Checked, InvalidSpec> {
        let bad = |m: String| Err(InvalidSpec(m));
        let prompt = if self.flags { "--prompt".to_string() } else { "the prompt".to_string() };
        if p.prompt.trim().is_empty() {
            return bad(format!("{prompt} is empty"));
        }
        if p.prompt.len() > self.max_prompt_bytes {
            return bad(format!("{prompt} is longer than {} bytes", self.max_prompt_bytes));
        }
        let step = u64::from(self.size_step.max(1));
        let (mut width, mut height, mut warnings) = (p.width, p.height, Vec::new());
        match self.sizes {
            Sizes::RoundDown => {
                for (what, v) in [("width", &mut width), ("height", &mut height)] {
                    let s = *v / step * step;
                    if s != *v {
                        warnings.push(format!("{what} {v} is not a multiple of {step}; using {s}"));
                        *v = s;
                    }
                }
            }
            Sizes::Exact => {
                if width % step != 0 || height % step != 0 {
                    return bad(format!("width and height must be multiples of {step} (got {width}x{height})"));
                }
            }
        }
        let min = u64::from(self.min_side);
        if width < min || height < min {
            return bad(format!(
                "size {}x{} is too small: width and height must be at least {min} pixels",
                p.width, p.height
            ));
        }
        // The maximum applies to what was asked, so rounding down never lets an oversized
        // request through.
        if p.width > u64::from(self.max_width) || p.height > u64::from(self.max_height) {
            return bad(format!(
                "size {}x{} is above the configured maximum {}x{} ([limits] max_width, max_height)",
                p.width, p.height, self.max_width, self.max_height
            ));
        }
        if let Some(s) = p.steps
            && (s == 0 || s > u64::from(self.max_steps))
        {
            return bad(if self.max_steps == u32::MAX {
                format!("{} must be at least 1", self.name("steps"))
            } else {
                format!("{} must be between 1 and {} ([limits] max_steps)", self.name("steps"), self.max_steps)
            });
        }
        if let Some(g) = p.guidance
            && !(g.is_finite() && (0.0..=self.max_guidance).contains(&g))
        {
            return bad(format!(
                "{} must be a number between 0 and {}, not {g}",
                self.name("guidance"),
                self.max_guidance
            ));
        }
        if p.batch == 0 || p.batch > u64::from(self.max_batch) {
            return bad(if self.max_batch == u32::MAX {
                format!("{} must be at least 1", self.name("batch"))
            } else {
                format!("{} must be between 1 and {}", self.name("batch"), self.max_batch)
            });
        }
        Ok(Checked { width, height, warnings })
    }
}

/// The parts of a request that [`Limits`] bound, whatever the caller's types.
#[derive(Debug, Clone)]
pub struct Params<'a> {
    pub prompt: &'a str,
    pub width: u64,
    pub height: u64,
    pub steps: Option<u64>,
    pub guidance: Option<f64>,
    pub batch: u64,
}

/// A request that passed: the size it is made at and what rounding it took.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub width: u64,
    pub height: u64,
    pub warnings: Vec<String>,
}

/// Why a request is outside the limits (the server answers 400 with it).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

impl JobSpec {
    /// The one check of a request (prompt, size, steps, guidance, batch) against `limits`;
    /// the model is the caller's to check. Returns the size the images are made at and the
    /// warnings of rounding it (only where `limits` round).
    pub fn validate(&self, limits: &Limits) -> Result<Checked, InvalidSpec> {
        limits.check(&Params {
            prompt: &self.prompt,
            width: u64::from(self.width),
            height: u64::from(self.height),
            steps: self.steps.map(u64::from),
            guidance: self.guidance,
            batch: u64::from(self.batch),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(width: u32, height: u32) -> JobSpec {
        JobSpec {
            model: "m".into(),
            prompt: "a fox".into(),
            width,
            height,
            steps: None,
            seed: None,
            guidance: None,
            batch: 1,
        }
    }

    #[test]
    fn the_server_refuses_what_the_cli_rounds() {
        let config = ConfiguredLimits::default();
        let (server, cli) = (Limits::server(&config), Limits::cli(&config));
        assert!(spec(64, 64).validate(&server).is_ok());
        let e = spec(48, 64).validate(&server).unwrap_err().0;
        assert!(e.contains("at least 64"), "{e}");
        let e = spec(100, 64).validate(&server).unwrap_err().0;
        assert!(e.contains("multiples of 16"), "{e}");
        let c = spec(100, 16).validate(&cli).unwrap();
        assert_eq!((c.width, c.height), (96, 16));
        assert_eq!(c.warnings, ["width 100 is not a multiple of 16; using 96"]);
        let e = spec(15, 64).validate(&cli).unwrap_err().0;
        assert!(e.contains("at least 16"), "{e}");
        let e = spec(4096, 64).validate(&cli).unwrap_err().0;
        assert!(e.contains("above the configured maximum"), "{e}");
        // Rounding down never brings an oversized request within the maximum.
        let e = spec(2050, 64).validate(&cli).unwrap_err().0;
        assert!(e.contains("above the configured maximum"), "{e}");
    }

    #[test]
    fn steps_guidance_batch_and_prompt_are_bounded() {
        let server = Limits::server(&ConfiguredLimits::default());
        let cli = Limits { flags: true, ..server.clone() };
        let with = |f: &dyn Fn(&mut JobSpec)| {
            let mut s = spec(512, 512);
            f(&mut s);
            s
        };
        assert!(
            with(&|s| s.steps = Some(0))
                .validate(&server)
                .unwrap_err()
                .0
                .starts_with("steps must be between 1 and 100")
        );
        assert!(with(&|s| s.steps = Some(101)).validate(&cli).unwrap_err().0.starts_with("--steps must be between"));
        assert!(with(&|s| s.guidance = Some(f64::NAN)).validate(&server).is_err());
        assert!(with(&|s| s.guidance = Some(30.5)).validate(&server).is_err());
        assert!(with(&|s| s.guidance = Some(30.0)).validate(&server).is_ok());
        assert!(with(&|s| s.batch = 0).validate(&server).is_err());
        assert!(with(&|s| s.batch = 65).validate(&server).is_err());
        assert!(with(&|s| s.batch = 64).validate(&server).is_ok());
        assert_eq!(with(&|s| s.prompt = " ".into()).validate(&server).unwrap_err().0, "the prompt is empty");
        assert_eq!(with(&|s| s.prompt = " ".into()).validate(&cli).unwrap_err().0, "--prompt is empty");
        assert!(with(&|s| s.prompt = "x".repeat(10_001)).validate(&server).is_err());
    }
}
