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
    /// LoRAs by library name (`GET /api/loras`), applied in this order. `<lora:name:w>` tags
    /// in the prompt are moved here by [`JobSpec::take_prompt_tags`] before anything else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
}

fn one() -> u32 {
    1
}

/// A LoRA a job applies: its library name and strength (negative allowed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    pub name: String,
    #[serde(default = "unit_weight")]
    pub weight: f32,
}

fn unit_weight() -> f32 {
    1.0
}

/// The most LoRAs one job applies (whatever the plan allows).
pub const MAX_LORAS: usize = 16;
/// The largest LoRA strength accepted, either sign (ComfyUI's slider stops at ±20; useful
/// strengths are within ±2).
pub const MAX_LORA_WEIGHT: f32 = 20.0;

/// Whether `name` can name a LoRA: 1 to 100 characters, none of them a path separator, a
/// control character, or the `<`, `>` and `:` of the prompt-tag syntax; not starting with a dot.
pub fn valid_lora_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 100
        && !name.starts_with('.')
        && name.trim() == name
        && !name.chars().any(|c| c.is_control() || "/\\<>:".contains(c))
}

/// Finds A1111 `<lora:name>` / `<lora:name:weight>` tags in a prompt: the prompt without them
/// (whitespace left by a tag collapsed, ends trimmed) and the LoRAs, in order. A tag whose name
/// is not a valid LoRA name, or whose weight is not a number, is an error.
pub fn take_lora_tags(prompt: &str) -> Result<(String, Vec<LoraRef>), InvalidSpec> {
    const OPEN: &str = "<lora:";
    let mut rest = prompt;
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    while let Some(at) = rest.find(OPEN) {
        let Some(len) = rest[at..].find('>') else { break };
        let inner = &rest[at + OPEN.len()..at + len];
        let (name, weight) = match inner.rsplit_once(':') {
            Some((n, w)) => {
                let w: f32 = w.trim().parse().map_err(|_| {
                    InvalidSpec(format!("the prompt tag <lora:{inner}> has a weight that is not a number"))
                })?;
                (n.trim(), w)
            }
            None => (inner.trim(), 1.0),
        };
        if !valid_lora_name(name) {
            return Err(InvalidSpec(format!("the prompt tag <lora:{inner}> does not name a LoRA")));
        }
        loras.push(LoraRef { name: name.to_string(), weight });
        let before = rest[..at].trim_end();
        text.push_str(before);
        rest = &rest[at + len + 1..];
        if !before.is_empty() && !rest.trim_start().is_empty() && !rest.trim_start().starts_with([',', '.']) {
            text.push(' ');
        }
        rest = rest.trim_start();
    }
    text.push_str(rest);
    Ok((text.trim().to_string(), loras))
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
        // Line breaks and tabs are text; other control characters are not (a NUL would also cut
        // the PNG's text chunk short in every reader).
        if let Some(c) = p.prompt.chars().find(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
            return bad(format!("{prompt} contains the control character U+{:04X}", u32::from(c)));
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

impl Limits {
    /// LoRA names, count and strengths (whether the caller may use them is the plan's and the
    /// library's to say).
    pub fn check_loras(&self, loras: &[LoraRef]) -> Result<(), InvalidSpec> {
        let bad = |m: String| Err(InvalidSpec(m));
        let field = self.name("lora");
        if loras.len() > MAX_LORAS {
            return bad(format!("at most {MAX_LORAS} LoRAs per job, not {}", loras.len()));
        }
        for (i, l) in loras.iter().enumerate() {
            if !valid_lora_name(&l.name) {
                return bad(format!("{field} {:?} is not a LoRA name", l.name));
            }
            if !(l.weight.is_finite() && l.weight.abs() <= MAX_LORA_WEIGHT) {
                return bad(format!(
                    "the weight of LoRA {:?} must be between -{MAX_LORA_WEIGHT} and {MAX_LORA_WEIGHT}, not {}",
                    l.name, l.weight
                ));
            }
            if loras[..i].iter().any(|o| o.name == l.name) {
                return bad(format!("LoRA {:?} is named twice", l.name));
            }
        }
        Ok(())
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
    /// Moves `<lora:name:w>` tags out of the prompt into `loras` (after any given there). The
    /// same LoRA named twice with the same weight counts once; with two weights it is an error.
    pub fn take_prompt_tags(&mut self) -> Result<(), InvalidSpec> {
        let (prompt, tags) = take_lora_tags(&self.prompt)?;
        self.prompt = prompt;
        for tag in tags {
            match self.loras.iter().find(|l| l.name == tag.name) {
                Some(l) if l.weight == tag.weight => {}
                Some(l) => {
                    return Err(InvalidSpec(format!(
                        "LoRA {:?} is asked for twice, at {} and at {}",
                        tag.name, l.weight, tag.weight
                    )));
                }
                None => self.loras.push(tag),
            }
        }
        Ok(())
    }

    /// The one check of a request (prompt, size, steps, guidance, batch) against `limits`;
    /// the model is the caller's to check. Returns the size the images are made at and the
    /// warnings of rounding it (only where `limits` round).
    pub fn validate(&self, limits: &Limits) -> Result<Checked, InvalidSpec> {
        limits.check_loras(&self.loras)?;
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
            loras: Vec::new(),
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
        assert_eq!(
            with(&|s| s.prompt = "red\u{0}heart".into()).validate(&server).unwrap_err().0,
            "the prompt contains the control character U+0000"
        );
        assert!(with(&|s| s.prompt = "red\nheart\t".into()).validate(&server).is_ok());
        assert!(with(&|s| s.prompt = "x".repeat(10_001)).validate(&server).is_err());
    }

    #[test]
    fn lora_tags_leave_the_prompt_and_join_the_list() {
        let (p, l) = take_lora_tags("a fox <lora:ink style:0.8>, red <lora:grain> sky").unwrap();
        assert_eq!(p, "a fox, red sky");
        assert_eq!(
            l,
            [LoraRef { name: "ink style".into(), weight: 0.8 }, LoraRef { name: "grain".into(), weight: 1.0 }]
        );
        let (p, l) = take_lora_tags("<lora:a:-0.5>cat").unwrap();
        assert_eq!((p.as_str(), l[0].weight), ("cat", -0.5));
        // An unclosed tag is text.
        assert_eq!(take_lora_tags("x <lora:y").unwrap().0, "x <lora:y");
        assert!(take_lora_tags("x <lora:y:big>").unwrap_err().0.contains("not a number"));
        assert!(take_lora_tags("x <lora::1>").unwrap_err().0.contains("does not name"));
        assert!(take_lora_tags("x <lora:../etc:1>").unwrap_err().0.contains("does not name"));

        let mut s = spec(512, 512);
        s.prompt = "a fox <lora:ink:0.8>".into();
        s.loras = vec![LoraRef { name: "ink".into(), weight: 0.8 }];
        s.take_prompt_tags().unwrap();
        assert_eq!((s.prompt.as_str(), s.loras.len()), ("a fox", 1));
        s.prompt = "a fox <lora:ink:0.5>".into();
        assert!(s.take_prompt_tags().unwrap_err().0.contains("twice"));
    }

    #[test]
    fn lora_lists_are_bounded() {
        let server = Limits::server(&ConfiguredLimits::default());
        let mut s = spec(512, 512);
        let l = |n: &str, w: f32| LoraRef { name: n.into(), weight: w };
        s.loras = vec![l("a", 1.0), l("b", -20.0)];
        assert!(s.validate(&server).is_ok());
        s.loras = vec![l("a", 20.5)];
        assert!(s.validate(&server).is_err());
        s.loras = vec![l("a", f32::NAN)];
        assert!(s.validate(&server).is_err());
        s.loras = vec![l("a", 1.0), l("a", 0.5)];
        assert!(s.validate(&server).unwrap_err().0.contains("twice"));
        s.loras = vec![l("x/y", 1.0)];
        assert!(s.validate(&server).is_err());
        s.loras = (0..17).map(|i| l(&format!("l{i}"), 1.0)).collect();
        assert!(s.validate(&server).is_err());
    }
}
