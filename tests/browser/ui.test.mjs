// Browser test of atelier's web UI against a running server (Playwright + system Chromium).
//
//   ATELIER_URL=http://127.0.0.1:8188 SCREENSHOT_DIR=/tmp/shots \
//   ADMIN_USER=admin ADMIN_PASS=... ALICE=alice ALICE_PASS=... BOB=bob BOB_PASS=... \
//   node tests/browser/ui.test.mjs
//
// Expects: alice on the starter plan, tara on the pro plan (a small `[training]` preset: the
// test trains one LoRA on the demo model), bob on the free plan with 200 extra credits and his dev
// quota unused, an admin on the max plan (alice's plan trains on 30 images per LoRA) (the one `serve` creates at first start); the demo models demo-schnell and demo-dev served. Changes alice's
// password and sets it back to ALICE_PASS (her other sessions end). Prints one line
// per passed step; exits 1 on the first failure (with screenshots of the pages involved).

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const env = process.env;
const BASE = (env.ATELIER_URL || '').replace(/\/+$/, '');
const SHOTS = path.resolve(env.SCREENSHOT_DIR || path.join(here, 'screenshots'));
const CHROMIUM = env.CHROMIUM_PATH || '/usr/bin/chromium';
const ADMIN = { name: env.ADMIN_USER || 'admin', pass: env.ADMIN_PASS };
const ALICE = { name: env.ALICE || 'alice', pass: env.ALICE_PASS };
const BOB = { name: env.BOB || 'bob', pass: env.BOB_PASS };
const TARA = { name: env.TARA || 'tara', pass: env.TARA_PASS };
const JOB_TIMEOUT = Number(env.JOB_TIMEOUT_MS || 180000);
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };

class TestFailure extends Error {}
function assert(cond, msg) {
  if (!cond) throw new TestFailure(msg);
}

for (const [k, v] of Object.entries({ ATELIER_URL: BASE, ADMIN_PASS: ADMIN.pass, ALICE_PASS: ALICE.pass, BOB_PASS: BOB.pass, TARA_PASS: TARA.pass })) {
  if (!v) {
    console.error(`FAIL setup: the environment variable ${k} is not set`);
    process.exit(2);
  }
}
if (!fs.existsSync(CHROMIUM)) {
  console.error(`FAIL setup: no Chromium at ${CHROMIUM} (install it, or set CHROMIUM_PATH)`);
  process.exit(2);
}
fs.mkdirSync(SHOTS, { recursive: true });

// ------------------------------------------------------------------ harness

const pages = new Set(); // every open page, for failure screenshots
const problems = []; // uncaught page errors and CSP violations: each fails the run
const started = Date.now();

async function newPage(browser, label, viewport = DESKTOP) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1, locale: 'en-US', timezoneId: 'UTC' });
  const page = await context.newPage();
  page.label = label;
  page.setDefaultTimeout(20000);
  page.on('pageerror', (e) => problems.push(`[${label}] uncaught error in the page: ${e.message}`));
  page.on('console', (m) => {
    const t = m.text();
    if (/Content[- ]Security[- ]Policy/i.test(t)) problems.push(`[${label}] CSP violation: ${t}`);
    else if (m.type() === 'error' && !/Failed to load resource/.test(t)) console.log(`  [${label}] console.error: ${t}`);
  });
  pages.add(page);
  return page;
}

function checkProblems() {
  if (problems.length) throw new TestFailure(`the page reported errors:\n    ${problems.join('\n    ')}`);
}

async function step(name, fn) {
  const t = Date.now();
  try {
    await fn();
    checkProblems();
  } catch (e) {
    console.error(`FAIL ${name}: ${e instanceof TestFailure ? e.message : e.stack || e.message}`);
    if (problems.length && !(e instanceof TestFailure && e.message.startsWith('the page reported errors'))) {
      console.error(`  the page also reported:\n    ${problems.join('\n    ')}`);
    }
    for (const p of pages) {
      if (p.isClosed()) continue;
      const file = path.join(SHOTS, `failure-${name.replace(/[^a-z0-9]+/gi, '-').toLowerCase()}-${p.label}.png`);
      try {
        await p.screenshot({ path: file, fullPage: true });
        const toast = await p.evaluate(() => {
          const t = document.getElementById('toast');
          return t && !t.hidden ? t.innerText : '';
        });
        console.error(`  screenshot: ${file}${toast ? ` — toast: ${toast.replace(/\s+/g, ' ')}` : ''}`);
      } catch {
        /* the page may be gone */
      }
    }
    throw e;
  }
  console.log(`ok   ${name} (${((Date.now() - t) / 1000).toFixed(1)} s)`);
}

async function waitFor(fn, { timeout = 20000, interval = 200, message = 'condition' } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) throw new TestFailure(`timed out after ${timeout / 1000} s waiting for ${message}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

const num = (s) => {
  const m = String(s || '').replace(/[,\u00a0\u202f ]/g, '').match(/-?\d+/);
  return m ? parseInt(m[0], 10) : NaN;
};

async function login(page, who) {
  await page.goto(`${BASE}/#/generate`);
  await page.waitForSelector('#login-name', { state: 'visible' });
  await page.fill('#login-name', who.name);
  await page.fill('#login-password', who.pass);
  await page.click('#login-submit');
  await page.waitForFunction((n) => document.getElementById('user-name')?.textContent === n && !document.getElementById('topbar').hidden, who.name);
  await page.waitForSelector('#balance[data-state="ok"]');
}

async function balance(page) {
  await page.waitForSelector('#balance[data-state="ok"]');
  const n = num(await page.textContent('#balance'));
  assert(Number.isFinite(n), `#balance shows no number: ${await page.textContent('#balance')}`);
  return n;
}

async function waitBalance(page, expected, what) {
  let seen;
  await waitFor(async () => {
    seen = await balance(page);
    return seen === expected;
  }, { timeout: 20000, message: `#balance to show ${expected} (${what}); it shows ${seen}` }).catch(async (e) => {
    throw new TestFailure(`${e.message}; last seen ${seen}`);
  });
}

async function priceOf(page) {
  await page.waitForSelector('#price[data-state="ok"]', { timeout: 20000 });
  const t = await page.textContent('#price');
  const n = num(t);
  assert(Number.isFinite(n) && n > 0, `#price shows no total: "${t}"`);
  return n;
}

/** Records #progress data-state changes and the step texts shown while running. */
async function watchProgress(page) {
  await page.evaluate(() => {
    const log = { states: [], steps: [] };
    window.__progressLog = log;
    const p = document.getElementById('progress');
    const s = document.getElementById('progress-step');
    const note = () => {
      const st = p.dataset.state;
      if (log.states[log.states.length - 1] !== st) log.states.push(st);
      if (st === 'running') log.steps.push(s.textContent);
    };
    if (window.__progressObserver) window.__progressObserver.disconnect();
    window.__progressObserver = new MutationObserver(note);
    window.__progressObserver.observe(p, { attributes: true, subtree: true, childList: true, characterData: true });
  });
}

/** Clicks Generate and waits for the job to end; returns {job, state, log}. */
async function generateAndWait(page, { keyboard = false } = {}) {
  const prev = await page.getAttribute('#progress', 'data-job');
  await page.waitForSelector('#generate-btn:not([disabled])', { timeout: 20000 });
  await watchProgress(page);
  if (keyboard) {
    await page.focus('#prompt');
    await page.keyboard.press('Control+Enter');
  } else await page.click('#generate-btn');
  const job = await waitFor(async () => {
    const j = await page.getAttribute('#progress', 'data-job');
    return j && j !== prev ? j : null;
  }, { timeout: 20000, message: 'the submitted job to show in #progress' }).catch(async (e) => {
    const msg = await page.evaluate(() => [document.getElementById('price-msg')?.textContent, document.getElementById('toast')?.innerText].filter(Boolean).join(' / '));
    throw new TestFailure(`${e.message}${msg ? ` (page says: ${msg})` : ''}`);
  });
  await page.waitForSelector('#progress[data-state="succeeded"], #progress[data-state="failed"], #progress[data-state="canceled"]', { timeout: JOB_TIMEOUT });
  const state = await page.getAttribute('#progress', 'data-state');
  const log = await page.evaluate(() => window.__progressLog);
  if (state !== 'succeeded') {
    const why = await page.textContent('#progress-stage');
    throw new TestFailure(`job ${job} ended ${state}: ${why}`);
  }
  return { job, state, log };
}

async function resultLoaded(page, jobId) {
  const sel = `img.result[data-job="${jobId}"]`;
  await page.waitForSelector(sel, { state: 'attached', timeout: 20000 });
  await page.waitForFunction((s) => {
    const imgs = [...document.querySelectorAll(s)];
    return imgs.length && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, sel, { timeout: 20000 }).catch(() => {
    throw new TestFailure(`the result image of job ${jobId} did not load (naturalWidth 0)`);
  });
  return page.$$eval(sel, (imgs) => imgs.map((i) => ({ id: i.dataset.id, w: i.naturalWidth })));
}

async function galleryIds(page) {
  // A fresh document: no stale grid from an earlier visit.
  await page.goto(`${BASE}/#/gallery`);
  await page.reload();
  await page.waitForSelector('#gallery-grid[aria-busy="false"]');
  return page.$$eval('#gallery-grid img.thumb', (imgs) => imgs.map((i) => i.dataset.id));
}

/** A screenshot with the checks that it shows something; returns its bytes. */
const shotHashes = new Map();
async function screenshot(page, name, { fullPage = true } = {}) {
  await page.waitForLoadState('networkidle').catch(() => {});
  await page.evaluate(() => document.fonts && document.fonts.ready);
  // Transient toasts would float over the middle of a full-page capture.
  await page.evaluate(() => ['toast', 'notice'].forEach((id) => { const t = document.getElementById(id); if (t) t.hidden = true; }));
  await page.waitForTimeout(250);
  const visible = await page.evaluate(() => {
    const text = document.body.innerText.trim().length;
    const boxes = [...document.querySelectorAll('main section:not([hidden]), dialog[open]')].map((e) => e.getBoundingClientRect());
    const area = boxes.reduce((s, b) => s + b.width * b.height, 0);
    return { text, area };
  });
  assert(visible.text > 20 && visible.area > 10000, `${name}: the page shows nothing (text ${visible.text} chars, content area ${Math.round(visible.area)} px²)`);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert(overflow <= 1, `${name}: the page is ${overflow} px wider than the window (horizontal scrolling)`);
  const file = path.join(SHOTS, `${name}.png`);
  const buf = await page.screenshot({ path: file, fullPage });
  assert(buf.length > 10 * 1024, `${name}.png is only ${buf.length} bytes (blank?)`);
  const hash = crypto.createHash('sha256').update(buf).digest('hex');
  assert(!shotHashes.has(hash), `${name}.png is identical to ${shotHashes.get(hash)}.png`);
  shotHashes.set(hash, name);
  return buf;
}

// Four small images the browser encodes itself: PNG, JPEG, WebP, PNG, as setInputFiles takes them.
async function testImages(page) {
  const files = await page.evaluate(async () => {
    const out = [];
    const kinds = [['image/png', 'png'], ['image/jpeg', 'jpg'], ['image/webp', 'webp'], ['image/png', 'png']];
    for (const [i, [type, ext]] of kinds.entries()) {
      const c = document.createElement('canvas');
      c.width = 96 + 16 * i;
      c.height = 72;
      const g = c.getContext('2d');
      g.fillStyle = `hsl(${i * 80}, 70%, 50%)`;
      g.fillRect(0, 0, c.width, c.height);
      g.fillStyle = '#fff';
      g.fillRect(12, 12, 30, 30);
      const blob = await new Promise((r) => c.toBlob(r, type, 0.9));
      const bytes = new Uint8Array(await blob.arrayBuffer());
      out.push({ name: `dog${i}.${ext}`, mimeType: type, b64: btoa(String.fromCharCode(...bytes)) });
    }
    return out;
  });
  return files.map((f) => ({ name: f.name, mimeType: f.mimeType, buffer: Buffer.from(f.b64, 'base64') }));
}

// ------------------------------------------------------------------ the test

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});

// Step 6 changes alice's password and back; should it stop halfway, the catch below sets the
// original again, so that a rerun against the same server can still log in.
let alicePassNow = ALICE.pass;
let alicePage = null;
async function restoreAlicePassword() {
  if (alicePassNow === ALICE.pass || !alicePage || alicePage.isClosed()) return;
  const status = await alicePage.evaluate(async ([current, next]) => {
    const s = await (await fetch('/api/session')).json();
    const r = await fetch('/api/password', { method: 'POST', headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf_token }, body: JSON.stringify({ current, new: next }) });
    return r.status;
  }, [alicePassNow, ALICE.pass]);
  console.error(`  set alice's password back to ALICE_PASS: HTTP ${status}`);
}

let exitCode = 0;
try {
  const alice = await newPage(browser, 'alice');
  alicePage = alice;
  const bob = await newPage(browser, 'bob');
  const admin = await newPage(browser, 'admin');
  const shared = {};

  await step('0. login page and a wrong password', async () => {
    const anon = await newPage(browser, 'anon');
    await anon.goto(`${BASE}/`);
    await anon.waitForSelector('#login-name', { state: 'visible' });
    assert(await anon.isHidden('#topbar'), 'the top bar shows before logging in');
    await anon.fill('#login-name', ALICE.name);
    await anon.fill('#login-password', 'definitely-wrong');
    await anon.click('#login-submit');
    await anon.waitForSelector('#login-error:not([hidden])');
    const msg = await anon.textContent('#login-error');
    assert(/wrong name or password/i.test(msg), `the login error says "${msg}"`);
    await anon.waitForSelector('#toast:not([hidden])');
    assert((await anon.getAttribute('#toast', 'role')) === 'alert', '#toast lacks role=alert');
    await anon.context().close();
    pages.delete(anon);
  });

  await step('1. alice generates an image and pays its price', async () => {
    await login(alice, ALICE);
    assert((await alice.textContent('#plan-badge')).trim().toLowerCase() === 'starter', `alice's plan badge says "${await alice.textContent('#plan-badge')}"`);
    assert(await alice.isHidden('a[href="#/admin"]'), 'alice (not an admin) sees the Admin link');
    await alice.waitForSelector('#model option[value="demo-schnell"]', { state: 'attached' });
    await alice.selectOption('#model', 'demo-schnell');
    // Starter = "standard" parameters: seed and steps yes, guidance and custom size no.
    assert(await alice.isEnabled('#seed'), 'alice (starter) cannot set a seed');
    assert(await alice.isEnabled('#steps'), 'alice (starter) cannot set steps');
    assert(await alice.isDisabled('#guidance'), 'alice (starter) can set guidance');
    assert(/Pro/.test(await alice.textContent('#guidance-note')), `the guidance note does not name the Pro plan: "${await alice.textContent('#guidance-note')}"`);
    assert((await alice.getAttribute('#batch', 'max')) === '4', `alice's batch max is ${await alice.getAttribute('#batch', 'max')}, not 4`);
    const P = await priceOf(alice);
    // The price follows the parameters.
    await alice.fill('#batch', '2');
    await alice.dispatchEvent('#batch', 'change');
    await waitFor(async () => (await alice.getAttribute('#price', 'data-state')) === 'ok' && num(await alice.textContent('#price')) === 2 * P, { message: `#price to show ${2 * P} for a batch of 2` });
    await alice.fill('#batch', '1');
    await alice.dispatchEvent('#batch', 'change');
    await waitFor(async () => (await alice.getAttribute('#price', 'data-state')) === 'ok' && num(await alice.textContent('#price')) === P, { message: `#price to come back to ${P}` });
    await alice.click('#dice');
    const rolled = await alice.inputValue('#seed');
    assert(/^\d+$/.test(rolled), `the dice gave the seed "${rolled}"`);
    // A fixed seed for the picture checked below (the images are deterministic on the CPU).
    const seed = '1';
    await alice.fill('#seed', seed);
    const B = await balance(alice);
    // The first minute: the shipped demo model draws what it is asked for (tests/browser.rs
    // checks the image below is nearest the red-heart emoji).
    const prompt = 'red heart';
    await alice.fill('#prompt', prompt);
    assert(num(await alice.textContent('#price')) === P, 'the price changed with the prompt');
    const { job, log } = await generateAndWait(alice);
    assert(log.states.includes('running'), `#progress never showed data-state=running (states: ${log.states.join(' → ')})`);
    assert(log.steps.some((t) => /step [1-9]\d*\/\d+/.test(t)), `no "step i/N" text while running (seen: ${[...new Set(log.steps)].join(', ') || 'none'})`);
    const imgs = await resultLoaded(alice, job);
    assert(imgs.length === 1 && imgs[0].w === 64, `expected 1 result image at the demo's native 64², got ${JSON.stringify(imgs)}`);
    // The bytes the UI shows, for tests/browser.rs's nearest-emoji check.
    const src = await alice.$eval(`img.result[data-job="${job}"]`, (i) => i.src);
    const bytes = await alice.evaluate(async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer())), src);
    if (env.RESULT_DIR) fs.writeFileSync(path.join(env.RESULT_DIR, 'red-heart.png'), Buffer.from(bytes));
    await waitBalance(alice, B - P, `${B} − ${P}`);
    shared.alice = { job, imageId: imgs[0].id, prompt, seed, price: P };
  });

  await step('1b. alice applies the shipped demo LoRA from the picker', async () => {
    await alice.waitForSelector('#lora-results .lora-result[data-lora="demo-grain"]');
    // Search filters by name, label and trigger words.
    await alice.fill('#lora-search', 'no such lora');
    await waitFor(async () => (await alice.locator('#lora-results .lora-result').count()) === 0, { message: 'the search to hide every LoRA' });
    await alice.fill('#lora-search', 'grain');
    await alice.click('#lora-results .lora-result[data-lora="demo-grain"] button');
    await alice.waitForSelector('#lora-chosen .lora-item[data-lora="demo-grain"]');
    const item = '#lora-chosen .lora-item[data-lora="demo-grain"]';
    // The sidecar's default weight, then a new one; trigger words go into the prompt on request.
    assert((await alice.inputValue(`${item} input.lora-weight`)) === '0.8', 'the default weight is not the sidecar\'s 0.8');
    await alice.fill(`${item} input.lora-weight`, '0.65');
    await alice.dispatchEvent(`${item} input.lora-weight`, 'change');
    await alice.fill('#prompt', 'a lighthouse at dusk');
    await alice.click(`${item} .lora-trigger`);
    const prompt = await alice.inputValue('#prompt');
    assert(prompt === 'a lighthouse at dusk, grainy film', `the trigger was not inserted: "${prompt}"`);
    // Starter allows one LoRA: the picker says which plan allows more.
    await alice.waitForSelector('#lora-lock:not([hidden])');
    assert(/Pro plan/.test(await alice.textContent('#lora-lock')), `the lock note does not name Pro: "${await alice.textContent('#lora-lock')}"`);
    const { job } = await generateAndWait(alice);
    const j = await alice.evaluate(async (id) => (await fetch(`/api/jobs/${id}`)).json(), job);
    assert(JSON.stringify(j.job.spec.loras) === JSON.stringify([{ name: 'demo-grain', weight: 0.65 }]), `the job's LoRAs: ${JSON.stringify(j.job.spec.loras)}`);
    const imgs = await resultLoaded(alice, job);
    const meta = await alice.evaluate(async (id) => (await fetch(`/api/images/${id}`)).json(), imgs[0].id);
    assert(meta.image.prompt === 'a lighthouse at dusk, grainy film <lora:demo-grain:0.65>', `the gallery prompt: "${meta.image.prompt}"`);
    await alice.click(`${item} .lora-remove`);
    await waitFor(async () => (await alice.locator('#lora-chosen .lora-item').count()) === 0, { message: 'the LoRA to be removed' });
  });

  await step('2. bob (free) uses up the weekly dev quota; demo-dev locks', async () => {
    await login(bob, BOB);
    assert((await bob.textContent('#plan-badge')).trim().toLowerCase() === 'free', `bob's plan badge says "${await bob.textContent('#plan-badge')}"`);
    await bob.waitForSelector('#model option[value="demo-dev"]', { state: 'attached' });
    // Free has no LoRAs: the picker is locked and names the plan that has them.
    await bob.waitForSelector('#lora-lock:not([hidden])');
    assert(/LoRAs need the Starter plan/.test(await bob.textContent('#lora-lock')), `bob's LoRA note: "${await bob.textContent('#lora-lock')}"`);
    assert(await bob.isDisabled('#lora-search'), 'bob (free) can search LoRAs');
    // Free = "basic" parameters: presets and batch only, and a note naming the plan that unlocks more.
    assert(await bob.isDisabled('#seed'), 'bob (free) can set a seed');
    assert(await bob.isDisabled('#dice'), 'bob (free) can roll a seed');
    assert(await bob.isDisabled('#steps'), 'bob (free) can set steps');
    assert(await bob.isDisabled('#guidance'), 'bob (free) can set guidance');
    assert(await bob.isDisabled('#width'), 'bob (free) can set a custom width');
    const seedNote = await bob.textContent('#seed-note');
    assert(/Seed needs the Starter plan/i.test(seedNote), `the seed note says "${seedNote}"`);
    assert((await bob.getAttribute('#batch', 'max')) === '1', 'bob (free) may ask for a batch above 1');
    const devText = await bob.textContent('#model option[value="demo-dev"]');
    assert(!(await bob.$eval('#model option[value="demo-dev"]', (o) => o.disabled)), `demo-dev is disabled for bob before any use ("${devText}")`);
    assert(/5\/5/.test(devText), `the demo-dev option does not show 5/5 left: "${devText}"`);
    await bob.selectOption('#model', 'demo-dev');
    const P = await priceOf(bob);
    const B0 = await balance(bob);
    for (let i = 1; i <= 5; i++) {
      await bob.selectOption('#model', 'demo-dev');
      await bob.fill('#prompt', `bob's dev test ${i}: a red fox in snow`);
      await priceOf(bob);
      const { job } = await generateAndWait(bob, { keyboard: i === 3 }); // Ctrl+Enter submits too
      await resultLoaded(bob, job);
    }
    await waitBalance(bob, B0 - 5 * P, `${B0} − 5 × ${P}`);
    await bob.reload();
    await bob.waitForSelector('#model option[value="demo-dev"]', { state: 'attached' });
    const opt = await bob.$eval('#model option[value="demo-dev"]', (o) => ({ disabled: o.disabled, text: o.textContent }));
    assert(opt.disabled, `demo-dev is still selectable after the quota is used up ("${opt.text}")`);
    assert(/locked/i.test(opt.text), `the demo-dev option does not say "locked": "${opt.text}"`);
    const why = await bob.textContent('#model-locked [data-model="demo-dev"]');
    assert(/quota/i.test(why) && /unlocks with/i.test(why), `the locked demo-dev note lacks the quota reason or the plans: "${why}"`);
    assert((await bob.inputValue('#model')) !== 'demo-dev', 'the locked demo-dev is still the selected model');
    // The server refuses a 6th dev job with 402 too.
    const r = await bob.evaluate(async () => {
      const s = await (await fetch('/api/session')).json();
      const res = await fetch('/api/jobs', { method: 'POST', headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf_token }, body: JSON.stringify({ model: 'demo-dev', prompt: 'one more', width: 512, height: 512, batch: 1 }) });
      return { status: res.status, body: await res.json() };
    });
    assert(r.status === 402, `a 6th dev job answered ${r.status}: ${JSON.stringify(r.body)}`);
    shared.bob = { devPrice: P };
  });

  await step('3. galleries are private', async () => {
    const aliceIds = await galleryIds(alice);
    assert(aliceIds.includes(shared.alice.imageId), `alice's gallery lacks her new image ${shared.alice.imageId} (has ${aliceIds.join(', ')})`);
    await alice.click(`#gallery-grid img.thumb[data-id="${shared.alice.imageId}"]`);
    await alice.waitForSelector('#image-modal[open]');
    await alice.waitForFunction((p) => document.getElementById('modal-params').textContent.includes(p), shared.alice.prompt);
    const params = await alice.textContent('#modal-params');
    assert(params.includes(shared.alice.seed), `the modal does not show the seed ${shared.alice.seed}: ${params}`);
    assert(/demo-schnell/.test(params), `the modal does not name the model: ${params}`);
    const href = await alice.getAttribute('#download-link', 'href');
    assert(href === `/api/images/${shared.alice.imageId}/file?download=true`, `the download link is ${href}`);
    shared.modalShot = await screenshot(alice, 'gallery-modal-desktop', { fullPage: false });
    await alice.click('#reuse-btn');
    await alice.waitForFunction(() => location.hash === '#/generate');
    await alice.waitForFunction((p) => document.getElementById('prompt').value === p, shared.alice.prompt);
    assert((await alice.inputValue('#seed')) === shared.alice.seed, `"Use these settings" did not fill the seed (${await alice.inputValue('#seed')})`);

    const bobIds = await galleryIds(bob);
    assert(bobIds.length === 5, `bob's gallery shows ${bobIds.length} images, not 5`);
    const leaked = bobIds.filter((id) => aliceIds.includes(id));
    assert(!leaked.length, `bob's gallery shows alice's images ${leaked.join(', ')}`);
    const status = await bob.evaluate(async (id) => [(await fetch(`/api/images/${id}`)).status, (await fetch(`/api/images/${id}/file`)).status], shared.alice.imageId);
    assert(status[0] === 404 && status[1] === 404, `bob fetching alice's image got ${status.join(' / ')}, not 404`);
    // Delete (with confirmation) removes the image.
    const victim = bobIds[bobIds.length - 1];
    await bob.click(`#gallery-grid img.thumb[data-id="${victim}"]`);
    await bob.waitForSelector('#image-modal[open]');
    await bob.click('#delete-btn');
    await bob.waitForSelector('#confirm-dialog[open]');
    await bob.click('#confirm-ok');
    await bob.waitForFunction((id) => !document.querySelector(`#gallery-grid img.thumb[data-id="${id}"]`), victim);
    await bob.click('#modal-close');
    await bob.waitForSelector('#image-modal:not([open])', { state: 'attached' });
    const after = await galleryIds(bob);
    assert(after.length === 4 && !after.includes(victim), `after the delete bob's gallery shows ${after.length} images`);
  });

  await step('4. admin grants bob 77 credits and changes a plan in one step', async () => {
    await login(admin, ADMIN);
    assert(await admin.isVisible('a[href="#/admin"]'), 'the admin does not see the Admin link');
    assert((await admin.textContent('#plan-badge')).trim().toLowerCase() === 'max', `the first admin's plan badge says "${await admin.textContent('#plan-badge')}"`);
    await bob.reload();
    const before = await balance(bob);
    await admin.goto(`${BASE}/#/admin`);
    const row = `#admin-users tr[data-user="${BOB.name}"]`;
    await admin.waitForSelector(row);
    await admin.fill(`${row} input.grant-amount`, '77');
    await admin.click(`${row} button.grant-btn`);
    await admin.waitForSelector('#notice:not([hidden])');
    await admin.waitForFunction(([sel, n]) => {
      const el = document.querySelector(`${sel} .credits-available`);
      return el && parseInt(el.textContent.replace(/[^\d]/g, ''), 10) === n;
    }, [row, before + 77]);
    await bob.reload();
    await waitBalance(bob, before + 77, `${before} + 77`);
    // Queue and models panels.
    await admin.waitForFunction(() => /succeeded/.test(document.getElementById('admin-queue').textContent));
    const models = await admin.textContent('#admin-models');
    assert(/demo-schnell/.test(models) && /demo-dev/.test(models) && /ready/.test(models), `#admin-models: ${models}`);
    // A refusal shows in the alert area: a password that is too short.
    await admin.fill('#new-user-name', 'carol');
    await admin.fill('#new-user-password', 'short');
    await admin.click('#new-user-submit');
    await admin.waitForSelector('#toast:not([hidden])');
    const toast = await admin.textContent('#toast');
    assert(/8 characters/.test(toast), `the toast says "${toast}"`);
    await admin.fill('#new-user-password', 'carolpass1');
    await admin.selectOption('#new-user-plan', 'pro');
    await admin.click('#new-user-submit');
    await admin.waitForSelector('#admin-users tr[data-user="carol"]');
    const carol = '#admin-users tr[data-user="carol"]';
    assert(/Pro/.test(await admin.textContent(carol)), 'carol was not created on the Pro plan');
    // A plan change is one control (plan and billing period together) and one click.
    assert((await admin.$$(`${carol} .plan-td select`)).length === 1, 'the plan change takes more than one control');
    await admin.selectOption(`${carol} select.plan-select`, 'ultra:yearly');
    await admin.click(`${carol} button.set-plan`);
    await admin.waitForFunction((sel) => /Ultra · yearly/.test(document.querySelector(`${sel} .plan-td .muted`)?.textContent || ''), carol);
    assert(/Ultra/.test(await admin.textContent('#notice')), `the notice says "${await admin.textContent('#notice')}"`);
  });

  await step('5. usage dashboard', async () => {
    await alice.goto(`${BASE}/#/usage`);
    await alice.waitForSelector('#usage-balance .big');
    const shown = num(await alice.textContent('#usage-available'));
    const top = await balance(alice);
    assert(shown === top, `#usage-balance shows ${shown}, the top bar ${top}`);
    assert((await alice.$$('#grants-table tbody tr')).length >= 1, 'the grants table is empty');
    const bars = await alice.$$eval('#usage-chart .chart-col', (cols) => cols.map((c) => Number(c.dataset.credits)));
    assert(bars.length === 30, `the chart has ${bars.length} days, not 30`);
    assert(bars[29] >= shared.alice.price, `today's bar shows ${bars[29]} credits spent`);
    const plans = await alice.textContent('#plans-table');
    for (const n of ['Free', 'Starter', 'Pro', 'Ultra', 'Max']) assert(plans.includes(n), `the plan table lacks ${n}`);
    assert(await alice.isVisible('#cancel-sub'), 'alice (weekly starter) has no "Cancel at period end" button');
    assert(await alice.$('#allowance'), 'no #allowance');
    assert(await alice.$('#low-balance-banner'), 'no #low-balance-banner element');
    await bob.goto(`${BASE}/#/usage`);
    await bob.waitForSelector('#usage-balance .big');
    assert(!(await bob.$('#cancel-sub')), 'bob (free, no period) has a cancel button');
    assert(/0 of 5/.test(await bob.textContent('#allowance')), `bob's allowance does not show the used-up dev quota: ${await bob.textContent('#allowance')}`);
  });

  await step('5b. alice builds a training dataset: 4 images, captions, thumbnails', async () => {
    await alice.goto(`${BASE}/#/train`);
    await alice.waitForSelector('#new-dataset-name');
    await alice.fill('#new-dataset-name', 'Browser dog');
    await alice.fill('#new-dataset-trigger', 'bwdog');
    await alice.click('#new-dataset-btn');
    await alice.waitForSelector('#dataset-editor:not([hidden]) #train-drop');
    assert((await alice.inputValue('#dataset-trigger')) === 'bwdog', 'the editor does not show the trigger word');
    assert(/^0 \/ 30 images$/.test(await alice.textContent('#train-count')), `the limit reads "${await alice.textContent('#train-count')}"`);
    const files = await testImages(alice);
    await alice.setInputFiles('#train-files', files);
    await alice.waitForFunction(() => document.querySelectorAll('#train-images .train-card').length === 4);
    await alice.waitForFunction(() => [...document.querySelectorAll('img.train-thumb')].every((i) => i.complete && i.naturalWidth > 0));
    assert(/^4 \/ 30 images$/.test(await alice.textContent('#train-count')), `the limit reads "${await alice.textContent('#train-count')}"`);
    // One caption, saved on change.
    const first = '#train-images .train-card:first-child textarea.caption';
    await alice.fill(first, '[trigger] sitting on a red sofa');
    await alice.press(first, 'Tab');
    await alice.waitForFunction(() => document.querySelector('#train-images .train-card:first-child .caption-status').textContent === 'Saved');
    // In bulk: a prefix on every caption.
    await alice.fill('#bulk-text', 'photo of');
    await alice.click('#bulk-prefix');
    await alice.waitForFunction(() => [...document.querySelectorAll('textarea.caption')].every((t) => t.value.startsWith('photo of')));
    const saved = await alice.evaluate(async () => {
      const list = await (await fetch('/api/datasets')).json();
      const ds = list.datasets.find((d) => d.name === 'Browser dog');
      return (await (await fetch(`/api/datasets/${ds.id}`)).json()).images.map((i) => i.caption);
    });
    assert(saved.length === 4 && saved[0] === 'photo of [trigger] sitting on a red sofa' && saved[1] === 'photo of',
      `the server keeps the captions ${JSON.stringify(saved)}`);
    assert((await alice.textContent('#dataset-list')).includes('4 images'), 'the dataset list does not show 4 images');
    // Starter on a weekly period includes no training: the run panel says so and Start stays off.
    await alice.waitForSelector('#train-run:not([hidden]) #train-allowance');
    assert(/^0 trainings left/.test(await alice.textContent('#train-allowance')), `alice's allowance reads "${await alice.textContent('#train-allowance')}"`);
    assert(await alice.isDisabled('#train-start'), 'alice can start a training without an allowance');
  });

  await step('5c. tara (pro) trains a LoRA: dataset, start, loss chart, a sample, then generates with it', async () => {
    const tara = await newPage(browser, 'tara');
    shared.tara = tara;
    await login(tara, TARA);
    await tara.goto(`${BASE}/#/train`);
    await tara.waitForSelector('#new-dataset-name');
    await tara.fill('#new-dataset-name', 'Tara cat');
    await tara.fill('#new-dataset-trigger', 'trcat');
    await tara.click('#new-dataset-btn');
    await tara.waitForSelector('#dataset-editor:not([hidden]) #train-drop');
    await tara.setInputFiles('#train-files', await testImages(tara));
    await tara.waitForFunction(() => document.querySelectorAll('#train-images .train-card').length === 4);
    const first = '#train-images .train-card:first-child textarea.caption';
    await tara.fill(first, '[trigger] asleep in the sun');
    await tara.press(first, 'Tab');
    await tara.waitForFunction(() => document.querySelector('#train-images .train-card:first-child .caption-status').textContent === 'Saved');
    // The run panel: the preset filled in (pro = "advanced": editable), one training left.
    await tara.waitForSelector('#train-run:not([hidden]) #train-start:not([disabled])');
    assert(await tara.isEnabled('#train-steps'), 'pro (advanced) cannot edit the steps');
    assert(/1 training left/.test(await tara.textContent('#train-allowance')), `the allowance reads "${await tara.textContent('#train-allowance')}"`);
    await tara.selectOption('#train-model', 'demo-schnell');
    await tara.fill('#train-lora-name', 'tara-cat');
    await tara.fill('#train-sample-prompt', 'trcat on a rooftop');
    // Every redraw of the chart is recorded: it must grow step by step as events arrive, not
    // appear whole at the end.
    await tara.evaluate(() => {
      window.__chartSizes = [];
      const note = () => {
        const l = document.querySelector('#loss-chart polyline.loss-mean');
        const n = l ? l.getAttribute('points').trim().split(/\s+/).length : 0;
        const a = window.__chartSizes;
        if (n && a[a.length - 1] !== n) a.push(n);
        const st = document.getElementById('train-status');
        if (st && /step \d+ \/ \d+/.test(st.textContent)) window.__stepText = st.textContent;
      };
      new MutationObserver(note).observe(document.getElementById('train-run'), { childList: true, subtree: true, attributes: true });
    });
    await tara.click('#train-start');
    const points = () => tara.evaluate(() => {
      const l = document.querySelector('#loss-chart polyline.loss-mean');
      return l ? l.getAttribute('points').trim().split(/\s+/).length : 0;
    });
    await tara.waitForSelector('#train-samples img', { timeout: JOB_TIMEOUT });
    await tara.waitForSelector('#train-use', { timeout: JOB_TIMEOUT });
    await tara.waitForFunction(() => [...document.querySelectorAll('#train-samples img')].every((i) => i.complete && i.naturalWidth > 0));
    const total = await tara.evaluate(async () => {
      const r = await (await fetch('/api/trainings')).json();
      return r.trainings[0];
    });
    assert(total.status === 'succeeded' && total.lora === 'tara-cat', `the training ended ${JSON.stringify(total.status)} with ${total.lora}`);
    assert((await points()) === total.training.steps, `the chart has ${await points()} points for ${total.training.steps} steps`);
    const sizes = await tara.evaluate(() => window.__chartSizes);
    assert(sizes.length >= 3 && sizes.every((n, i) => i === 0 || n > sizes[i - 1]), `the chart did not grow step by step: ${JSON.stringify(sizes)}`);
    assert(await tara.evaluate(() => window.__stepText), 'the status never read "step i / N" while running');
    // Its LoRA on the Generate page: picked, its trigger word in the prompt, and an image made.
    await tara.click('#train-use');
    await tara.waitForSelector('#lora-chosen .lora-item[data-lora="tara-cat"]');
    assert((await tara.inputValue('#prompt')).includes('trcat'), `the trigger is not in the prompt: "${await tara.inputValue('#prompt')}"`);
    await tara.selectOption('#model', 'demo-schnell');
    await tara.fill('#prompt', 'trcat on a rooftop at night');
    const { job } = await generateAndWait(tara);
    await resultLoaded(tara, job);
    const spec = await tara.evaluate(async (id) => (await (await fetch(`/api/jobs/${id}`)).json()).job.spec, job);
    assert(JSON.stringify(spec.loras) === JSON.stringify([{ name: 'tara-cat', weight: 1 }]), `the job ran with LoRAs ${JSON.stringify(spec.loras)}`);
  });

  await step('6. alice changes her password (wrong, right, and back)', async () => {
    const NEW_PASS = `${ALICE.pass}-Changed9`;
    // A second session of alice's: a password change must end it.
    const other = await newPage(browser, 'alice-2');
    await login(other, ALICE);
    const sessionStatus = (p) => p.evaluate(async () => (await fetch('/api/session', { cache: 'no-store' })).status);
    assert((await sessionStatus(other)) === 200, 'alice\'s second session does not work');

    await alice.goto(`${BASE}/#/usage`);
    await alice.waitForSelector('#pw-submit');
    const requests = [];
    const onRequest = (r) => {
      if (new URL(r.url()).pathname === '/api/password') requests.push(r.method());
    };
    alice.on('request', onRequest);
    const fillPw = async (current, next, repeat = next) => {
      await alice.fill('#pw-current', current);
      await alice.fill('#pw-new', next);
      await alice.fill('#pw-repeat', repeat);
    };
    const hideMessages = () => alice.evaluate(() => ['toast', 'notice'].forEach((id) => { document.getElementById(id).hidden = true; }));
    const change = async (current, next, expect) => {
      await hideMessages();
      await fillPw(current, next);
      const res = alice.waitForResponse((r) => new URL(r.url()).pathname === '/api/password' && r.request().method() === 'POST');
      await alice.click('#pw-submit');
      const r = await res;
      const body = await r.json().catch(() => null);
      assert(r.status() === expect, `POST /api/password answered ${r.status()} (expected ${expect}): ${JSON.stringify(body)}`);
      await alice.waitForSelector('#pw-submit:not([disabled])');
      return body;
    };

    // Checks in the browser: nothing is sent.
    await fillPw(ALICE.pass, 'short7!');
    await alice.click('#pw-submit');
    await alice.waitForSelector('#pw-error:not([hidden])');
    assert(/8 characters/.test(await alice.textContent('#pw-error')), `a short new password says "${await alice.textContent('#pw-error')}"`);
    assert(await alice.$('#pw-new.invalid'), 'a short new password does not mark #pw-new');
    await fillPw(ALICE.pass, NEW_PASS, `${NEW_PASS}x`);
    await alice.click('#pw-submit');
    await alice.waitForFunction(() => /differ/i.test(document.getElementById('pw-error').textContent));
    assert(await alice.$('#pw-repeat.invalid'), 'different new passwords do not mark #pw-repeat');
    await alice.waitForTimeout(300);
    assert(!requests.length, `the browser checks still sent ${requests.length} request(s) to /api/password`);

    // A wrong current password: 403, the error toast, nothing changes.
    const wrong = await change('not-my-password', NEW_PASS, 403);
    assert(/current password is wrong/i.test(wrong?.error?.message || ''), `the 403 says ${JSON.stringify(wrong)}`);
    await alice.waitForSelector('#toast:not([hidden])');
    const toastText = await alice.innerText('#toast');
    assert(/current password is wrong/i.test(toastText), `the toast says "${toastText.replace(/\s+/g, ' ')}"`);
    assert(await alice.$('#pw-current.invalid'), 'a wrong current password does not mark #pw-current');
    assert((await sessionStatus(other)) === 200, 'a refused password change ended alice\'s other session');

    // The right one: 200, the notice, the fields cleared, the other session ended, this one kept.
    const ok = await change(ALICE.pass, NEW_PASS, 200);
    alicePassNow = NEW_PASS;
    assert(ok && ok.ok === true, `the 200 answer is ${JSON.stringify(ok)}`);
    await alice.waitForSelector('#notice:not([hidden])');
    const noticeText = await alice.innerText('#notice');
    assert(/Password changed; your other sessions were logged out/i.test(noticeText), `the notice says "${noticeText.replace(/\s+/g, ' ')}"`);
    assert(await alice.isHidden('#toast'), 'the error toast still shows after the success');
    assert(await alice.isHidden('#pw-error'), '#pw-error still shows after the success');
    for (const id of ['#pw-current', '#pw-new', '#pw-repeat']) assert((await alice.inputValue(id)) === '', `${id} was not cleared`);
    assert((await sessionStatus(alice)) === 200, 'the password change ended the session that made it');
    assert((await sessionStatus(other)) === 401, 'alice\'s other session still works after the password change');
    // The new password logs in; the old one does not.
    const loginStatus = (pass) => other.evaluate(async ([name, password]) => (await fetch('/api/login', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ name, password }) })).status, [ALICE.name, pass]);
    assert((await loginStatus(ALICE.pass)) === 401, 'the old password still logs in');
    assert((await loginStatus(NEW_PASS)) === 200, 'the new password does not log in');

    // Back to the original, so that the rest of the run (and later runs) are unaffected.
    await change(NEW_PASS, ALICE.pass, 200);
    alicePassNow = ALICE.pass;
    await alice.waitForSelector('#notice:not([hidden])');
    assert((await sessionStatus(other)) === 401, 'alice\'s other session survived changing the password back');
    assert((await loginStatus(ALICE.pass)) === 200, 'the original password does not log in after changing it back');
    alice.off('request', onRequest);
    assert((await sessionStatus(alice)) === 200, 'alice\'s session ended after changing the password back');
    await hideMessages();
    await other.context().close();
    pages.delete(other);
  });

  await step('7. screenshots at desktop and phone sizes', async () => {
    const anon = await newPage(browser, 'anon-shots');
    const shots = [
      ['login', anon, async (p) => { await p.goto(`${BASE}/`); await p.waitForSelector('#login-name', { state: 'visible' }); }],
      ['generate', alice, async (p) => {
        await p.goto(`${BASE}/#/generate`);
        await p.waitForSelector('#price[data-state="ok"]');
        await p.waitForSelector('img.result');
        await p.waitForFunction(() => [...document.querySelectorAll('img.result')].slice(0, 4).every((i) => i.complete));
      }],
      ['gallery', alice, async (p) => { await p.goto(`${BASE}/#/gallery`); await p.waitForSelector('#gallery-grid img.thumb'); await p.waitForFunction(() => [...document.querySelectorAll('img.thumb')].every((i) => i.complete)); }],
      ['gallery-modal', alice, async (p) => {
        await p.goto(`${BASE}/#/gallery`);
        await p.waitForSelector('#gallery-grid img.thumb');
        await p.click('#gallery-grid img.thumb');
        await p.waitForSelector('#image-modal[open]');
        await p.waitForFunction(() => document.getElementById('modal-img').complete && document.getElementById('modal-params').textContent.length > 20);
      }, { fullPage: false }],
      ['train', shared.tara, async (p) => {
        await p.goto(`${BASE}/#/train`);
        await p.waitForSelector('#train-images img.train-thumb');
        await p.waitForSelector('#loss-chart polyline.loss-mean');
        await p.waitForFunction(() => [...document.querySelectorAll('img.train-thumb, #train-samples img')].every((i) => i.complete));
      }],
      ['usage', alice, async (p) => { await p.goto(`${BASE}/#/usage`); await p.waitForSelector('#usage-chart .chart-col'); await p.waitForSelector('#plans-table tbody tr'); }],
      ['admin', admin, async (p) => { await p.goto(`${BASE}/#/admin`); await p.waitForSelector('#admin-users tbody tr'); await p.waitForSelector('#admin-models table'); }],
    ];
    const written = [];
    for (const [size, vp] of [['desktop', DESKTOP], ['phone', PHONE]]) {
      for (const [name, p, open, opts] of shots) {
        await p.setViewportSize(vp);
        if (await p.$('#image-modal[open]')) await p.keyboard.press('Escape');
        if (name === 'gallery-modal' && size === 'desktop' && shared.modalShot) {
          written.push(`${name}-${size}.png`);
          continue; // taken in step 3
        }
        await open(p);
        await screenshot(p, `${name}-${size}`, opts);
        written.push(`${name}-${size}.png`);
      }
    }
    for (const p of [alice, bob, admin, shared.tara]) await p.setViewportSize(DESKTOP);
    console.log(`     ${written.length} screenshots in ${SHOTS}: ${written.join(', ')}`);
  });

  await step('8. cancel at period end, API key, logout', async () => {
    await alice.goto(`${BASE}/#/usage`);
    await alice.waitForSelector('#cancel-sub');
    await alice.click('#cancel-sub');
    await alice.waitForSelector('#confirm-dialog[open]');
    await alice.click('#confirm-ok');
    await alice.waitForSelector('#cancel-sub', { state: 'detached' });
    assert(/period end/i.test(await alice.textContent('#usage-plan')), `the plan card does not say it ends at period end: ${await alice.textContent('#usage-plan')}`);
    await alice.fill('#new-key-label', 'browser test');
    await alice.click('#new-key-btn');
    await alice.waitForSelector('#new-key-value');
    const key = await alice.inputValue('#new-key-value');
    assert(/^atk_/.test(key), `the new API key looks wrong: ${key}`);
    const viaKey = await alice.evaluate(async (k) => (await fetch('/api/usage', { headers: { Authorization: `Bearer ${k}` }, credentials: 'omit' })).status, key);
    assert(viaKey === 200, `the new key does not work (${viaKey})`);
    await alice.click('#logout');
    await alice.waitForSelector('#login-name', { state: 'visible' });
    await alice.goto(`${BASE}/#/gallery`);
    await alice.waitForSelector('#login-name', { state: 'visible' });
    assert(await alice.isHidden('#gallery-grid'), 'the gallery shows after logging out');
  });

  console.log(`PASS all steps in ${((Date.now() - started) / 1000).toFixed(1)} s`);
} catch (e) {
  exitCode = 1;
  await restoreAlicePassword().catch(() => {});
} finally {
  await browser.close().catch(() => {});
}
process.exit(exitCode);
