// The training loss chart: an inline SVG (no library, no external service) of each step's loss
// (thin) and its running mean (bold), redrawn as steps arrive. The y axis spans the losses
// seen (with a little margin); the x axis spans the whole run, so the curve grows to the right.

const NS = 'http://www.w3.org/2000/svg';
const W = 600;
const H = 220;
const PAD = { left: 52, right: 12, top: 12, bottom: 28 };

function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/** A short label for an axis value: 3 significant digits. */
function tick(v) {
  if (v === 0) return '0';
  const a = Math.abs(v);
  return a >= 1000 || a < 0.01 ? v.toExponential(1) : Number(v.toPrecision(3)).toString();
}

function polyline(points, x, y, cls) {
  const d = points.map(([s, v]) => `${x(s).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
  return el('polyline', { points: d, class: cls, fill: 'none' });
}

/**
 * Draws `steps` (an array of {step, loss, mean}, in step order) into `svg` for a run of
 * `total` steps. Non-finite losses (skipped steps) are left out of the curves.
 */
export function drawLossChart(svg, steps, total) {
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('role', 'img');
  svg.replaceChildren();
  const ok = steps.filter((p) => Number.isFinite(p.loss));
  const last = steps.length ? steps[steps.length - 1] : null;
  svg.setAttribute(
    'aria-label',
    last ? `Loss chart: step ${last.step} of ${total}, loss ${tick(last.loss)}, mean ${tick(last.mean)}` : 'Loss chart: no steps yet',
  );
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  svg.append(el('rect', { x: PAD.left, y: PAD.top, width: plotW, height: plotH, class: 'loss-frame' }));
  if (!ok.length) {
    svg.append(el('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'loss-label' }, 'waiting for the first step'));
    return;
  }
  let lo = Math.min(...ok.map((p) => Math.min(p.loss, p.mean)));
  let hi = Math.max(...ok.map((p) => Math.max(p.loss, p.mean)));
  if (hi - lo < 1e-9) {
    lo -= 0.5 * Math.abs(lo || 1);
    hi += 0.5 * Math.abs(hi || 1);
  }
  const margin = (hi - lo) * 0.05;
  lo -= margin;
  hi += margin;
  const span = Math.max(total, last.step, 1);
  const x = (s) => PAD.left + (s / span) * plotW;
  const y = (v) => PAD.top + (1 - (v - lo) / (hi - lo)) * plotH;
  for (let i = 0; i <= 4; i++) {
    const v = lo + ((hi - lo) * i) / 4;
    svg.append(el('line', { x1: PAD.left, x2: PAD.left + plotW, y1: y(v), y2: y(v), class: 'loss-grid' }));
    svg.append(el('text', { x: PAD.left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'loss-label' }, tick(v)));
  }
  for (let i = 0; i <= 4; i++) {
    const s = Math.round((span * i) / 4);
    svg.append(el('text', { x: x(s), y: H - 8, 'text-anchor': 'middle', class: 'loss-label' }, String(s)));
  }
  svg.append(polyline(ok.map((p) => [p.step, p.loss]), x, y, 'loss-step'));
  svg.append(polyline(ok.map((p) => [p.step, p.mean]), x, y, 'loss-mean'));
  const end = ok[ok.length - 1];
  svg.append(el('circle', { cx: x(end.step), cy: y(end.mean), r: 3, class: 'loss-dot' }));
}
