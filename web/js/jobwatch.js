// Watching jobs: the state machine behind the Generate page's progress. One EventSource on
// /api/events, polling GET /api/jobs/{id} while the stream is down, and a Watch per job that
// turns events into its state (queued → running → succeeded | failed | canceled). No DOM: the
// page subscribes with onJobs() and renders what the watches hold.

import { get } from './api.js';

/** Every watched job by id (finished ones too, until pruned). */
export const watchers = new Map();

const listeners = { change: () => {}, ended: () => {} };

/**
 * The page's callbacks: `change(watch)` after any watch changed, `ended(watch)` once when a
 * watched job reaches a final state.
 */
export function onJobs({ change, ended }) {
  if (change) listeners.change = change;
  if (ended) listeners.ended = ended;
}

/**
 * One EventSource on /api/events carries the progress of all the user's jobs (one connection,
 * however many jobs are queued: browsers allow only 6 per server). It is open while a watched
 * job is unfinished. A job that ended while the stream was not connected is caught by asking
 * for it (GET /api/jobs/{id}) each time the stream (re)opens.
 */
export const Hub = {
  es: null,
  retry: null,
  dead: false,

  ensure() {
    const active = [...watchers.values()].some((w) => !w.final);
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
      const w = watchers.get(ev.job_id);
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
    for (const w of watchers.values()) if (!w.final) w.check();
  },

  close() {
    if (this.es) this.es.close();
    this.es = null;
    clearTimeout(this.retry);
  },
};


export class Watch {
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
    listeners.change(this);
  }

  finish() {
    this.stop();
    listeners.ended(this);
    Hub.ensure();
  }
}

/**
 * Starts watching `job` (an /api/jobs answer) unless it is watched already. Returns the watch
 * and whether it is new.
 */
export function watchJob(job) {
  let w = watchers.get(job.id);
  if (w) return { watch: w, created: false };
  w = new Watch(job);
  watchers.set(job.id, w);
  // Events published before the watcher existed are not replayed on an open stream: ask once.
  const open = Hub.es && Hub.es.readyState === EventSource.OPEN;
  w.start();
  if (open) w.check();
  return { watch: w, created: true };
}

/** The server answered a cancel with a status other than canceled: the job is stopping. */
export function markStopping(id) {
  const w = watchers.get(id);
  if (!w) return;
  w.stopping = true;
  listeners.change(w);
}

/** Forgets finished jobs beyond the newest `max` watches (`keep` stays). */
export function pruneFinished(keep, max = 12) {
  for (const [id, x] of watchers) {
    if (x.final && id !== keep && watchers.size > max) watchers.delete(id);
  }
}
