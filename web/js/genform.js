// The Generate page's form: prompt, model, size presets and custom size, batch, the
// parameters the plan's level allows (seed, steps, guidance) with the locked ones explained,
// and LoRAs (lorapick.js);
// the draft kept in localStorage; the price before submitting; "Use these settings". The
// request limits (sizes, steps, guidance, batch, prompt length) come from GET /api/limits.

import { get, qs } from './api.js';
import { h, clear, notice, fmtNum, aspectLabel, debounce, describeError, pill } from './ui.js';
import { store, levelIndex, needsPlanNote, planName } from './store.js';
import { buildLoraField, loadLoras, chosenLoras, takeTags } from './lorapick.js';

/** The most images one job asks for from this page, whatever the plan allows. */
export const MAX_UI_BATCH = 16;
const U64_MAX = 18446744073709551615n;

/** The form's state; `models` is the /api/models answer, `limits` the /api/limits one. */
export const S = {
  models: null,
  limits: null,
  level: 0,
  model: null,
  width: 512,
  height: 512,
  sizeTouched: false,
  priceSeq: 0,
  priceOk: false,
  submitting: false,
  reprice: () => {},
  saveDraft: () => {},
};

/** The form's elements (the page reads `form`, `prompt`, `price`). */
export const el = {};

function field(label, forId, ...children) {
  return h('div', { class: 'field' }, h('label', { class: 'label', for: forId, text: label }), ...children);
}

/** Builds the form; `onSubmit` runs on submit and Ctrl/⌘+Enter. Returns the form element. */
export function buildForm(onSubmit) {
  el.prompt = h('textarea', {
    id: 'prompt',
    rows: '5',
    placeholder: 'Describe the image — subject, style, light, lens…',
    spellcheck: 'true',
  });
  el.promptCount = h('span', { class: 'muted', text: '0' });
  el.model = h('select', { id: 'model', 'aria-describedby': 'model-note' });
  el.modelNote = h('div', { id: 'model-note', class: 'note' });
  el.modelLocked = h('ul', { id: 'model-locked', class: 'locked-list' });
  el.presets = h('div', { id: 'size-presets', class: 'presets', role: 'radiogroup', 'aria-label': 'Size presets' });
  el.width = h('input', { id: 'width', type: 'number', inputmode: 'numeric' });
  el.height = h('input', { id: 'height', type: 'number', inputmode: 'numeric' });
  el.sizeNote = h('p', { id: 'size-note', class: 'lock-note', hidden: true });
  el.batch = h('input', { id: 'batch', type: 'number', min: '1', value: '1', inputmode: 'numeric' });
  el.batchDec = h('button', { type: 'button', class: 'btn btn-icon', 'aria-label': 'Fewer images', text: '−' });
  el.batchInc = h('button', { type: 'button', class: 'btn btn-icon', 'aria-label': 'More images', text: '+' });
  el.batchNote = h('p', { id: 'batch-note', class: 'hint' });
  el.seed = h('input', { id: 'seed', type: 'text', inputmode: 'numeric', autocomplete: 'off', placeholder: 'Random', pattern: '[0-9]*' });
  el.dice = h('button', { type: 'button', id: 'dice', class: 'btn btn-icon dice', title: 'Random seed', 'aria-label': 'Random seed' }, diceIcon());
  el.seedNote = h('p', { id: 'seed-note', class: 'lock-note', hidden: true });
  el.steps = h('input', { id: 'steps', type: 'number', min: '1', inputmode: 'numeric' });
  el.stepsNote = h('p', { id: 'steps-note', class: 'lock-note', hidden: true });
  el.guidance = h('input', { id: 'guidance', type: 'number', min: '0', step: '0.1', inputmode: 'decimal', placeholder: 'Default' });
  el.guidanceNote = h('p', { id: 'guidance-note', class: 'lock-note', hidden: true });
  el.price = h('span', { id: 'price', class: 'price', 'data-state': 'loading', text: '—' });
  el.priceDetail = h('span', { id: 'price-detail', class: 'muted' });
  el.priceMsg = h('p', { id: 'price-msg', class: 'price-msg', hidden: true });
  el.btn = h('button', { type: 'submit', id: 'generate-btn', class: 'btn btn-primary btn-block btn-lg' }, h('span', { text: 'Generate' }), h('kbd', { class: 'kbd', text: '⌘↵' }));

  el.paramSeed = h('div', { class: 'param', id: 'param-seed' },
    h('label', { class: 'label', for: 'seed', text: 'Seed' }),
    h('div', { class: 'input-group' }, el.seed, el.dice),
    el.seedNote);
  el.paramSteps = h('div', { class: 'param', id: 'param-steps' },
    h('label', { class: 'label', for: 'steps', text: 'Steps' }), el.steps, el.stepsNote);
  el.paramGuidance = h('div', { class: 'param', id: 'param-guidance' },
    h('label', { class: 'label', for: 'guidance', text: 'Guidance' }), el.guidance, el.guidanceNote);

  el.form = h('form', { class: 'panel gen-controls', id: 'gen-form', novalidate: true },
    field('Prompt', 'prompt', el.prompt,
      h('div', { class: 'field-foot' }, h('span', { class: 'hint', text: 'Ctrl/⌘ + Enter to generate' }), el.promptCount)),
    field('Model', 'model', el.model, el.modelNote, el.modelLocked),
    h('div', { class: 'field' },
      h('span', { class: 'label', text: 'Size' }),
      el.presets,
      h('div', { class: 'size-inputs', id: 'param-size' },
        h('label', { class: 'mini' }, h('span', { text: 'W' }), el.width),
        h('span', { class: 'times', 'aria-hidden': 'true', text: '×' }),
        h('label', { class: 'mini' }, h('span', { text: 'H' }), el.height)),
      el.sizeNote),
    h('div', { class: 'field' },
      h('label', { class: 'label', for: 'batch', text: 'Images per job' }),
      h('div', { class: 'stepper' }, el.batchDec, el.batch, el.batchInc),
      el.batchNote),
    h('div', { class: 'field params-grid' }, el.paramSeed, el.paramSteps, el.paramGuidance),
    buildLoraField(el.prompt, () => S.reprice()),
    h('div', { class: 'gen-submit' },
      h('div', { class: 'price-line' }, h('span', { class: 'label', text: 'Cost' }), h('span', { class: 'price-wrap' }, el.price, el.priceDetail)),
      el.priceMsg,
      el.btn));

  wire(onSubmit);
  return el.form;
}

function diceIcon() {
  const svg = h('svg:svg', { viewBox: '0 0 24 24', width: '18', height: '18', 'aria-hidden': 'true' });
  svg.append(
    h('svg:rect', { x: '3', y: '3', width: '18', height: '18', rx: '4', fill: 'none', stroke: 'currentColor', 'stroke-width': '2' }),
    ...[[8, 8], [16, 8], [12, 12], [8, 16], [16, 16]].map(([cx, cy]) => h('svg:circle', { cx: String(cx), cy: String(cy), r: '1.6', fill: 'currentColor' })),
  );
  return svg;
}

function wire(onSubmit) {
  const reprice = debounce(updatePrice, 220);
  S.reprice = () => {
    // A quote still in flight is for the old settings: bumping the sequence now (not when the
    // debounced request starts) keeps it from marking the new settings' price as shown.
    S.priceSeq++;
    el.price.dataset.state = 'loading';
    S.priceOk = false;
    syncButton();
    reprice();
  };
  S.saveDraft = debounce(saveDraft, 400);
  el.form.addEventListener('submit', (e) => {
    e.preventDefault();
    onSubmit();
  });
  el.form.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      onSubmit();
    }
  });
  el.prompt.addEventListener('input', () => {
    el.promptCount.textContent = fmtNum(el.prompt.value.length);
    el.prompt.classList.remove('invalid');
    S.saveDraft();
  });
  el.model.addEventListener('change', () => {
    selectModel(el.model.value);
    S.saveDraft();
  });
  el.width.addEventListener('input', () => customSize());
  el.height.addEventListener('input', () => customSize());
  el.batch.addEventListener('input', () => {
    S.reprice();
  });
  el.batch.addEventListener('change', () => {
    setBatch(parseInt(el.batch.value, 10));
  });
  el.batchDec.addEventListener('click', () => setBatch(batchValue() - 1));
  el.batchInc.addEventListener('click', () => setBatch(batchValue() + 1));
  el.seed.addEventListener('input', () => {
    el.seed.value = el.seed.value.replace(/[^0-9]/g, '');
    S.reprice();
  });
  el.dice.addEventListener('click', () => {
    const b = new Uint32Array(1);
    crypto.getRandomValues(b);
    el.seed.value = String(b[0]);
    el.dice.classList.remove('roll');
    void el.dice.offsetWidth;
    el.dice.classList.add('roll');
    S.reprice();
  });
  el.steps.addEventListener('input', () => S.reprice());
  el.guidance.addEventListener('input', () => S.reprice());
}

// ---------------------------------------------------------------- drafts

function draftKey() {
  return `atelier.draft.${store.user ? store.user.id : 0}`;
}

function saveDraft() {
  try {
    localStorage.setItem(draftKey(), JSON.stringify({ prompt: el.prompt.value, model: el.model.value, width: S.width, height: S.height, sizeTouched: S.sizeTouched }));
  } catch {
    /* storage may be off */
  }
}

export function loadDraft() {
  try {
    return JSON.parse(localStorage.getItem(draftKey()) || 'null');
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- models and parameters

const selectable = (m) => m.access === 'yes' || m.access === 'limited';

function optionText(m) {
  switch (m.access) {
    case 'limited':
      return m.quota ? `${m.label} · ${m.quota.left}/${m.quota.limit} left this week` : `${m.label} · limited`;
    case 'locked':
      return `${m.label} · locked${m.quota && m.quota.left === 0 ? ' (quota used up)' : ''}`;
    case 'unavailable':
      return `${m.label} · unavailable (missing)`;
    default:
      return m.label;
  }
}

/** Loads the models the plan offers (and, once, the server's request limits) into the form. */
export async function loadModels() {
  const [r, limits] = await Promise.all([
    get('/api/models'),
    S.limits || get('/api/limits'),
    // The picker says why when it cannot load; the rest of the form works without it.
    loadLoras().catch((e) => console.error(e)),
  ]);
  S.models = r;
  S.limits = limits;
  S.level = levelIndex(r.parameters);
  const keep = el.model.value || (loadDraft() || {}).model;
  clear(el.model);
  for (const m of r.models) {
    const o = h('option', { value: m.id, text: optionText(m), disabled: !selectable(m) });
    o.dataset.access = m.access;
    el.model.append(o);
  }
  const ok = r.models.filter(selectable);
  // Unless chosen before, an unmetered model first: a limited one spends the weekly quota.
  const pick = ok.find((m) => m.id === keep) || ok.find((m) => m.access === 'yes') || ok[0] || null;
  el.model.value = pick ? pick.id : '';
  if (!pick) el.model.selectedIndex = -1;
  renderLockedList();
  applyLevel();
  renderPresets();
  selectModel(pick ? pick.id : null);
}

function renderLockedList() {
  clear(el.modelLocked);
  for (const m of S.models.models) {
    if (selectable(m)) continue;
    let why;
    if (m.access === 'unavailable') why = m.reason || 'the model files are missing on this server; ask your admin';
    else why = m.reason || 'not included in your plan';
    const unlock = (m.plans_allowing || []).map(planName);
    el.modelLocked.append(
      h('li', { class: `locked-item ${m.access}`, data: { model: m.id } },
        h('span', { class: ['lock-ico', m.access === 'unavailable' && 'missing'], 'aria-hidden': 'true' }),
        h('div', {},
          h('strong', { text: m.label }), ' ',
          pill(m.access === 'unavailable' ? 'missing' : 'locked', m.access === 'unavailable' ? 'warn' : 'muted'),
          h('div', { class: 'muted', text: capFirst(why) }),
          unlock.length ? h('div', { class: 'unlock', text: `unlocks with: ${unlock.join(', ')}` }) : null)));
  }
  el.modelLocked.hidden = !el.modelLocked.children.length;
}

/** The names of the plans with full ("yes") access to a limited model's tag. */
function unlimitedWith(m) {
  const tag = m.quota && m.quota.tag;
  if (!tag) return (m.plans_allowing || []).map(planName);
  return store.plans.filter((p) => (p.models || {})[tag] === 'yes').map((p) => p.name);
}

export const capFirst = (s) => (s ? s[0].toUpperCase() + s.slice(1) : s);

export function selectModel(id) {
  const m = S.models && S.models.models.find((x) => x.id === id);
  S.model = m || null;
  clear(el.modelNote);
  if (!m) {
    el.modelNote.append(h('span', { class: 'warn-text', text: 'No model is available to you right now.' }));
  } else {
    const bits = [];
    if (m.kind) bits.push(m.kind);
    bits.push(`${m.default_steps} steps`);
    bits.push(`default ${m.default_width}×${m.default_height}`);
    el.modelNote.append(h('span', { class: 'muted', text: bits.join(' · ') }));
    if (m.access === 'limited' && m.quota) {
      el.modelNote.append(
        h('div', { class: 'quota' },
          h('span', { text: `Limited on ${planName(S.models.plan)}: ` }),
          h('strong', { text: `${m.quota.left} of ${m.quota.limit}` }),
          h('span', { text: ` ${m.quota.tag} images left this week` }),
          unlimitedWith(m).length ? h('span', { class: 'muted', text: ` · unlimited with ${unlimitedWith(m).join(', ')}` }) : null));
    }
    el.steps.placeholder = String(m.default_steps);
    if (!S.sizeTouched) {
      S.width = m.default_width;
      S.height = m.default_height;
    }
  }
  if (S.models && !S.sizeTouched && S.level < 2 && !isPreset(S.width, S.height)) {
    const p = S.models.size_presets[0];
    if (p) [S.width, S.height] = p;
  }
  syncSize();
  S.reprice();
}

export function isPreset(w, hgt) {
  return !!(S.models && S.models.size_presets.some(([a, b]) => a === w && b === hgt));
}

function renderPresets() {
  clear(el.presets);
  for (const [w, hgt] of S.models.size_presets) {
    const shape = h('span', { class: 'ratio-shape', 'aria-hidden': 'true' });
    const k = 22 / Math.max(w, hgt);
    shape.style.width = `${Math.round(w * k)}px`;
    shape.style.height = `${Math.round(hgt * k)}px`;
    const b = h('button', {
      type: 'button',
      class: 'preset',
      role: 'radio',
      'aria-checked': 'false',
      data: { w: String(w), h: String(hgt) },
      title: `${w} × ${hgt}`,
      on: {
        click: () => {
          S.width = w;
          S.height = hgt;
          S.sizeTouched = true;
          syncSize();
          S.reprice();
          S.saveDraft();
        },
      },
    }, h('span', { class: 'ratio-box' }, shape), h('span', { class: 'preset-text' }, h('strong', { text: aspectLabel(w, hgt) }), h('small', { text: `${w}×${hgt}` })));
    b.setAttribute('aria-label', `${aspectLabel(w, hgt)} ${w}×${hgt}`);
    el.presets.append(b);
  }
}

export function syncSize() {
  el.width.value = String(S.width);
  el.height.value = String(S.height);
  for (const b of el.presets.children) {
    const on = Number(b.dataset.w) === S.width && Number(b.dataset.h) === S.height;
    b.classList.toggle('active', on);
    b.setAttribute('aria-checked', on ? 'true' : 'false');
  }
}

function customSize() {
  const w = parseInt(el.width.value, 10);
  const hgt = parseInt(el.height.value, 10);
  if (Number.isFinite(w)) S.width = w;
  if (Number.isFinite(hgt)) S.height = hgt;
  S.sizeTouched = true;
  for (const b of el.presets.children) {
    const on = Number(b.dataset.w) === S.width && Number(b.dataset.h) === S.height;
    b.classList.toggle('active', on);
    b.setAttribute('aria-checked', on ? 'true' : 'false');
  }
  S.reprice();
  S.saveDraft();
}

function maxBatch() {
  const mb = S.models ? S.models.max_batch : 1;
  const most = Math.min(MAX_UI_BATCH, (S.limits && S.limits.max_batch) || MAX_UI_BATCH);
  return mb === null || mb === undefined ? most : Math.min(mb, most);
}

/** The server's bounds on the inputs (GET /api/limits). */
function applyLimits() {
  const lim = S.limits || {};
  for (const [input, max] of [[el.width, lim.max_width], [el.height, lim.max_height]]) {
    if (lim.min_side) input.min = String(lim.min_side);
    if (lim.size_step) input.step = String(lim.size_step);
    if (max) input.max = String(max);
  }
  if (lim.max_steps) el.steps.max = String(lim.max_steps);
  if (lim.max_guidance !== undefined) el.guidance.max = String(lim.max_guidance);
  if (lim.max_prompt_bytes) el.prompt.maxLength = lim.max_prompt_bytes;
}

function batchValue() {
  const v = parseInt(el.batch.value, 10);
  return Number.isFinite(v) ? v : 1;
}

function setBatch(n) {
  const max = maxBatch();
  n = Math.max(1, Math.min(max, Number.isFinite(n) ? n : 1));
  el.batch.value = String(n);
  el.batchDec.disabled = n <= 1;
  el.batchInc.disabled = n >= max;
  S.reprice();
}

function lockParam(wrapper, inputs, note, allowed, text) {
  wrapper.classList.toggle('locked', !allowed);
  for (const i of inputs) {
    i.disabled = !allowed;
    if (!allowed && i.tagName === 'INPUT' && i !== el.width && i !== el.height) i.value = '';
  }
  note.hidden = allowed;
  note.textContent = allowed ? '' : text;
}

function applyLevel() {
  const lv = S.level;
  const planLabel = planName(S.models.plan);
  lockParam(el.paramSeed, [el.seed, el.dice], el.seedNote, lv >= 1, needsPlanNote('Seed', 'standard'));
  lockParam(el.paramSteps, [el.steps], el.stepsNote, lv >= 1, needsPlanNote('Steps', 'standard'));
  lockParam(el.paramGuidance, [el.guidance], el.guidanceNote, lv >= 2, needsPlanNote('Guidance', 'advanced'));
  const sizeWrap = el.width.closest('.size-inputs');
  lockParam(sizeWrap, [el.width, el.height], el.sizeNote, lv >= 2, needsPlanNote('Custom size', 'advanced'));
  applyLimits();
  const max = maxBatch();
  el.batch.max = String(max);
  const mb = S.models.max_batch;
  const next = store.plans.find((p) => p.rank > ((store.plans.find((x) => x.plan === S.models.plan) || {}).rank ?? -1) && (p.max_batch === null || (mb !== null && p.max_batch > mb)));
  let note = mb === null ? `No batch limit on ${planLabel} (up to ${MAX_UI_BATCH} here).` : `Up to ${mb} per job on ${planLabel}.`;
  if (next && mb !== null) note += ` ${next.name} allows ${next.max_batch === null ? 'unlimited' : next.max_batch}.`;
  el.batchNote.textContent = note;
  setBatch(batchValue());
}

// ---------------------------------------------------------------- price

export function currentSpec() {
  const spec = {
    model: el.model.value,
    prompt: el.prompt.value.trim(),
    width: S.width,
    height: S.height,
    batch: batchValue(),
  };
  if (S.level >= 1 && el.seed.value.trim() !== '') spec.seed = el.seed.value.trim();
  if (S.level >= 1 && el.steps.value.trim() !== '') spec.steps = parseInt(el.steps.value, 10);
  if (S.level >= 2 && el.guidance.value.trim() !== '') spec.guidance = Number(el.guidance.value);
  const loras = chosenLoras();
  if (loras.length) spec.loras = loras;
  return spec;
}

/** A local check before asking the server; returns a message or null. */
function localProblem(spec) {
  if (!spec.model) return 'Choose a model.';
  if (spec.seed !== undefined && (!/^\d+$/.test(spec.seed) || BigInt(spec.seed) > U64_MAX)) return 'The seed must be a whole number from 0 to 18446744073709551615.';
  if (spec.steps !== undefined && !(spec.steps >= 1)) return 'Steps must be a whole number of at least 1.';
  if (spec.guidance !== undefined && !Number.isFinite(spec.guidance)) return 'Guidance must be a number.';
  if (!Number.isFinite(spec.width) || !Number.isFinite(spec.height)) return 'Enter a width and a height.';
  const lim = S.limits;
  if (lim) {
    const side = (v, max) => v >= lim.min_side && v <= max && v % lim.size_step === 0;
    if (!side(spec.width, lim.max_width) || !side(spec.height, lim.max_height)) {
      return `Width and height must be multiples of ${lim.size_step} from ${lim.min_side} to ${lim.max_width}×${lim.max_height}.`;
    }
    if (spec.steps !== undefined && spec.steps > lim.max_steps) return `Steps must be at most ${lim.max_steps}.`;
    if (spec.guidance !== undefined && !(spec.guidance >= 0 && spec.guidance <= lim.max_guidance)) return `Guidance must be between 0 and ${lim.max_guidance}.`;
  }
  const m = S.model;
  if (m && m.access === 'limited' && m.quota && spec.batch > m.quota.left) {
    return m.quota.left === 0
      ? `The weekly quota of ${m.quota.limit} ${m.quota.tag} images is used up.`
      : `Only ${m.quota.left} ${m.quota.tag} image${m.quota.left === 1 ? '' : 's'} left this week; lower the batch.`;
  }
  return null;
}

export function showPriceMsg(text, kind = 'error') {
  el.priceMsg.hidden = !text;
  el.priceMsg.textContent = text || '';
  el.priceMsg.className = `price-msg ${kind}`;
}

export async function updatePrice() {
  const seq = ++S.priceSeq;
  const spec = currentSpec();
  const problem = localProblem(spec);
  if (problem && !spec.model) {
    el.price.textContent = '—';
    el.priceDetail.textContent = '';
    el.price.dataset.state = 'error';
    showPriceMsg(problem);
    S.priceOk = false;
    syncButton();
    return;
  }
  const q = { model: spec.model, width: spec.width, height: spec.height, batch: spec.batch, steps: spec.steps, seed: spec.seed, guidance: spec.guidance, loras: spec.loras ? spec.loras.length : undefined };
  try {
    const r = await get(`/api/price${qs(q)}`);
    if (seq !== S.priceSeq) return;
    const p = r.price || {};
    el.price.textContent = `${p.total} credits`;
    el.price.dataset.total = String(p.total);
    el.priceDetail.textContent = spec.batch > 1 ? `${p.per_item} × ${spec.batch} · ${fmtNum(r.credits_available)} available` : `${fmtNum(r.credits_available)} available`;
    el.price.dataset.state = 'ok';
    if (problem) {
      showPriceMsg(problem);
      S.priceOk = false;
    } else if (!r.allowed) {
      const d = describeError({ status: r.status, message: r.message, details: r.details });
      showPriceMsg(d.lines.join(' '));
      S.priceOk = false;
    } else {
      showPriceMsg(null);
      S.priceOk = true;
    }
  } catch (e) {
    if (seq !== S.priceSeq) return;
    el.price.textContent = '—';
    el.price.dataset.state = 'error';
    el.priceDetail.textContent = '';
    showPriceMsg(problem || describeError(e).lines.join(' '));
    S.priceOk = false;
  }
  syncButton();
}

export function syncButton() {
  el.btn.disabled = S.submitting || !S.priceOk;
  el.btn.classList.toggle('is-busy', S.submitting);
}

// ---------------------------------------------------------------- reuse ("Use these settings")

export function applyReuse(r) {
  const skipped = [];
  // An image's prompt carries its LoRAs as <lora:name:w> tags (as A1111 writes them): they go
  // to the picker, and stay in the prompt (the server reads them) when the picker cannot take them.
  const { prompt, missing } = takeTags(r.prompt || '');
  if (missing.length) skipped.push(`LoRA ${missing.join(', ')} (not in your libraries or over your plan's count)`);
  el.prompt.value = prompt;
  el.promptCount.textContent = fmtNum(el.prompt.value.length);
  const m = S.models.models.find((x) => x.id === r.model);
  if (m && selectable(m)) {
    el.model.value = m.id;
    selectModel(m.id);
  } else if (r.model) skipped.push(`model ${r.model} (${m ? m.access : 'not served'})`);
  if (isPreset(r.width, r.height) || S.level >= 2) {
    S.width = r.width;
    S.height = r.height;
    S.sizeTouched = true;
    syncSize();
  } else skipped.push(`custom size ${r.width}×${r.height}`);
  if (S.level >= 1) {
    el.seed.value = String(r.seed);
    if (r.steps) el.steps.value = String(r.steps);
  } else skipped.push('seed and steps');
  if (r.guidance !== null && r.guidance !== undefined) {
    if (S.level >= 2) el.guidance.value = String(r.guidance);
    else skipped.push('guidance');
  } else if (S.level >= 2) el.guidance.value = '';
  S.reprice();
  S.saveDraft();
  if (skipped.length) notice(`Not applied on your plan: ${skipped.join(', ')}.`, 'Settings loaded');
  else notice('The image\u2019s settings are loaded.', 'Settings loaded');
  el.prompt.focus();
}

// ---------------------------------------------------------------- submitting

/** The spec to submit once the form allows it, or null (the form says why). */
export async function readySpec() {
  const spec = currentSpec();
  if (!spec.prompt) {
    el.prompt.classList.add('invalid');
    el.prompt.focus();
    showPriceMsg('Write a prompt first.');
    return null;
  }
  if (!S.priceOk) {
    if (el.price.dataset.state !== 'loading') return null;
    // The price is on its way: submit once it has arrived.
    await updatePrice();
    if (!S.priceOk) return null;
  }
  return spec;
}

export function setSubmitting(on) {
  S.submitting = on;
  syncButton();
}

/** On the first visit: the draft's prompt and size (when the plan allows that size). */
export function restoreDraft() {
  const d = loadDraft();
  if (!d) return;
  el.prompt.value = d.prompt || '';
  el.promptCount.textContent = fmtNum(el.prompt.value.length);
  if (d.sizeTouched && d.width && d.height && (isPreset(d.width, d.height) || S.level >= 2)) {
    S.width = d.width;
    S.height = d.height;
    S.sizeTouched = true;
    syncSize();
    S.reprice();
  }
}
