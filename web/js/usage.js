// The Usage page: balance, grants, 30-day spending chart, training allowance and quotas, plan
// and period, the plan comparison, cancel at period end, API keys, change password, recent
// account events.

import { get, post, del } from './api.js';
import { h, clear, toast, notice, confirmDialog, busy, fmtNum, fmtDate, fmtDateTime, fmtRelative, cap, pill } from './ui.js';
import { store, loadPlans, planName, refreshAccount } from './store.js';

const el = {};
let seq = 0;

const card = (title, id, ...body) =>
  h('section', { class: 'card', 'aria-labelledby': `${id}-title` }, h('h2', { class: 'card-title', id: `${id}-title`, text: title }), ...body);

export function mount(root) {
  el.banner = h('div', { id: 'low-balance-banner', class: 'banner banner-warn', role: 'status', hidden: true });
  el.balance = h('div', { id: 'usage-balance', class: 'balance-block' });
  el.plan = h('div', { id: 'usage-plan', class: 'plan-block' });
  el.allowance = h('div', { id: 'allowance', class: 'allowance-block' });
  el.chartSum = h('span', { class: 'muted', id: 'usage-chart-sum' });
  el.chart = h('div', { id: 'usage-chart', class: 'chart', role: 'img', 'aria-label': 'Credits spent per day, last 30 days' });
  el.grants = h('table', { id: 'grants-table', class: 'table' });
  el.plans = h('table', { id: 'plans-table', class: 'table compare' });
  el.keys = h('div', { id: 'api-keys', class: 'keys-block' });
  el.password = passwordForm();
  el.events = h('ul', { id: 'usage-events', class: 'events' });
  root.append(
    h('div', { class: 'page-head' }, h('div', {}, h('h1', { text: 'Usage & plan' }), h('span', { class: 'muted', id: 'usage-sub' }))),
    el.banner,
    h('div', { class: 'cards cards-3' },
      card('Balance', 'c-balance', el.balance),
      card('Plan', 'c-plan', el.plan),
      card('Training & quotas', 'c-allow', el.allowance)),
    h('section', { class: 'card', 'aria-labelledby': 'c-chart-title' },
      h('div', { class: 'card-head' }, h('h2', { class: 'card-title', id: 'c-chart-title', text: 'Credits spent — last 30 days' }), el.chartSum),
      el.chart),
    card('Credit grants', 'c-grants', h('div', { class: 'table-wrap' }, el.grants)),
    card('Compare plans', 'c-plans', h('div', { class: 'table-wrap' }, el.plans)),
    h('div', { class: 'cards cards-3 cards-account' },
      card('API keys', 'c-keys', el.keys),
      card('Change password', 'c-password', el.password),
      card('Recent activity', 'c-events', el.events)));
}

export function hide() {}

export async function show() {
  const s = ++seq;
  let u;
  try {
    [u] = await Promise.all([refreshAccount(), loadPlans()]);
  } catch (e) {
    toast(e);
    return;
  }
  if (s !== seq) return;
  document.getElementById('usage-sub').textContent = `${u.name} · ${planName(u.plan)}${u.period ? ` (${u.period})` : ''}`;
  renderBanner(u);
  renderBalance(u);
  renderPlan(u);
  renderAllowance(u);
  renderChart(u.history || []);
  renderGrants(u.grants || []);
  renderPlans(u);
  renderEvents(u.events || []);
  loadKeys();
}

function stat(label, value, cls) {
  return h('div', { class: ['stat', cls] }, h('span', { class: 'stat-value', text: value }), h('span', { class: 'stat-label', text: label }));
}

function renderBanner(u) {
  clear(el.banner);
  el.banner.hidden = !u.low_balance;
  if (!u.low_balance) return;
  const upgrade = store.plans.find((p) => p.rank > ((store.plans.find((x) => x.plan === u.plan) || {}).rank ?? 0));
  el.banner.append(
    ...[
    h('strong', { text: 'Your balance is running low. ' }),
    h('span', { text: `${fmtNum(u.credits_available)} credits left.` }),
    u.next_renewal_at ? h('span', { text: ` Your plan adds credits on ${fmtDateTime(u.next_renewal_at)}.` }) : null,
    upgrade ? h('span', { text: ` ${upgrade.name} includes ${fmtNum(upgrade.credits_weekly)} credits a week — ${store.user && store.user.is_admin ? 'change plans on the Admin page' : 'ask your admin to upgrade'}.` }) : null,
    ].filter(Boolean),
  );
}

function renderBalance(u) {
  clear(el.balance);
  el.balance.append(
    h('div', { class: 'big-number' }, h('span', { class: 'gem gem-lg', 'aria-hidden': 'true' }), h('span', { class: 'big', id: 'usage-available', text: fmtNum(u.credits_available) }), h('span', { class: 'unit', text: 'credits available' })),
    h('div', { class: 'stats' },
      stat('held by jobs', fmtNum(u.credits_held)),
      stat('spent', fmtNum(u.credits_spent)),
      stat('expired', fmtNum(u.credits_expired)),
      stat('granted', fmtNum(u.credits_granted))),
  );
}

function renderPlan(u) {
  clear(el.plan);
  const statusText = { active: 'Active', cancel_at_period_end: 'Ends at period end', canceled: 'Canceled' }[u.status] || cap(u.status || '');
  el.plan.append(
    h('div', { class: 'plan-title' },
      h('span', { class: 'plan-name', text: planName(u.plan) }),
      u.period ? pill(cap(u.period), 'accent') : pill('No subscription', 'muted'),
      u.period && u.status ? pill(statusText, u.status === 'active' ? 'ok' : 'warn') : null),
    h('dl', { class: 'kv' },
      u.period_start && u.period_end ? [h('dt', { text: 'Period' }), h('dd', { text: `${fmtDate(u.period_start)} – ${fmtDate(u.period_end)}` })] : null,
      !u.period ? [h('dt', { text: 'Credits' }), h('dd', { text: `${fmtNum((u.entitlements || {}).signup_credits || 0)} at signup; no renewals` })] : null,
      [h('dt', { text: 'Next renewal' }), h('dd', { text: u.next_renewal_at ? `${fmtDateTime(u.next_renewal_at)} (${fmtRelative(u.next_renewal_at)})` : 'none' })],
      u.pending_plan ? [h('dt', { text: 'Changes to' }), h('dd', { text: `${planName(u.pending_plan)}${u.pending_period ? ` (${u.pending_period})` : ''} at period end` })] : null,
      u.status === 'cancel_at_period_end' ? [h('dt', { text: 'After that' }), h('dd', { text: `${planName(store.plans[0] ? store.plans[0].plan : 'free')} plan` })] : null),
  );
  if (u.period && u.status === 'active') {
    const btn = h('button', { type: 'button', id: 'cancel-sub', class: 'btn btn-ghost-danger', text: 'Cancel at period end' });
    btn.addEventListener('click', async () => {
      const ok = await confirmDialog({
        title: 'Cancel your subscription?',
        message: `${planName(u.plan)} stays active until ${fmtDateTime(u.period_end)}; then your account moves to the free plan. Credits you have keep their own expiry.`,
        ok: 'Cancel at period end',
      });
      if (!ok) return;
      await busy(btn, async () => {
        const r = await post('/api/subscription/cancel');
        const at = r && (r.at || (r.CancelScheduled && r.CancelScheduled.at));
        notice(at ? `Your subscription ends on ${fmtDateTime(at)}.` : 'Your subscription will end at the end of the period.', 'Subscription canceled');
        await show();
      });
    });
    el.plan.append(h('div', { class: 'card-actions' }, btn));
  }
}

function meter(left, total) {
  const m = h('div', { class: 'meter' }, h('div', { class: 'meter-fill' }));
  const f = total > 0 ? Math.max(0, Math.min(1, left / total)) : 0;
  m.firstChild.style.width = `${(f * 100).toFixed(1)}%`;
  return m;
}

function renderAllowance(u) {
  clear(el.allowance);
  const a = u.allowance || {};
  const left = (a.week_left || 0) + (a.year_left || 0);
  el.allowance.append(
    h('div', { class: 'big-number' }, h('span', { class: 'big', id: 'training-left', text: fmtNum(left) }), h('span', { class: 'unit', text: `LoRA training${left === 1 ? '' : 's'} left` })),
    h('div', { class: 'stats' },
      stat('this week', fmtNum(a.week_left || 0)),
      stat('this year', fmtNum(a.year_left || 0)),
      stat('available now', fmtNum(u.training_available ?? left)),
      stat('images / LoRA', a.images_per_lora ? fmtNum(a.images_per_lora) : '—')),
  );
  const quotas = Object.entries(u.quotas || {});
  const ent = u.entitlements || {};
  const limited = quotas.filter(([tag]) => (ent.models || {})[tag] === 'limited');
  if (limited.length) {
    const list = h('ul', { class: 'quota-list' });
    for (const [tag, q] of limited) {
      list.append(h('li', {},
        h('div', { class: 'quota-row' }, h('span', { text: `${tag} models` }), h('strong', { text: `${q.left} of ${q.limit} left this week` })),
        meter(q.left, q.limit)));
    }
    el.allowance.append(h('h3', { class: 'sub-title', text: 'Weekly quotas' }), list);
  }
}

function utcDay(offsetDays) {
  return new Date(Date.now() - offsetDays * 86400000).toISOString().slice(0, 10);
}

function renderChart(history) {
  clear(el.chart);
  const byDay = new Map();
  for (const r of history) {
    const d = byDay.get(r.day) || { credits: 0, jobs: 0, units: 0, kinds: [] };
    d.credits += r.credits || 0;
    d.jobs += r.jobs || 0;
    d.units += r.units || 0;
    d.kinds.push(`${r.kind}: ${fmtNum(r.credits)} credits, ${fmtNum(r.jobs)} job${r.jobs === 1 ? '' : 's'}`);
    byDay.set(r.day, d);
  }
  const days = [];
  for (let i = 29; i >= 0; i--) {
    const day = utcDay(i);
    days.push({ day, ...(byDay.get(day) || { credits: 0, jobs: 0, units: 0, kinds: [] }) });
  }
  const max = Math.max(...days.map((d) => d.credits), 0);
  const total = days.reduce((s, d) => s + d.credits, 0);
  const jobs = days.reduce((s, d) => s + d.jobs, 0);
  el.chartSum.textContent = `${fmtNum(total)} credits · ${fmtNum(jobs)} job${jobs === 1 ? '' : 's'}`;
  const scale = niceMax(max);
  const axis = h('div', { class: 'chart-axis', 'aria-hidden': 'true' },
    h('span', { text: fmtNum(scale) }), h('span', { text: fmtNum(Math.round(scale / 2)) }), h('span', { text: '0' }));
  const bars = h('div', { class: 'chart-bars' });
  days.forEach((d, i) => {
    const date = new Date(`${d.day}T00:00:00Z`);
    const label = date.toLocaleDateString(undefined, { month: 'short', day: 'numeric', timeZone: 'UTC' });
    const tip = d.credits ? `${label}: ${fmtNum(d.credits)} credits · ${d.kinds.join('; ')}` : `${label}: nothing spent`;
    const bar = h('div', { class: ['chart-bar', d.credits ? null : 'zero'] });
    bar.style.height = `${scale ? Math.max(d.credits ? 2 : 0, (d.credits / scale) * 100) : 0}%`;
    const col = h('div', { class: 'chart-col', title: tip, data: { day: d.day, credits: String(d.credits) }, tabindex: '0', 'aria-label': tip },
      h('div', { class: 'chart-track' }, bar),
      h('span', { class: ['chart-label', i % 5 === 4 || i === 29 ? 'show' : null], text: i === 29 ? 'Today' : label }));
    bars.append(col);
  });
  el.chart.append(axis, bars);
  el.chart.classList.toggle('empty-chart', total === 0);
  if (total === 0) el.chart.append(h('div', { class: 'chart-empty', text: 'No credits spent in the last 30 days.' }));
}

function niceMax(v) {
  if (v <= 0) return 10;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderGrants(grants) {
  clear(el.grants);
  el.grants.append(
    h('thead', {}, h('tr', {}, ...['Source', 'Amount', 'Remaining', 'Held', 'Spent', 'Granted', 'Expires', ''].map((t) => h('th', { class: ['Held', 'Spent', 'Granted', ''].includes(t) ? 'hide-sm' : null, text: t })))),
  );
  const body = h('tbody');
  if (!grants.length) body.append(h('tr', {}, h('td', { colspan: '8', class: 'muted', text: 'No credit grants yet.' })));
  const sorted = grants.slice().sort((a, b) => (b.live - a.live) || String(b.effective_at).localeCompare(String(a.effective_at)));
  for (const g of sorted) {
    const expired = !g.live;
    body.append(h('tr', { class: expired ? 'dim' : null, data: { grant: String(g.id) } },
      h('td', {}, pill(sourceLabel(g.source), g.source === 'admin' ? 'accent' : g.source === 'refund' ? 'ok' : '')),
      h('td', { class: 'num', text: fmtNum(g.amount) }),
      h('td', { class: 'num strong', text: fmtNum(g.remaining) }),
      h('td', { class: 'num hide-sm', text: fmtNum(g.held) }),
      h('td', { class: 'num hide-sm', text: fmtNum(g.spent) }),
      h('td', { class: 'hide-sm', text: fmtDate(g.effective_at) }),
      h('td', { text: g.expires_at ? fmtDateTime(g.expires_at) : 'never' }),
      h('td', { class: 'hide-sm' }, expired ? pill(g.expired ? 'expired' : 'used', 'muted') : pill('live', 'ok'))));
  }
  el.grants.append(body);
}

function sourceLabel(s) {
  return { signup: 'Signup bonus', period: 'Plan credits', 'top-up': 'Top-up', refund: 'Refund', admin: 'Admin grant' }[s] || s;
}

function renderPlans(u) {
  clear(el.plans);
  const plans = store.plans;
  const tags = [...new Set(plans.flatMap((p) => Object.keys(p.models || {})))].sort();
  const limited = store.limitedPerWeek || {};
  const head = h('tr', {}, h('th', { class: 'row-head', text: 'Plan' }), ...plans.map((p) =>
    h('th', { class: p.plan === u.plan ? 'current' : null, data: { plan: p.plan } },
      h('span', { class: 'plan-col-name', text: p.name }), p.plan === u.plan ? pill('Current', 'accent') : null)));
  const row = (label, fn) => h('tr', {}, h('th', { class: 'row-head', scope: 'row', text: label }), ...plans.map((p) => {
    const v = fn(p);
    return h('td', { class: p.plan === u.plan ? 'current' : null }, v instanceof Node ? v : String(v));
  }));
  const access = (v, tag) => {
    if (v === 'yes') return h('span', { class: 'yes', text: '✓ included' });
    if (v === 'limited') return h('span', { class: 'limited', text: `${limited[tag] ?? ''}/week`.replace(/^\/week$/, 'limited') });
    return h('span', { class: 'no', text: '—' });
  };
  const body = h('tbody',
    {},
    row('Credits / week', (p) => (p.credits_weekly ? fmtNum(p.credits_weekly) : '—')),
    row('Credits / year', (p) => (p.credits_yearly ? fmtNum(p.credits_yearly) : '—')),
    row('Signup credits', (p) => (p.signup_credits ? fmtNum(p.signup_credits) : '—')),
    row('LoRA training', (p) => (p.training_weekly || p.training_yearly ? `${p.training_weekly}/week · ${p.training_yearly}/year` : '—')),
    row('Parameters', (p) => cap(p.parameters)),
    row('Max batch', (p) => (p.max_batch === null || p.max_batch === undefined ? 'Unlimited' : String(p.max_batch))),
    row('LoRAs per job', (p) => (p.max_loras === null || p.max_loras === undefined ? 'Unlimited' : p.max_loras === 0 ? '—' : String(p.max_loras))),
    row('Queue', (p) => cap(p.queue)),
    ...tags.map((tag) => row(`${cap(tag)} models`, (p) => access((p.models || {})[tag] || 'no', tag))),
    row('Support', (p) => p.support || '—'),
  );
  el.plans.append(h('thead', {}, head), body);
}

function renderEvents(events) {
  clear(el.events);
  if (!events.length) {
    el.events.append(h('li', { class: 'muted', text: 'Nothing yet.' }));
    return;
  }
  for (const e of events.slice(0, 12)) {
    el.events.append(h('li', {},
      h('span', { class: 'ev-kind', text: e.kind.replace(/_/g, ' ') }),
      h('span', { class: 'ev-at muted', title: fmtDateTime(e.at), text: fmtRelative(e.at) })));
  }
}

// ---- API keys ----

async function loadKeys() {
  let r;
  try {
    r = await get('/api/keys');
  } catch (e) {
    toast(e);
    return;
  }
  renderKeys(r.keys || []);
}

function renderKeys(keys, fresh) {
  clear(el.keys);
  el.keys.append(h('p', { class: 'muted', text: 'Use a key as "Authorization: Bearer <key>" with the API or OpenAI-compatible clients (/v1/images/generations).' }));
  if (fresh) {
    const input = h('input', { class: 'key-value', readOnly: true, value: fresh, 'aria-label': 'New API key', id: 'new-key-value' });
    const copy = h('button', { type: 'button', class: 'btn btn-sm', text: 'Copy' });
    copy.addEventListener('click', () => {
      input.select();
      (navigator.clipboard ? navigator.clipboard.writeText(fresh) : Promise.reject()).then(
        () => notice('The key is on your clipboard.', 'Copied'),
        () => toast('Select the key and copy it by hand.', 'Clipboard unavailable'),
      );
    });
    el.keys.append(h('div', { class: 'new-key' },
      h('strong', { text: 'Your new key — copy it now, it will not be shown again:' }),
      h('div', { class: 'input-group' }, input, copy)));
  }
  const live = keys.filter((k) => !k.revoked);
  const list = h('ul', { class: 'key-list' });
  if (!live.length) list.append(h('li', { class: 'muted', text: 'No API keys.' }));
  for (const k of live) {
    const rm = h('button', { type: 'button', class: 'btn btn-sm btn-ghost-danger', text: 'Revoke' });
    rm.addEventListener('click', async () => {
      const ok = await confirmDialog({ title: 'Revoke this key?', message: `Programs using "${k.label || k.prefix}" stop working at once.`, ok: 'Revoke' });
      if (!ok) return;
      await busy(rm, async () => {
        await del(`/api/keys/${k.id}`);
        notice('The key was revoked.', 'Revoked');
        loadKeys();
      });
    });
    list.append(h('li', { class: 'key-item', data: { key: String(k.id) } },
      h('div', {},
        h('strong', { text: k.label || 'Unnamed key' }), ' ',
        h('code', { text: `${k.prefix}…` }),
        h('div', { class: 'muted small', text: `created ${fmtDate(k.created_at)} · ${k.last_used_at ? `last used ${fmtRelative(k.last_used_at)}` : 'never used'}` })),
      rm));
  }
  const label = h('input', { id: 'new-key-label', placeholder: 'Label, e.g. "ComfyUI on my laptop"', maxlength: '100' });
  const add = h('button', { type: 'submit', class: 'btn', id: 'new-key-btn', text: 'Create key' });
  const form = h('form', { class: 'inline-form' }, label, add);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    busy(add, async () => {
      const r = await post('/api/keys', { label: label.value.trim() });
      const all = await get('/api/keys');
      renderKeys(all.keys || [], r.key);
    });
  });
  el.keys.append(list, form);
}

// ---- password ----

const MIN_PASSWORD = 8;

function passwordForm() {
  const input = (id, autocomplete, extra = {}) =>
    h('input', { id, name: id, type: 'password', autocomplete, autocapitalize: 'off', spellcheck: 'false', 'aria-describedby': 'pw-error', ...extra });
  // Lets password managers tie the new password to this account.
  const user = h('input', { type: 'text', name: 'username', autocomplete: 'username', class: 'visually-hidden', tabindex: '-1', 'aria-hidden': 'true', readOnly: true, value: (store.user && store.user.name) || '' });
  const cur = input('pw-current', 'current-password');
  const pw = input('pw-new', 'new-password', { minlength: String(MIN_PASSWORD), 'aria-describedby': 'pw-hint pw-error' });
  const rep = input('pw-repeat', 'new-password', { minlength: String(MIN_PASSWORD) });
  const err = h('p', { id: 'pw-error', class: 'form-error', role: 'alert', hidden: true });
  const submit = h('button', { type: 'submit', id: 'pw-submit', class: 'btn btn-primary', text: 'Change password' });
  const field = (label, control, hint) => h('label', { class: 'field' }, h('span', { class: 'label', text: label }), control, hint || null);
  const form = h('form', { id: 'password-form', class: 'password-form', novalidate: true },
    user,
    field('Current password', cur),
    field('New password', pw, h('span', { class: 'hint', id: 'pw-hint', text: `At least ${MIN_PASSWORD} characters.` })),
    field('Repeat new password', rep),
    h('p', { class: 'hint', id: 'pw-effects', text: 'Changing it logs out your other sessions and revokes all your API keys: scripts that use them will need a new key.' }),
    err,
    h('div', { class: 'card-actions' }, submit));

  const fields = [cur, pw, rep];
  const showError = (message, bad) => {
    for (const f of fields) f.classList.toggle('invalid', f === bad);
    err.textContent = message || '';
    err.hidden = !message;
    if (bad) bad.focus();
  };
  for (const f of fields) f.addEventListener('input', () => f.classList.remove('invalid'));

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    if (submit.disabled) return;
    user.value = (store.user && store.user.name) || '';
    if (!cur.value) return showError('Enter your current password.', cur);
    if (Array.from(pw.value).length < MIN_PASSWORD) return showError(`The new password needs at least ${MIN_PASSWORD} characters.`, pw);
    if (rep.value !== pw.value) return showError('The two new passwords differ; type the same one twice.', rep);
    showError('');
    busy(submit, async () => {
      let done;
      try {
        done = await post('/api/password', { current: cur.value, new: pw.value });
      } catch (ex) {
        if (ex && (ex.status === 400 || ex.status === 403)) {
          // 403 is also what a stale CSRF token gets: only blame the field the server names.
          const wrongCurrent = ex.status === 403 && /current password/i.test(ex.message);
          showError(`${cap(ex.message)}.`, wrongCurrent ? cur : ex.status === 400 && /new password/i.test(ex.message) ? pw : null);
          if (wrongCurrent) cur.select();
          toast(ex, 'Password not changed');
          return;
        }
        throw ex;
      }
      for (const f of fields) f.value = '';
      const keys = (done && done.api_keys_revoked) || 0;
      notice(`Password changed; your other sessions were logged out${keys ? ` and ${keys} API key${keys === 1 ? ' was' : 's were'} revoked` : ''}.`);
    });
  });
  return form;
}
