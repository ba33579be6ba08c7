// The Train page's run panel (#train-run), below the dataset editor: the training form (base
// model, LoRA name, the plan's preset or — on advanced plans — steps / rank / learning rate /
// resolution), Start, then the live run: step, loss and its running mean, it/s, ETA, the loss
// chart, the sample images as they are made, Cancel; and the dataset's earlier trainings with
// their LoRAs (download as kohya or PEFT, use on the Generate page).
//
// Progress comes over /api/events (the same stream as image jobs); while it is down, and when
// the page is opened mid-run, GET /api/trainings/{id} gives the whole loss history.

import { get, post, randomKey } from './api.js';
import { h, clear, toast, notice, busy, fmtNum, fmtSeconds, fmtRelative, pill } from './ui.js';
import { store, levelIndex, needsPlanNote } from './store.js';
import { drawLossChart } from './losschart.js';

const R = { root: null, dataset: null, images: 0, info: null, models: null, level: 0, watching: null };
const el = {};

/** Builds the panel inside `section` (once). */
export function mountRun(section) {
  R.root = section;
}

/**
 * Shows the panel for `dataset` (`{id, name, trigger}`) holding `images` images; called
 * whenever the editor opens a dataset or its images change.
 */
export async function showRun(dataset, images) {
  const changed = !R.dataset || R.dataset.id !== dataset.id;
  R.dataset = dataset;
  R.images = images;
  R.root.hidden = false;
  if (changed) {
    stopWatching();
    await load();
  } else if (el.start) {
    el.start.disabled = !canStart();
    el.imagesNote.textContent = imagesText();
  }
}

export function hideRun() {
  stopWatching();
  R.dataset = null;
  if (R.root) R.root.hidden = true;
}

async function load() {
  const dsId = R.dataset.id;
  const [info, models] = await Promise.all([get('/api/trainings'), R.models || get('/api/models')]);
  if (!R.dataset || R.dataset.id !== dsId) return;
  R.info = info;
  R.models = models;
  R.level = levelIndex(models.parameters);
  render();
  const mine = trainingsOfDataset();
  const active = mine.find((t) => t.status === 'queued' || t.status === 'running');
  if (active) watch(active.id);
  else if (mine[0]) showJob(mine[0].id);
}

function trainingsOfDataset() {
  return (R.info.trainings || []).filter((t) => t.training && t.training.dataset === R.dataset.id);
}

function canStart() {
  return R.images > 0 && (R.info.allowance_available ?? 1) > 0;
}

function allowanceText() {
  const left = R.info.allowance_available ?? 0;
  return `${fmtNum(left)} training${left === 1 ? '' : 's'} left on your plan`;
}

function imagesText() {
  return `${fmtNum(R.images)} image${R.images === 1 ? '' : 's'} in this dataset`;
}

const slug = (s) => s.toLowerCase().replace(/[^a-z0-9_-]+/g, '-').replace(/^-+|-+$/g, '').slice(0, 60) || 'my-lora';

function render() {
  clear(R.root);
  const info = R.info;
  const preset = info.preset || {};
  const limits = info.limits || {};
  const advanced = R.level >= 2;
  el.model = h('select', { id: 'train-model', 'aria-label': 'Base model' });
  for (const m of R.models.models || []) {
    el.model.append(h('option', { value: m.id, text: m.label || m.id, disabled: m.access === 'no' }));
  }
  const firstOk = (R.models.models || []).find((m) => m.access !== 'no');
  if (firstOk) el.model.value = firstOk.id;
  el.name = h('input', { id: 'train-lora-name', value: slug(R.dataset.name), maxlength: '64', autocapitalize: 'off', spellcheck: 'false' });
  el.prompt = h('input', { id: 'train-sample-prompt', placeholder: `Sample prompt (default: ${R.dataset.trigger || 'the trigger word'})`, maxlength: '500' });
  const num = (id, value, attrs) => h('input', { id, type: 'number', value: String(value ?? ''), disabled: !advanced, ...attrs });
  el.steps = num('train-steps', preset.steps, { min: '1', max: String(limits.max_steps || 10000) });
  el.rank = num('train-rank', preset.rank, { min: '1', max: String(limits.max_rank || 128) });
  el.lr = num('train-lr', preset.lr, { min: '0', step: 'any' });
  el.resolution = h('select', { id: 'train-resolution', disabled: !advanced });
  for (const r of limits.resolutions || [preset.resolution].filter(Boolean)) {
    el.resolution.append(h('option', { value: String(r), text: `${r} px`, selected: r === preset.resolution }));
  }
  el.imagesNote = h('span', { class: 'muted small', id: 'train-images-note', text: imagesText() });
  el.start = h('button', { type: 'submit', class: 'btn btn-primary', id: 'train-start', text: 'Start training', disabled: !canStart() });
  el.allowance = h('span', { class: 'muted small', id: 'train-allowance', text: allowanceText() });
  const field = (label, input) => h('label', { class: 'field' }, h('span', { class: 'label', text: label }), input);
  el.form = h('form', { id: 'train-form', class: 'train-form', on: { submit: start } },
    h('div', { class: 'card-title', text: 'Train a LoRA on this dataset' }),
    h('div', { class: 'train-params' },
      field('Base model', el.model),
      field('LoRA name', el.name),
      field('Steps', el.steps),
      field('Rank', el.rank),
      field('Learning rate', el.lr),
      field('Resolution', el.resolution)),
    advanced ? null : h('p', { class: 'muted small', id: 'train-preset-note', text: `The preset runs ${fmtNum(preset.steps)} steps at rank ${preset.rank}. ${needsPlanNote('Changing them', 'advanced')}.` }),
    field('Sample prompt', el.prompt),
    h('div', { class: 'train-actions' }, el.start, el.imagesNote, el.allowance));
  el.status = h('div', { class: 'train-status', id: 'train-status' });
  el.chart = h('svg:svg', { id: 'loss-chart', class: 'loss-chart' });
  const legend = h('div', { class: 'loss-legend muted small' },
    h('span', { class: 'loss-key loss-key-step' }), 'loss per step ',
    h('span', { class: 'loss-key loss-key-mean' }), 'running mean (50 steps)');
  el.samples = h('div', { class: 'train-samples', id: 'train-samples' });
  el.cancel = h('button', { type: 'button', class: 'btn btn-ghost-danger', id: 'train-cancel', text: 'Cancel training', hidden: true, on: { click: cancel } });
  el.result = h('div', { class: 'train-result', id: 'train-result' });
  el.progress = h('div', { class: 'train-progress', id: 'train-progress', hidden: true },
    h('div', { class: 'train-progress-head' }, el.status, el.cancel), el.chart, legend, el.samples, el.result);
  el.history = h('ul', { class: 'train-history', id: 'train-history' });
  R.root.append(el.form, el.progress, h('div', { class: 'card-title', text: 'Trainings of this dataset' }), el.history);
  renderHistory();
}

function renderHistory() {
  clear(el.history);
  const mine = trainingsOfDataset();
  if (!mine.length) el.history.append(h('li', { class: 'muted small', text: 'None yet.' }));
  for (const t of mine) {
    const name = t.lora || (t.training && t.training.name);
    el.history.append(h('li', { class: 'train-history-item' },
      h('button', { type: 'button', class: 'link', text: name, on: { click: () => (t.status === 'queued' || t.status === 'running' ? watch(t.id) : showJob(t.id)) } }),
      pill(t.status, t.status === 'succeeded' ? 'ok' : t.status === 'failed' ? 'danger' : ''),
      h('span', { class: 'muted small', text: fmtRelative(t.created_at) })));
  }
}

async function start(ev) {
  ev.preventDefault();
  const body = { dataset: R.dataset.id, model: el.model.value, name: el.name.value.trim() };
  const prompt = el.prompt.value.trim();
  if (prompt) body.sample_prompts = [prompt];
  if (R.level >= 2) {
    const preset = R.info.preset || {};
    const steps = parseInt(el.steps.value, 10);
    const rank = parseInt(el.rank.value, 10);
    const lr = Number(el.lr.value);
    const res = parseInt(el.resolution.value, 10);
    if (Number.isFinite(steps) && steps !== preset.steps) body.steps = steps;
    if (Number.isFinite(rank) && rank !== preset.rank) body.rank = rank;
    if (Number.isFinite(lr) && lr !== preset.lr) body.lr = lr;
    if (Number.isFinite(res) && res !== preset.resolution) body.resolution = res;
  }
  await busy(el.start, async () => {
    const r = await post('/api/trainings', body, { headers: { 'Idempotency-Key': randomKey() } });
    notice(`Training "${body.name}" queued; ${fmtNum(r.allowance_remaining)} training${r.allowance_remaining === 1 ? '' : 's'} left.`, 'Training started');
    R.info = await get('/api/trainings');
    renderHistory();
    el.start.disabled = !canStart();
    el.allowance.textContent = allowanceText();
    watch(r.job.id);
  });
}

async function cancel() {
  const id = R.watching && R.watching.id;
  if (!id) return;
  await busy(el.cancel, async () => {
    await post(`/api/trainings/${id}/cancel`);
  });
}

/** Shows a finished training: its curve, samples and LoRA. */
async function showJob(id) {
  stopWatching();
  const r = await get(`/api/trainings/${id}`);
  R.watching = { id, job: r.training, loss: r.training.loss || [], samples: r.training.samples || [], es: null };
  paint();
}

/** Follows a queued or running training live. */
async function watch(id) {
  stopWatching();
  const w = { id, job: null, loss: [], samples: [], es: null, poll: null };
  R.watching = w;
  const refresh = async () => {
    try {
      const r = await get(`/api/trainings/${id}`);
      if (R.watching !== w) return;
      w.job = r.training;
      w.loss = r.training.loss || [];
      w.samples = r.training.samples || [];
      paint();
      if (isFinal(w.job.status)) finished(w);
    } catch (e) {
      console.error(e);
    }
  };
  await refresh();
  if (R.watching !== w || isFinal(w.job.status)) return;
  const es = new EventSource('/api/events');
  w.es = es;
  es.onopen = refresh; // caught up after a reconnect
  es.onmessage = (m) => {
    let ev;
    try {
      ev = JSON.parse(m.data);
    } catch {
      return;
    }
    if (ev.job_id !== id || R.watching !== w) return;
    onEvent(w, ev, refresh);
  };
  // While the stream is down the browser retries; meanwhile poll now and then.
  w.poll = setInterval(() => {
    if (es.readyState !== EventSource.OPEN) refresh();
  }, 5000);
}

const isFinal = (s) => s === 'succeeded' || s === 'failed' || s === 'canceled';

function onEvent(w, ev, refresh) {
  switch (ev.type) {
    case 'queued':
      w.job = { ...w.job, status: 'queued', position: ev.position };
      break;
    case 'started':
      w.job = { ...w.job, status: 'running' };
      break;
    case 'stage':
      w.stage = ev.stage;
      break;
    case 'training_step':
      w.job = { ...w.job, status: 'running' };
      w.loss = w.loss.filter((p) => p.step < ev.step);
      w.loss.push({ step: ev.step, loss: ev.loss, mean: ev.mean });
      w.live = ev;
      break;
    case 'sample':
      if (!w.samples.includes(ev.url)) w.samples.push(ev.url);
      break;
    case 'lagged':
      refresh();
      return;
    default:
      // trained / failed / canceled: the job document has the outcome.
      if (['trained', 'failed', 'canceled', 'succeeded'].includes(ev.type)) {
        refresh();
        return;
      }
  }
  paint();
}

function finished(w) {
  if (w.es) w.es.close();
  clearInterval(w.poll);
  w.es = null;
  get('/api/trainings').then((info) => {
    R.info = info;
    renderHistory();
    el.start.disabled = !canStart();
    el.allowance.textContent = allowanceText();
  }).catch((e) => console.error(e));
  if (w.job.status === 'failed') toast(w.job.error || 'The training failed.', 'Training failed');
}

function stopWatching() {
  const w = R.watching;
  if (!w) return;
  if (w.es) w.es.close();
  clearInterval(w.poll);
  R.watching = null;
}

function paint() {
  const w = R.watching;
  if (!w || !w.job) return;
  const job = w.job;
  const spec = job.training || {};
  const total = spec.steps || (w.live && w.live.steps) || 0;
  el.progress.hidden = false;
  clear(el.status);
  const last = w.loss[w.loss.length - 1];
  const parts = [h('strong', { text: job.lora || spec.name || 'training' }), pill(job.status, job.status === 'succeeded' ? 'ok' : job.status === 'failed' ? 'danger' : '')];
  if (job.status === 'queued') parts.push(h('span', { class: 'muted', text: job.position ? `position ${job.position} in the queue` : 'waiting' }));
  if (last) parts.push(h('span', { id: 'train-step', text: `step ${fmtNum(last.step)} / ${fmtNum(total)}` }), h('span', { class: 'muted', text: `loss ${last.loss.toFixed(4)} · mean ${last.mean.toFixed(4)}` }));
  if (job.status === 'running' && w.live && w.live.step === (last && last.step)) {
    parts.push(h('span', { class: 'muted', text: `${w.live.it_per_s.toFixed(2)} it/s · ${fmtSeconds(w.live.eta_s)} left` }));
  } else if (job.status === 'running' && w.stage) parts.push(h('span', { class: 'muted', text: w.stage }));
  el.status.append(...parts);
  el.cancel.hidden = isFinal(job.status);
  drawLossChart(el.chart, w.loss, total);
  clear(el.samples);
  w.samples.forEach((url, i) => el.samples.append(h('figure', { class: 'train-sample' },
    h('img', { src: url, alt: `Sample ${i + 1}`, loading: 'lazy' }))));
  clear(el.result);
  if (job.status === 'succeeded' && job.lora) {
    const name = encodeURIComponent(job.lora);
    el.result.append(
      h('span', { text: `LoRA "${job.lora}" is in your library.` }),
      h('a', { class: 'btn btn-primary btn-sm', id: 'train-use', href: '#/generate', text: 'Use on Generate', on: { click: () => { store.useLora = job.lora; } } }),
      h('a', { class: 'btn btn-sm', href: `/api/loras/${name}/download?format=kohya`, download: `${job.lora}.safetensors`, text: 'Download (kohya)' }),
      h('a', { class: 'btn btn-sm', href: `/api/loras/${name}/download?format=peft`, download: `${job.lora}-peft.safetensors`, text: 'Download (PEFT)' }));
  }
  if (job.status === 'failed' && job.error) el.result.append(h('span', { class: 'bad', text: job.error }));
}
