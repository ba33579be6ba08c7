// Development helper: serves web/ from disk (with the server's CSP) and proxies everything else
// to a running atelier, so UI changes show without rebuilding the binary (build.rs embeds web/).
//
//   node tests/browser/dev-server.mjs --upstream http://127.0.0.1:8188 --listen 127.0.0.1:8189
//
// Then open http://127.0.0.1:8189/ (or point ATELIER_URL at it to run ui.test.mjs on the
// working tree's web/).

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] ? args[i + 1] : def;
};
const upstream = new URL(opt('--upstream', process.env.ATELIER_UPSTREAM || 'http://127.0.0.1:8188'));
const [host, port] = opt('--listen', '127.0.0.1:8189').split(':');
const webRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../web');

const CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";
const TYPES = { html: 'text/html; charset=utf-8', js: 'text/javascript; charset=utf-8', mjs: 'text/javascript; charset=utf-8', css: 'text/css; charset=utf-8', svg: 'image/svg+xml', png: 'image/png', ico: 'image/x-icon', json: 'application/json' };

function serveFile(req, res) {
  const rel = decodeURIComponent(new URL(req.url, 'http://x').pathname).replace(/^\/+/, '') || 'index.html';
  const file = path.resolve(webRoot, rel);
  if (!file.startsWith(webRoot + path.sep)) return false;
  let bytes;
  try {
    bytes = fs.readFileSync(file);
  } catch {
    return false;
  }
  res.writeHead(200, {
    'Content-Type': TYPES[path.extname(file).slice(1)] || 'application/octet-stream',
    'Content-Security-Policy': CSP,
    'X-Content-Type-Options': 'nosniff',
    'Cache-Control': 'no-cache',
  });
  res.end(bytes);
  return true;
}

function proxy(req, res) {
  const p = http.request(
    { hostname: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: { ...req.headers, host: upstream.host } },
    (up) => {
      res.writeHead(up.statusCode, up.headers);
      res.flushHeaders();
      up.pipe(res);
    },
  );
  p.on('error', (e) => {
    res.writeHead(502, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({ error: { message: `dev-server: upstream unreachable: ${e.message}`, type: 'server_error', code: 'bad_gateway' } }));
  });
  req.pipe(p);
  res.on('close', () => p.destroy());
}

http
  .createServer((req, res) => {
    const isApi = /^\/(api|v1)\//.test(req.url) || req.url === '/healthz' || req.url === '/metrics';
    if (!isApi && (req.method === 'GET' || req.method === 'HEAD') && serveFile(req, res)) return;
    proxy(req, res);
  })
  .listen(Number(port), host, () => console.log(`dev-server on http://${host}:${port} -> ${upstream.origin} (web/ from ${webRoot})`));
