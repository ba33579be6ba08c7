// The Generate page: the form (genform.js) beside the progress of the job in focus — preview,
// step, speed, ETA, queue position and cancel, from the watches of jobwatch.js — the other
// unfinished jobs, and the results grid.

import { get, post, randomKey } from './api.js';
import { h, clear, toast, notice, fmtSeconds, describeError } from './ui.js';
import { store, refreshAccount } from './store.js';
import { openViewer } from './viewer.js';
import * as form from './genform.js';
import { chooseLora } from './lorapick.js';
import { watchers, watchJob, onJobs, markStopping, pruneFinished } from './jobwatch.js';

const S = {
  root: null,
  lastAttempt: null,
  focus: null,
  resumed: false,
  recentLoaded: false,
  results: [], // {id, job_id, ...meta?} newest first, what the results grid shows
};

const el = {};

// ---------------------------------------------------------------- building the page

export function mount(root) {
  S.root = root;
  el.form = form.buildForm(submit);

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


  el.cancel.addEventListener('click', () => {
    if (S.focus) cancelJob(S.focus, el.cancel);
  });
  el.previewBox.addEventListener('click', () => {
    const w = S.focus && watchers.get(S.focus);
    if (w && w.images && w.images.length) openResults(w.images[0]);
  });
  onJobs({ change: renderAll, ended: onJobEnded });
  renderProgress();
}

// ---------------------------------------------------------------- submit

async function submit() {
  if (form.S.submitting) return;
  const spec = await form.readySpec();
  if (!spec) return;
  // The seed goes out as its digits (a u64 does not fit a JS number).
  const seed = spec.seed;
  delete spec.seed;
  let body = JSON.stringify(spec);
  if (seed !== undefined) body = `${body.slice(0, -1)},"seed":${seed}}`;
  const key = S.lastAttempt && S.lastAttempt.body === body ? S.lastAttempt.key : randomKey();
  S.lastAttempt = { body, key };
  form.setSubmitting(true);
  try {
    const r = await post('/api/jobs', body, { headers: { 'Idempotency-Key': key } });
    S.lastAttempt = null;
    form.showPriceMsg(null);
    const job = r.job;
    watch(job, true);
    form.S.reprice();
    if (window.matchMedia('(max-width: 860px)').matches) el.progress.scrollIntoView({ behavior: 'smooth', block: 'start' });
    refreshAccount().catch(() => {});
    if (form.S.model && form.S.model.access === 'limited') form.loadModels().catch(() => {});
  } catch (e) {
    if (e.status !== 0) S.lastAttempt = null;
    toast(e);
    if ([402, 403, 503].includes(e.status)) {
      form.showPriceMsg(describeError(e).lines.join(' '));
      form.loadModels().catch(() => {});
      refreshAccount().catch(() => {});
    }
  } finally {
    form.setSubmitting(false);
  }
}

async function cancelJob(id, btn) {
  if (btn) btn.disabled = true;
  try {
    const r = await post(`/api/jobs/${encodeURIComponent(id)}/cancel`);
    if (r && r.status !== 'canceled') markStopping(id);
  } catch (e) {
    toast(e);
  } finally {
    if (btn) btn.disabled = false;
  }
}

// ---------------------------------------------------------------- watching jobs

function watch(job, focus) {
  const { watch: w, created } = watchJob(job);
  if (created && !w.final) addPending(w);
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
  form.loadModels().catch(() => {});
  // Keep only a few finished watchers around (the one in focus stays).
  pruneFinished(S.focus);
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
  const w = S.focus ? watchers.get(S.focus) : null;
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
  const steps = (w.step && w.step.steps) || spec.steps || (form.S.model && form.S.model.id === spec.model ? form.S.model.default_steps : null);
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
    if (w.stage) stage = form.capFirst(w.stage.replace(/_/g, ' '));
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
  const active = [...watchers.values()].filter((w) => w.id !== S.focus && !w.final);
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

// ---------------------------------------------------------------- page life

export async function show() {
  const first = !form.S.models;
  await form.loadModels();
  if (first && !store.reuse) form.restoreDraft();
  if (store.reuse) {
    const r = store.reuse;
    store.reuse = null;
    form.applyReuse(r);
  }
  if (store.useLora) {
    const name = store.useLora;
    store.useLora = null;
    if (chooseLora(name)) notice(`LoRA "${name}" is applied; write your prompt.`, 'LoRA picked');
    else toast(`LoRA "${name}" cannot be applied on your plan or is gone.`, 'LoRA not picked');
  }
  if (!S.resumed) {
    S.resumed = true;
    await resume();
  }
  if (!S.recentLoaded) {
    S.recentLoaded = true;
    loadRecent();
  }
  if (!store.reuse && document.activeElement === document.body) form.el.prompt.focus({ preventScroll: true });
}

export function hide() {}
