// The HTTP client: JSON in and out, the CSRF token on every change, errors as ApiError.

const conf = { csrf: null, onUnauthorized: null };

export function setCsrf(token) {
  conf.csrf = token || null;
}

/** Called (once per failing request) when the server answers 401 outside the login flow. */
export function onUnauthorized(fn) {
  conf.onUnauthorized = fn;
}

/** An API refusal: `{"error": {"message", "type", "code", "details"}}` with its HTTP status. */
export class ApiError extends Error {
  constructor(status, body, retryAfter) {
    const e = (body && body.error) || {};
    super(e.message || (status ? `the server answered HTTP ${status}` : 'cannot reach the server'));
    this.name = 'ApiError';
    this.status = status;
    this.type = e.type || null;
    this.code = e.code || null;
    this.details = e.details || null;
    const ra = retryAfter == null ? NaN : parseInt(retryAfter, 10);
    this.retryAfter = Number.isFinite(ra) ? ra : null;
  }
}

/** A random key (works outside secure contexts too, unlike crypto.randomUUID). */
export function randomKey() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

/**
 * Calls the API. `body` is sent as JSON (a string is sent as is). Resolves to the parsed JSON
 * answer; rejects with an ApiError (status 0 when the server cannot be reached).
 */
export async function api(path, { method = 'GET', body, headers = {}, signal } = {}) {
  const h = { Accept: 'application/json', ...headers };
  let payload;
  if (body instanceof FormData) {
    // multipart/form-data: the browser sets the Content-Type with its boundary.
    payload = body;
  } else if (body !== undefined) {
    h['Content-Type'] = 'application/json';
    payload = typeof body === 'string' ? body : JSON.stringify(body);
  }
  if (method !== 'GET' && method !== 'HEAD' && conf.csrf) h['X-CSRF-Token'] = conf.csrf;
  let res;
  try {
    res = await fetch(path, { method, headers: h, body: payload, credentials: 'same-origin', signal, cache: 'no-store' });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    throw new ApiError(0, { error: { message: 'Cannot reach the server. Check your connection and try again.' } });
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const err = new ApiError(res.status, data, res.headers.get('Retry-After'));
    if (res.status === 401 && conf.onUnauthorized && path !== '/api/login' && path !== '/api/session') {
      conf.onUnauthorized(err);
    }
    throw err;
  }
  return data;
}

export const get = (path, opts) => api(path, opts);
export const post = (path, body, opts = {}) => api(path, { ...opts, method: 'POST', body: body === undefined ? {} : body });
export const patch = (path, body, opts = {}) => api(path, { ...opts, method: 'PATCH', body });
export const del = (path, opts = {}) => api(path, { ...opts, method: 'DELETE' });

/** Builds a query string from an object, leaving out null / undefined / '' values. */
export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== '') u.set(k, String(v));
  }
  const s = u.toString();
  return s ? `?${s}` : '';
}
