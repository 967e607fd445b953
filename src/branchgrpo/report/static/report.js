(function () {
'use strict';
const D = JSON.parse(document.getElementById('report-data').textContent);
const $ = (sel, root) => (root || document).querySelector(sel);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const isNum = v => typeof v === 'number' && isFinite(v);

function fmt(v, p) {
  if (v === null || v === undefined || (typeof v === 'number' && isNaN(v))) return '\u2014';
  if (typeof v !== 'number') return String(v);
  if (!isFinite(v)) return v > 0 ? '\u221e' : '-\u221e';
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (Number.isInteger(v) && a < 1e7) return String(v);
  if (a >= 1e6 || a < 1e-3) return v.toExponential(Math.max(0, (p || 4) - 2));
  return String(Number(v.toPrecision(p || 4)));
}
function secs(v) { return isNum(v) ? (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toPrecision(3)) : '\u2014'; }

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  if (attrs) for (const k in attrs) {
    const v = attrs[k];
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') e.textContent = v;
    else if (k === 'html') e.innerHTML = v;
    else if (k === 'class') e.className = v;
    else if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  if (children) for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}
function card(title, sub) {
  const host = el('div', {class: 'chart-host'});
  const c = el('div', {class: 'card'}, [el('div', {class: 'card-title', html: esc(title) + (sub ? '<span class="sub">' + esc(sub) + '</span>' : '')}), host]);
  return [c, host];
}
function body(id) { const b = document.getElementById(id + '-body'); b.innerHTML = ''; return b; }

// ---------------------------------------------------------------- tooltip
const tip = document.getElementById('tip');
function showTip(html, ev) { tip.innerHTML = html; tip.hidden = false; moveTip(ev); }
function moveTip(ev) {
  const pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
  let x = ev.clientX + pad, y = ev.clientY + pad;
  if (x + w > window.innerWidth - 4) x = ev.clientX - w - pad;
  if (y + h > window.innerHeight - 4) y = ev.clientY - h - pad;
  tip.style.left = Math.max(4, x) + 'px';
  tip.style.top = Math.max(4, y) + 'px';
}
function hideTip() { tip.hidden = true; }
function tipTable(rows) {
  return '<table>' + rows.map(r => '<tr><td>' + esc(r[0]) + '</td><td>' + esc(r[1]) + '</td></tr>').join('') + '</table>';
}

// ---------------------------------------------------------------- charts
function niceTicks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, n);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / mag;
  const step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
  const out = [];
  for (let k = Math.ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; k++) out.push(Math.abs(k * step) < step * 1e-9 ? 0 : k * step);
  return out;
}
function tickFmt(v) {
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(1);
  return String(Number(v.toPrecision(6)));
}
function ema(y, w) {
  if (!w) return y;
  const out = new Array(y.length);
  let last = 0, n = 0;
  for (let i = 0; i < y.length; i++) {
    const v = y[i];
    if (!isNum(v)) { out[i] = null; continue; }
    last = last * w + (1 - w) * v; n++;
    out[i] = last / (1 - Math.pow(w, n));
  }
  return out;
}
function pathOf(xs, ys, X, Y) {
  let d = '', pen = false;
  for (let i = 0; i < xs.length; i++) {
    const y = ys[i];
    if (!isNum(y)) { pen = false; continue; }
    d += (pen ? 'L' : 'M') + X(xs[i]).toFixed(1) + ' ' + Y(y).toFixed(1);
    pen = true;
  }
  return d;
}
function bandOf(xs, lo, hi, X, Y) {
  let d = '', seg = [];
  const flush = () => {
    if (seg.length) {
      d += 'M' + seg.map(i => X(xs[i]).toFixed(1) + ' ' + Y(hi[i]).toFixed(1)).join('L');
      d += 'L' + seg.slice().reverse().map(i => X(xs[i]).toFixed(1) + ' ' + Y(lo[i]).toFixed(1)).join('L') + 'Z';
    }
    seg = [];
  };
  for (let i = 0; i < xs.length; i++) { if (isNum(lo[i]) && isNum(hi[i])) seg.push(i); else flush(); }
  flush();
  return d;
}

const charts = [];
let smoothing = 0;
// charts are drawn once every section is laid out (their width is their card's width)
let chartsLive = false;
function addChart(host, spec) { const c = {host: host, spec: spec}; charts.push(c); if (chartsLive) drawChart(c); return c; }
function redrawCharts() { for (const c of charts) { try { drawChart(c); } catch (e) { console.error(e); } } }

function drawChart(c) {
  if (c.draw) return c.draw();
  const s = c.spec;
  const host = c.host;
  const series = [];
  for (const sr of s.series || []) {
    if (!sr.y || !sr.y.some(isNum)) continue;
    if (sr.smooth && smoothing > 0) {
      series.push(Object.assign({}, sr, {faint: true, legend: false, tip: false}));
      series.push(Object.assign({}, sr, {y: ema(sr.y, smoothing), name: sr.name + ' (smoothed)'}));
    } else series.push(sr);
  }
  const bands = (s.bands || []).filter(b => b.lo && b.hi && b.lo.some(isNum));
  if (!series.length && !bands.length) { host.innerHTML = '<p class="empty">' + esc(s.empty || 'not logged in this run') + '</p>'; return; }
  const W = Math.max(260, host.clientWidth || 600), H = s.height || 210;
  const m = {l: 58, r: 14, t: 8, b: 28};
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  const scan = (xs, ys) => { for (let i = 0; i < xs.length; i++) { const y = ys[i]; if (!isNum(y)) continue; const x = xs[i]; if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y; } };
  series.forEach(sr => scan(sr.x, sr.y));
  bands.forEach(b => { scan(b.x, b.lo); scan(b.x, b.hi); });
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; } else { const d = (y1 - y0) * 0.06; y0 -= d; y1 += d; }
  const pw = W - m.l - m.r, ph = H - m.t - m.b;
  const X = x => m.l + (x - x0) / (x1 - x0) * pw;
  const Y = y => m.t + (1 - (y - y0) / (y1 - y0)) * ph;
  let g = '';
  for (const v of niceTicks(y0, y1, Math.max(2, Math.round(ph / 38)))) {
    const y = Y(v).toFixed(1);
    g += '<line class="grid" x1="' + m.l + '" x2="' + (W - m.r) + '" y1="' + y + '" y2="' + y + '"/>';
    g += '<text x="' + (m.l - 6) + '" y="' + (+y + 4) + '" text-anchor="end">' + tickFmt(v) + '</text>';
  }
  for (const v of niceTicks(x0, x1, Math.max(2, Math.round(pw / 90))).filter(v => Number.isInteger(v))) {
    const x = X(v).toFixed(1);
    g += '<line class="axis" x1="' + x + '" x2="' + x + '" y1="' + (m.t + ph) + '" y2="' + (m.t + ph + 4) + '"/>';
    g += '<text x="' + x + '" y="' + (m.t + ph + 16) + '" text-anchor="middle">' + v + '</text>';
  }
  g += '<line class="axis" x1="' + m.l + '" x2="' + (W - m.r) + '" y1="' + (m.t + ph) + '" y2="' + (m.t + ph) + '"/>';
  g += '<text x="' + (W - m.r) + '" y="' + (H - 1) + '" text-anchor="end" class="xlbl">' + esc(s.xlabel || 'iteration') + '</text>';
  for (const b of bands) g += '<path d="' + bandOf(b.x, b.lo, b.hi, X, Y) + '" fill="' + b.color + '" fill-opacity="' + (b.opacity || 0.15) + '" stroke="none"/>';
  for (const sr of series) {
    const d = pathOf(sr.x, sr.y, X, Y);
    if (d) g += '<path class="line" d="' + d + '" stroke="' + sr.color + '" stroke-width="' + (sr.width || 1.8) + '"' +
      (sr.faint ? ' stroke-opacity="0.28"' : '') + (sr.dash ? ' stroke-dasharray="' + sr.dash + '"' : '') + '/>';
    const pts = sr.y.filter(isNum).length;
    if (!sr.faint && (sr.markers || pts <= 2)) {
      for (let i = 0; i < sr.x.length; i++) if (isNum(sr.y[i])) g += '<circle cx="' + X(sr.x[i]).toFixed(1) + '" cy="' + Y(sr.y[i]).toFixed(1) + '" r="3" fill="' + sr.color + '"/>';
    }
  }
  g += '<line class="xhair" x1="0" x2="0" y1="' + m.t + '" y2="' + (m.t + ph) + '" visibility="hidden"/>';
  g += '<rect class="hover" x="' + m.l + '" y="' + m.t + '" width="' + pw + '" height="' + ph + '" fill="transparent"/>';
  const legend = series.filter(sr => sr.legend !== false).map(sr => '<span><span class="sw ln" style="background:' + sr.color + '"></span>' + esc(sr.name) + '</span>')
    .concat(bands.map(b => '<span><span class="sw" style="background:' + b.color + ';opacity:' + Math.min(1, (b.opacity || 0.15) * 2.5) + '"></span>' + esc(b.name) + '</span>'));
  host.innerHTML = '<div class="legend">' + legend.join('') + '</div><svg class="chart" width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + ' ' + H + '">' + g + '</svg>';
  // hover: nearest logged x, every series' value there
  const xsSet = new Set();
  series.forEach(sr => sr.x.forEach((x, i) => { if (isNum(sr.y[i])) xsSet.add(x); }));
  bands.forEach(b => b.x.forEach((x, i) => { if (isNum(b.lo[i])) xsSet.add(x); }));
  const xs = Array.from(xsSet).sort((a, b) => a - b);
  const lookups = series.filter(sr => sr.tip !== false).map(sr => { const mp = new Map(); sr.x.forEach((x, i) => mp.set(x, sr.y[i])); return [sr, mp]; });
  const blook = bands.map(b => { const mp = new Map(); b.x.forEach((x, i) => mp.set(x, [b.lo[i], b.hi[i]])); return [b, mp]; });
  const svg = host.querySelector('svg'), rect = svg.querySelector('rect.hover'), xh = svg.querySelector('.xhair');
  rect.addEventListener('mousemove', ev => {
    const box = svg.getBoundingClientRect();
    const xv = x0 + (ev.clientX - box.left - m.l) / pw * (x1 - x0);
    let lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (xs[mid] < xv) lo = mid; else hi = mid; }
    const x = Math.abs(xs[lo] - xv) <= Math.abs(xs[hi] - xv) ? xs[lo] : xs[hi];
    xh.setAttribute('x1', X(x)); xh.setAttribute('x2', X(x)); xh.setAttribute('visibility', 'visible');
    const rows = [[s.xlabel || 'iteration', String(x)]];
    for (const [sr, mp] of lookups) if (mp.has(x) && isNum(mp.get(x))) rows.push([sr.name, fmt(mp.get(x), 5)]);
    for (const [b, mp] of blook) if (mp.has(x) && isNum(mp.get(x)[0])) rows.push([b.name, fmt(mp.get(x)[0], 4) + ' \u2013 ' + fmt(mp.get(x)[1], 4)]);
    showTip(tipTable(rows), ev);
  });
  rect.addEventListener('mouseleave', () => { xh.setAttribute('visibility', 'hidden'); hideTip(); });
}

let resizeTimer = 0, lastWidth = window.innerWidth;
const resizeHooks = [redrawCharts];
window.addEventListener('resize', () => {
  if (window.innerWidth === lastWidth) return;  // only a width change moves anything
  lastWidth = window.innerWidth;
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => resizeHooks.forEach(f => { try { f(); } catch (e) { console.error(e); } }), 150);
});

// ---------------------------------------------------------------- data helpers
const T = D.train || {iteration: []}, E = D.eval || {iteration: [], eval_reward: []};
const IT = T.iteration || [];
const col = k => T[k];
const has = k => Array.isArray(T[k]) && T[k].some(isNum);
function median(a) { const v = a.filter(isNum).sort((x, y) => x - y); if (!v.length) return null; const h = v.length >> 1; return v.length % 2 ? v[h] : (v[h - 1] + v[h]) / 2; }
function mean(a) { const v = a.filter(isNum); return v.length ? v.reduce((s, x) => s + x, 0) / v.length : null; }
function lastNum(a) { if (!a) return null; for (let i = a.length - 1; i >= 0; i--) if (isNum(a[i])) return a[i]; return null; }
function firstNum(a) { if (!a) return null; for (let i = 0; i < a.length; i++) if (isNum(a[i])) return a[i]; return null; }
const LABELS = {
  clip_fraction: 'clip fraction', ratio_mean: 'importance ratio \u03c1 (mean)', grad_norm: 'gradient norm', kl: 'KL to reference',
  advantage_abs_mean: 'mean |advantage|', fusion_entropy_ratio: 'fusion entropy ratio', lr: 'learning rate',
  'memory/peak_gb': 'peak memory (GB)', optimizer_steps: 'optimizer steps', skipped_steps: 'skipped optimizer steps',
  nonfinite_micro_batches: 'non-finite micro-batches', ratio_max_deviation_first_step: 'max |\u03c1 \u2212 1| at first step',
  processes: 'processes', reward_std: 'reward std'
};
const SUBS = {
  clip_fraction: 'share of trained edges with \u03c1 clipped', grad_norm: 'last optimizer step', kl: '0 without a KL term',
  fusion_entropy_ratio: '1 = uniform fusion weights', ratio_mean: '1 = on-policy'
};
const PALETTE = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#ca8a04', '#db2777', '#475569'];

function section(id, fn) {
  try { fn(body(id)); }
  catch (e) {
    console.error('report section ' + id + ': ' + e);
    document.getElementById(id + '-body').append(el('p', {class: 'err', text: 'Could not render this section: ' + e}));
  }
}

// ---------------------------------------------------------------- overview
section('overview', b => {
  document.getElementById('run-meta').textContent = D.run.path + ' \u00b7 generated ' + D.run.generated + ' \u00b7 branchgrpo ' + D.run.version;
  b.append(el('div', {class: 'facts'}, (D.highlights || []).map(h => el('span', {class: 'fact', html: '<b>' + esc(h[0]) + '</b>' + esc(h[1])}))));
  const stats = el('div', {class: 'stats'});
  const stat = (label, value, delta) => stats.append(el('div', {class: 'card stat'}, [el('div', {class: 'l', text: label}), el('div', {class: 'v', text: value}), delta || null]));
  const ev = E.eval_reward || [];
  if (ev.some(isNum)) {
    const a = firstNum(ev), z = lastNum(ev), d = z - a;
    stat('held-out reward (first \u2192 last eval)', fmt(a, 4) + ' \u2192 ' + fmt(z, 4),
      el('div', {class: 'd ' + (d >= 0 ? 'up' : 'down'), text: (d >= 0 ? '+' : '') + fmt(d, 3) + (a ? ' (' + (d / Math.abs(a) * 100).toFixed(1) + '%)' : '')}));
  }
  const dv = E.diversity_feature || [];
  if (dv.some(isNum)) {
    stat('held-out diversity, features (first \u2192 last eval)', fmt(firstNum(dv), 4) + ' \u2192 ' + fmt(lastNum(dv), 4));
  }
  if (has('reward_mean')) stat('train reward mean (first \u2192 last)', fmt(firstNum(col('reward_mean')), 4) + ' \u2192 ' + fmt(lastNum(col('reward_mean')), 4));
  stat('iterations logged', String(IT.length));
  if (has('time/iteration')) stat('median time / iteration', secs(median(col('time/iteration'))) + ' s');
  if (has('nfe/leaves') && has('nfe/rollout_calls')) {
    const leaves = mean(col('nfe/leaves'));
    stat('NFE per leaf (rollout / training)', fmt(mean(col('nfe/rollout_calls')) / leaves, 4) + ' / ' + (has('nfe/training_forwards') ? fmt(mean(col('nfe/training_forwards')) / leaves, 4) : '\u2014'));
  }
  if (has('memory/peak_gb')) stat('peak memory', fmt(Math.max.apply(null, col('memory/peak_gb').filter(isNum)), 3) + ' GB');
  if (D.summary && isNum(D.summary.seconds)) stat('run time', secs(D.summary.seconds) + ' s');
  b.append(stats);
  if ((D.warnings || []).length) b.append(el('div', {class: 'warn'}, [el('b', {text: 'Notes'}), el('ul', {}, D.warnings.map(w => el('li', {text: w})))]));
});

// ---------------------------------------------------------------- reward and loss
section('rewards', b => {
  const bar = el('div', {class: 'toolbar'});
  const sel = el('select', {id: 'smoothing', onchange: () => { smoothing = +sel.value; redrawCharts(); }},
    [0, 0.6, 0.8, 0.9, 0.95, 0.99].map(v => el('option', {value: v, text: v ? 'EMA ' + v : 'none'})));
  bar.append(el('label', {}, [document.createTextNode('smoothing of training curves'), sel]));
  b.append(bar);
  const grid = el('div', {class: 'grid two'});
  b.append(grid);
  const [c1, h1] = card('Reward', 'train leaves: mean, \u00b1 std and min\u2013max band; held-out eval');
  const [c2, h2] = card('Loss', 'clipped surrogate, mean over trained edges');
  const diversity = ['diversity_pixel', 'diversity_feature'].some(k => (E[k] || []).some(isNum));
  if (diversity) {
    const [c3, h3] = card('Sample diversity (held-out)', 'per prompt: mean pairwise distance among its samples');
    grid.append(c1, c3, c2);
    addChart(h3, {
      height: 260,
      series: [
        {name: 'random-conv features (0\u20132)', x: E.iteration, y: E.diversity_feature || [], color: '#16a34a', markers: E.iteration.length <= 60, width: 2},
        {name: 'pixels (RMS)', x: E.iteration, y: E.diversity_pixel || [], color: '#ca8a04', markers: E.iteration.length <= 60, width: 2},
      ],
      empty: 'no diversity logged (one sample per prompt)',
    });
  } else grid.append(c1, c2);
  const mu = col('reward_mean') || [], sd = col('reward_std') || [];
  addChart(h1, {
    height: 260,
    series: [
      {name: 'train reward (mean)', x: IT, y: mu, color: '#2563eb', smooth: true},
      {name: 'eval reward (held-out)', x: E.iteration, y: E.eval_reward, color: '#dc2626', markers: E.iteration.length <= 60, width: 2},
    ],
    bands: [
      {name: 'train min\u2013max', x: IT, lo: col('reward_min') || [], hi: col('reward_max') || [], color: '#2563eb', opacity: 0.1},
      {name: 'train mean \u00b1 std', x: IT, lo: mu.map((v, i) => isNum(v) && isNum(sd[i]) ? v - sd[i] : null), hi: mu.map((v, i) => isNum(v) && isNum(sd[i]) ? v + sd[i] : null), color: '#2563eb', opacity: 0.18},
    ],
    empty: 'no reward logged yet',
  });
  addChart(h2, {height: 260, series: [{name: 'loss', x: IT, y: col('loss') || [], color: '#7c3aed', smooth: true}], empty: 'no loss logged yet'});
});

// ---------------------------------------------------------------- other metrics
section('metrics', b => {
  const main = ['clip_fraction', 'ratio_mean', 'grad_norm', 'kl'];
  const shown = new Set(['iteration', 'reward_mean', 'reward_min', 'reward_max', 'reward_std', 'loss', 'processes']);
  const grid = el('div', {class: 'grid four'});
  b.append(grid);
  const add = (k, i) => {
    const [c, h] = card(LABELS[k] || k, SUBS[k] || (LABELS[k] ? k : ''));
    grid.append(c);
    addChart(h, {height: 180, series: [{name: LABELS[k] || k, x: IT, y: col(k) || [], color: PALETTE[i % PALETTE.length], smooth: true}]});
    shown.add(k);
  };
  main.forEach(add);
  const extra = Object.keys(T).filter(k => !shown.has(k) && k.indexOf('nfe/') !== 0 && k.indexOf('time/') !== 0 && has(k));
  if (extra.length) {
    b.append(el('h3', {text: 'More metrics'}));
    const g2 = el('div', {class: 'grid four'});
    b.append(g2);
    extra.forEach((k, i) => {
      const [c, h] = card(LABELS[k] || k, SUBS[k] || (LABELS[k] ? k : ''));
      g2.append(c);
      addChart(h, {height: 160, series: [{name: LABELS[k] || k, x: IT, y: col(k), color: PALETTE[(i + 4) % PALETTE.length], smooth: true}]});
    });
  }
});

// ---------------------------------------------------------------- samples
const lightbox = document.getElementById('lightbox');
let lbIndex = -1;
function openLightbox(i) {
  const s = D.samples[i]; if (!s) return;
  lbIndex = i;
  const scale = Math.max(1, Math.floor(Math.min(window.innerWidth * 0.9 / s.width, window.innerHeight * 0.8 / s.height)));
  lightbox.innerHTML = '';
  lightbox.append(el('img', {src: s.src, width: s.width * scale, height: s.height * scale, alt: 'samples at iteration ' + s.iteration}),
    el('div', {class: 'cap', text: 'iteration ' + s.iteration + (isNum(s.eval_reward) ? ' \u00b7 held-out reward ' + fmt(s.eval_reward, 4) : '') +
      (isNum(s.diversity_feature) ? ' \u00b7 diversity ' + fmt(s.diversity_feature, 4) : '') + ' \u00b7 samples/' + s.file + (s.original ? ' (' + s.original[0] + '\u00d7' + s.original[1] + ', shown reduced)' : '') + '   (\u2190 \u2192 to browse, Esc to close)'}));
  lightbox.hidden = false;
}
lightbox.addEventListener('click', () => { lightbox.hidden = true; });
document.addEventListener('keydown', ev => {
  if (lightbox.hidden) return;
  if (ev.key === 'Escape') lightbox.hidden = true;
  else if (ev.key === 'ArrowRight' && lbIndex < D.samples.length - 1) openLightbox(lbIndex + 1);
  else if (ev.key === 'ArrowLeft' && lbIndex > 0) openLightbox(lbIndex - 1);
});
section('samples', b => {
  const S = D.samples || [];
  if (!S.length) { b.append(el('p', {class: 'empty', text: 'No sample grids in samples/ (written at every evaluation).'})); return; }
  b.append(el('p', {class: 'tree-info', text: 'Held-out sample grids (one row per prompt, fixed seeds) after the given number of iterations. Click to enlarge.' + (D.samples_omitted ? ' ' + D.samples_omitted + ' more grids not embedded.' : '')}));
  const gal = el('div', {class: 'gallery'});
  // small grids are enlarged by a whole factor (crisp pixels); tall or wide ones shrunk to fit a row
  const maxSide = Math.max.apply(null, S.map(s => Math.max(s.width, s.height)));
  const maxH = Math.max.apply(null, S.map(s => s.height)), maxW = Math.max.apply(null, S.map(s => s.width));
  const scale = maxSide < 130 ? Math.floor(260 / maxSide) : Math.min(1, 460 / maxH, 640 / maxW);
  S.forEach((s, i) => {
    gal.append(el('figure', {onclick: () => openLightbox(i)}, [
      el('img', {src: s.src, width: Math.round(s.width * scale), height: Math.round(s.height * scale), alt: 'samples at iteration ' + s.iteration, class: scale < 1 ? 'smooth' : null}),
      el('figcaption', {html: '<b>iteration ' + s.iteration + '</b>' + (isNum(s.eval_reward) ? ' \u00b7 reward ' + esc(fmt(s.eval_reward, 4)) : '') +
        (isNum(s.diversity_feature) ? ' \u00b7 diversity ' + esc(fmt(s.diversity_feature, 4)) : '')}),
    ]));
  });
  b.append(gal);
});

// ---------------------------------------------------------------- NFE and time
const PHASE_COLORS = {encode: '#94a3b8', rollout: '#2563eb', reward: '#f59e0b', train: '#16a34a'};
section('cost', b => {
  const phases = Object.keys(T).filter(k => k.indexOf('time/') === 0 && k !== 'time/iteration' && has(k)).map(k => k.slice(5));
  const grid = el('div', {class: 'grid two'});
  b.append(grid);
  // time table + share bar
  const [c1, h1] = card('Time per iteration by phase', 'seconds, over ' + IT.length + ' iterations');
  grid.append(c1);
  if (!phases.length) h1.append(el('p', {class: 'empty', text: 'no timings logged yet'}));
  else {
    const color = (p, i) => PHASE_COLORS[p] || PALETTE[(i + 3) % PALETTE.length];
    const totalMean = phases.reduce((s, p) => s + (mean(col('time/' + p)) || 0), 0);
    const share = el('div', {class: 'sharebar'});
    phases.forEach((p, i) => {
      const f = (mean(col('time/' + p)) || 0) / (totalMean || 1);
      share.append(el('div', {style: 'width:' + (f * 100).toFixed(2) + '%;background:' + color(p, i), title: p + ' ' + (f * 100).toFixed(1) + '%', text: f > 0.08 ? p + ' ' + (f * 100).toFixed(0) + '%' : ''}));
    });
    h1.append(share);
    const rows = phases.map((p, i) => {
      const v = col('time/' + p), mn = mean(v);
      return '<tr><td><span class="sw-phase" style="background:' + color(p, i) + '"></span>' + esc(p) + '</td><td>' + secs(mn) + '</td><td>' + secs(median(v)) +
        '</td><td>' + secs(Math.max.apply(null, v.filter(isNum))) + '</td><td>' + (totalMean ? (mn / totalMean * 100).toFixed(1) + '%' : '\u2014') + '</td><td>' + secs(v.filter(isNum).reduce((s, x) => s + x, 0)) + '</td></tr>';
    });
    const it = col('time/iteration') || [];
    rows.push('<tr class="total"><td>iteration</td><td>' + secs(mean(it)) + '</td><td>' + secs(median(it)) + '</td><td>' + secs(it.some(isNum) ? Math.max.apply(null, it.filter(isNum)) : null) + '</td><td>100%</td><td>' + secs(it.filter(isNum).reduce((s, x) => s + x, 0)) + '</td></tr>');
    h1.append(el('table', {class: 't', id: 'time-table', html: '<thead><tr><th>phase</th><th>mean</th><th>median</th><th>max</th><th>share</th><th>total</th></tr></thead><tbody>' + rows.join('') + '</tbody>'}));
    const [c3, h3] = card('Phase times per iteration', 'stacked seconds');
    grid.append(c3);
    const drawBars = () => stackedBars(h3, phases, color);
    charts.push({host: h3, draw: drawBars});
  }
  // NFE table
  const [c2, h2] = card('NFE per prompt', 'denoiser calls, nodes and edges (docs/method.md \u00a710), mean over iterations');
  const [c4, h4] = card('NFE per leaf', 'rollout calls (\u03c0\u03b8old), trained edges, training forwards (\u03c0\u03b8)');
  grid.append(c2, c4);
  const keys = ['leaves', 'nodes', 'rollout_calls', 'edges', 'sde_edges', 'trained_edges', 'training_forwards'].filter(k => has('nfe/' + k));
  if (!keys.length || !has('nfe/leaves')) { h2.append(el('p', {class: 'empty', text: 'no NFE counts logged yet'})); h4.append(el('p', {class: 'empty', text: 'no NFE counts logged yet'})); }
  else {
    const leaves = col('nfe/leaves');
    const perLeaf = k => col('nfe/' + k).map((v, i) => isNum(v) && isNum(leaves[i]) && leaves[i] ? v / leaves[i] : null);
    const NAMES = {leaves: 'leaves', nodes: 'nodes (incl. roots)', rollout_calls: 'rollout calls (\u03c0\u03b8old)', edges: 'edges', sde_edges: 'SDE edges', trained_edges: 'trained edges', training_forwards: 'training forwards (\u03c0\u03b8)'};
    const range = v => { const f = v.filter(isNum); const lo = Math.min.apply(null, f), hi = Math.max.apply(null, f); return lo === hi ? '' : ' <span class="sub">(' + fmt(lo, 4) + '\u2013' + fmt(hi, 4) + ')</span>'; };
    const rows = keys.map(k => '<tr><td>' + esc(NAMES[k] || k) + '</td><td>' + fmt(mean(col('nfe/' + k)), 5) + range(col('nfe/' + k)) + '</td><td>' + (k === 'leaves' ? '1' : fmt(mean(perLeaf(k)), 5)) + '</td></tr>');
    if (has('nfe/rollout_calls_measured')) rows.push('<tr><td>rollout calls measured (whole batch)</td><td>' + fmt(mean(col('nfe/rollout_calls_measured')), 5) + '</td><td></td></tr>');
    h2.append(el('table', {class: 't', id: 'nfe-table', html: '<thead><tr><th>per prompt</th><th>mean</th><th>per leaf</th></tr></thead><tbody>' + rows.join('') + '</tbody>'}));

    const bars = [['rollout_calls', 'rollout calls', '#2563eb'], ['trained_edges', 'trained edges', '#9333ea'], ['training_forwards', 'training forwards', '#16a34a']].filter(x => has('nfe/' + x[0]));
    const maxv = Math.max.apply(null, bars.map(x => mean(perLeaf(x[0])) || 0)) || 1;
    const hb = el('div', {class: 'hbars', id: 'nfe-bars'});
    bars.forEach(x => {
      const v = mean(perLeaf(x[0]));
      hb.append(el('div', {class: 'row'}, [el('span', {text: x[1]}), el('div', {}, [el('div', {class: 'bar', style: 'width:' + (v / maxv * 100).toFixed(1) + '%;background:' + x[2]})]), el('span', {class: 'val', text: fmt(v, 4)})]));
    });
    h4.append(hb);
    const varies = bars.some(x => { const f = perLeaf(x[0]).filter(isNum); return Math.min.apply(null, f) !== Math.max.apply(null, f); });
    if (varies) {
      const host = el('div', {class: 'chart-host'});
      h4.append(el('h3', {text: 'over training'}), host);
      addChart(host, {height: 170, series: bars.map(x => ({name: x[1] + ' / leaf', x: IT, y: perLeaf(x[0]), color: x[2]}))});
    }
  }
});

function stackedBars(host, phases, color) {
  const W = Math.max(260, host.clientWidth || 600), H = 230, m = {l: 52, r: 10, t: 8, b: 28};
  const n = IT.length, bin = Math.max(1, Math.ceil(n / 300)), nb = Math.ceil(n / bin);
  const bins = [];
  for (let j = 0; j < nb; j++) {
    const lo = j * bin, hi = Math.min(n, lo + bin);
    const vals = phases.map(p => { const v = col('time/' + p).slice(lo, hi).filter(isNum); return v.length ? v.reduce((s, x) => s + x, 0) / v.length : 0; });
    bins.push({first: IT[lo], last: IT[hi - 1], vals: vals, total: vals.reduce((s, x) => s + x, 0)});
  }
  const ymax = Math.max.apply(null, bins.map(b => b.total)) * 1.06 || 1;
  const pw = W - m.l - m.r, ph = H - m.t - m.b, bw = pw / nb;
  const Y = y => m.t + (1 - y / ymax) * ph;
  let g = '';
  for (const v of niceTicks(0, ymax, 5)) g += '<line class="grid" x1="' + m.l + '" x2="' + (W - m.r) + '" y1="' + Y(v) + '" y2="' + Y(v) + '"/><text x="' + (m.l - 6) + '" y="' + (Y(v) + 4) + '" text-anchor="end">' + tickFmt(v) + '</text>';
  bins.forEach((b, j) => {
    let acc = 0;
    const x = m.l + j * bw + bw * 0.08, w = Math.max(0.5, bw * 0.84);
    b.vals.forEach((v, i) => { if (v > 0) g += '<rect x="' + x.toFixed(2) + '" y="' + Y(acc + v).toFixed(2) + '" width="' + w.toFixed(2) + '" height="' + (Y(acc) - Y(acc + v)).toFixed(2) + '" fill="' + color(phases[i], i) + '"/>'; acc += v; });
  });
  const step = Math.max(1, Math.ceil(nb / Math.max(2, Math.round(pw / 70))));
  for (let j = 0; j < nb; j += step) g += '<text x="' + (m.l + (j + 0.5) * bw).toFixed(1) + '" y="' + (H - 12) + '" text-anchor="middle">' + bins[j].first + '</text>';
  g += '<line class="axis" x1="' + m.l + '" x2="' + (W - m.r) + '" y1="' + (m.t + ph) + '" y2="' + (m.t + ph) + '"/>';
  g += '<text x="' + (W - m.r) + '" y="' + (H - 1) + '" text-anchor="end" class="xlbl">iteration' + (bin > 1 ? ' (mean of ' + bin + ')' : '') + ' \u00b7 seconds</text>';
  g += '<rect class="hover" x="' + m.l + '" y="' + m.t + '" width="' + pw + '" height="' + ph + '" fill="transparent"/>';
  const legend = phases.map((p, i) => '<span><span class="sw" style="background:' + color(p, i) + '"></span>' + esc(p) + '</span>').join('');
  host.innerHTML = '<div class="legend">' + legend + '</div><svg class="chart" id="time-bars" width="' + W + '" height="' + H + '">' + g + '</svg>';
  const svg = host.querySelector('svg');
  svg.querySelector('rect.hover').addEventListener('mousemove', ev => {
    const j = Math.min(nb - 1, Math.max(0, Math.floor((ev.clientX - svg.getBoundingClientRect().left - m.l) / bw)));
    const bb = bins[j];
    const rows = [['iteration', bb.first === bb.last ? String(bb.first) : bb.first + '\u2013' + bb.last]].concat(phases.map((p, i) => [p, secs(bb.vals[i]) + ' s'])).concat([['total', secs(bb.total) + ' s']]);
    showTip(tipTable(rows), ev);
  });
  svg.querySelector('rect.hover').addEventListener('mouseleave', hideTip);
}

// ---------------------------------------------------------------- config
section('config', b => {
  if (!D.config_text) { b.append(el('p', {class: 'empty', text: 'No config.yaml in the run directory.'})); return; }
  b.append(el('p', {class: 'tree-info', text: 'Resolved config of the run (' + D.run.path + '/config.yaml).'}));
  b.append(el('details', {class: 'cfg'}, [el('summary', {text: 'show config.yaml (' + D.config_text.split('\n').length + ' lines)'}), el('pre', {class: 'cfg', text: D.config_text})]));
});
chartsLive = true;
redrawCharts();

// ---------------------------------------------------------------- rollout trees
const VIRIDIS = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779', '#6ece58', '#b5de2b', '#fde725'];
const DIVERGING = ['#2166ac', '#4393c3', '#92c5de', '#d1e5f0', '#f7f7f7', '#fddbc7', '#f4a582', '#d6604d', '#b2182b'];
function hexRgb(h) { return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)]; }
const VIR = VIRIDIS.map(hexRgb), DIV = DIVERGING.map(hexRgb);
function ramp(stops, t) {
  if (!isNum(t)) return '#bdbdbd';
  t = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i, a = stops[i], b = stops[i + 1];
  return 'rgb(' + Math.round(a[0] + (b[0] - a[0]) * f) + ',' + Math.round(a[1] + (b[1] - a[1]) * f) + ',' + Math.round(a[2] + (b[2] - a[2]) * f) + ')';
}
const EDGE_STYLE = {
  // key: SDE/ODE + trained / untrained (pruned) / zero advantage
  st: {stroke: '#475569', width: 1.3, dash: ''},
  su: {stroke: '#475569', width: 1.1, dash: '5 3'},
  sz: {stroke: '#d97706', width: 1.3, dash: '1.5 2.5'},
  ot: {stroke: '#38bdf8', width: 1.1, dash: ''},
  ou: {stroke: '#38bdf8', width: 1.0, dash: '5 3'},
  oz: {stroke: '#38bdf8', width: 1.1, dash: '1.5 2.5'},
};
async function inflate(b64) {
  const bin = atob(b64), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  if (typeof DecompressionStream === 'undefined') throw new Error('this browser has no DecompressionStream; open the report in a current Chrome, Firefox or Safari');
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}
async function treeColumns(t) {
  if (t._cols) return t._cols;
  const raw = await inflate(t.blob), buf = raw.buffer, n = t.nodes, cols = {};
  let off = raw.byteOffset;
  for (const [name, dt] of t.layout) {
    const C = dt === 'i4' ? Int32Array : dt === 'f4' ? Float32Array : Uint8Array;
    cols[name] = new C(buf, off, n);
    off += n * C.BYTES_PER_ELEMENT;
  }
  t._cols = cols;
  t._groups = {};
  return cols;
}
function groupModel(t, gid) {
  if (t._groups[gid]) return t._groups[gid];
  const c = t._cols, N = t.nodes;
  const idx = [];
  for (let i = 0; i < N; i++) if (c.tree_id[i] === gid) idx.push(i);
  const n = idx.length, local = new Int32Array(N).fill(-1);
  idx.forEach((g, l) => { local[g] = l; });
  const par = new Int32Array(n), depth = new Int32Array(n), nch = new Int32Array(n), first = new Int32Array(n).fill(-1), last = new Int32Array(n).fill(-1);
  let maxDepth = 0;
  for (let l = 0; l < n; l++) {
    const g = idx[l], p = c.parent[g];
    par[l] = p >= 0 ? local[p] : -1;
    depth[l] = c.depth[g];
    if (depth[l] > maxDepth) maxDepth = depth[l];
  }
  // children lists (rows of siblings are contiguous and in order)
  const start = new Int32Array(n + 1);
  for (let l = 0; l < n; l++) if (par[l] >= 0) nch[par[l]]++;
  for (let l = 0; l < n; l++) start[l + 1] = start[l] + nch[l];
  const kids = new Int32Array(start[n]), fill = start.slice(0, n);
  for (let l = 0; l < n; l++) if (par[l] >= 0) kids[fill[par[l]]++] = l;
  // leaf order: depth-first, children in row order; internal nodes centred on their children
  const y = new Float64Array(n), below = new Int32Array(n);
  const stack = [];
  for (let l = n - 1; l >= 0; l--) if (par[l] < 0) stack.push(l);
  let leaves = 0;
  while (stack.length) {
    const v = stack.pop();
    if (nch[v] === 0) { y[v] = leaves++; continue; }
    for (let k = start[v + 1] - 1; k >= start[v]; k--) stack.push(kids[k]);
  }
  for (let l = n - 1; l >= 0; l--) {
    if (nch[l] === 0) { below[l] = 1; continue; }
    y[l] = (y[kids[start[l]]] + y[kids[start[l + 1] - 1]]) / 2;
    let s = 0;
    for (let k = start[l]; k < start[l + 1]; k++) s += below[kids[k]];
    below[l] = s;
  }
  let fmin = Infinity, fmax = -Infinity, amax = 0;
  const edges = {trained: 0, pruned: 0, zero: 0, ode: 0, total: 0};
  const depthSde = new Int8Array(maxDepth + 1).fill(-1), width = new Int32Array(maxDepth + 1);
  for (let l = 0; l < n; l++) {
    const g = idx[l], f = c.fused_reward[g], a = c.advantage[g];
    width[depth[l]]++;
    if (isNum(f)) { if (f < fmin) fmin = f; if (f > fmax) fmax = f; }
    if (par[l] >= 0) {
      edges.total++;
      if (isNum(a) && Math.abs(a) > amax) amax = Math.abs(a);
      if (c.trained[g]) edges.trained++; else edges.pruned++;
      if (a === 0) edges.zero++;
      if (!c.is_sde[g]) edges.ode++;
      depthSde[depth[l]] = Math.max(depthSde[depth[l]], c.is_sde[g] ? 1 : 0);
    }
  }
  const m = {gid: gid, idx: idx, n: n, par: par, depth: depth, nch: nch, start: start, kids: kids, y: y, below: below, leaves: leaves,
    maxDepth: maxDepth, fmin: fmin, fmax: fmax, amax: amax, edges: edges, depthSde: depthSde, width: width};
  t._groups[gid] = m;
  return m;
}

const TV = {dump: null, group: null, mode: 'fused', thumbs: false, spacing: 0, sprite: null};
section('trees', b => {
  const trees = D.trees || [];
  if (!trees.length) { b.append(el('p', {class: 'empty', text: 'No tree dumps in trees/ (set run.dump_tree_every=N to write one every N iterations).'})); document.body.dataset.treeReady = 'none'; return; }
  const dumpSel = el('select', {id: 'tree-dump'}, trees.map((t, i) => el('option', {value: i, text: 'iteration ' + (t.iteration === null ? '?' : t.iteration) + ' \u00b7 ' + t.file})));
  const groupSel = el('select', {id: 'tree-group'});
  const seg = el('span', {class: 'seg', id: 'tree-color'}, [
    el('button', {type: 'button', 'data-mode': 'fused', class: 'on', text: 'fused reward'}),
    el('button', {type: 'button', 'data-mode': 'advantage', text: 'advantage'})]);
  const thumbBox = el('input', {type: 'checkbox', id: 'tree-thumbs'});
  const thumbLabel = el('label', {}, [thumbBox, document.createTextNode('x\u03020 thumbnails')]);
  const spacing = el('input', {type: 'range', id: 'tree-spacing', min: 3, max: 48, step: 1, value: 8});
  b.append(el('div', {class: 'toolbar'}, [
    el('label', {}, [document.createTextNode('dump'), dumpSel]),
    el('label', {}, [document.createTextNode('prompt group'), groupSel]),
    el('label', {}, [document.createTextNode('colour by'), seg]),
    thumbLabel,
    el('label', {}, [document.createTextNode('leaf spacing'), spacing]),
  ]));
  const promptLine = el('p', {class: 'tree-prompt', id: 'tree-prompt'});
  const info = el('p', {class: 'tree-info', id: 'tree-info'});
  const legend = el('div', {class: 'tree-legend', id: 'tree-legend'});
  const wrap = el('div', {class: 'tree-wrap', id: 'tree-wrap'});
  b.append(promptLine, info, legend, wrap);

  function fillGroups() {
    const t = trees[TV.dump];
    groupSel.innerHTML = '';
    const short = p => p.length > 48 ? p.slice(0, 47) + '\u2026' : p;
    t.groups.forEach(g => groupSel.append(el('option', {value: g.id, text: 'group ' + g.id + (g.prompt ? ': ' + short(g.prompt) : '') + ' \u00b7 ' + g.leaves + ' leaves' + (isNum(g.reward_mean) ? ' \u00b7 mean reward ' + fmt(g.reward_mean, 4) : '')})));
    if (!t.groups.some(g => g.id === TV.group)) TV.group = t.groups.length ? t.groups[0].id : null;
    groupSel.value = TV.group;
    thumbLabel.style.display = t.thumbs ? '' : 'none';
  }
  // renders are serialised, and a burst of inputs (dragging the slider) coalesces into one
  let pending = Promise.resolve(), queued = false, resetQueued = false;
  function update(resetSpacing) {
    resetQueued = resetQueued || resetSpacing;
    if (queued) return pending;
    queued = true;
    pending = pending.then(async () => {
      queued = false;
      const resetSpacing = resetQueued;
      resetQueued = false;
      const t = trees[TV.dump];
      await treeColumns(t);
      const m = groupModel(t, TV.group);
      if (resetSpacing) {
        const auto = TV.thumbs && t.thumbs ? Math.floor(900 / Math.max(1, m.leaves)) : Math.floor(Math.max(600, 4 * m.leaves) / Math.max(1, m.leaves));
        TV.spacing = Math.min(TV.thumbs && t.thumbs ? 40 : 26, Math.max(TV.thumbs && t.thumbs ? 12 : 3, auto));
        spacing.value = TV.spacing;
      }
      const g = t.groups.find(x => x.id === TV.group);
      promptLine.textContent = g && g.prompt ? 'prompt: \u201c' + g.prompt + '\u201d' : '';
      promptLine.hidden = !(g && g.prompt);
      drawTree(t, m, wrap, info, legend);
      document.body.dataset.treeReady = '1';
    }).catch(e => {
      console.error('tree viewer: ' + e);
      wrap.innerHTML = '';
      wrap.append(el('p', {class: 'err', text: 'Could not draw the tree: ' + e}));
      document.body.dataset.treeReady = 'error';
    });
    return pending;
  }
  dumpSel.addEventListener('change', () => { TV.dump = +dumpSel.value; fillGroups(); update(true); });
  groupSel.addEventListener('change', () => { TV.group = +groupSel.value; update(true); });
  seg.addEventListener('click', ev => {
    const btn = ev.target.closest('button'); if (!btn) return;
    TV.mode = btn.dataset.mode;
    seg.querySelectorAll('button').forEach(x => x.classList.toggle('on', x === btn));
    update(false);
  });
  thumbBox.addEventListener('change', () => { TV.thumbs = thumbBox.checked; update(true); });
  spacing.addEventListener('input', () => { TV.spacing = +spacing.value; update(false); });
  resizeHooks.push(() => update(false));
  TV.dump = trees.length - 1;
  TV.group = null;
  dumpSel.value = TV.dump;
  fillGroups();
  update(true);
  // hover: tooltip and the path to the root
  wrap.addEventListener('mouseover', ev => {
    const node = ev.target.closest && ev.target.closest('[data-i]');
    if (!node || !TV.model) return;
    const l = +node.getAttribute('data-i');
    nodeTip(l, ev);
  });
  wrap.addEventListener('mousemove', ev => { if (!tip.hidden && ev.target.closest && ev.target.closest('[data-i]')) moveTip(ev); });
  wrap.addEventListener('mouseout', ev => {
    const node = ev.target.closest && ev.target.closest('[data-i]');
    if (node) { hideTip(); const hl = document.getElementById('tree-hl'); if (hl) hl.setAttribute('d', ''); }
  });
});

function nodeTip(l, ev) {
  const t = TV.tree, m = TV.model, c = t._cols, g = m.idx[l], lay = TV.layout;
  const root = m.par[l] < 0;
  const rows = [
    ['depth \u00b7 step', m.depth[l] + ' \u00b7 ' + c.step[g]],
    ['edge', root ? 'root (no edge)' : (c.is_sde[g] ? 'SDE' : 'ODE') + (c.trained[g] ? ', trained' : ', not trained') + (c.advantage[g] === 0 ? ', zero advantage' : '')],
    ['log p (rollout)', root ? '\u2014' : fmt(c.logp[g], 5)],
    ['fused reward r\u0304', fmt(c.fused_reward[g], 5)],
    ['advantage', root ? '\u2014' : fmt(c.advantage[g], 4)],
    ['leaf reward', isNum(c.leaf_reward[g]) ? fmt(c.leaf_reward[g], 5) : '\u2014'],
    ['trained', root ? '\u2014' : (c.trained[g] ? 'yes' : 'no')],
    ['children \u00b7 leaves below', m.nch[l] + ' \u00b7 ' + m.below[l]],
  ];
  showTip('<div class="h">node ' + g + ' \u00b7 group ' + m.gid + '</div>' + tipTable(rows) + (t.thumbs ? '<canvas id="tip-thumb"></canvas>' : ''), ev);
  if (t.thumbs && TV.sprite && TV.sprite.complete) {
    const cv = document.getElementById('tip-thumb'), th = t.thumbs, s = Math.max(1, Math.floor(96 / Math.max(th.w, th.h)));
    cv.width = th.w * s; cv.height = th.h * s;
    const ctx = cv.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(TV.sprite, (g % th.cols) * th.w, Math.floor(g / th.cols) * th.h, th.w, th.h, 0, 0, cv.width, cv.height);
    moveTip(ev);
  }
  let d = '', v = l;
  while (v >= 0) { d += (d ? 'L' : 'M') + lay.X(m.depth[v]).toFixed(1) + ' ' + lay.Y(m.y[v]).toFixed(1); v = m.par[v]; }
  const hl = document.getElementById('tree-hl');
  if (hl) hl.setAttribute('d', d);
}

function drawTree(t, m, wrap, info, legend) {
  const t0 = performance.now();
  const c = t._cols;
  TV.tree = t; TV.model = m;
  const thumbs = TV.thumbs && t.thumbs;
  if (!t.thumbs) { TV.sprite = null; TV.spriteOf = null; }
  else if (TV.spriteOf !== t) { TV.sprite = new Image(); TV.sprite.src = t.thumbs.src; TV.spriteOf = t; }
  const row = TV.spacing || 8;
  const showLabels = row >= 13 && !thumbs;
  const W = Math.max(640, wrap.clientWidth - 2);
  const ml = 28, mr = showLabels ? 62 : (thumbs ? 30 : 18), mt = 34, mb = 14;
  const dx = (W - ml - mr) / Math.max(1, m.maxDepth);
  const H = mt + mb + Math.max(1, m.leaves) * row;
  const X = d => ml + d * dx, Y = y => mt + (y + 0.5) * row;
  TV.layout = {X: X, Y: Y};
  const r = Math.max(1.6, Math.min(6, row * 0.36, dx * 0.3));
  // dense trees (a few pixels per leaf): nodes become small bars, so their colours still read as a strip per depth
  const dense = row < 7, bw = Math.max(3, Math.min(8, dx * 0.18)), bh = Math.max(1.2, row * 0.8), thin = dense ? 0.55 : 1;
  const fused = TV.mode === 'fused';
  const color = g => {
    if (fused) return ramp(VIR, m.fmax > m.fmin ? (c.fused_reward[g] - m.fmin) / (m.fmax - m.fmin) : 0.5);
    if (c.parent[g] < 0) return '#bdbdbd';
    return ramp(DIV, m.amax > 0 ? 0.5 + c.advantage[g] / (2 * m.amax) : 0.5);
  };
  let s = '<svg id="tree-svg" width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + ' ' + H + '" data-nodes="' + m.n + '" data-dump="' + TV.dump + '" data-group="' + m.gid + '">';
  if (thumbs) s += '<defs><image id="tree-sprite" href="' + t.thumbs.src + '" width="' + (t.thumbs.cols * t.thumbs.w) + '" height="' + (Math.ceil(t.nodes / t.thumbs.cols) * t.thumbs.h) + '" style="image-rendering:pixelated"/></defs>';
  // depth axis: depth labels, SDE/ODE of the edges into each depth, branching factors
  for (let d = 0; d <= m.maxDepth; d++) {
    const x = X(d).toFixed(1);
    s += '<line x1="' + x + '" x2="' + x + '" y1="' + (mt - 6) + '" y2="' + (H - mb) + '" stroke="#f1f5f9"/>';
    s += '<text class="dlbl" x="' + x + '" y="12" text-anchor="middle"' + (m.depthSde[d] === 0 ? ' style="fill:#0284c7"' : '') + '>' + d + '</text>';
    if (d > 0 && m.width[d - 1] > 0 && m.width[d] > m.width[d - 1]) s += '<text class="dlbl" x="' + (X(d - 0.5)).toFixed(1) + '" y="24" text-anchor="middle" style="fill:#b45309">\u00d7' + fmt(m.width[d] / m.width[d - 1], 3) + '</text>';
  }
  // edges: one path per style
  const paths = {st: [], su: [], sz: [], ot: [], ou: [], oz: []};
  for (let l = 0; l < m.n; l++) {
    const p = m.par[l];
    if (p < 0) continue;
    const g = m.idx[l];
    const key = (c.is_sde[g] ? 's' : 'o') + (c.advantage[g] === 0 ? 'z' : c.trained[g] ? 't' : 'u');
    paths[key].push('M' + X(m.depth[p]).toFixed(1) + ' ' + Y(m.y[p]).toFixed(1) + 'L' + X(m.depth[l]).toFixed(1) + ' ' + Y(m.y[l]).toFixed(1));
  }
  for (const k in paths) if (paths[k].length) {
    const st = EDGE_STYLE[k];
    s += '<path class="edges e-' + k + '" d="' + paths[k].join('') + '" fill="none" stroke="' + st.stroke + '" stroke-width="' + (st.width * thin).toFixed(2) + '"' +
      (st.dash ? ' stroke-dasharray="' + (dense ? st.dash.split(' ').map(v => v * 0.6).join(' ') : st.dash) + '"' : '') + '/>';
  }
  s += '<path id="tree-hl" class="hl" d=""/>';
  // nodes
  const parts = [];
  if (thumbs) {
    const th = t.thumbs, size = Math.max(4, Math.min(row * 0.92, dx * 0.8, 64)), sw = size * Math.min(1, th.w / th.h), sh = size * Math.min(1, th.h / th.w);
    for (let l = 0; l < m.n; l++) {
      const g = m.idx[l], x = X(m.depth[l]) - sw / 2, y = Y(m.y[l]) - sh / 2;
      parts.push('<svg class="th" data-i="' + l + '" x="' + x.toFixed(1) + '" y="' + y.toFixed(1) + '" width="' + sw.toFixed(1) + '" height="' + sh.toFixed(1) +
        '" viewBox="' + (g % th.cols) * th.w + ' ' + Math.floor(g / th.cols) * th.h + ' ' + th.w + ' ' + th.h + '" preserveAspectRatio="none"><use href="#tree-sprite"/></svg>' +
        '<rect x="' + (x - 1).toFixed(1) + '" y="' + (y - 1).toFixed(1) + '" width="' + (sw + 2).toFixed(1) + '" height="' + (sh + 2).toFixed(1) + '" fill="none" stroke="' + color(g) + '" stroke-width="2" pointer-events="none"/>');
    }
  } else if (dense) {
    for (let l = 0; l < m.n; l++) {
      const g = m.idx[l];
      parts.push('<rect class="n" data-i="' + l + '" x="' + (X(m.depth[l]) - bw / 2).toFixed(1) + '" y="' + (Y(m.y[l]) - bh / 2).toFixed(2) + '" width="' + bw.toFixed(1) + '" height="' + bh.toFixed(2) + '" fill="' + color(g) + '"/>');
    }
  } else {
    for (let l = 0; l < m.n; l++) {
      const g = m.idx[l];
      parts.push('<circle class="n" data-i="' + l + '" cx="' + X(m.depth[l]).toFixed(1) + '" cy="' + Y(m.y[l]).toFixed(1) + '" r="' + r.toFixed(2) + '" fill="' + color(g) + '"/>');
    }
  }
  s += parts.join('');
  if (showLabels) {
    for (let l = 0; l < m.n; l++) {
      const g = m.idx[l];
      if (m.nch[l] === 0 && isNum(c.leaf_reward[g])) s += '<text class="lbl" x="' + (X(m.depth[l]) + r + 4).toFixed(1) + '" y="' + (Y(m.y[l]) + 3.5).toFixed(1) + '">' + fmt(c.leaf_reward[g], 3) + '</text>';
    }
  }
  s += '</svg>';
  wrap.innerHTML = s;
  const ms = performance.now() - t0;
  const svg = document.getElementById('tree-svg');
  svg.dataset.renderMs = ms.toFixed(1);
  const e = m.edges;
  info.innerHTML = '';
  info.append(document.createTextNode(
    'iteration ' + (t.iteration === null ? '?' : t.iteration) + ' \u00b7 group ' + m.gid + ' of ' + t.groups.length +
    ' \u00b7 ' + m.n + ' nodes, ' + m.leaves + ' leaves, depth ' + m.maxDepth +
    ' \u00b7 ' + e.total + ' edges: ' + e.trained + ' trained, ' + e.pruned + ' not trained, ' + e.zero + ' zero-advantage, ' + e.ode + ' ODE' +
    (isNum(t.beta) ? ' \u00b7 fusion \u03b2 = ' + fmt(t.beta) + (t.reduction ? ' (' + t.reduction + ' log-prob)' : '') : '') +
    (isNum(t.root_entropy_ratio) ? ' \u00b7 fusion entropy ratio ' + fmt(t.root_entropy_ratio, 4) : '') +
    ' \u00b7 drawn in ' + ms.toFixed(0) + ' ms'));
  // legend: colour bar + edge styles
  const lo = fused ? m.fmin : -m.amax, hi = fused ? m.fmax : m.amax;
  const stops = (fused ? VIRIDIS : DIVERGING).map((h, i, a) => '<stop offset="' + (i / (a.length - 1)).toFixed(3) + '" stop-color="' + h + '"/>').join('');
  const bar = '<svg width="250" height="30"><defs><linearGradient id="tree-grad">' + stops + '</linearGradient></defs>' +
    '<rect x="40" y="3" width="170" height="11" fill="url(#tree-grad)" stroke="#d1d5db"/>' +
    '<text x="36" y="12" text-anchor="end">' + esc(fmt(isNum(lo) ? lo : null, 3)) + '</text><text x="214" y="12">' + esc(fmt(isNum(hi) ? hi : null, 3)) + '</text>' +
    '<text x="125" y="27" text-anchor="middle">' + (fused ? 'fused reward r\u0304 (this group)' : 'edge advantage (0 = white; roots grey)') + '</text></svg>';
  const sample = (k, label) => { const st = EDGE_STYLE[k]; return '<span><svg width="34" height="10"><line x1="2" x2="32" y1="5" y2="5" stroke="' + st.stroke + '" stroke-width="' + (st.width + 0.6) + '"' + (st.dash ? ' stroke-dasharray="' + st.dash + '"' : '') + '/></svg> ' + label + '</span>'; };
  legend.innerHTML = bar + sample('st', 'SDE edge, trained') + sample('su', 'not trained (pruned)') + sample('sz', 'zero advantage (skipped)') +
    sample('ou', 'ODE edge (never trained)') + '<span>depth labels: <span style="color:#0284c7">blue</span> = ODE steps, \u00d7K = split</span>';
}
})();
