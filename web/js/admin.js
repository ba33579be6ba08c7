// The Admin page: users (create, plan, grant credits, disable), the queue and recent jobs, the
// models and the device. The queue refreshes itself while the page is open.

import { get, post } from './api.js';
import { h, clear, toast, notice, confirmDialog, busy, fmtNum, fmtDateTime, fmtRelative, pill } from './ui.js';
import { store, loadPlans, planName, refreshAccount } from './store.js';

const el = {};
let timer = null;
let visible = false;

export function mount(root) {
  el.users = h('table', { id: 'admin-users', class: 'table users-table' });
  el.userCount = h('span', { class: 'muted' });
  el.newName = h('input', { id: 'new-user-name', placeholder: 'name', autocomplete: 'off', autocapitalize: 'off', spellcheck: 'false', required: true });
  el.newPass = h('input', { id: 'new-user-password', type: 'password', placeholder: 'password (8+ characters)', autocomplete: 'new-password', minlength: '8', required: true });
  el.newPlan = h('select', { id: 'new-user-plan', 'aria-label': 'Plan' });
  el.newYearly = h('input', { id: 'new-user-yearly', type: 'checkbox' });
  el.newAdmin = h('input', { id: 'new-user-admin', type: 'checkbox' });
  el.newSubmit = h('button', { type: 'submit', id: 'new-user-submit', class: 'btn btn-primary', text: 'Create user' });
  el.newForm = h('form', { class: 'create-user', id: 'new-user-form', novalidate: true },
    h('label', { class: 'field-inline' }, h('span', { class: 'label', text: 'Name' }), el.newName),
    h('label', { class: 'field-inline' }, h('span', { class: 'label', text: 'Password' }), el.newPass),
    h('label', { class: 'field-inline' }, h('span', { class: 'label', text: 'Plan' }), el.newPlan),
    h('div', { class: 'checks' },
      h('label', { class: 'check' }, el.newYearly, h('span', { text: 'Yearly' })),
      h('label', { class: 'check' }, el.newAdmin, h('span', { text: 'Admin' }))),
    el.newSubmit);
  el.newForm.addEventListener('submit', (e) => {
    e.preventDefault();
    createUser();
  });
  el.queueCounts = h('div', { class: 'counts', id: 'admin-counts' });
  el.queue = h('div', { id: 'admin-queue', class: 'queue-block' });
  el.models = h('div', { id: 'admin-models', class: 'models-block' });
  root.append(
    h('div', { class: 'page-head' }, h('div', {}, h('h1', { text: 'Admin' }), h('span', { class: 'muted', text: 'Users, credits, the queue and the models of this server.' }))),
    h('section', { class: 'card' },
      h('div', { class: 'card-head' }, h('h2', { class: 'card-title', text: 'Users' }), el.userCount),
      el.newForm,
      h('div', { class: 'table-wrap' }, el.users)),
    h('section', { class: 'card' },
      h('div', { class: 'card-head' }, h('h2', { class: 'card-title', text: 'Queue & jobs' }), el.queueCounts),
      el.queue),
    h('section', { class: 'card' },
      h('div', { class: 'card-head' }, h('h2', { class: 'card-title', text: 'Models' })),
      el.models));
}

export async function show() {
  visible = true;
  await loadPlans().catch((e) => toast(e));
  fillPlanSelect(el.newPlan, store.plans[0] ? store.plans[0].plan : 'free');
  await Promise.all([loadUsers(), loadQueue(), loadModels()]);
  schedule();
}

export function hide() {
  visible = false;
  clearTimeout(timer);
}

function schedule() {
  clearTimeout(timer);
  if (!visible) return;
  timer = setTimeout(async () => {
    if (!visible) return;
    if (!document.hidden) await loadQueue(true);
    schedule();
  }, 3000);
}

function fillPlanSelect(sel, value) {
  clear(sel);
  for (const p of store.plans) sel.append(h('option', { value: p.plan, text: p.name }));
  sel.value = value;
}

// ---- users ----

async function loadUsers() {
  let r;
  try {
    r = await get('/api/admin/users');
  } catch (e) {
    toast(e);
    return;
  }
  renderUsers(r.users || []);
}

function renderUsers(users) {
  clear(el.users);
  el.userCount.textContent = `${users.length} user${users.length === 1 ? '' : 's'}`;
  el.users.append(h('thead', {}, h('tr', {}, ...['User', 'Plan', 'Credits', 'Grant credits', 'Account'].map((t) => h('th', { text: t })))));
  const body = h('tbody');
  for (const u of users) body.append(userRow(u));
  el.users.append(body);
}

// One choice per plan and billing period ("Pro · yearly"; "Free" for a plan without periods),
// so that changing a user's plan is this one control and the Set plan button.
function fillPlanChoices(sel, plan, period) {
  clear(sel);
  for (const p of store.plans) {
    const periods = p.periods || [];
    if (!periods.length) sel.append(h('option', { value: p.plan, text: p.name }));
    for (const per of periods) sel.append(h('option', { value: `${p.plan}:${per}`, text: `${p.name} · ${per}` }));
  }
  sel.value = period ? `${plan}:${period}` : plan;
}

function userRow(u) {
  const planSel = h('select', { class: 'plan-select', 'aria-label': `Plan of ${u.name}` });
  fillPlanChoices(planSel, u.plan, u.period);
  const setPlan = h('button', { type: 'button', class: 'btn btn-sm set-plan', text: 'Set plan' });
  setPlan.addEventListener('click', () =>
    busy(setPlan, async () => {
      const [plan, period] = planSel.value.split(':');
      const r = await post(`/api/admin/users/${u.id}/plan`, { plan, yearly: period === 'yearly' });
      notice(describeChange(u.name, r), 'Plan updated');
      await loadUsers();
      if (store.user && u.id === store.user.id) refreshAccount().catch(() => {});
    }));

  const amount = h('input', { class: 'grant-amount', type: 'number', min: '1', step: '1', placeholder: 'credits', inputmode: 'numeric', 'aria-label': `Credits to grant ${u.name}` });
  const expires = h('input', { class: 'grant-expires', type: 'date', 'aria-label': `Grant expiry for ${u.name} (optional)`, title: 'Expires (optional; end of that day, UTC)' });
  const grant = h('button', { type: 'button', class: 'btn btn-sm grant-btn', text: 'Grant' });
  grant.addEventListener('click', () => {
    const n = parseInt(amount.value, 10);
    if (!Number.isFinite(n) || n < 1) {
      toast('Enter a whole number of credits, 1 or more.', 'Check your input');
      amount.focus();
      return;
    }
    const body = { credits: n };
    if (expires.value) body.expires_at = `${expires.value}T23:59:59Z`;
    busy(grant, async () => {
      await post(`/api/admin/users/${u.id}/grant`, body);
      notice(`Granted ${fmtNum(n)} credits to ${u.name}${body.expires_at ? `, expiring ${fmtDateTime(body.expires_at)}` : ''}.`, 'Credits granted');
      await loadUsers();
      if (store.user && u.id === store.user.id) refreshAccount().catch(() => {});
    });
  });
  amount.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') grant.click();
  });

  const isSelf = store.user && store.user.id === u.id;
  const toggle = h('button', {
    type: 'button',
    class: ['btn', 'btn-sm', 'disable-btn', u.disabled ? null : 'btn-ghost-danger'],
    text: u.disabled ? 'Enable' : 'Disable',
    disabled: isSelf && !u.disabled,
    title: isSelf ? 'You cannot disable your own account' : null,
  });
  toggle.addEventListener('click', async () => {
    if (!u.disabled) {
      const ok = await confirmDialog({ title: `Disable ${u.name}?`, message: 'They are logged out and cannot log in or use API keys until enabled again. Their images and credits are kept.', ok: 'Disable' });
      if (!ok) return;
    }
    busy(toggle, async () => {
      await post(`/api/admin/users/${u.id}/disable`, { disabled: !u.disabled });
      notice(`${u.name} is ${u.disabled ? 'enabled' : 'disabled'}.`, 'Account updated');
      await loadUsers();
    });
  });

  return h('tr', { data: { user: u.name, id: String(u.id) }, class: u.disabled ? 'dim' : null },
    h('td', { class: 'user-td' }, h('div', { class: 'user-cell' },
      h('span', { class: 'avatar', 'aria-hidden': 'true', text: (u.name[0] || '?').toUpperCase() }),
      h('div', {},
        h('strong', { text: u.name }), ' ',
        u.admin ? pill('admin', 'accent') : null, ' ',
        u.disabled ? pill('disabled', 'danger') : null,
        h('div', { class: 'muted small', text: `#${u.id}${u.created_at ? ` · joined ${fmtRelative(u.created_at)}` : ''}` })))),
    h('td', { class: 'plan-td' },
      h('div', { class: 'muted small', text: `${planName(u.plan)}${u.period ? ` · ${u.period}` : ''}${u.status && u.status !== 'active' ? ` · ${u.status.replace(/_/g, ' ')}` : ''}` }),
      h('div', { class: 'row-controls' }, planSel, setPlan)),
    h('td', { class: 'credits-cell' },
      h('strong', { class: 'credits-available', text: fmtNum(u.credits_available) }),
      h('div', { class: 'muted small', text: `${fmtNum(u.credits_held)} held · ${fmtNum(u.credits_spent)} spent` })),
    h('td', { class: 'grant-td' }, h('div', { class: 'muted small sm-only', text: 'Grant credits' }), h('div', { class: 'row-controls' }, amount, expires, grant)),
    h('td', { class: 'account-td' }, toggle));
}

function describeChange(name, r) {
  if (!r || typeof r !== 'object') return `${name}'s plan was updated.`;
  switch (r.change) {
    case 'upgraded':
      return `${name} is now on ${planName(r.to)}${r.period ? ` (${r.period})` : ''}.`;
    case 'scheduled':
      return `${name} moves to ${planName(r.to)} on ${fmtDateTime(r.at)} (the end of the current period).`;
    case 'cancel_scheduled':
      return `${name}'s subscription ends on ${fmtDateTime(r.at)}.`;
    case 'resumed':
      return `${name} stays on ${planName(r.plan)}; the scheduled change was undone.`;
    case 'unchanged':
      return `${name}: ${r.note || 'nothing changed'}.`;
    default:
      return `${name}'s plan was updated.`;
  }
}

async function createUser() {
  const name = el.newName.value.trim();
  const password = el.newPass.value;
  if (!name) {
    toast('Enter a name for the new user.', 'Check your input');
    el.newName.focus();
    return;
  }
  await busy(el.newSubmit, async () => {
    await post('/api/admin/users', { name, password, admin: el.newAdmin.checked, plan: el.newPlan.value, yearly: el.newYearly.checked });
    notice(`${name} can now log in.`, 'User created');
    el.newName.value = '';
    el.newPass.value = '';
    el.newAdmin.checked = false;
    el.newYearly.checked = false;
    if (store.plans[0]) el.newPlan.value = store.plans[0].plan;
    await loadUsers();
  });
}

// ---- queue ----

async function loadQueue(quiet) {
  let r;
  try {
    r = await get('/api/admin/queue');
  } catch (e) {
    if (!quiet) toast(e);
    return;
  }
  renderQueue(r);
}

const statusKind = { queued: 'muted', running: 'accent', succeeded: 'ok', failed: 'danger', canceled: 'warn' };

function jobRow(j, withPos) {
  const s = j.spec || {};
  return h('tr', { data: { job: j.id } },
    withPos ? h('td', { class: 'num', text: j.position ? `#${j.position}` : j.status === 'running' ? '▶' : '' }) : null,
    h('td', { text: j.user || `#${j.user_id}` }),
    h('td', {}, pill(j.status, statusKind[j.status])),
    h('td', { class: 'hide-sm', text: j.model }),
    h('td', { class: 'prompt-cell', title: s.prompt || '', text: s.prompt || '' }),
    h('td', { class: 'hide-sm', text: `${s.width}×${s.height}${s.batch > 1 ? ` ×${s.batch}` : ''}` }),
    h('td', { class: 'hide-sm', text: j.queue || '' }),
    h('td', { class: 'num', text: fmtNum(j.price) }),
    h('td', { title: fmtDateTime(j.finished_at || j.created_at), text: fmtRelative(j.finished_at || j.started_at || j.created_at) }),
    withPos ? null : h('td', { class: 'error-cell hide-sm', title: j.error || '', text: j.error || '' }));
}

function renderQueue(r) {
  clear(el.queueCounts);
  const counts = r.counts || {};
  for (const k of ['queued', 'running', 'succeeded', 'failed', 'canceled']) {
    el.queueCounts.append(pill(`${k} ${fmtNum(counts[k] || 0)}`, statusKind[k]));
  }
  clear(el.queue);
  const q = r.queue || [];
  const HIDE = new Set(['Model', 'Size', 'Queue', 'Error']);
  const head = (cols) => h('thead', {}, h('tr', {}, ...cols.map((c) => h('th', { class: HIDE.has(c) ? 'hide-sm' : null, text: c }))));
  el.queue.append(h('h3', { class: 'sub-title', text: 'Running and waiting' }));
  if (!q.length) el.queue.append(h('p', { class: 'muted', text: 'The queue is empty.' }));
  else el.queue.append(h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'admin-queue-table' },
    head(['', 'User', 'Status', 'Model', 'Prompt', 'Size', 'Queue', 'Price', 'Since']),
    h('tbody', {}, ...q.map((j) => jobRow(j, true))))));
  const recent = r.recent || [];
  el.queue.append(h('h3', { class: 'sub-title', text: 'Recently finished' }));
  if (!recent.length) el.queue.append(h('p', { class: 'muted', text: 'No finished jobs yet.' }));
  else el.queue.append(h('div', { class: 'table-wrap' }, h('table', { class: 'table', id: 'admin-recent-table' },
    head(['User', 'Status', 'Model', 'Prompt', 'Size', 'Queue', 'Price', 'Finished', 'Error']),
    h('tbody', {}, ...recent.slice(0, 20).map((j) => jobRow(j, false))))));
}

// ---- models ----

async function loadModels() {
  let r;
  try {
    r = await get('/api/admin/models');
  } catch (e) {
    toast(e);
    return;
  }
  clear(el.models);
  el.models.append(h('p', { class: 'device' }, h('span', { class: 'muted', text: 'Device: ' }), h('strong', { id: 'admin-device', text: r.device || 'unknown' }),
    h('span', { class: 'muted', text: ' · compute dtype: ' }), h('strong', { id: 'admin-dtype', text: r.dtype || 'unknown' })));
  const rows = (r.models || []).map((m) =>
    h('tr', { data: { model: m.id } },
      h('td', {}, h('strong', { text: m.id }), h('div', { class: 'muted small', text: m.label })),
      h('td', { class: 'hide-sm', text: m.kind || '—' }),
      h('td', {}, m.state === 'ready' ? pill('ready', 'ok') : pill(m.state || 'missing', 'danger'), m.reason ? h('div', { class: 'muted small reason', text: m.reason }) : null),
      h('td', { text: (m.tags || []).length ? m.tags.join(', ') : 'open to all' }),
      h('td', { class: 'hide-sm', text: `${m.default_steps} steps · ${m.default_width}×${m.default_height}` })));
  el.models.append(h('div', { class: 'table-wrap' }, h('table', { class: 'table' },
    h('thead', {}, h('tr', {}, ...['Model', 'Kind', 'State', 'Tags', 'Defaults'].map((t) => h('th', { class: t === 'Kind' || t === 'Defaults' ? 'hide-sm' : null, text: t })))),
    h('tbody', {}, ...rows))));
  if (!rows.length) el.models.append(h('p', { class: 'muted', text: 'No models are configured.' }));
}
