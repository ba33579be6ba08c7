// The Generate page's LoRA picker: the studio's LoRAs and the user's own (GET /api/loras),
// searched by name, label and trigger words; each chosen one with a weight slider and its
// trigger words, inserted into the prompt on request. How many a job may use is the plan's:
// past it the picker says which plan allows more, like the other locked parameters.

import { get } from './api.js';
import { h, clear } from './ui.js';

const WEIGHT_MIN = -2;
const WEIGHT_MAX = 2;

/** `list`: the /api/loras answer; `chosen`: [{name, weight}] in the order picked. */
const P = { list: null, chosen: [], onChange: () => {}, prompt: null };
const el = {};

/** The picker's field; `prompt` is the prompt textarea (trigger words go there). */
export function buildLoraField(prompt, onChange) {
  P.prompt = prompt;
  P.onChange = onChange;
  el.search = h('input', { id: 'lora-search', type: 'search', placeholder: 'Search LoRAs…', autocomplete: 'off', 'aria-label': 'Search LoRAs' });
  el.results = h('ul', { id: 'lora-results', class: 'lora-results', role: 'listbox', 'aria-label': 'LoRAs' });
  el.chosen = h('ul', { id: 'lora-chosen', class: 'lora-chosen', 'aria-label': 'LoRAs applied' });
  el.note = h('p', { id: 'lora-note', class: 'hint' });
  el.lock = h('p', { id: 'lora-lock', class: 'lock-note', hidden: true });
  el.search.addEventListener('input', renderResults);
  el.field = h('div', { class: 'field', id: 'param-loras' },
    h('label', { class: 'label', for: 'lora-search', text: 'LoRAs' }),
    el.chosen, el.search, el.results, el.note, el.lock);
  return el.field;
}

export async function loadLoras() {
  P.list = await get('/api/loras');
  const known = new Set(P.list.loras.map((l) => l.name));
  P.chosen = P.chosen.filter((c) => known.has(c.name));
  render();
}

/** The chosen LoRAs, as jobs take them. */
export function chosenLoras() {
  return P.chosen.map((c) => ({ name: c.name, weight: c.weight }));
}

const max = () => (P.list ? P.list.max_loras : 0);
const full = () => max() !== null && P.chosen.length >= max();

/** Moves `<lora:name:w>` tags of a prompt into the picker (those of LoRAs the user has);
 * returns the prompt without them, and the names it could not apply. */
export function takeTags(prompt) {
  const missing = [];
  const rest = prompt.replace(/\s*<lora:([^>]+)>/g, (tag, inner) => {
    const i = inner.lastIndexOf(':');
    const w = i > 0 ? Number(inner.slice(i + 1)) : NaN;
    const name = (Number.isFinite(w) ? inner.slice(0, i) : inner).trim();
    const entry = P.list && P.list.loras.find((l) => l.name === name);
    if (!entry || (full() && !P.chosen.some((c) => c.name === name))) {
      missing.push(name);
      return tag;
    }
    setChosen(name, Number.isFinite(w) ? w : entry.default_weight);
    return '';
  });
  render();
  return { prompt: rest.trim(), missing };
}

/** Picks LoRA `name` (with its default weight) and puts its first trigger word into the
 * prompt, as "Use on Generate" after a training asks; false when it cannot be picked. */
export function chooseLora(name) {
  const entry = P.list && P.list.loras.find((l) => l.name === name);
  if (!entry || (full() && !P.chosen.some((c) => c.name === name))) return false;
  setChosen(name, entry.default_weight);
  if (entry.triggers.length) insertTrigger(entry.triggers[0]);
  render();
  P.onChange();
  return true;
}

function setChosen(name, weight) {
  const c = P.chosen.find((x) => x.name === name);
  if (c) c.weight = weight;
  else P.chosen.push({ name, weight });
}

function add(entry) {
  if (full()) return;
  setChosen(entry.name, entry.default_weight);
  el.search.value = '';
  render();
  P.onChange();
}

function remove(name) {
  P.chosen = P.chosen.filter((c) => c.name !== name);
  render();
  P.onChange();
}

function insertTrigger(word) {
  const p = P.prompt;
  const text = p.value.trim();
  if (text.split(/[\s,]+/).includes(word)) return;
  p.value = text ? `${text}, ${word}` : word;
  p.dispatchEvent(new Event('input'));
}

function render() {
  renderChosen();
  renderResults();
  renderNote();
}

function renderChosen() {
  clear(el.chosen);
  for (const c of P.chosen) {
    const entry = (P.list && P.list.loras.find((l) => l.name === c.name)) || { name: c.name, label: c.name, triggers: [] };
    const slider = h('input', { type: 'range', min: String(WEIGHT_MIN), max: String(WEIGHT_MAX), step: '0.05', value: String(c.weight), 'aria-label': `Weight of ${entry.label}` });
    const number = h('input', { type: 'number', class: 'lora-weight', step: '0.05', value: String(c.weight), 'aria-label': `Weight of ${entry.label} (number)` });
    const set = (v) => {
      if (!Number.isFinite(v)) return;
      c.weight = Math.round(v * 100) / 100;
      slider.value = String(c.weight);
      number.value = String(c.weight);
      P.onChange();
    };
    slider.addEventListener('input', () => set(Number(slider.value)));
    number.addEventListener('change', () => set(Number(number.value)));
    el.chosen.append(
      h('li', { class: 'lora-item', data: { lora: c.name } },
        h('div', { class: 'lora-head' },
          h('strong', { text: entry.label }),
          entry.scope === 'mine' ? h('span', { class: 'muted', text: ' · yours' }) : null,
          h('button', { type: 'button', class: 'btn btn-icon lora-remove', 'aria-label': `Remove ${entry.label}`, text: '×', on: { click: () => remove(c.name) } })),
        h('div', { class: 'lora-weight-row' }, slider, number),
        entry.triggers.length
          ? h('div', { class: 'lora-triggers' },
            h('span', { class: 'muted', text: 'Trigger words: ' }),
            ...entry.triggers.map((t) => h('button', { type: 'button', class: 'btn btn-chip lora-trigger', title: 'Insert into the prompt', text: t, on: { click: () => insertTrigger(t) } })))
          : null));
  }
  el.chosen.hidden = !P.chosen.length;
}

function renderResults() {
  clear(el.results);
  if (!P.list) return;
  const q = el.search.value.trim().toLowerCase();
  const picked = new Set(P.chosen.map((c) => c.name));
  const hits = P.list.loras.filter((l) => !picked.has(l.name)
    && (!q || [l.name, l.label, ...l.triggers].some((s) => s.toLowerCase().includes(q))));
  const locked = full();
  for (const l of hits.slice(0, 50)) {
    el.results.append(
      h('li', { class: 'lora-result', role: 'option', data: { lora: l.name } },
        h('button', { type: 'button', class: 'btn btn-ghost lora-add', disabled: locked, on: { click: () => add(l) } },
          h('span', { text: l.label }),
          l.scope === 'mine' ? h('span', { class: 'muted', text: ' · yours' }) : null,
          l.triggers.length ? h('span', { class: 'muted', text: ` · ${l.triggers.join(', ')}` }) : null)));
  }
  if (!P.list.loras.length) el.results.append(h('li', { class: 'muted', text: 'No LoRAs yet: an admin adds them to the studio library, or upload your own.' }));
  else if (!hits.length && q) el.results.append(h('li', { class: 'muted', text: 'No LoRA matches.' }));
}

function renderNote() {
  if (!P.list) return;
  const m = max();
  const plan = P.list.plans.find((p) => p.plan === P.list.plan);
  const planLabel = plan ? plan.name : P.list.plan;
  const rank = P.list.plans.findIndex((p) => p.plan === P.list.plan);
  const better = P.list.plans.slice(rank + 1).find((p) => p.max_loras === null || (m !== null && p.max_loras > m));
  el.note.textContent = m === null ? `No LoRA limit on ${planLabel}.` : `Up to ${m} per job on ${planLabel}.`;
  el.note.hidden = m === 0;
  const locked = m !== null && (m === 0 || P.chosen.length > m || full());
  el.lock.hidden = !locked || !better;
  if (better) {
    const what = m === 0 ? 'LoRAs need' : `More than ${m} LoRA${m === 1 ? '' : 's'} per job needs`;
    el.lock.textContent = `${what} the ${better.name} plan or higher`;
  }
  el.search.disabled = m === 0;
  el.field.classList.toggle('locked', m === 0);
}
