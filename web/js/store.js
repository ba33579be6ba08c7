// What the pages share: the user, the plans, the balance shown in the top bar.

import { get } from './api.js';
import { fmtNum } from './ui.js';

export const LEVELS = ['basic', 'standard', 'advanced', 'full'];
export const levelIndex = (l) => Math.max(0, LEVELS.indexOf(l));

export const store = {
  user: null,
  plans: [],
  usage: null,
  /** Settings handed from the gallery's "Use these settings" to the Generate page. */
  reuse: null,
  /** A LoRA name handed from the Train page's "Use on Generate" to the Generate page. */
  useLora: null,
};

const listeners = new Set();
/** Calls fn(usage) whenever the account (balance, plan) is refreshed. */
export function onAccount(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export async function loadPlans() {
  if (store.plans.length) return store.plans;
  const r = await get('/api/plans');
  store.plans = (r.plans || []).slice().sort((a, b) => a.rank - b.rank);
  store.limitedPerWeek = r.limited_per_week || {};
  return store.plans;
}

export function planName(id) {
  const p = store.plans.find((x) => x.plan === id);
  return p ? p.name : id;
}

/** The lowest-ranked plan whose parameter level reaches `level`. */
export function lowestPlanFor(level) {
  const need = levelIndex(level);
  return store.plans.find((p) => levelIndex(p.parameters) >= need) || null;
}

/** "Seed needs the Starter plan or higher". */
export function needsPlanNote(what, level) {
  const p = lowestPlanFor(level);
  return p ? `${what} needs the ${p.name} plan or higher` : `${what} is not available on your plan`;
}

export function setBalance(available, held) {
  const el = document.getElementById('balance');
  if (!el) return;
  el.textContent = String(available);
  el.dataset.state = 'ok';
  el.dataset.value = String(available);
  const chip = el.closest('.balance-chip');
  if (chip) chip.title = `${fmtNum(available)} credits available${held ? `, ${fmtNum(held)} held by running jobs` : ''}`;
  const heldEl = document.getElementById('balance-held');
  if (heldEl) {
    heldEl.hidden = !held;
    heldEl.textContent = held ? `+${fmtNum(held)} held` : '';
  }
}

/** Reloads the account document (balance, plan) and updates the top bar. */
export async function refreshAccount() {
  const u = await get('/api/usage');
  store.usage = u;
  setBalance(u.credits_available, u.credits_held);
  const badge = document.getElementById('plan-badge');
  if (badge) {
    badge.textContent = planName(u.plan);
    badge.dataset.plan = u.plan;
    badge.title = `${planName(u.plan)} plan${u.period ? ` (${u.period})` : ''}${u.status && u.status !== 'active' ? ` — ${u.status}` : ''}`;
  }
  for (const fn of listeners) {
    try {
      fn(u);
    } catch (e) {
      console.error(e);
    }
  }
  return u;
}
