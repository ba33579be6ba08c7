// The Train page: the user's training datasets (create, delete) and the dataset editor (name,
// trigger word, image upload by picker or drag and drop, thumbnails with a caption each, bulk
// caption tools, the plan's image limit). Training runs go into #train-run (trainrun.js).

import { get, post, patch, del } from './api.js';
import { h, clear, toast, notice, confirmDialog, busy, fmtNum } from './ui.js';
import { mountRun, showRun, hideRun } from './trainrun.js';

const T = { root: null, list: [], maxImages: 0, maxDatasets: 0, current: null, images: [], seq: 0 };
const el = {};

export function mount(root) {
  T.root = root;
  el.count = h('span', { class: 'muted', id: 'train-datasets-count' });
  el.name = h('input', { id: 'new-dataset-name', placeholder: 'Dataset name, e.g. My dog', maxlength: '100', required: true });
  el.trigger = h('input', { id: 'new-dataset-trigger', placeholder: 'Trigger word, e.g. rexdog', maxlength: '100', autocapitalize: 'off', spellcheck: 'false' });
  el.create = h('button', { type: 'submit', class: 'btn btn-primary', id: 'new-dataset-btn', text: 'Create' });
  el.list = h('ul', { id: 'dataset-list', class: 'dataset-list' });
  el.editor = h('div', { id: 'dataset-editor', class: 'dataset-editor', hidden: true });
  el.none = h('div', { class: 'card empty', id: 'dataset-none' },
    h('h2', { text: 'No dataset open' }),
    h('p', { class: 'muted', text: 'Create a dataset, then add 10–30 photos of your subject with a caption each.' }));
  root.append(
    h('div', { class: 'page-head' },
      h('div', {}, h('h1', { text: 'Train' }), el.count)),
    h('div', { class: 'train-layout' },
      h('aside', { class: 'card train-side' },
        h('div', { class: 'card-title', text: 'Your datasets' }),
        h('form', { id: 'new-dataset', class: 'new-dataset', on: { submit: create } },
          el.name, el.trigger, el.create),
        el.list),
      h('div', { class: 'train-main' }, el.none, el.editor,
        el.run = h('section', { id: 'train-run', class: 'card', hidden: true }))));
  mountRun(el.run);
}

export async function show(params) {
  await loadList();
  const want = params.get('ds') || (T.current && T.current.id) || (T.list[0] && T.list[0].id);
  if (want && T.list.some((d) => d.id === want)) await open(want);
  else closeEditor();
}

export function hide() {}

async function loadList() {
  const r = await get('/api/datasets');
  T.list = r.datasets || [];
  T.maxImages = r.max_images;
  T.maxDatasets = r.max_datasets;
  el.count.textContent = `${fmtNum(T.list.length)} of ${fmtNum(T.maxDatasets)} datasets · your plan trains on up to ${fmtNum(T.maxImages)} images per LoRA`;
  renderList();
}

function renderList() {
  clear(el.list);
  if (!T.list.length) el.list.append(h('li', { class: 'muted small', text: 'No datasets yet.' }));
  for (const d of T.list) {
    const active = T.current && T.current.id === d.id;
    el.list.append(h('li', { class: ['dataset-item', active && 'active'], data: { id: d.id } },
      h('a', { class: 'dataset-link', href: `#/train?ds=${encodeURIComponent(d.id)}`, 'aria-current': active ? 'true' : null },
        d.cover_url ? h('img', { class: 'dataset-cover', src: d.cover_url, alt: '' }) : h('span', { class: 'dataset-cover' }),
        h('span', { class: 'dataset-text' },
          h('span', { class: 'strong', text: d.name }),
          h('span', { class: 'muted small', text: `${d.image_count} image${d.image_count === 1 ? '' : 's'}${d.trigger ? ` · ${d.trigger}` : ''}` }))),
      h('button', { type: 'button', class: 'btn btn-ghost-danger btn-sm', 'aria-label': `Delete ${d.name}`, text: 'Delete', on: { click: () => remove(d) } })));
  }
}

async function create(ev) {
  ev.preventDefault();
  const name = el.name.value.trim();
  if (!name) {
    el.name.classList.add('invalid');
    el.name.focus();
    return;
  }
  el.name.classList.remove('invalid');
  await busy(el.create, async () => {
    const r = await post('/api/datasets', { name, trigger: el.trigger.value.trim() });
    el.name.value = '';
    el.trigger.value = '';
    location.hash = `#/train?ds=${encodeURIComponent(r.dataset.id)}`;
  });
}

async function remove(d) {
  const ok = await confirmDialog({ title: `Delete "${d.name}"?`, message: `Its ${d.image_count} images and captions are deleted for good.`, ok: 'Delete' });
  if (!ok) return;
  await busy(null, async () => {
    await del(`/api/datasets/${d.id}`);
    if (T.current && T.current.id === d.id) T.current = null;
    notice(`Dataset "${d.name}" deleted.`);
    if (location.hash.includes(d.id)) location.hash = '#/train';
    else await show(new URLSearchParams());
  });
}

function closeEditor() {
  T.current = null;
  hideRun();
  el.editor.hidden = true;
  el.none.hidden = false;
  renderList();
}

async function open(id) {
  const seq = ++T.seq;
  const r = await get(`/api/datasets/${id}`);
  if (seq !== T.seq) return;
  T.current = r.dataset;
  T.images = r.images || [];
  T.maxImages = r.max_images;
  T.limits = r.limits;
  el.none.hidden = true;
  el.editor.hidden = false;
  renderEditor();
  renderList();
}

function renderEditor() {
  const d = T.current;
  const nameIn = h('input', { id: 'dataset-name', value: d.name, maxlength: '100', 'aria-label': 'Dataset name' });
  const triggerIn = h('input', { id: 'dataset-trigger', value: d.trigger, maxlength: '100', autocapitalize: 'off', spellcheck: 'false', placeholder: 'e.g. rexdog' });
  const save = (field, input) => async () => {
    const v = input.value.trim();
    if (v === T.current[field]) return;
    try {
      const r = await patch(`/api/datasets/${d.id}`, { [field]: v });
      T.current = { ...T.current, ...r.dataset };
      input.classList.remove('invalid');
      renderList();
    } catch (e) {
      input.classList.add('invalid');
      toast(e);
    }
  };
  nameIn.addEventListener('change', save('name', nameIn));
  triggerIn.addEventListener('change', save('trigger', triggerIn));

  el.files = h('input', { type: 'file', id: 'train-files', multiple: true, accept: 'image/png,image/jpeg,image/webp,.txt', class: 'visually-hidden', on: { change: () => upload([...el.files.files]) } });
  el.drop = h('label', { class: 'dropzone', id: 'train-drop', for: 'train-files' },
    el.files,
    h('strong', { text: 'Drop images here or choose files' }),
    h('span', { class: 'muted small', text: `PNG, JPEG or WebP, up to ${T.limits.max_image_mib} MiB each; a NAME.txt beside an image is its caption.` }));
  for (const ev of ['dragenter', 'dragover']) el.drop.addEventListener(ev, (e) => { e.preventDefault(); el.drop.classList.add('over'); });
  for (const ev of ['dragleave', 'drop']) el.drop.addEventListener(ev, () => el.drop.classList.remove('over'));
  el.drop.addEventListener('drop', (e) => {
    e.preventDefault();
    upload([...e.dataTransfer.files]);
  });

  el.limit = h('span', { id: 'train-count', class: 'strong' });
  el.meter = h('div', { class: 'meter-fill' });
  el.grid = h('div', { id: 'train-images', class: 'train-grid' });

  const bulkText = h('input', { id: 'bulk-text', placeholder: 'e.g. photo of [trigger],' });
  const findIn = h('input', { id: 'bulk-find', placeholder: 'find' });
  const replaceIn = h('input', { id: 'bulk-replace', placeholder: 'replace with' });
  const bulk = (btn, body) => busy(btn, async () => {
    const r = await patch(`/api/datasets/${d.id}/captions`, body);
    T.images = r.images;
    renderImages();
    notice('Captions updated.');
  });
  const prefixBtn = h('button', { type: 'button', class: 'btn btn-sm', id: 'bulk-prefix', text: 'Add at start' });
  const suffixBtn = h('button', { type: 'button', class: 'btn btn-sm', id: 'bulk-suffix', text: 'Add at end' });
  const replaceBtn = h('button', { type: 'button', class: 'btn btn-sm', id: 'bulk-replace-btn', text: 'Replace' });
  prefixBtn.addEventListener('click', () => bulkText.value.trim() && bulk(prefixBtn, { prefix: bulkText.value }));
  suffixBtn.addEventListener('click', () => bulkText.value.trim() && bulk(suffixBtn, { suffix: bulkText.value }));
  replaceBtn.addEventListener('click', () => findIn.value && bulk(replaceBtn, { find: findIn.value, replace: replaceIn.value }));

  clear(el.editor).append(
    h('div', { class: 'card' },
      h('div', { class: 'train-fields' },
        h('label', { class: 'field' }, h('span', { class: 'label', text: 'Name' }), nameIn),
        h('label', { class: 'field' }, h('span', { class: 'label', text: 'Trigger word' }), triggerIn)),
      h('p', { class: 'hint', text: 'Write [trigger] in a caption where the trigger word belongs; an image without a caption trains on the trigger word alone.' }),
      h('div', { class: 'quota-row' }, h('span', { text: 'Images' }), el.limit),
      h('div', { class: 'meter' }, el.meter),
      el.drop),
    h('div', { class: 'card' },
      h('div', { class: 'card-title', text: 'Captions for all images' }),
      h('div', { class: 'bulk-row' }, bulkText, prefixBtn, suffixBtn),
      h('div', { class: 'bulk-row' }, findIn, replaceIn, replaceBtn)),
    el.grid);
  renderImages();
}

function renderImages() {
  const n = T.images.length;
  el.limit.textContent = `${fmtNum(n)} / ${fmtNum(T.maxImages)} images`;
  el.meter.style.width = `${T.maxImages ? Math.min(100, (100 * n) / T.maxImages) : 100}%`;
  clear(el.grid);
  if (!n) el.grid.append(h('p', { class: 'muted', text: 'No images yet.' }));
  for (const img of T.images) el.grid.append(imageCard(img));
  showRun(T.current, n).catch((e) => toast(e, 'Cannot load the trainings'));
}

function imageCard(img) {
  const d = T.current;
  const status = h('span', { class: 'muted small caption-status' });
  const text = h('textarea', { class: 'caption', rows: '3', maxlength: String(T.limits.max_caption_chars), 'aria-label': 'Caption', placeholder: `[trigger] …` });
  text.value = img.caption;
  text.addEventListener('input', () => { status.textContent = 'Unsaved'; });
  text.addEventListener('change', async () => {
    status.textContent = 'Saving…';
    try {
      const r = await patch(`/api/datasets/${d.id}/images/${img.id}`, { caption: text.value });
      img.caption = r.image.caption;
      status.textContent = 'Saved';
      text.classList.remove('invalid');
    } catch (e) {
      status.textContent = 'Not saved';
      text.classList.add('invalid');
      toast(e);
    }
  });
  const delBtn = h('button', { type: 'button', class: 'btn btn-icon btn-ghost-danger image-delete', 'aria-label': 'Delete image', text: '✕' });
  delBtn.addEventListener('click', () => busy(delBtn, async () => {
    await del(`/api/datasets/${d.id}/images/${img.id}`);
    T.images = T.images.filter((i) => i.id !== img.id);
    renderImages();
    await loadList();
  }));
  const thumb = h('img', { class: 'train-thumb', src: img.thumb_url, alt: img.caption || 'training image', decoding: 'async' });
  return h('div', { class: 'train-card', data: { id: img.id } },
    h('div', { class: 'train-thumb-box' }, thumb, delBtn),
    h('div', { class: 'train-card-body' },
      h('div', { class: 'field-foot' }, h('span', { class: 'muted small', text: `${img.width}×${img.height}` }), status),
      text));
}

async function upload(files) {
  if (!files.length || !T.current) return;
  // What the server would refuse is said before posting (a large refused body can end in a
  // reset connection rather than the server's message).
  const imgs = files.filter((f) => !/\.txt$/i.test(f.name));
  if (T.maxImages && T.images.length + imgs.length > T.maxImages) {
    toast(`This dataset holds ${T.images.length} images and your plan trains on up to ${T.maxImages}; choose at most ${Math.max(0, T.maxImages - T.images.length)} more.`, 'Too many images');
    return;
  }
  const maxMib = T.limits && T.limits.max_image_mib;
  const big = maxMib ? imgs.filter((f) => f.size > maxMib * 1048576) : [];
  if (big.length) {
    toast(`${big.map((f) => f.name).join(', ')}: larger than ${maxMib} MiB, the most one image may be.`, 'Image too large');
    return;
  }
  const form = new FormData();
  for (const f of files) form.append('files', f, f.name);
  el.drop.classList.add('is-busy');
  el.drop.setAttribute('aria-busy', 'true');
  try {
    const r = await post(`/api/datasets/${T.current.id}/images`, form);
    notice(`${r.images.length} image${r.images.length === 1 ? '' : 's'} added.`);
    await open(T.current.id);
    await loadList();
  } catch (e) {
    toast(e, 'Nothing was uploaded');
  } finally {
    el.drop.classList.remove('is-busy');
    el.drop.removeAttribute('aria-busy');
    if (el.files) el.files.value = '';
  }
}
