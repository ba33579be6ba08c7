//! The JSON bodies the routes answer with, as types: each field name and nesting here is part
//! of the HTTP API (the browser UI, the tests and API clients read them).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::accounts::ApiKeyInfo;
use crate::config::FluxKind;
use crate::jobs::store::{ImageMeta, Job, JobStatus};
use crate::ledger::{
    AccountSummary, Entitlements, Event, Grant, Hold, ParamLevel, Period, Price, SubscriptionStatus, UsageDay, User,
    UserId,
};
use crate::models::{ModelState, ServedModel};

/// `{"ok": true}` and nothing else to say.
#[derive(Debug, Serialize)]
pub struct Done {
    pub ok: bool,
}

pub const DONE: Done = Done { ok: true };

// ---- account ----

/// POST /api/login, GET /api/session: who is logged in and the CSRF token for changes
/// (`None` with an API key).
#[derive(Debug, Serialize)]
pub struct SessionView<'a> {
    pub user: &'a User,
    pub csrf_token: Option<&'a str>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// GET /api/keys
#[derive(Debug, Serialize)]
pub struct KeyList {
    pub keys: Vec<ApiKeyInfo>,
}

/// POST /api/keys: the key itself, shown this once.
#[derive(Debug, Serialize)]
pub struct KeyCreated {
    pub key: String,
    pub info: ApiKeyInfo,
}

/// POST /api/keys/{id}/revoke
#[derive(Debug, Serialize)]
pub struct KeyRevoked {
    pub revoked: i64,
}

/// GET /api/plans
#[derive(Debug, Serialize)]
pub struct PlanList<'a> {
    pub plans: Vec<Entitlements>,
    pub limited_per_week: &'a BTreeMap<String, u32>,
}

/// POST /api/password
#[derive(Debug, Serialize)]
pub struct PasswordChanged {
    pub ok: bool,
    pub sessions_ended: usize,
    pub api_keys_revoked: usize,
}

// ---- usage ----

/// GET /api/usage (and, with `disabled`, an admin's view of a user): the account summary
/// with the low-balance warning, daily history, open holds, events and training left.
#[derive(Debug, Serialize)]
pub struct Usage {
    #[serde(flatten)]
    pub account: AccountSummary,
    pub low_balance: bool,
    pub history: Vec<UsageDay>,
    pub holds: Vec<Hold>,
    pub events: Vec<Event>,
    pub training_available: i64,
}

/// A weekly quota on a model, as GET /api/models shows it.
#[derive(Debug, Serialize)]
pub struct ModelQuota {
    pub tag: String,
    pub limit: u32,
    pub used: u32,
    pub left: u32,
}

/// One model with the caller's access to it: "yes", "limited" (with the quota),
/// "locked" (with why and the plans that unlock it) or "unavailable".
#[derive(Debug, Serialize)]
pub struct ModelAccessView {
    pub id: String,
    pub label: String,
    pub kind: Option<FluxKind>,
    /// "ready" or "missing" (the model's state).
    pub state: &'static str,
    pub tags: Vec<String>,
    pub default_steps: u32,
    pub default_width: u32,
    pub default_height: u32,
    pub access: &'static str,
    pub reason: Option<String>,
    pub plans_allowing: Vec<String>,
    pub quota: Option<ModelQuota>,
}

impl ModelAccessView {
    /// The model's own fields; access "yes" until told otherwise.
    pub fn new(m: &ServedModel) -> ModelAccessView {
        ModelAccessView {
            id: m.id.clone(),
            label: m.label.clone(),
            kind: m.kind,
            state: match m.state {
                ModelState::Ready => "ready",
                ModelState::Missing { .. } => "missing",
            },
            tags: m.tags.clone(),
            default_steps: m.default_steps,
            default_width: m.default_width,
            default_height: m.default_height,
            access: "yes",
            reason: None,
            plans_allowing: Vec::new(),
            quota: None,
        }
    }
}

/// The size limits of a job.
#[derive(Debug, Serialize)]
pub struct SizeLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_steps: u32,
}

/// GET /api/models
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub models: Vec<ModelAccessView>,
    pub plan: String,
    pub parameters: ParamLevel,
    pub max_batch: Option<u32>,
    pub size_presets: Vec<[u32; 2]>,
    pub limits: SizeLimits,
}

// ---- LoRAs ----

/// GET /api/loras
#[derive(Debug, Serialize)]
pub struct LoraList {
    pub loras: Vec<crate::loras::LoraEntry>,
    pub plan: String,
    /// LoRAs per job on the caller's plan; `null` = unlimited.
    pub max_loras: Option<u32>,
    /// Every plan's LoRAs per job, lowest rank first (what the UI's "needs the X plan" reads).
    pub plans: Vec<LoraPlan>,
}

#[derive(Debug, Serialize)]
pub struct LoraPlan {
    pub plan: String,
    pub name: String,
    pub max_loras: Option<u32>,
}

/// POST /api/loras
#[derive(Debug, Serialize)]
pub struct LoraUploaded {
    pub lora: crate::loras::LoraEntry,
    /// The format detected (kohya, peft, …).
    pub format: &'static str,
    /// A1111's LoRA hash (what `Lora hashes` in a PNG records).
    pub hash: String,
    /// Keys that matched nothing, parts skipped.
    pub warnings: Vec<String>,
}

/// GET /api/price
#[derive(Debug, Serialize)]
pub struct PriceCheck {
    pub price: Price,
    pub credits_available: i64,
    pub allowed: bool,
    /// The HTTP status submitting it would answer (402, 403, …), when not allowed.
    pub status: Option<u16>,
    pub message: Option<String>,
    pub details: Option<serde_json::Value>,
    pub parameter_level: ParamLevel,
    pub parameters_needing_level: Vec<String>,
}

// ---- jobs and gallery ----

/// A job with its place in the queue (`None` unless waiting).
#[derive(Debug, Serialize)]
pub struct JobView<'a> {
    #[serde(flatten)]
    pub job: &'a Job,
    pub position: Option<usize>,
}

impl<'a> JobView<'a> {
    pub fn new(job: &'a Job, positions: &[(String, usize)]) -> JobView<'a> {
        let position = positions.iter().find(|(id, _)| id == &job.id).map(|(_, p)| *p);
        JobView { job, position }
    }
}

/// GET /api/jobs/{id}
#[derive(Debug, Serialize)]
pub struct OneJob<'a> {
    pub job: JobView<'a>,
}

/// GET /api/jobs
#[derive(Debug, Serialize)]
pub struct JobList<'a> {
    pub jobs: Vec<JobView<'a>>,
}

/// POST /api/jobs: the job, whether the key replayed an earlier request, and the credits.
#[derive(Debug, Serialize)]
pub struct Submitted<'a> {
    pub job: &'a Job,
    pub replayed: bool,
    pub credits_held: i64,
    pub credits_remaining: i64,
}

/// POST /api/jobs/{id}/cancel
#[derive(Debug, Serialize)]
pub struct CancelStatus {
    pub status: JobStatus,
}

/// GET /api/images
#[derive(Debug, Serialize)]
pub struct ImagePage {
    pub images: Vec<ImageMeta>,
    pub page: u32,
    pub per_page: u32,
    pub total: u32,
    pub pages: u32,
}

/// GET /api/images/{id}
#[derive(Debug, Serialize)]
pub struct OneImage {
    pub image: ImageMeta,
}

/// DELETE /api/images/{id}
#[derive(Debug, Serialize)]
pub struct ImageDeleted {
    pub deleted: String,
}

// ---- admin ----

/// One row of GET /api/admin/users.
#[derive(Debug, Serialize)]
pub struct AdminUserRow {
    pub id: UserId,
    pub name: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    pub plan: String,
    pub period: Option<Period>,
    pub status: SubscriptionStatus,
    pub credits_available: i64,
    pub credits_held: i64,
    pub credits_spent: i64,
    pub disabled: bool,
}

/// GET /api/admin/users
#[derive(Debug, Serialize)]
pub struct AdminUsers {
    pub users: Vec<AdminUserRow>,
}

/// POST /api/admin/users
#[derive(Debug, Serialize)]
pub struct UserCreated {
    pub user: User,
}

/// GET /api/admin/users/{id}
#[derive(Debug, Serialize)]
pub struct AdminUsage {
    #[serde(flatten)]
    pub usage: Usage,
    pub disabled: bool,
}

/// POST /api/admin/users/{id}/grant
#[derive(Debug, Serialize)]
pub struct GrantCreated {
    pub grant: Grant,
}

/// POST /api/admin/users/{id}/disable
#[derive(Debug, Serialize)]
pub struct Disabled {
    pub id: UserId,
    pub disabled: bool,
    pub jobs_canceled: usize,
}

/// A job on the admin page: with its user's name and, when it is done, what went wrong
/// inside it (server paths included; admins only).
#[derive(Debug, Serialize)]
pub struct AdminJob {
    #[serde(flatten)]
    pub job: Job,
    /// Waiting and running jobs: the place in the queue (`Some(None)`: not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<Option<usize>>,
    pub user: Option<String>,
    /// Finished jobs: what went wrong inside (`Some(None)`: nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_detail: Option<Option<String>>,
}

/// GET /api/admin/queue
#[derive(Debug, Serialize)]
pub struct AdminQueue {
    pub queue: Vec<AdminJob>,
    pub recent: Vec<AdminJob>,
    pub counts: BTreeMap<&'static str, i64>,
}

/// GET /api/admin/models
#[derive(Debug, Serialize)]
pub struct AdminModels<'a> {
    pub models: Vec<&'a ServedModel>,
    pub device: &'a str,
    /// The compute dtype the models run in on that device.
    pub dtype: &'a str,
    /// `memory_budget`, `memory_budget_source`, `memory_plans` (model id → its last job's plan).
    #[serde(flatten)]
    pub memory: crate::jobs::MemoryState,
}

// ---- ops ----

/// GET /healthz
#[derive(Debug, Serialize)]
pub struct Health<'a> {
    pub status: &'static str,
    pub database: bool,
    pub models_ready: usize,
    pub device: &'a str,
}

// ---- errors and the OpenAI API ----

/// Every error: `{"error": {"message", "type", "code", "details"}}` (OpenAI's shape).
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub code: &'a str,
    pub details: Option<&'a serde_json::Value>,
}

/// One image of POST /v1/images/generations: a link or the PNG in base64.
#[derive(Debug, Serialize)]
pub struct OpenAiImage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    pub revised_prompt: Option<String>,
}

/// What atelier adds to an OpenAI images answer.
#[derive(Debug, Serialize)]
pub struct AtelierExtra<'a> {
    pub job_id: &'a str,
    pub images: &'a [String],
    pub seed: u64,
    pub credits_charged: i64,
    pub credits_remaining: i64,
}

/// POST /v1/images/generations
#[derive(Debug, Serialize)]
pub struct OpenAiImages<'a> {
    pub created: i64,
    pub data: Vec<OpenAiImage>,
    pub atelier: AtelierExtra<'a>,
}

/// One entry of GET /v1/models.
#[derive(Debug, Serialize)]
pub struct OpenAiModel<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
}

/// GET /v1/models
#[derive(Debug, Serialize)]
pub struct OpenAiList<T> {
    pub object: &'static str,
    pub data: Vec<T>,
}
