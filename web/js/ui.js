// DOM helpers, formatting, toasts and the confirm dialog. Nothing here sets style attributes
// (the CSP forbids them); sizes that must be computed go through the CSSOM (el.style.x = ...).

/**
 * Creates an element. `attrs`: class, text, html-free only; `on: {click: fn}`; `data: {k: v}`;
 * booleans (hidden, disabled, checked, selected) set as properties; anything else as attribute.
 */
export function h(tag, attrs, ...children) {
  const svg = tag.startsWith('svg:');
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4)) : document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.setAttribute('class', Array.isArray(v) ? v.filter(Boolean).join(' ') : v);
      else if (k === 'text') el.textContent = v;
      else if (k === 'on') for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
      else if (k === 'data') for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = dv;
      else if (!svg && ['hidden', 'disabled', 'checked', 'selected', 'value', 'readOnly', 'required'].includes(k)) el[k] = v;
      else el.setAttribute(k, v === true ? '' : v);
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

// ---- formatting ----

const nf = new Intl.NumberFormat(undefined);
export const fmtNum = (n) => (n === null || n === undefined ? '—' : nf.format(n));

export function fmtDate(iso) {
  if (!iso) return 'never';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleDateString(undefined, { year: 'numeric', month: 'short', day: 'numeric' });
}

export function fmtDateTime(iso) {
  if (!iso) return 'never';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return d.toLocaleString(undefined, { year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}

/** "in 3 days", "5 min ago". */
export function fmtRelative(iso) {
  if (!iso) return '';
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return '';
  const s = Math.round((t - Date.now()) / 1000);
  const a = Math.abs(s);
  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });
  if (a < 60) return rtf.format(s, 'second');
  if (a < 3600) return rtf.format(Math.round(s / 60), 'minute');
  if (a < 86400) return rtf.format(Math.round(s / 3600), 'hour');
  return rtf.format(Math.round(s / 86400), 'day');
}

export function fmtSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '—';
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  return `${m}m ${String(s % 60).padStart(2, '0')}s`;
}

export const cap = (s) => (s ? s.charAt(0).toUpperCase() + s.slice(1) : '');

/** "1:1", "16:9": the nearest common ratio, else the reduced one. */
export function aspectLabel(w, h) {
  const common = [[1, 1], [2, 3], [3, 2], [3, 4], [4, 3], [4, 5], [5, 4], [4, 7], [7, 4], [9, 16], [16, 9], [9, 21], [21, 9]];
  const r = w / h;
  let best = null;
  let err = Infinity;
  for (const [a, b] of common) {
    const e = Math.abs(a / b - r) / r;
    if (e < err) {
      err = e;
      best = `${a}:${b}`;
    }
  }
  if (err < 0.035) return best;
  const g = (a, b) => (b ? g(b, a % b) : a);
  const d = g(w, h);
  return `${w / d}:${h / d}`;
}

// ---- toasts ----

const STATUS_TITLES = {
  0: 'Offline',
  400: 'Check your input',
  401: 'Please log in',
  402: 'Not enough credits',
  403: 'Not allowed',
  404: 'Not found',
  409: 'Conflict',
  413: 'Too large',
  429: 'Slow down',
  503: 'Unavailable',
};

let planNames = (id) => id;
/** Lets error messages name plans ("Starter") instead of ids ("starter"). */
export function setPlanNamer(fn) {
  planNames = fn;
}

/** A plain sentence for a plan or balance refusal (`details.reason`), or null. */
function refusalText(d) {
  const plan = d.plan ? planNames(d.plan) : 'Your plan';
  switch (d.reason) {
    case 'out_of_credits':
      return `Not enough ${d.resource || 'credits'}: this needs ${fmtNum(d.needed)}, you have ${fmtNum(d.available)}.${d.next_renewal_at ? ` Your plan renews on ${fmtDateTime(d.next_renewal_at)}.` : ''}`;
    case 'quota_exhausted':
      return `The weekly quota of ${d.limit} ${d.tag} images is used up (${d.used} used${d.requested ? `, ${d.requested} more asked` : ''}). It resets on ${fmtDateTime(d.resets_at)}.`;
    case 'parameter_level':
      return `${plan} allows ${d.has} parameters; this job needs ${d.needs} for ${(d.params || []).join(', ')}.`;
    case 'batch_too_large':
      return `${plan} allows up to ${d.max} image${d.max === 1 ? '' : 's'} per job; this asks for ${d.batch}.`;
    case 'training_not_in_plan':
      return `${plan} does not include LoRA training.`;
    case 'too_many_training_images':
      return `${plan} trains on up to ${d.max} images per LoRA; this would make ${d.images}.`;
    case 'model_not_in_plan':
      return `${plan} does not include ${d.tag} models such as ${d.model}.`;
    default:
      return null;
  }
}

/** The title and the helpful lines of an API error. */
export function describeError(err) {
  if (!err || typeof err !== 'object') return { title: 'Error', lines: [String(err)] };
  const status = err.status;
  let title = STATUS_TITLES[status] || (status >= 500 ? 'Server error' : 'Error');
  if (err.code === 'quota_exhausted') title = 'Weekly quota used up';
  if (err.code === 'queue_full') title = 'Queue full';
  if (err.code === 'too_many_logins') title = 'Too many attempts';
  const d = err.details || {};
  const friendly = refusalText(d);
  const lines = [friendly || err.message || String(err)];
  if (friendly) {
    // The sentence above already says it in full.
  } else if (d.resets_at) lines.push(`The quota resets on ${fmtDateTime(d.resets_at)}.`);
  else if (d.next_renewal_at) lines.push(`Your credits renew on ${fmtDateTime(d.next_renewal_at)}.`);
  if (Array.isArray(d.plans_allowing) && d.plans_allowing.length) {
    lines.push(`Available with: ${d.plans_allowing.map((p) => planNames(p)).join(', ')}.`);
  }
  if (status === 429 && err.retryAfter != null) lines.push(`Try again in ${err.retryAfter} s.`);
  return { title, lines };
}

let toastTimer = null;
let noticeTimer = null;

function fill(el, title, lines, onClose) {
  clear(el);
  el.append(
    h('div', { class: 'toast-text' }, h('strong', { text: title }), ...lines.map((l) => h('span', { text: l }))),
    h('button', { type: 'button', class: 'toast-close', 'aria-label': 'Dismiss', text: '✕', on: { click: onClose } }),
  );
  el.hidden = false;
  el.classList.remove('leaving');
}

/** Shows an error (an ApiError, an Error or a string) in #toast (role=alert). */
export function toast(err, title) {
  const el = document.getElementById('toast');
  const d = typeof err === 'string' ? { title: title || 'Error', lines: [err] } : describeError(err);
  if (title) d.title = title;
  const close = () => {
    el.hidden = true;
  };
  fill(el, d.title, d.lines, close);
  clearTimeout(toastTimer);
  toastTimer = setTimeout(close, 9000);
}

export function hideToast() {
  const el = document.getElementById('toast');
  if (el) el.hidden = true;
}

/** A short success message in #notice (role=status). */
export function notice(message, title = 'Done') {
  // A success supersedes an earlier error.
  hideToast();
  const el = document.getElementById('notice');
  const close = () => {
    el.hidden = true;
  };
  fill(el, title, [message], close);
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(close, 4000);
}

// ---- confirm dialog ----

/** Asks before something that cannot be undone; resolves to true when confirmed. */
export function confirmDialog({ title = 'Are you sure?', message = '', ok = 'OK', danger = true } = {}) {
  const dlg = document.getElementById('confirm-dialog');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-message').textContent = message;
  const okBtn = document.getElementById('confirm-ok');
  okBtn.textContent = ok;
  okBtn.className = danger ? 'btn btn-danger' : 'btn btn-primary';
  dlg.returnValue = '';
  return new Promise((resolve) => {
    dlg.addEventListener('close', () => resolve(dlg.returnValue === 'ok'), { once: true });
    dlg.showModal();
    okBtn.focus();
  });
}

/** Runs `fn` with `btn` disabled and marked busy; errors go to the toast. */
export async function busy(btn, fn) {
  if (btn) {
    btn.disabled = true;
    btn.classList.add('is-busy');
  }
  try {
    return await fn();
  } catch (e) {
    if (!(e && e.name === 'AbortError')) toast(e);
    return undefined;
  } finally {
    if (btn) {
      btn.disabled = false;
      btn.classList.remove('is-busy');
    }
  }
}

/** Small images (the demo model draws 64×64) are shown upscaled with hard pixel edges rather
 * than blurred; the files themselves are untouched. One capture listener covers every <img>. */
export function upscaleSmallImages(limit = 256) {
  document.addEventListener('load', (e) => {
    const img = e.target;
    if (img instanceof HTMLImageElement) img.classList.toggle('pixel', img.naturalWidth > 0 && img.naturalWidth < limit);
  }, true);
}

export function debounce(fn, ms) {
  let t = null;
  const d = (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
  d.cancel = () => clearTimeout(t);
  return d;
}

/** A small status pill. */
export const pill = (text, kind = '') => h('span', { class: ['pill', kind && `pill-${kind}`], text });
