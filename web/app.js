// atelier's browser UI: session, top bar and hash routing (#/generate, #/gallery, #/train, #/usage, #/admin).

import { get, post, setCsrf, onUnauthorized } from './js/api.js';
import { store, loadPlans, refreshAccount, planName } from './js/store.js';
import { toast, hideToast, setPlanNamer, upscaleSmallImages } from './js/ui.js';
import * as generate from './js/generate.js';
import * as gallery from './js/gallery.js';
import * as train from './js/train.js';
import * as usage from './js/usage.js';
import * as admin from './js/admin.js';

const PAGES = {
  generate: { mod: generate, title: 'Generate' },
  gallery: { mod: gallery, title: 'Gallery' },
  train: { mod: train, title: 'Train' },
  usage: { mod: usage, title: 'Usage' },
  admin: { mod: admin, title: 'Admin', admin: true },
};

let authed = false;
let endedSession = false;
let current = null;
const mounted = new Set();

setPlanNamer(planName);

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, query = ''] = raw.split('?');
  return { name: path.split('/')[0] || 'generate', params: new URLSearchParams(query) };
}

function showOnly(id) {
  for (const s of document.querySelectorAll('#view > section')) s.hidden = s.id !== id;
}

function showLogin(message) {
  document.body.classList.remove('booting');
  document.body.classList.add('logged-out');
  document.getElementById('topbar').hidden = true;
  if (current && current.mod.hide) current.mod.hide();
  current = null;
  showOnly('login-view');
  document.title = 'Log in · atelier';
  const err = document.getElementById('login-error');
  err.hidden = !message;
  err.textContent = message || '';
  const name = document.getElementById('login-name');
  if (!name.value) name.focus();
  else document.getElementById('login-password').focus();
}

async function route() {
  if (!authed) {
    showLogin();
    return;
  }
  const { name, params } = parseHash();
  if (!location.hash || name === 'login') {
    history.replaceState(null, '', '#/generate');
    return route();
  }
  const page = PAGES[name];
  for (const a of document.querySelectorAll('#nav a')) {
    const on = a.dataset.route === name;
    a.classList.toggle('active', on);
    if (on) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (current && current !== page && current.mod.hide) current.mod.hide();
  if (!page || (page.admin && !store.user.is_admin)) {
    current = null;
    showOnly('page-missing');
    document.title = 'Not found · atelier';
    return;
  }
  const el = document.getElementById(`page-${name}`);
  showOnly(el.id);
  document.title = `${page.title} · atelier`;
  current = page;
  if (!mounted.has(name)) {
    mounted.add(name);
    page.mod.mount(el);
  }
  try {
    await page.mod.show(params);
  } catch (e) {
    toast(e);
  }
}

async function startSession(session) {
  authed = true;
  store.user = session.user;
  setCsrf(session.csrf_token);
  document.body.classList.remove('booting', 'logged-out');
  document.getElementById('topbar').hidden = false;
  document.getElementById('user-name').textContent = session.user.name;
  document.getElementById('nav-admin').hidden = !session.user.is_admin;
  try {
    await loadPlans();
  } catch (e) {
    toast(e);
  }
  refreshAccount().catch((e) => toast(e));
  await route();
}

async function login(ev) {
  ev.preventDefault();
  const name = document.getElementById('login-name').value.trim();
  const password = document.getElementById('login-password').value;
  const err = document.getElementById('login-error');
  const btn = document.getElementById('login-submit');
  if (!name || !password) {
    err.hidden = false;
    err.textContent = 'Enter your name and password.';
    return;
  }
  btn.disabled = true;
  btn.classList.add('is-busy');
  try {
    const r = await post('/api/login', { name, password });
    hideToast();
    err.hidden = true;
    document.getElementById('login-password').value = '';
    if (endedSession) {
      // Another account may have used this tab: start clean.
      location.reload();
      return;
    }
    await startSession(r);
  } catch (e) {
    let msg = e.message;
    if (e.status === 429 && e.retryAfter != null) msg += ` (wait ${e.retryAfter} s)`;
    err.hidden = false;
    err.textContent = msg;
    toast(e);
  } finally {
    btn.disabled = false;
    btn.classList.remove('is-busy');
  }
}

async function logout() {
  try {
    await post('/api/logout');
  } catch (e) {
    if (e.status !== 401) {
      toast(e);
      return;
    }
  }
  // A fresh page: nothing of this account stays in memory.
  history.replaceState(null, '', '/');
  location.reload();
}

onUnauthorized(() => {
  if (!authed) return;
  authed = false;
  endedSession = true;
  setCsrf(null);
  showLogin('Your session has ended. Log in again.');
});

async function boot() {
  upscaleSmallImages();
  document.getElementById('login-form').addEventListener('submit', login);
  document.getElementById('logout').addEventListener('click', logout);
  window.addEventListener('hashchange', route);
  try {
    const s = await get('/api/session');
    if (s && s.user && s.csrf_token) {
      await startSession(s);
      return;
    }
    showLogin();
  } catch (e) {
    showLogin();
    if (e.status !== 401) toast(e);
  }
}

boot();
