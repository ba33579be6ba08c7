// The Generate page: prompt, model, size, batch and the parameters the plan allows; the price
// before submitting; live progress (SSE) with preview, step, speed, ETA, queue position and
// cancel; the results grid.

import { get, post, qs, randomKey } from './api.js';
import { h, clear, toast, notice, fmtNum, fmtSeconds, aspectLabel, debounce, describeError, pill } from './ui.js';
import { store, levelIndex, needsPlanNote, planName, refreshAccount } from './store.js';
import { openViewer } from './viewer.js';

const MAX_UI_BATCH = 16;
const U64_MAX = 18446744073709551615n;

const S = {
  root: null,
  models: null, // the /api/models answer
  level: 0,
  model: null,
  width: 512,
  height: 512,
  sizeTouched: false,
  priceSeq: 0,
  priceOk: false,
  submitting: false,
  lastAttempt: null,
  watchers: new Map(),
  focus: null,
  resumed: false,
  recentLoaded: false,
  results: [], // {id, job_id, ...meta?} newest first, what the results grid shows
};

const el = {};

// ---------------------------------------------------------------- building the page

function field(label, forId, ...children) {
  return h('div', { class: 'field' }, h('label', { class: 'label', for: forId, text: label }), ...children);
}

export function mount(root) {
  S.root = root;
  el.prompt = h('textarea', {
    id: 'prompt',
    rows: '5',
    maxlength: '10000',
    placeholder: 'Describe the image — subject, style, light, lens…',
    spellcheck: 'true',
  });
  el.promptCount = h('span', { class: 'muted', text: '0' });
  el.model = h('select', { id: 'model', 'aria-describedby': 'model-note' });
  el.modelNote = h('div', { id: 'model-note', class: 'note' });
  el.modelLocked = h('ul', { id: 'model-locked', class: 'locked-list' });
  el.presets = h('div', { id: 'size-presets', class: 'presets', role: 'radiogroup', 'aria-label': 'Size presets' });
  el.width = h('input', { id: 'width', type: 'number', min: '64', step: '16', inputmode: 'numeric' });
  el.height = h('input', { id: 'height', type: 'number', min: '64', step: '16', inputmode: 'numeric' });
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
  el.guidance = h('input', { id: 'guidance', type: 'number', min: '0', max: '30', step: '0.1', inputmode: 'decimal', placeholder: 'Default' });
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
    h('div', { class: 'gen-submit' },
      h('div', { class: 'price-line' }, h('span', { class: 'label', text: 'Cost' }), h('span', { class: 'price-wrap' }, el.price, el.priceDetail)),
      el.priceMsg,
      el.btn));

  // Progress of the job in focus.
  el.progress = h('div', { id: 'progress', class: 'panel progress', 'data-state': 'idle', 'aria-live': 'polite' });
  el.preview = h('img', { id: 'preview', alt: 'Live preview', class: 'preview-img' });
  el.previewBox = h('div', { class: 'preview-box empty' }, el.preview, h('div', { class: 'preview-ph', 'aria-hidden': 'true' }));
  el.status = h('span', { id: 'progress-status', class: 'status-label' });
  el.cancel = h('button', { type: 'button', id: 'cancel-btn', class: 'btn btn-sm btn-ghost-danger', text: 'Cancel' });
  el.progPrompt = h('p', { id: 'progress-prompt', class: 'progress-prompt' });
  el.barFill = h('div', { class: 'bar-fill', id: 'progress-bar' });
  el.bar = h('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': '0' }, el.barFill);
  el.step = h('span', { id: 'progress-step' });
  el.image = h('span', { id: 'progress-image' });
  el.speed = h('span', { id: 'progress-speed' });
  el.eta = h('span', { id: 'progress-eta' });
  el.stage = h('p', { id: 'progress-stage', class: 'progress-stage' });
  el.progMain = h('div', { class: 'progress-main' },
    el.previewBox,
    h('div', { class: 'progress-info' },
      h('div', { class: 'progress-head' }, el.status, el.cancel),
      el.progPrompt,
      el.bar,
      h('div', { class: 'progress-stats' }, el.step, el.image, el.speed, el.eta),
      el.stage));
  el.idle = h('div', { class: 'progress-idle' },
    h('div', { class: 'idle-art', 'aria-hidden': 'true' }),
    h('div', {},
      h('strong', { text: 'Ready when you are' }),
      h('p', { class: 'muted', text: 'Write a prompt, pick a model and size, and press Generate. Progress and a live preview show here.' })));
  el.progress.append(el.idle, el.progMain);
  el.others = h('div', { id: 'other-jobs', class: 'other-jobs', hidden: true });
  el.results = h('div', { id: 'results', class: 'results-grid' });
  el.resultsEmpty = h('p', { class: 'muted results-empty', text: 'Nothing yet — your images will collect here.' });

  root.append(
    h('div', { class: 'gen-layout' },
      el.form,
      h('div', { class: 'gen-output' },
        el.progress,
        el.others,
        h('div', { class: 'section-head' },
          h('h2', { text: 'Results' }),
          h('a', { href: '#/gallery', class: 'link', text: 'Open gallery →' })),
        el.resultsEmpty,
        el.results)));

  wire();
  renderProgress();
}

function diceIcon() {
  const svg = h('svg:svg', { viewBox: '0 0 24 24', width: '18', height: '18', 'aria-hidden': 'true' });
  svg.append(
    h('svg:rect', { x: '3', y: '3', width: '18', height: '18', rx: '4', fill: 'none', stroke: 'currentColor', 'stroke-width': '2' }),
    ...[[8, 8], [16, 8], [12, 12], [8, 16], [16, 16]].map(([cx, cy]) => h('svg:circle', { cx: String(cx), cy: String(cy), r: '1.6', fill: 'currentColor' })),
  );
  return svg;
}

function wire() {
  const reprice = debounce(updatePrice, 220);
  S.reprice = () => {
    el.price.dataset.state = 'loading';
    S.priceOk = false;
    syncButton();
    reprice();
  };
  S.saveDraft = debounce(saveDraft, 400);
  el.form.addEventListener('submit', (e) => {
    e.preventDefault();
    submit();
  });
  el.form.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      submit();
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
  el.cancel.addEventListener('click', () => {
    if (S.focus) cancelJob(S.focus, el.cancel);
  });
  el.previewBox.addEventListener('click', () => {
    const w = S.focus && S.watchers.get(S.focus);
    if (w && w.images && w.images.length) openResults(w.images[0]);
  });
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

function loadDraft() {
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

async function loadModels() {
  const r = await get('/api/models');
  S.models = r;
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

const capFirst = (s) => (s ? s[0].toUpperCase() + s.slice(1) : s);

function selectModel(id) {
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

function isPreset(w, hgt) {
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

function syncSize() {
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
  return mb === null || mb === undefined ? MAX_UI_BATCH : Math.min(mb, MAX_UI_BATCH);
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
  const lim = S.models.limits || {};
  if (lim.max_width) el.width.max = String(lim.max_width);
  if (lim.max_height) el.height.max = String(lim.max_height);
  if (lim.max_steps) el.steps.max = String(lim.max_steps);
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

function currentSpec() {
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
  return spec;
}

/** A local check before asking the server; returns a message or null. */
function localProblem(spec) {
  if (!spec.model) return 'Choose a model.';
  if (spec.seed !== undefined && (!/^\d+$/.test(spec.seed) || BigInt(spec.seed) > U64_MAX)) return 'The seed must be a whole number from 0 to 18446744073709551615.';
  if (spec.steps !== undefined && !(spec.steps >= 1)) return 'Steps must be a whole number of at least 1.';
  if (spec.guidance !== undefined && !Number.isFinite(spec.guidance)) return 'Guidance must be a number.';
  if (!Number.isFinite(spec.width) || !Number.isFinite(spec.height)) return 'Enter a width and a height.';
  const m = S.model;
  if (m && m.access === 'limited' && m.quota && spec.batch > m.quota.left) {
    return m.quota.left === 0
      ? `The weekly quota of ${m.quota.limit} ${m.quota.tag} images is used up.`
      : `Only ${m.quota.left} ${m.quota.tag} image${m.quota.left === 1 ? '' : 's'} left this week; lower the batch.`;
  }
  return null;
}

function showPriceMsg(text, kind = 'error') {
  el.priceMsg.hidden = !text;
  el.priceMsg.textContent = text || '';
  el.priceMsg.className = `price-msg ${kind}`;
}

async function updatePrice() {
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
  const q = { model: spec.model, width: spec.width, height: spec.height, batch: spec.batch, steps: spec.steps, seed: spec.seed, guidance: spec.guidance };
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

function syncButton() {
  el.btn.disabled = S.submitting || !S.priceOk;
  el.btn.classList.toggle('is-busy', S.submitting);
}

// ---------------------------------------------------------------- submit

async function submit() {
  if (S.submitting) return;
  const spec = currentSpec();
  if (!spec.prompt) {
    el.prompt.classList.add('invalid');
    el.prompt.focus();
    showPriceMsg('Write a prompt first.');
    return;
  }
  if (!S.priceOk) {
    if (el.price.dataset.state === 'loading') {
      // The price is on its way: submit once it has arrived.
      await updatePrice();
      if (!S.priceOk) return;
    } else return;
  }
  // The seed goes out as its digits (a u64 does not fit a JS number).
  const seed = spec.seed;
  delete spec.seed;
  let body = JSON.stringify(spec);
  if (seed !== undefined) body = `${body.slice(0, -1)},"seed":${seed}}`;
  const key = S.lastAttempt && S.lastAttempt.body === body ? S.lastAttempt.key : randomKey();
  S.lastAttempt = { body, key };
  S.submitting = true;
  syncButton();
  try {
    const r = await post('/api/jobs', body, { headers: { 'Idempotency-Key': key } });
    S.lastAttempt = null;
    showPriceMsg(null);
    const job = r.job;
    watch(job, true);
    S.reprice();
    if (window.matchMedia('(max-width: 860px)').matches) el.progress.scrollIntoView({ behavior: 'smooth', block: 'start' });
    refreshAccount().catch(() => {});
    if (S.model && S.model.access === 'limited') loadModels().catch(() => {});
  } catch (e) {
    if (e.status !== 0) S.lastAttempt = null;
    toast(e);
    if ([402, 403, 503].includes(e.status)) {
      showPriceMsg(describeError(e).lines.join(' '));
      loadModels().catch(() => {});
      refreshAccount().catch(() => {});
    }
  } finally {
    S.submitting = false;
    syncButton();
  }
}

async function cancelJob(id, btn) {
  if (btn) btn.disabled = true;
  try {
    const r = await post(`/api/jobs/${encodeURIComponent(id)}/cancel`);
    const w = S.watchers.get(id);
    if (w && r && r.status !== 'canceled') {
      w.stopping = true;
      renderAll();
    }
  } catch (e) {
    toast(e);
  } finally {
    if (btn) btn.disabled = false;
  }
}

// ---------------------------------------------------------------- watching jobs

/**
 * One EventSource on /api/events carries the progress of all the user's jobs (one connection,
 * however many jobs are queued: browsers allow only 6 per server). It is open while a watched
 * job is unfinished. A job that ended while the stream was not connected is caught by asking
 * for it (GET /api/jobs/{id}) each time the stream (re)opens.
 */
const Hub = {
  es: null,
  retry: null,
  dead: false,

  ensure() {
    const active = [...S.watchers.values()].some((w) => !w.final);
    if (!active || this.dead) {
      this.close();
      return;
    }
    if (this.es) return;
    const es = new EventSource('/api/events');
    this.es = es;
    es.onopen = () => this.checkAll();
    es.onmessage = (m) => {
      let ev;
      try {
        ev = JSON.parse(m.data);
      } catch {
        return;
      }
      if (ev.type === 'lagged') {
        this.checkAll();
        return;
      }
      const w = S.watchers.get(ev.job_id);
      if (w) w.onEvent(ev);
    };
    es.onerror = () => {
      // CONNECTING: the browser reconnects by itself (onopen checks again). CLOSED: refused
      // (logged out, server gone): poll the jobs and try the stream again later.
      if (es.readyState !== EventSource.CLOSED) return;
      this.es = null;
      this.checkAll();
      clearTimeout(this.retry);
      this.retry = setTimeout(() => this.ensure(), 5000);
    };
  },

  checkAll() {
    for (const w of S.watchers.values()) if (!w.final) w.check();
  },

  close() {
    if (this.es) this.es.close();
    this.es = null;
    clearTimeout(this.retry);
  },
};

class Watch {
  constructor(job) {
    this.id = job.id;
    this.job = job;
    this.spec = job.spec || {};
    this.state = job.status || 'queued';
    this.position = job.position ?? null;
    this.queueLength = null;
    this.step = null;
    this.preview = null;
    this.stage = null;
    this.images = job.images || [];
    this.error = job.error || null;
    this.charged = null;
    this.stopping = false;
    this.checkTimer = null;
    this.checking = false;
  }

  get final() {
    return ['succeeded', 'failed', 'canceled'].includes(this.state);
  }

  start() {
    Hub.ensure();
  }

  stop() {
    clearTimeout(this.checkTimer);
  }

  /** Asks the server where the job is; repeats while the live stream is down. */
  async check() {
    clearTimeout(this.checkTimer);
    if (this.final || this.checking) return;
    this.checking = true;
    try {
      const r = await get(`/api/jobs/${encodeURIComponent(this.id)}`);
      const j = r.job;
      if (j.status === 'succeeded') this.onEvent({ type: 'succeeded', images: j.images, credits_charged: j.price });
      else if (j.status === 'failed') this.onEvent({ type: 'failed', error: j.error || 'the job failed' });
      else if (j.status === 'canceled') this.onEvent({ type: 'canceled' });
      else if (j.status === 'running' && this.state === 'queued') this.onEvent({ type: 'started' });
      else if (j.status === 'queued' && this.state === 'queued' && j.position != null) this.onEvent({ type: 'queued', position: j.position, queue_length: this.queueLength });
    } catch (e) {
      if (e.status === 401) {
        Hub.dead = true;
        Hub.close();
        return;
      }
      if (e.status === 404) {
        this.onEvent({ type: 'failed', error: 'the job is gone' });
        return;
      }
    } finally {
      this.checking = false;
    }
    if (!this.final && !(Hub.es && Hub.es.readyState === EventSource.OPEN)) {
      this.checkTimer = setTimeout(() => this.check(), 3000);
    }
  }

  onEvent(ev) {
    if (this.final) return;
    switch (ev.type) {
      case 'queued':
        this.state = 'queued';
        this.position = ev.position;
        this.queueLength = ev.queue_length;
        break;
      case 'started':
        this.state = 'running';
        break;
      case 'stage':
        this.state = 'running';
        this.stage = ev.stage;
        break;
      case 'step':
        this.state = 'running';
        // Denoising now: an earlier stage ("loading…") is over.
        this.stage = null;
        this.step = ev;
        break;
      case 'preview':
        this.state = 'running';
        this.preview = ev.data_url;
        break;
      case 'succeeded':
        this.state = 'succeeded';
        this.images = ev.images || [];
        this.charged = ev.credits_charged;
        break;
      case 'failed':
        this.state = 'failed';
        this.error = ev.error || 'the job failed';
        break;
      case 'canceled':
        this.state = 'canceled';
        break;
      default:
        return;
    }
    if (this.final) this.finish();
    renderAll();
  }

  finish() {
    this.stop();
    onJobEnded(this);
    Hub.ensure();
  }
}

function watch(job, focus) {
  let w = S.watchers.get(job.id);
  if (!w) {
    w = new Watch(job);
    S.watchers.set(job.id, w);
    if (!w.final) addPending(w);
    // Events published before the watcher existed are not replayed on an open stream: ask once.
    const open = Hub.es && Hub.es.readyState === EventSource.OPEN;
    w.start();
    if (open) w.check();
  }
  if (focus || !S.focus) S.focus = job.id;
  renderAll();
  return w;
}

function onJobEnded(w) {
  removePending(w.id);
  if (w.state === 'succeeded') {
    const metas = w.images.map((id, i) => ({ id, job_id: w.id, index: i }));
    S.results.unshift(...metas);
    renderResults(metas);
  } else if (w.state === 'failed') {
    toast(`The job failed: ${w.error}`, 'Generation failed');
  }
  refreshAccount().catch(() => {});
  loadModels().catch(() => {});
  // Keep only a few finished watchers around (the one in focus stays).
  for (const [id, x] of S.watchers) {
    if (x.final && id !== S.focus && S.watchers.size > 12) S.watchers.delete(id);
  }
}

// ---------------------------------------------------------------- rendering progress

const STATE_LABEL = {
  queued: 'Queued',
  running: 'Generating',
  succeeded: 'Done',
  failed: 'Failed',
  canceled: 'Canceled',
};

function fraction(w) {
  if (w.state === 'succeeded') return 1;
  const s = w.step;
  if (!s || !s.steps) return 0;
  const images = s.images || 1;
  return Math.min(1, (s.image * s.steps + s.step) / (images * s.steps));
}

function renderAll() {
  renderProgress();
  renderOthers();
}

function renderProgress() {
  const w = S.focus ? S.watchers.get(S.focus) : null;
  if (!w) {
    el.progress.dataset.state = 'idle';
    delete el.progress.dataset.job;
    el.idle.hidden = false;
    el.progMain.hidden = true;
    return;
  }
  el.idle.hidden = true;
  el.progMain.hidden = false;
  el.progress.dataset.job = w.id;
  if (el.progress.dataset.state !== w.state) el.progress.dataset.state = w.state;
  const spec = w.spec;
  const steps = (w.step && w.step.steps) || spec.steps || (S.model && S.model.id === spec.model ? S.model.default_steps : null);
  const images = (w.step && w.step.images) || spec.batch || 1;

  let label = STATE_LABEL[w.state] || w.state;
  if (w.state === 'queued' && w.position) label = `Queued · #${w.position}${w.queueLength ? ` of ${w.queueLength}` : ''} in line`;
  if (w.state === 'running' && w.stopping) label = 'Stopping…';
  if (w.state === 'succeeded' && w.charged != null) label = `Done · ${w.charged} credits`;
  el.status.textContent = label;
  el.status.dataset.state = w.state;
  el.cancel.hidden = w.final;
  el.progPrompt.textContent = spec.prompt || '';
  el.progPrompt.title = spec.prompt || '';

  const f = fraction(w);
  el.barFill.style.width = `${(f * 100).toFixed(1)}%`;
  el.bar.setAttribute('aria-valuenow', String(Math.round(f * 100)));
  el.bar.classList.toggle('indeterminate', w.state === 'queued' || (w.state === 'running' && !w.step));

  let stepText;
  if (w.step) stepText = `step ${w.step.step}/${w.step.steps}`;
  else if (w.state === 'succeeded' && steps) stepText = `step ${steps}/${steps}`;
  else if (w.state === 'queued') stepText = 'waiting for the device';
  else stepText = steps ? `step 0/${steps}` : 'starting';
  if (el.step.textContent !== stepText) el.step.textContent = stepText;
  el.image.textContent = images > 1 ? `image ${Math.min(images, ((w.step && w.step.image) || 0) + 1)}/${images}` : '';
  el.image.hidden = images <= 1;
  el.speed.textContent = w.step && w.step.it_per_s ? `${w.step.it_per_s.toFixed(2)} it/s` : '';
  el.speed.hidden = !el.speed.textContent;
  el.eta.textContent = w.state === 'running' && w.step ? `ETA ${fmtSeconds(w.step.eta_s)}` : '';
  el.eta.hidden = !el.eta.textContent;

  let stage = '';
  if (w.state === 'queued') stage = w.position === 1 ? 'Next up — starting shortly.' : 'Waiting in the queue. You can leave this page; the job keeps going.';
  else if (w.state === 'running') {
    if (w.stage) stage = capFirst(w.stage.replace(/_/g, ' '));
    else if (w.step) stage = images > 1 ? `Denoising image ${w.step.image + 1} of ${images}` : 'Denoising';
    else stage = 'Starting';
  }
  else if (w.state === 'failed') stage = w.error || 'The job failed.';
  else if (w.state === 'canceled') stage = 'The job was canceled; held credits were released.';
  else if (w.state === 'succeeded') stage = `${w.images.length} image${w.images.length === 1 ? '' : 's'} added to your gallery.`;
  el.stage.textContent = stage;
  el.stage.classList.toggle('error', w.state === 'failed');

  // Preview: live estimate while running, the finished image after.
  let src = null;
  if (w.state === 'succeeded' && w.images.length) src = `/api/images/${encodeURIComponent(w.images[0])}/file`;
  else if (w.preview) src = w.preview;
  if (src) {
    if (el.preview.getAttribute('src') !== src) el.preview.src = src;
    el.previewBox.classList.remove('empty');
  } else {
    el.preview.removeAttribute('src');
    el.previewBox.classList.add('empty');
  }
  el.previewBox.classList.toggle('live', w.state === 'running' && !!w.preview);
  el.previewBox.classList.toggle('clickable', w.state === 'succeeded');
  const ratio = `${spec.width || 1} / ${spec.height || 1}`;
  if (el.previewBox.style.aspectRatio !== ratio) el.previewBox.style.aspectRatio = ratio;
}

function renderOthers() {
  clear(el.others);
  const active = [...S.watchers.values()].filter((w) => w.id !== S.focus && !w.final);
  el.others.hidden = !active.length;
  if (!active.length) return;
  el.others.append(h('div', { class: 'others-title', text: `${active.length} more job${active.length === 1 ? '' : 's'} in progress` }));
  for (const w of active) {
    const fill = h('div', { class: 'bar-fill' });
    fill.style.width = `${(fraction(w) * 100).toFixed(1)}%`;
    const cancel = h('button', { type: 'button', class: 'btn btn-sm btn-ghost-danger', text: 'Cancel' });
    cancel.addEventListener('click', () => cancelJob(w.id, cancel));
    el.others.append(
      h('div', { class: 'other-job', data: { job: w.id, state: w.state } },
        h('button', { type: 'button', class: 'other-main', title: 'Show this job', on: { click: () => { S.focus = w.id; renderAll(); } } },
          h('span', { class: 'other-state', text: w.state === 'queued' ? `Queued${w.position ? ` #${w.position}` : ''}` : w.step ? `step ${w.step.step}/${w.step.steps}` : 'Running' }),
          h('span', { class: 'other-prompt', text: w.spec.prompt || '' }),
          h('div', { class: 'bar bar-thin' }, fill)),
        cancel));
  }
}

// ---------------------------------------------------------------- results

function addPending(w) {
  const spec = w.spec;
  const n = spec.batch || 1;
  for (let i = 0; i < n; i++) {
    const tile = h('div', { class: 'result-card pending', data: { pending: w.id } }, h('div', { class: 'shimmer' }));
    tile.style.aspectRatio = `${spec.width || 1} / ${spec.height || 1}`;
    el.results.prepend(tile);
  }
  el.resultsEmpty.hidden = true;
}

function removePending(jobId) {
  for (const t of el.results.querySelectorAll(`[data-pending="${CSS.escape(jobId)}"]`)) t.remove();
}

function resultTile(meta) {
  const img = h('img', {
    class: 'result',
    src: `/api/images/${encodeURIComponent(meta.id)}/file`,
    alt: meta.prompt || 'Generated image',
    loading: 'lazy',
    decoding: 'async',
    data: { id: meta.id, job: meta.job_id || '' },
  });
  const card = h('button', { type: 'button', class: 'result-card', title: meta.prompt || 'Open', on: { click: () => openResults(meta.id) } }, img);
  if (meta.width && meta.height) card.style.aspectRatio = `${meta.width} / ${meta.height}`;
  img.addEventListener('load', () => {
    card.classList.add('loaded');
    if (!meta.width) card.style.aspectRatio = `${img.naturalWidth} / ${img.naturalHeight}`;
  });
  return card;
}

function renderResults(newMetas) {
  // New results go first, in their batch order.
  const frag = document.createDocumentFragment();
  for (const m of newMetas) frag.append(resultTile(m));
  el.results.prepend(frag);
  el.resultsEmpty.hidden = el.results.children.length > 0;
}

function openResults(id) {
  const list = S.results.slice();
  const i = Math.max(0, list.findIndex((m) => m.id === id));
  openViewer(list, i, {
    onDeleted: (gone) => {
      S.results = S.results.filter((m) => m.id !== gone);
      for (const img of el.results.querySelectorAll('img.result')) if (img.dataset.id === gone) img.closest('.result-card').remove();
      el.resultsEmpty.hidden = el.results.children.length > 0;
    },
  });
}

async function loadRecent() {
  try {
    const r = await get('/api/images?page=1&per_page=12');
    const have = new Set(S.results.map((m) => m.id));
    const add = (r.images || []).filter((m) => !have.has(m.id));
    S.results.push(...add);
    const frag = document.createDocumentFragment();
    for (const m of add) frag.append(resultTile(m));
    el.results.append(frag);
    el.resultsEmpty.hidden = el.results.children.length > 0;
  } catch (e) {
    toast(e);
  }
}

async function resume() {
  try {
    const r = await get('/api/jobs?status=queued,running');
    const jobs = (r.jobs || []).slice().sort((a, b) => (a.created_at < b.created_at ? -1 : 1));
    for (const j of jobs) watch(j, true);
  } catch (e) {
    toast(e);
  }
}

// ---------------------------------------------------------------- reuse ("Use these settings")

function applyReuse(r) {
  const skipped = [];
  el.prompt.value = r.prompt || '';
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

// ---------------------------------------------------------------- page life

export async function show() {
  const first = !S.models;
  await loadModels();
  if (first) {
    const d = loadDraft();
    if (d && !store.reuse) {
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
  }
  if (store.reuse) {
    const r = store.reuse;
    store.reuse = null;
    applyReuse(r);
  }
  if (!S.resumed) {
    S.resumed = true;
    await resume();
  }
  if (!S.recentLoaded) {
    S.recentLoaded = true;
    loadRecent();
  }
  if (!store.reuse && document.activeElement === document.body) el.prompt.focus({ preventScroll: true });
}

export function hide() {}
