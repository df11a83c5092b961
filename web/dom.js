// DOM helpers the views share: lookup, element builder, cards and meters,
// the error banner and the confirm dialog.

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v != null) e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

export function card(title, ...body) { return el('div', { class: 'card' }, el('h3', { text: title }), ...body); }

export function meter(label, frac, text, cls) {
  const f = frac == null || !isFinite(frac) ? 0 : Math.max(0, Math.min(1, frac));
  return el('div', { class: 'meter ' + (cls || '') },
    el('div', { class: 'meter-label' }, el('span', { text: label }), el('span', { class: 'meter-text', text })),
    el('div', { class: 'meter-track' }, el('div', { class: 'meter-fill' + (f > 0.9 ? ' hot' : ''), style: `width:${(f * 100).toFixed(1)}%` })));
}

export function showError(msg) {
  const b = $('error-banner');
  b.textContent = msg; b.hidden = !msg;
  if (msg) setTimeout(() => { if (b.textContent === msg) b.hidden = true; }, 8000);
}

export function confirmDialog(text) {
  return new Promise((resolve) => {
    const d = $('confirm-dialog');
    $('confirm-text').textContent = text;
    d.returnValue = '';
    d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
    d.showModal();
  });
}
