// The large view of an image (#image-modal): the picture, its parameters, reuse, download, delete.

import { get, del } from './api.js';
import { h, clear, toast, notice, confirmDialog, fmtDateTime } from './ui.js';
import { store } from './store.js';

const V = {
  list: [],
  index: 0,
  onDeleted: null,
  wired: false,
  seq: 0,
};

const $ = (id) => document.getElementById(id);

function wire() {
  if (V.wired) return;
  V.wired = true;
  const dlg = $('image-modal');
  $('modal-close').addEventListener('click', () => dlg.close());
  $('modal-prev').addEventListener('click', () => step(-1));
  $('modal-next').addEventListener('click', () => step(1));
  dlg.addEventListener('click', (e) => {
    // A click on the backdrop (outside the body) closes.
    if (e.target === dlg) dlg.close();
  });
  dlg.addEventListener('keydown', (e) => {
    if (e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement) return;
    if (e.key === 'ArrowLeft') step(-1);
    else if (e.key === 'ArrowRight') step(1);
  });
  dlg.addEventListener('close', () => {
    $('modal-img').removeAttribute('src');
    document.body.classList.remove('modal-open');
  });
  $('reuse-btn').addEventListener('click', reuse);
  $('delete-btn').addEventListener('click', remove);
}

function step(d) {
  const n = V.list.length;
  if (n < 2) return;
  V.index = (V.index + d + n) % n;
  render();
}

function row(label, value, { copy = false, wide = false } = {}) {
  const dd = h('dd', { class: wide ? 'wide' : null }, h('span', { class: 'val', text: value }));
  if (copy && value && navigator.clipboard) {
    dd.append(
      h('button', {
        type: 'button',
        class: 'copy-btn',
        title: `Copy ${label.toLowerCase()}`,
        text: 'Copy',
        on: {
          click: () =>
            navigator.clipboard.writeText(String(value)).then(
              () => notice(`${label} copied`, 'Copied'),
              () => toast('The clipboard is not available here.'),
            ),
        },
      }),
    );
  }
  return [h('dt', { text: label }), dd];
}

function fillParams(meta) {
  const dl = $('modal-params');
  clear(dl);
  if (!meta) {
    dl.append(h('dd', { class: 'muted', text: 'Loading…' }));
    return;
  }
  dl.dataset.id = meta.id;
  dl.append(
    ...row('Prompt', meta.prompt, { copy: true, wide: true }),
    ...row('Model', meta.model),
    ...row('Seed', String(meta.seed), { copy: true }),
    ...row('Steps', String(meta.steps)),
    ...row('Size', `${meta.width} × ${meta.height}`),
    ...row('Guidance', meta.guidance === null || meta.guidance === undefined ? 'default' : String(meta.guidance)),
    ...row('Created', fmtDateTime(meta.created_at)),
  );
}

async function render() {
  const item = V.list[V.index];
  if (!item) return;
  const seq = ++V.seq;
  const img = $('modal-img');
  img.src = `/api/images/${encodeURIComponent(item.id)}/file`;
  img.alt = item.prompt || 'Generated image';
  $('download-link').href = `/api/images/${encodeURIComponent(item.id)}/file?download=true`;
  $('download-link').setAttribute('download', `atelier-${item.id.slice(0, 8)}.png`);
  $('modal-prev').hidden = V.list.length < 2;
  $('modal-next').hidden = V.list.length < 2;
  $('modal-title').textContent = V.list.length > 1 ? `Image ${V.index + 1} of ${V.list.length}` : 'Image';
  $('image-modal').dataset.id = item.id;
  if (item.prompt === undefined) {
    fillParams(null);
    try {
      const r = await get(`/api/images/${encodeURIComponent(item.id)}`);
      Object.assign(item, r.image);
    } catch (e) {
      if (seq === V.seq) toast(e);
      return;
    }
  }
  if (seq === V.seq) fillParams(item);
}

/**
 * Opens the viewer on `list[index]`. Items are image metadata from the API, or `{id}` stubs
 * whose metadata is fetched when shown. `onDeleted(id)` is called after a delete.
 */
export function openViewer(list, index, { onDeleted } = {}) {
  wire();
  V.list = list;
  V.index = index;
  V.onDeleted = onDeleted || null;
  const dlg = $('image-modal');
  render();
  if (!dlg.open) dlg.showModal();
  document.body.classList.add('modal-open');
  $('modal-close').focus();
}

function reuse() {
  const m = V.list[V.index];
  if (!m || m.prompt === undefined) return;
  store.reuse = {
    prompt: m.prompt,
    model: m.model,
    width: m.width,
    height: m.height,
    seed: m.seed,
    steps: m.steps,
    guidance: m.guidance,
  };
  $('image-modal').close();
  location.hash = '#/generate';
}

async function remove() {
  const m = V.list[V.index];
  if (!m) return;
  const ok = await confirmDialog({
    title: 'Delete this image?',
    message: 'It is removed from your gallery for good. This cannot be undone.',
    ok: 'Delete',
  });
  if (!ok) return;
  const btn = $('delete-btn');
  btn.disabled = true;
  try {
    await del(`/api/images/${encodeURIComponent(m.id)}`);
    notice('The image was deleted.', 'Deleted');
    V.list.splice(V.index, 1);
    if (V.onDeleted) V.onDeleted(m.id);
    if (!V.list.length) $('image-modal').close();
    else {
      V.index = Math.min(V.index, V.list.length - 1);
      render();
    }
  } catch (e) {
    toast(e);
  } finally {
    btn.disabled = false;
  }
}
