// The Gallery page: the user's own images, newest first, 24 a page; a click opens the viewer.

import { get } from './api.js';
import { h, clear, toast, fmtNum, fmtRelative } from './ui.js';
import { openViewer } from './viewer.js';

const PER_PAGE = 24;
const G = { root: null, page: 1, images: [], total: 0, pages: 0, seq: 0 };
const el = {};

export function mount(root) {
  G.root = root;
  el.count = h('span', { class: 'muted', id: 'gallery-count' });
  el.grid = h('div', { id: 'gallery-grid', class: 'gallery-grid', 'aria-busy': 'true' });
  el.pager = h('nav', { id: 'gallery-pager', class: 'pager', 'aria-label': 'Gallery pages' });
  el.empty = h('div', { class: 'empty', hidden: true },
    h('div', { class: 'empty-art', 'aria-hidden': 'true' }),
    h('h2', { text: 'No images yet' }),
    h('p', { class: 'muted', text: 'Everything you generate is kept here, private to your account.' }),
    h('a', { class: 'btn btn-primary', href: '#/generate', text: 'Create your first image' }));
  root.append(
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', { text: 'Gallery' }), el.count),
      h('a', { class: 'btn', href: '#/generate', text: 'New image' })),
    el.empty,
    el.grid,
    el.pager);
}

export async function show(params) {
  const page = Math.max(1, parseInt(params.get('page') || '1', 10) || 1);
  await load(page);
}

export function hide() {}

async function load(page) {
  const seq = ++G.seq;
  el.grid.setAttribute('aria-busy', 'true');
  let r;
  try {
    r = await get(`/api/images?page=${page}&per_page=${PER_PAGE}`);
  } catch (e) {
    toast(e);
    return;
  }
  if (seq !== G.seq) return;
  if (r.pages > 0 && page > r.pages) {
    // The page emptied (deletes): go to the last one.
    location.hash = `#/gallery?page=${r.pages}`;
    return;
  }
  G.page = r.page;
  G.images = r.images || [];
  G.total = r.total;
  G.pages = r.pages;
  el.count.textContent = `${fmtNum(r.total)} image${r.total === 1 ? '' : 's'}`;
  renderGrid();
  renderPager();
  el.grid.setAttribute('aria-busy', 'false');
}

function renderGrid() {
  clear(el.grid);
  el.empty.hidden = G.images.length > 0;
  el.grid.hidden = !G.images.length;
  G.images.forEach((m, i) => {
    const img = h('img', {
      class: 'thumb',
      src: `/api/images/${encodeURIComponent(m.id)}/file`,
      alt: m.prompt,
      loading: 'lazy',
      decoding: 'async',
      data: { id: m.id },
    });
    const card = h('button', { type: 'button', class: 'thumb-card', title: m.prompt, on: { click: () => open(i) } },
      img,
      h('span', { class: 'thumb-meta' },
        h('span', { class: 'thumb-prompt', text: m.prompt }),
        h('span', { class: 'thumb-sub', text: `${m.width}×${m.height} · ${m.model} · ${fmtRelative(m.created_at)}` })));
    card.style.aspectRatio = `${m.width} / ${m.height}`;
    img.addEventListener('load', () => card.classList.add('loaded'));
    el.grid.append(card);
  });
}

function open(i) {
  openViewer(G.images.slice(), i, { onDeleted: () => load(G.page) });
}

function pageLink(n, label, { current = false, disabled = false } = {}) {
  if (disabled) return h('span', { class: 'pager-btn disabled', 'aria-disabled': 'true', text: label });
  return h('a', {
    class: ['pager-btn', current && 'current'],
    href: `#/gallery?page=${n}`,
    'aria-current': current ? 'page' : null,
    text: label,
  });
}

function renderPager() {
  clear(el.pager);
  el.pager.hidden = G.pages <= 1;
  if (G.pages <= 1) return;
  const p = G.page;
  el.pager.append(pageLink(p - 1, '‹ Prev', { disabled: p <= 1 }));
  const nums = new Set([1, G.pages, p - 1, p, p + 1].filter((n) => n >= 1 && n <= G.pages));
  let last = 0;
  for (const n of [...nums].sort((a, b) => a - b)) {
    if (n - last > 1) el.pager.append(h('span', { class: 'pager-gap', text: '…' }));
    el.pager.append(pageLink(n, String(n), { current: n === p }));
    last = n;
  }
  el.pager.append(pageLink(p + 1, 'Next ›', { disabled: p >= G.pages }));
}
