// vaelab latent explorer: plain JavaScript, no libraries. Talks to the JSON API of server.py.
"use strict";

(() => {
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const STEPS = 10;             // images in the interpolation strip
  const SNAP_PX = 6;            // a click this close to a test image pins its posterior mean
  const $ = (id) => document.getElementById(id);
  // latent dimension j (0-based) as the figures name it: z₁, z₂, ...
  const zName = (j) => "z" + String(j + 1).replace(/\d/g, (d) => "₀₁₂₃₄₅₆₇₈₉"[d]);

  const state = {
    runs: [],
    limits: { z_bound: 10, max_batch: 64 },
    run: null,
    generation: 0,              // bumped on every run switch: late answers are dropped
    points: null,               // {labels: [...], mu: [[...], ...]} of the current run
    pointsError: null,
    pointsCache: new Map(),
    dims: [0, 1],
    others: "zero",
    cls: 0,
    pins: [],                   // [{z: full vector, label?, index?}]
    cursor: null,               // [x, y] on the plane, latent units
    rowImages: null,            // the current z under every class (CVAE)
    encoded: null,              // {mu, sigma, source, body}: body is what was encoded
    posterior: null,            // the true p(z|x) of state.encoded: {z1, z2, canvas, ...}
    range: 4,
    seq: 0,
  };

  // ------------------------------------------------------------------------------ helpers
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const fmt = (v) => (v >= 0 ? " " : "") + v.toFixed(2);

  async function api(path, body) {
    const opts = body === undefined ? {} : {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    };
    const res = await fetch(path, opts);
    let data;
    try {
      data = await res.json();
    } catch (e) {
      data = { error: `HTTP ${res.status}` };
    }
    if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
    return data;
  }

  function showError(err) {
    const el = $("error");
    el.textContent = err ? String(err.message || err) : "";
    el.classList.toggle("shown", Boolean(err));
  }

  function bytesOf(b64) {
    const bin = atob(b64);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // Gray values (0-255, row major) onto a size x size canvas: white ink on black, as MNIST.
  function paint(canvas, values, size) {
    if (canvas.width !== size) canvas.width = canvas.height = size;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(size, size);
    for (let i = 0; i < size * size; i++) {
      const v = values[i];
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function clampZ(z) {
    const b = state.limits.z_bound;
    return z.map((v) => Math.round(clamp(v, -b, b) * 1e4) / 1e4);
  }

  function strip(box, images, size, captions) {
    while (box.children.length > images.length) box.lastChild.remove();
    while (box.children.length < images.length) {
      const fig = document.createElement("figure");
      fig.append(document.createElement("canvas"));
      if (captions) fig.append(document.createElement("figcaption"));
      box.append(fig);
    }
    images.forEach((b64, k) => {
      const fig = box.children[k];
      const canvas = fig.querySelector("canvas");
      canvas.className = "digit";
      paint(canvas, bytesOf(b64), size);
      const cap = fig.querySelector("figcaption");
      if (cap) cap.textContent = captions[k];
    });
  }

  // ------------------------------------------------------------------------------ latent z
  function baseVector() {
    const D = state.run.latent_dim;
    let src = null;
    if (state.others === "pin0" && state.pins[0]) src = state.pins[0].z;
    if (state.others === "pin1" && state.pins[1]) src = state.pins[1].z;
    if (state.others === "encoded" && state.encoded) src = state.encoded.mu;
    return src ? src.slice() : new Array(D).fill(0);
  }

  function zAt(x, y) {
    const z = baseVector();
    z[state.dims[0]] = x;
    if (state.run.latent_dim > 1) z[state.dims[1]] = y;
    return clampZ(z);
  }

  const coord = (vec, axis) => (axis === 1 && state.run.latent_dim === 1 ? 0 : vec[state.dims[axis]]);

  // ------------------------------------------------------------------------------ the plane
  const plane = $("plane");
  const base = document.createElement("canvas");   // scatter + grid + prior, redrawn rarely
  let cssSize = 560;
  let dpr = 1;

  function sizePlane() {
    cssSize = Math.max(200, Math.round(plane.clientWidth || 560));
    dpr = window.devicePixelRatio || 1;
    for (const c of [plane, base]) {
      c.width = Math.round(cssSize * dpr);
      c.height = Math.round(cssSize * dpr);
    }
  }

  function toPx(x, y) {
    const R = state.range;
    return [((x + R) / (2 * R)) * cssSize, ((R - y) / (2 * R)) * cssSize];
  }

  function toLatent(px, py) {
    const R = state.range;
    return [(px / cssSize) * 2 * R - R, R - (py / cssSize) * 2 * R];
  }

  function eventPx(e) {
    const r = plane.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * cssSize, ((e.clientY - r.top) / r.height) * cssSize];
  }

  function computeRange() {
    let R = 3.5;
    if (state.points && state.points.mu.length) {
      const a = [];
      for (const m of state.points.mu) a.push(Math.abs(coord(m, 0)), Math.abs(coord(m, 1)));
      a.sort((p, q) => p - q);
      R = Math.max(R, a[Math.floor(0.999 * (a.length - 1))] * 1.08);
    }
    state.range = Math.min(R, state.limits.z_bound);
  }

  function drawBase() {
    const ctx = base.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const S = cssSize;
    const R = state.range;
    ctx.fillStyle = "#fbfcfd";
    ctx.fillRect(0, 0, S, S);
    // integer grid and axes
    ctx.lineWidth = 1;
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#8a929c";
    for (let v = -Math.floor(R); v <= Math.floor(R); v++) {
      const [px, py] = toPx(v, v);
      ctx.strokeStyle = v === 0 ? "#b9c0c8" : "#eceff2";
      ctx.beginPath();
      ctx.moveTo(px, 0); ctx.lineTo(px, S);
      ctx.moveTo(0, py); ctx.lineTo(S, py);
      ctx.stroke();
      if (v !== 0) {
        ctx.fillText(String(v), px + 2, S - 4);
        ctx.fillText(String(v), 3, py - 2);
      }
    }
    if (state.run) {
      const D = state.run.latent_dim;
      ctx.fillStyle = "#4b535d";
      ctx.font = "12px system-ui, sans-serif";
      ctx.fillText(zName(state.dims[0]), S - 24, toPx(0, 0)[1] - 6);
      if (D > 1) ctx.fillText(zName(state.dims[1]), toPx(0, 0)[0] + 6, 14);
    }
    // the encoded test set
    if (state.points) {
      const { mu, labels } = state.points;
      ctx.globalAlpha = 0.55;
      for (let i = 0; i < mu.length; i++) {
        const [px, py] = toPx(coord(mu[i], 0), coord(mu[i], 1));
        ctx.fillStyle = COLORS[labels[i] % COLORS.length];
        ctx.fillRect(px - 1.2, py - 1.2, 2.4, 2.4);
      }
      ctx.globalAlpha = 1;
    } else {
      ctx.fillStyle = "#67707c";
      ctx.font = "13px system-ui, sans-serif";
      ctx.textAlign = "center";
      const text = state.pointsError ? `no test points: ${state.pointsError}` : "encoding the test set…";
      ctx.fillText(text.slice(0, 90), S / 2, S / 2 - 40);
      ctx.textAlign = "start";
    }
    // the prior N(0, I): 1, 2, 3 sigma
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = "#3d4550";
    ctx.fillStyle = "#3d4550";
    const [cx, cy] = toPx(0, 0);
    for (const k of [1, 2, 3]) {
      const r = (k / (2 * R)) * S;
      ctx.beginPath();
      ctx.arc(cx, cy, r, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.fillText(`${k}σ`, cx + r * 0.707 + 3, cy - r * 0.707 - 3);
    }
    ctx.setLineDash([]);
  }

  function drawOverlay() {
    const ctx = plane.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, plane.width, plane.height);
    ctx.drawImage(base, 0, 0);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    plane.dataset.pins = JSON.stringify(state.pins.map((p) => p.z));
    if (!state.run) return;
    drawPosterior(ctx);
    const enc = state.encoded;
    if (enc) {
      const [px, py] = toPx(coord(enc.mu, 0), coord(enc.mu, 1));
      const scale = cssSize / (2 * state.range);
      const rx = Math.max(coord(enc.sigma, 0) * scale, 1);
      const ry = state.run.latent_dim > 1 ? Math.max(coord(enc.sigma, 1) * scale, 1) : 4;
      star(ctx, px, py, rx < 10 && ry < 10 ? 5 : 8);
      ctx.beginPath();
      ctx.ellipse(px, py, rx, ry, 0, 0, 2 * Math.PI);
      ctx.fillStyle = "rgba(255, 212, 0, 0.25)";
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#111";
      ctx.stroke();
    }
    if (state.pins.length === 2) {
      const [a, b] = state.pins.map((p) => toPx(coord(p.z, 0), coord(p.z, 1)));
      ctx.setLineDash([4, 3]);
      ctx.strokeStyle = "#111";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      ctx.moveTo(a[0], a[1]);
      ctx.lineTo(b[0], b[1]);
      ctx.stroke();
      ctx.setLineDash([]);
    }
    state.pins.forEach((p, k) => {
      const [px, py] = toPx(coord(p.z, 0), coord(p.z, 1));
      ctx.beginPath();
      ctx.arc(px, py, 7, 0, 2 * Math.PI);
      ctx.fillStyle = "#fff";
      ctx.fill();
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#111";
      ctx.stroke();
      ctx.fillStyle = "#111";
      ctx.font = "bold 10px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.fillText(k === 0 ? "A" : "B", px, py + 3.5);
      ctx.textAlign = "start";
    });
    if (state.cursor) {
      const [px, py] = toPx(state.cursor[0], state.cursor[1]);
      ctx.strokeStyle = "#d11";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      ctx.moveTo(px - 8, py); ctx.lineTo(px + 8, py);
      ctx.moveTo(px, py - 8); ctx.lineTo(px, py + 8);
      ctx.stroke();
    }
  }

  // The true posterior as a blue heat map under q's ellipse: its grid, one pixel per node
  // (alpha proportional to density / max), stretched so that each node sits at its own z.
  function drawPosterior(ctx) {
    const post = state.posterior;
    const shown = Boolean(post) && state.dims[0] === 0 && state.dims[1] === 1;
    plane.dataset.posterior = shown ? "1" : "0";
    if (!shown) return;
    const { z1, z2 } = post;
    const n = z1.length - 1;
    const h1 = (z1[n] - z1[0]) / n;
    const h2 = (z2[n] - z2[0]) / n;
    const [x0, y0] = toPx(z1[0] - h1 / 2, z2[n] + h2 / 2);
    const [x1, y1] = toPx(z1[n] + h1 / 2, z2[0] - h2 / 2);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(post.canvas, x0, y0, x1 - x0, y1 - y0);
  }

  function posteriorCanvas(z1, z2, density) {
    const n1 = z1.length;
    const n2 = z2.length;
    const canvas = document.createElement("canvas");
    canvas.width = n1;
    canvas.height = n2;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(n1, n2);
    let top = 0;
    for (const row of density) for (const v of row) top = Math.max(top, v);
    for (let i = 0; i < n1; i++) {
      for (let j = 0; j < n2; j++) {
        const k = 4 * ((n2 - 1 - j) * n1 + i);   // z2 grows upwards, canvas rows downwards
        img.data[k] = 31;
        img.data[k + 1] = 90;
        img.data[k + 2] = 220;
        img.data[k + 3] = top > 0 ? Math.round((200 * clamp(density[i][j], 0, top)) / top) : 0;
      }
    }
    ctx.putImageData(img, 0, 0);
    return canvas;
  }

  // Forget the true posterior: the encoding it belonged to changed, or the run did.
  function clearPosterior() {
    state.posterior = null;
    $("posterior-readout").textContent = "";
    const button = $("posterior");
    button.hidden = !(state.encoded && state.run && state.run.latent_dim === 2);
    button.disabled = false;
  }

  async function fetchPosterior() {
    const run = state.run;
    const enc = state.encoded;
    if (!enc || run.latent_dim !== 2) return;
    const gen = state.generation;
    const button = $("posterior");
    button.disabled = true;
    $("posterior-readout").textContent = "computing the true posterior…";
    try {
      const data = await api(`/api/runs/${run.index}/posterior`, enc.body);
      if (gen !== state.generation || enc !== state.encoded) return;   // a late answer
      state.posterior = { z1: data.z1, z2: data.z2,
                          canvas: posteriorCanvas(data.z1, data.z2, data.density) };
      $("posterior-readout").textContent =
        `log p(x) = ${data.log_px.toFixed(2)}, ELBO = ${data.elbo.toFixed(2)}, ` +
        `KL(q‖p) = ${data.kl.toFixed(2)} nats\n` +
        `(log p(x) ± ${data.log_px_error.toFixed(2)}; blue: the true posterior p(z|x))`;
      drawOverlay();
      showError(null);
    } catch (e) {
      if (gen !== state.generation || enc !== state.encoded) return;
      $("posterior-readout").textContent = "";
      showError(e);
    } finally {
      if (gen === state.generation && enc === state.encoded) button.disabled = false;
    }
  }

  function star(ctx, x, y, size) {
    ctx.beginPath();
    for (let k = 0; k < 10; k++) {
      const r = k % 2 ? size * 0.45 : size;
      const a = -Math.PI / 2 + (k * Math.PI) / 5;
      ctx.lineTo(x + r * Math.cos(a), y + r * Math.sin(a));
    }
    ctx.closePath();
    ctx.fillStyle = "#ffd400";
    ctx.fill();
    ctx.lineWidth = 1.2;
    ctx.strokeStyle = "#111";
    ctx.stroke();
  }

  function nearestPoint(px, py) {
    if (!state.points) return null;
    let best = null;
    let bestD = SNAP_PX * SNAP_PX;
    state.points.mu.forEach((m, i) => {
      const [qx, qy] = toPx(coord(m, 0), coord(m, 1));
      const d = (qx - px) ** 2 + (qy - py) ** 2;
      if (d < bestD) { bestD = d; best = i; }
    });
    return best;
  }

  // ------------------------------------------------------------------------------ live decode
  let inflight = false;
  let pending = null;

  function requestDecode(z) {
    pending = z;
    if (!inflight) pump();
  }

  async function pump() {
    inflight = true;
    document.body.dataset.busy = "1";
    while (pending) {
      const z = pending;
      pending = null;
      const run = state.run;
      const gen = state.generation;
      try {
        if (run.conditional) {
          const ys = [...Array(run.num_classes).keys()];
          const data = await api(`/api/runs/${run.index}/decode_batch`, { z, ys });
          if (gen !== state.generation) continue;
          state.rowImages = data.images;
          strip($("class-row"), data.images, data.size, ys.map(String));
          showDigit(data.images[state.cls], data.size, z);
        } else {
          const data = await api(`/api/runs/${run.index}/decode`, { z });
          if (gen !== state.generation) continue;
          showDigit(data.image, data.size, z);
        }
        showError(null);
      } catch (e) {
        showError(e);
      }
    }
    inflight = false;
    document.body.dataset.busy = "0";
  }

  function showDigit(b64, size, z) {
    const digit = $("digit");
    paint(digit, bytesOf(b64), size);
    if (z) {
      const shown = z.length > 6 ? z.slice(0, 6).map(fmt).join(",") + ", …" : z.map(fmt).join(",");
      $("z-readout").textContent = `z = (${shown})`;
      digit.dataset.z = JSON.stringify(z);
    }
    state.seq += 1;
    digit.dataset.seq = String(state.seq);
    digit.dataset.run = String(state.run.index);
    digit.dataset.cls = String(state.cls);
  }

  function currentZ() {
    return state.cursor ? zAt(state.cursor[0], state.cursor[1]) : zAt(0, 0);
  }

  async function updateInterp() {
    const box = $("interp");
    if (state.pins.length < 2) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    const run = state.run;
    const gen = state.generation;
    const [a, b] = state.pins.map((p) => p.z);
    const zs = [];
    for (let k = 0; k < STEPS; k++) {
      const t = k / (STEPS - 1);
      zs.push(clampZ(a.map((v, j) => v + t * (b[j] - v))));
    }
    const body = { zs };
    if (run.conditional) body.y = state.cls;
    try {
      const data = await api(`/api/runs/${run.index}/decode_batch`, body);
      if (gen === state.generation) strip($("interp-strip"), data.images, data.size);
    } catch (e) {
      showError(e);
    }
  }

  // ------------------------------------------------------------------------------ controls
  function setClass(k) {
    if (!state.run || !state.run.conditional || k >= state.run.num_classes) return;
    state.cls = k;
    for (const b of $("class-buttons").children) b.classList.toggle("on", Number(b.value) === k);
    if (state.rowImages) showDigit(state.rowImages[k], state.run.image_size, null);
    updateInterp();
    if (state.encoded && state.encoded.source === "drawing") encodeGrid("drawing", null);
  }

  function buildClassButtons(n) {
    const box = $("class-buttons");
    box.replaceChildren();
    for (let k = 0; k < n; k++) {
      const b = document.createElement("button");
      b.type = "button";
      b.value = String(k);
      b.dataset.class = String(k);
      b.textContent = String(k);
      b.addEventListener("click", () => setClass(k));
      box.append(b);
    }
    state.cls = Math.min(state.cls, n - 1);
    for (const b of box.children) b.classList.toggle("on", Number(b.value) === state.cls);
  }

  function refreshOthers() {
    const sel = $("others");
    const have = { zero: true, pin0: Boolean(state.pins[0]), pin1: Boolean(state.pins[1]),
                   encoded: Boolean(state.encoded) };
    for (const o of sel.options) o.disabled = !have[o.value];
    if (!have[state.others]) {
      state.others = "zero";
      sel.value = "zero";
    }
  }

  function setupDims() {
    const D = state.run.latent_dim;
    $("dims").hidden = D <= 2;
    for (const [id, axis] of [["dim-x", 0], ["dim-y", 1]]) {
      const sel = $(id);
      sel.replaceChildren();
      for (let j = 0; j < D; j++) {
        const o = document.createElement("option");
        o.value = String(j);
        o.textContent = zName(j);
        sel.append(o);
      }
      sel.value = String(state.dims[axis]);
    }
    $("others").value = state.others;
  }

  function changeDims() {
    let x = Number($("dim-x").value);
    let y = Number($("dim-y").value);
    if (x === y) {   // two different dimensions: move the other selector along
      if (x === state.dims[0]) x = state.dims[1]; else y = state.dims[0];
      $("dim-x").value = String(x);
      $("dim-y").value = String(y);
    }
    state.dims = [x, y];
    computeRange();
    drawBase();
    drawOverlay();
    requestDecode(currentZ());
  }

  async function selectRun(i) {
    const run = state.runs[i];
    state.run = run;
    state.generation += 1;
    const gen = state.generation;
    $("run").value = String(i);
    state.pins = [];
    state.encoded = null;
    clearPosterior();
    state.rowImages = null;
    state.cursor = null;
    state.others = "zero";
    state.dims = [0, Math.min(1, run.latent_dim - 1)];
    setupDims();
    refreshOthers();
    $("classes").hidden = !run.conditional;
    if (run.conditional) buildClassButtons(run.num_classes);
    $("interp").hidden = true;
    $("encoded-readout").textContent = "";
    paint($("recon"), new Uint8Array(run.image_size * run.image_size), run.image_size);
    resetGrid(run.image_size);
    const test = run.test ? run.test.neg_elbo : undefined;
    $("run-info").textContent = [
      `${run.kind.toUpperCase()}, latent ${run.latent_dim}`,
      run.dataset || "",
      test !== undefined ? `test −ELBO ${test.toFixed(1)} nats` : "",
    ].filter(Boolean).join(" · ");
    const ti = $("test-index");
    ti.max = String(Math.max(0, run.test_size - 1));
    for (const id of ["load-test", "random-test"]) $(id).disabled = run.test_size === 0;

    state.points = null;
    state.pointsError = null;
    state.range = 3.5;
    drawBase();
    drawOverlay();
    requestDecode(zAt(0, 0));
    let pts = state.pointsCache.get(i);
    if (!pts) {
      try {
        pts = await api(`/api/runs/${i}/points`);
        state.pointsCache.set(i, pts);
      } catch (e) {
        if (gen === state.generation) state.pointsError = e.message;
      }
    }
    if (gen !== state.generation) return;
    state.points = pts || null;
    computeRange();
    drawBase();
    drawOverlay();
    plane.dataset.run = String(i);
  }

  function wirePlane() {
    plane.addEventListener("pointermove", (e) => {
      if (!state.run) return;
      const [px, py] = eventPx(e);
      state.cursor = toLatent(px, py);
      requestDecode(zAt(state.cursor[0], state.cursor[1]));
      drawOverlay();
    });
    plane.addEventListener("pointerleave", () => {
      state.cursor = null;
      drawOverlay();
    });
    plane.addEventListener("click", (e) => {
      if (!state.run) return;
      const [px, py] = eventPx(e);
      const hit = state.pins.findIndex((p) => {
        const [qx, qy] = toPx(coord(p.z, 0), coord(p.z, 1));
        return (qx - px) ** 2 + (qy - py) ** 2 < 64;
      });
      if (hit >= 0) {
        state.pins.splice(hit, 1);
      } else {
        if (state.pins.length >= 2) state.pins = [];
        const near = nearestPoint(px, py);
        if (near !== null) {
          state.pins.push({ z: clampZ(state.points.mu[near]), label: state.points.labels[near],
                            index: near });
        } else {
          const [x, y] = toLatent(px, py);
          state.pins.push({ z: zAt(x, y) });
        }
      }
      refreshOthers();
      updateInterp();
      drawOverlay();
    });
  }

  // ------------------------------------------------------------------------------ drawing
  const drawCanvas = $("draw");
  let grid = new Float32Array(28 * 28);
  let gridSize = 28;
  let drawing = false;
  let last = null;

  function resetGrid(size) {
    gridSize = size;
    grid = new Float32Array(size * size);
    renderGrid();
  }

  function renderGrid() {
    const values = new Uint8Array(gridSize * gridSize);
    for (let i = 0; i < values.length; i++) values[i] = Math.round(grid[i] * 255);
    paint(drawCanvas, values, gridSize);
  }

  // A soft round pen about 2.5 pixels wide, like MNIST's strokes.
  function stamp(cx, cy) {
    for (let r = Math.floor(cy - 2); r <= Math.ceil(cy + 2); r++) {
      for (let c = Math.floor(cx - 2); c <= Math.ceil(cx + 2); c++) {
        if (r < 0 || c < 0 || r >= gridSize || c >= gridSize) continue;
        const d = Math.hypot(c + 0.5 - cx, r + 0.5 - cy);
        const v = clamp(1.6 - d, 0, 1);
        if (v > grid[r * gridSize + c]) grid[r * gridSize + c] = v;
      }
    }
  }

  function gridPos(e) {
    const r = drawCanvas.getBoundingClientRect();
    return [((e.clientX - r.left) / r.width) * gridSize, ((e.clientY - r.top) / r.height) * gridSize];
  }

  function wireDrawing() {
    drawCanvas.addEventListener("pointerdown", (e) => {
      drawing = true;
      drawCanvas.setPointerCapture(e.pointerId);
      last = gridPos(e);
      stamp(last[0], last[1]);
      renderGrid();
    });
    drawCanvas.addEventListener("pointermove", (e) => {
      if (!drawing) return;
      const p = gridPos(e);
      const n = Math.max(1, Math.ceil(Math.hypot(p[0] - last[0], p[1] - last[1]) / 0.25));
      for (let k = 1; k <= n; k++) {
        stamp(last[0] + ((p[0] - last[0]) * k) / n, last[1] + ((p[1] - last[1]) * k) / n);
      }
      last = p;
      renderGrid();
    });
    const end = () => {
      if (!drawing) return;
      drawing = false;
      encodeGrid("drawing", null);
    };
    drawCanvas.addEventListener("pointerup", end);
    drawCanvas.addEventListener("pointercancel", end);
    $("clear-draw").addEventListener("click", () => {
      resetGrid(gridSize);
      state.encoded = null;
      clearPosterior();
      paint($("recon"), new Uint8Array(gridSize * gridSize), gridSize);
      $("encoded-readout").textContent = "";
      refreshOthers();
      drawOverlay();
    });
    $("load-test").addEventListener("click", () => loadTest(Number($("test-index").value)));
    $("random-test").addEventListener("click", () => {
      const k = Math.floor(Math.random() * state.run.test_size);
      $("test-index").value = String(k);
      loadTest(k);
    });
  }

  async function loadTest(k) {
    const run = state.run;
    const gen = state.generation;
    if (!Number.isInteger(k) || k < 0 || k >= run.test_size) {
      showError(`test image index must be 0-${run.test_size - 1}`);
      return;
    }
    try {
      const data = await api(`/api/runs/${run.index}/test_image/${k}`);
      if (gen !== state.generation) return;
      const bytes = bytesOf(data.image);
      resetGrid(data.size);
      for (let i = 0; i < bytes.length; i++) grid[i] = bytes[i] / 255;
      renderGrid();
      await encodeGrid(`test image ${k} (label ${data.label})`, data.label);
    } catch (e) {
      showError(e);
    }
  }

  async function encodeGrid(source, label) {
    const run = state.run;
    const gen = state.generation;
    const image = [];
    for (let r = 0; r < gridSize; r++) {
      const row = [];
      for (let c = 0; c < gridSize; c++) row.push(Math.round(grid[r * gridSize + c] * 1000) / 1000);
      image.push(row);
    }
    const body = { image };
    const y = label === null ? state.cls : label;
    if (run.conditional) body.y = y;
    try {
      const data = await api(`/api/runs/${run.index}/encode`, body);
      if (gen !== state.generation) return;
      state.encoded = { mu: data.mu, sigma: data.sigma, source, body };
      clearPosterior();
      paint($("recon"), bytesOf(data.recon), data.size);
      const dims = data.mu.length > 8 ? " (first 8 dimensions)" : "";
      $("encoded-readout").textContent =
        `${source}${run.conditional ? `, encoded as class ${y}` : ""}${dims}\n` +
        `mean  (${data.mu.slice(0, 8).map(fmt).join(",")})\n` +
        `sigma (${data.sigma.slice(0, 8).map(fmt).join(",")})`;
      refreshOthers();
      drawOverlay();
      showError(null);
    } catch (e) {
      showError(e);
    }
  }

  // ------------------------------------------------------------------------------ start
  function legend() {
    const box = $("legend");
    box.replaceChildren();
    COLORS.forEach((c, k) => {
      const s = document.createElement("span");
      const dot = document.createElement("i");
      dot.style.background = c;
      s.append(dot, String(k));
      box.append(s);
    });
  }

  async function init() {
    sizePlane();
    legend();
    wirePlane();
    wireDrawing();
    $("run").addEventListener("change", () => selectRun(Number($("run").value)));
    $("dim-x").addEventListener("change", changeDims);
    $("dim-y").addEventListener("change", changeDims);
    $("others").addEventListener("change", () => {
      state.others = $("others").value;
      requestDecode(currentZ());
    });
    $("posterior").addEventListener("click", fetchPosterior);
    $("clear-pins").addEventListener("click", () => {
      state.pins = [];
      refreshOthers();
      updateInterp();
      drawOverlay();
    });
    document.addEventListener("keydown", (e) => {
      if (e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement) return;
      if (/^[0-9]$/.test(e.key)) setClass(Number(e.key));
    });
    window.addEventListener("resize", () => {
      sizePlane();
      drawBase();
      drawOverlay();
    });
    try {
      const data = await api("/api/runs");
      state.runs = data.runs;
      state.limits = data.limits;
      for (const r of data.runs) {
        const o = document.createElement("option");
        o.value = String(r.index);
        o.textContent = `${r.index}: ${r.name} (${r.kind}, latent ${r.latent_dim})`;
        $("run").append(o);
      }
      await selectRun(0);
    } catch (e) {
      showError(e);
    }
  }

  init();
})();
