"use strict";
// The bonexray page: send the chosen images to /api/predict?heatmap=1 and show what comes back.
// The radiograph is drawn at its own resolution on a canvas: window/level is a lookup table over its
// pixels, zoom/pan/pinch come from @panzoom/panzoom (vendored), heatmap and boxes are drawn on a second
// canvas in the original image's pixel coordinates. Text from the server is only ever set with textContent.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "bonexray-api-key";
const BORDERLINE = 0.05;       // |p - threshold| below this is "borderline" when the API gives no confidence
const LOW_PART_CONFIDENCE = 0.6; // body part probability below this gets a low-confidence note
const BOX_COLOUR = "#ffd400";

let model = null;
let lastResult = null;   // the last response (JSON)
let current = null;      // { xhr } of the request in flight
let requestSeq = 0;      // answers to anything but the latest request are dropped
let viewer = null;       // the image on show (see showImage)
let panzoom = null;

// ------------------------------------------------------------------ small helpers

function apiHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const pct = (p) => (100 * p).toFixed(1) + "%";
const mib = (n) => (n / (1024 * 1024)).toLocaleString("en", { maximumFractionDigits: 1 }) + " MiB";
const plural = (n, one, many) => n + " " + (n === 1 ? one : many);

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function showFileErrors(problems) {
  const list = $("file-errors");
  list.replaceChildren(...problems.map((p) => el("li", {}, el("strong", {}, p.file), ": " + p.reason)));
  list.hidden = problems.length === 0;
}

async function readError(response) {
  try {
    const body = await response.json();
    return body.detail || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

function download(name, blob) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

// ------------------------------------------------------------------ verdict states

// One of: abnormal, normal, borderline, cannot (assess); always with words, never colour alone.
function stateOf(rec, threshold) {
  if (rec.in_scope === false) {
    return { key: "cannot", word: "Cannot assess", detail: rec.scope_reason || "outside what this model knows" };
  }
  const p = rec.prob_abnormal;
  if (typeof p !== "number" || !isFinite(p)) return { key: "cannot", word: "Cannot assess", detail: "no probability" };
  const borderline = rec.confidence ? rec.confidence === "borderline" : Math.abs(p - threshold) < BORDERLINE;
  if (borderline) {
    return { key: "borderline", word: "Borderline", detail: "near the threshold, leaning " + (p >= threshold ? "abnormal" : "normal") };
  }
  return p >= threshold ? { key: "abnormal", word: "Abnormal", detail: "" } : { key: "normal", word: "Normal", detail: "" };
}

// A study verdict uses its in-scope images only: say how many were left out.
function outOfScopeNote(study) {
  const n = study.n_out_of_scope;
  return plural(n, "image", "images") + " of " + study.n_images + " could not be assessed"
    + (study.in_scope === false ? "" : "; the verdict uses the other " + (study.n_images - n));
}

function bodyPartText(rec) {
  if (!rec.body_part) return "not assessed";
  const p = rec["prob_" + rec.body_part];
  let text = rec.body_part + (typeof p === "number" ? " (" + pct(p) + ")" : "");
  if (typeof p === "number" && p < LOW_PART_CONFIDENCE) text += ", low confidence";
  return text;
}

function verdictBadge(state) {
  return el("span", { class: "verdict " + state.key }, state.word);
}

function probBar(p, threshold) {
  const fill = el("span", { class: "fill" });
  fill.style.width = pct(p);
  const mark = el("span", { class: "mark" });
  mark.style.left = pct(threshold);
  return el("div", { class: "bar", role: "img", "aria-label": "p(abnormal) " + pct(p) + ", threshold " + pct(threshold) }, fill, mark);
}

// ------------------------------------------------------------------ the model card

function trainingText(t) {
  if (!t) return "not recorded with this model file";
  let text = t.dataset + (t.source ? " (" + t.source + ")" : "");
  if (t.images) text += ": " + Object.entries(t.images).map(([s, n]) => n + " " + s).join(", ") + " images";
  if (t.epochs) text += ", up to " + t.epochs + " epochs";
  return text;
}

function evaluationText(e) {
  if (!e) return "no test results given to this server (bonexray serve --metrics FILE shows them here)";
  const f = (x) => (typeof x === "number" ? x.toFixed(3) : "n/a");
  let text = "AUROC " + f(e.auroc);
  if (e.auroc_ci95) text += " (95% CI " + f(e.auroc_ci95[0]) + "\u2013" + f(e.auroc_ci95[1]) + ")";
  text += "; sensitivity " + f(e.sensitivity) + ", specificity " + f(e.specificity) + " at the threshold";
  text += " \u2014 " + (e.split || "?") + " split" + (e.n_images ? ", " + e.n_images + " images" : "") + " (" + e.source_file + ")";
  return text;
}

function fillList(list, rows) {
  list.replaceChildren();
  for (const [k, v] of rows) list.append(el("dt", {}, k), el("dd", {}, v));
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/api/model", { headers: apiHeaders() });
  } catch (e) {
    showError("The server did not answer (" + e.message + ").");
    return;
  }
  if (response.status === 401) {
    const hadKey = !!sessionStorage.getItem(KEY_STORE);
    sessionStorage.removeItem(KEY_STORE);
    $("key-box").hidden = false;
    const keyError = $("key-error");
    keyError.textContent = hadKey ? "That key was not accepted. Check it and enter it again." : "";
    keyError.hidden = !hadKey;
    $("status").textContent = hadKey ? "The API key was not accepted." : "Enter the API key to start.";
    $("key-input").focus();
    return;
  }
  if (!response.ok) { showError("Cannot read the model card: " + await readError(response)); return; }
  model = await response.json();
  $("key-box").hidden = true;
  $("key-error").hidden = true;
  $("status").textContent = "";
  $("intended-use").textContent = model.intended_use;
  fillList($("card-list"), [
    ["Trained on", trainingText(model.training_data)],
    ["Test result", evaluationText(model.evaluation)],
    ["Classes", "normal / abnormal; body part: " + model.body_parts.join(", ")],
    ["Threshold", model.threshold.toFixed(3) + " on p(abnormal): " + model.threshold_source],
    ["Heatmap", model.heatmap ? model.heatmap + ": " + model.heatmap_note : model.heatmap_note],
  ]);
  fillList($("card-more-list"), [
    ["Model file", model.model_file + " (" + model.format + ")"],
    ["Backbone", model.backbone + ", " + model.image_size + " px input"],
    ["Version", "model written by bonexray " + model.version + "; server " + model.server_version],
  ]);
  const L = model.limits;
  $("limits").textContent = "Up to " + L.max_files + " files per upload, " + mib(L.max_file_bytes) + " each, "
    + mib(L.max_request_bytes) + " in all.";
  if (!model.heatmap) {
    $("show-heatmap").checked = false;
    $("show-heatmap").disabled = true;
  }
}

// ------------------------------------------------------------------ sending files

// Files over the page's limits are not sent; they are named with the reason.
function checkLimits(files) {
  const L = model ? model.limits : null;
  if (!L) return { send: files, refused: [] };
  const send = [], refused = [];
  let total = 0;
  for (const f of files) {
    if (send.length >= L.max_files) {
      refused.push({ file: f.name, reason: "not sent: at most " + L.max_files + " files per upload" });
    } else if (f.size > L.max_file_bytes) {
      refused.push({ file: f.name, reason: "not sent: " + mib(f.size) + " is over the limit of " + mib(L.max_file_bytes) + " per file" });
    } else if (total + f.size > L.max_request_bytes * 0.98) {  // multipart headers take a little room
      refused.push({ file: f.name, reason: "not sent: the upload would exceed " + mib(L.max_request_bytes) });
    } else {
      send.push(f);
      total += f.size;
    }
  }
  return { send, refused };
}

function setBusy(busy) {
  $("cancel").hidden = !busy;
  $("progress").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function cancelCurrent() {
  if (current) {
    current.xhr.abort();
    current = null;
  }
}

function post(url, form, onUpload) {
  // XMLHttpRequest rather than fetch: it reports upload progress, and abort() cancels it.
  const xhr = new XMLHttpRequest();
  const promise = new Promise((resolve, reject) => {
    xhr.open("POST", url);
    for (const [k, v] of Object.entries(apiHeaders())) xhr.setRequestHeader(k, v);
    xhr.responseType = "text";
    xhr.upload.onprogress = (e) => e.lengthComputable && onUpload(e.loaded / e.total);
    xhr.onload = () => resolve(xhr);
    xhr.onerror = () => reject(new Error("network error"));
    xhr.onabort = () => reject(new DOMException("cancelled", "AbortError"));
    xhr.send(form);
  });
  return { xhr, promise };
}

async function predict(files) {
  if (!files.length) return;
  cancelCurrent();  // a later drop replaces the request in flight
  const seq = ++requestSeq;
  const { send, refused } = checkLimits(files);
  showError("");
  showFileErrors(refused);
  $("summary").hidden = true;
  $("viewer").hidden = true;
  $("results").replaceChildren();
  lastResult = null;
  if (!send.length) {
    $("status").textContent = "Nothing was sent: every file is over the limits.";
    return;
  }
  const separate = $("separate-studies").checked;
  const form = new FormData();
  for (const f of send) form.append("files", f, f.name);
  const what = plural(send.length, "image", "images");
  $("status").textContent = "Uploading " + what + "\u2026";
  $("progress").removeAttribute("value");
  setBusy(true);
  const req = post("/api/predict?heatmap=1" + (separate ? "&studies=each" : ""), form, (fraction) => {
    $("progress").value = fraction;
    if (fraction >= 1) $("status").textContent = "Analysing " + what + "\u2026";
  });
  current = req;
  let xhr;
  try {
    xhr = await req.promise;
  } catch (e) {
    if (seq !== requestSeq) return;  // replaced by a later request: that one owns the page now
    setBusy(false);
    current = null;
    $("status").textContent = e.name === "AbortError" ? "Cancelled." : "";
    if (e.name !== "AbortError") showError("The server did not answer (" + e.message + ").");
    return;
  }
  if (seq !== requestSeq) return;
  current = null;
  setBusy(false);
  let body = null;
  try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
  if (xhr.status < 200 || xhr.status >= 300) {
    $("status").textContent = "";
    if (xhr.status === 401) { loadModel(); return; }
    const detail = body && body.detail ? body.detail : xhr.status + " " + xhr.statusText;
    showError(detail + (body && body.errors ? " Nothing was analysed." : ""));
    if (body && body.errors) showFileErrors(refused.concat(body.errors));
    return;
  }
  lastResult = body;
  render(body, refused.concat(body.errors || []));
}

// ------------------------------------------------------------------ results

function render(result, problems) {
  const t = result.threshold;
  showFileErrors(problems);
  if (problems.length) {
    showError(plural(problems.length, "file was", "files were") + " not analysed (named below); the others were.");
  }
  const studies = result.studies || [result.study];
  const multi = result.images.length > 1;
  const lines = [];
  const box = $("studies");
  box.replaceChildren();
  for (const study of studies) {
    // One image: its own record is the verdict (it carries in_scope and confidence).
    const rec = study.n_images === 1 ? result.images.find((r) => r.study === study.study) || study : study;
    const state = stateOf(rec, t);
    const title = study.n_images === 1 ? (rec.path || "1 image") : "Study of " + study.n_images + " images";
    const p = typeof rec.prob_abnormal === "number" ? pct(rec.prob_abnormal) : "n/a";
    box.append(el("div", { class: "study-line", "data-state": state.key },
      el("h3", {}, title), verdictBadge(state),
      el("span", {}, (study.n_images > 1 ? "mean " : "") + "p(abnormal) " + p + " (threshold " + pct(t) + ")"),
      el("span", {}, "body part " + bodyPartText(rec)),
      state.detail ? el("span", { class: "note" }, state.detail) : null,
      study.n_out_of_scope > 0 && study.n_images > 1 ? el("span", { class: "note" }, outOfScopeNote(study)) : null));
    lines.push(title + ": " + state.word + (state.detail ? " (" + state.detail + ")" : "") + ", p(abnormal) " + p
               + ", body part " + bodyPartText(rec)
               + (study.n_out_of_scope > 0 && study.n_images > 1 ? " (" + outOfScopeNote(study) + ")" : ""));
  }
  const frag = document.createDocumentFragment();
  result.images.forEach((rec, i) => frag.append(renderCard(rec, i, t, result.heatmap, multi)));
  for (const p of problems) frag.append(renderProblem(p));
  $("results").replaceChildren(frag);
  $("summary").hidden = false;
  const summary = $("summary");
  // The verdict is announced (role=status) and brought into view (on a phone it is below the fold).
  $("status").textContent = "Done: " + plural(result.images.length, "image", "images") + ". " + lines.join(". ") + ".";
  updateHeatmapNotes();
  if (result.images.length) showImage(0);
  summary.scrollIntoView({ block: "start" });
}

function renderCard(rec, index, threshold, heatmapName, multi) {
  const state = stateOf(rec, threshold);
  const facts = el("dl", { class: "facts" },
    el("dt", {}, "p(abnormal)"),
    el("dd", {}, typeof rec.prob_abnormal === "number" ? pct(rec.prob_abnormal) + " (threshold " + pct(threshold) + ")" : "n/a"),
    el("dt", {}, "Body part"), el("dd", { class: "body-part" }, bodyPartText(rec)));
  const boxes = rec.boxes || [];
  if (boxes.length) facts.append(el("dt", {}, "Boxes"), el("dd", {}, plural(boxes.length, "box", "boxes") + ", best score " + boxes[0].score.toFixed(2)));
  const body = el("div", { class: "body" }, el("p", { class: "fname" }, rec.path), verdictBadge(state));
  if (state.detail) body.append(el("span", { class: "state-detail" }, " " + state.detail));
  body.append(facts);
  if (typeof rec.prob_abnormal === "number") body.append(probBar(rec.prob_abnormal, threshold));
  const note = el("p", { class: "note heatmap-note" });
  note.dataset.heatmap = rec.heatmap_gray_png ? heatmapName || "heatmap" : "";
  body.append(note);
  if (rec.truncated) body.append(el("p", { class: "note" }, "This file ends early; the part that was there was read."));
  const view = el("button", { type: "button", class: "secondary view", "aria-pressed": "false" }, multi ? "Show image " + (index + 1) : "Show image");
  view.addEventListener("click", () => showImage(index));
  body.append(view);
  return el("article", { class: "result", "data-state": state.key, "data-abnormal": String(!!rec.abnormal) }, body);
}

function renderProblem(p) {
  return el("article", { class: "result", "data-state": "cannot" },
    el("div", { class: "body" }, el("p", { class: "fname" }, p.file), verdictBadge({ key: "cannot", word: "Cannot assess" }),
      el("p", { class: "note" }, p.reason)));
}

function updateHeatmapNotes() {
  const on = $("show-heatmap").checked && $("show-overlay").checked;
  for (const note of document.querySelectorAll(".heatmap-note")) {
    if (note.dataset.heatmap) note.textContent = on ? "Heatmap: " + note.dataset.heatmap + " (shown on the image)." : "Heatmap hidden.";
    else note.textContent = model && !model.heatmap ? "No heatmap: " + model.heatmap_note + "." : "";
  }
}

// ------------------------------------------------------------------ the viewer

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("cannot load image"));
    img.src = src;
  });
}

function pixelsOf(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, c.width, c.height);
}

// 256 colours from low (dark blue) to high (yellow-red), a jet-like map as in the CLI's overlays.
const HEAT_LUT = (() => {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const v = i / 255;
    const r = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 3)));
    const g = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 2)));
    const b = Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - 1)));
    lut.set([r * 255, g * 255, b * 255], i * 3);
  }
  return lut;
})();

function drawLegend() {
  const c = $("legend-bar");
  const ctx = c.getContext("2d");
  for (let i = 0; i < 256; i++) {
    ctx.fillStyle = "rgb(" + HEAT_LUT[i * 3] + "," + HEAT_LUT[i * 3 + 1] + "," + HEAT_LUT[i * 3 + 2] + ")";
    ctx.fillRect(i, 0, 1, c.height);
  }
}

async function showImage(index) {
  const rec = lastResult && lastResult.images[index];
  if (!rec || !rec.original_png) return;
  const seq = requestSeq;
  const img = await loadImage("data:image/png;base64," + rec.original_png);
  let heat = null;
  if (rec.heatmap_gray_png) heat = pixelsOf(await loadImage("data:image/png;base64," + rec.heatmap_gray_png));
  if (seq !== requestSeq) return;
  const gray = pixelsOf(img);
  const w = gray.width, h = gray.height;
  const values = new Uint8Array(w * h);
  for (let i = 0; i < values.length; i++) values[i] = gray.data[i * 4];
  viewer = { index, rec, w, h, values, heat, wc: 128, ww: 256, out: null };
  for (const c of [$("base"), $("overlay")]) { c.width = w; c.height = h; }
  viewer.out = $("base").getContext("2d").createImageData(w, h);
  $("viewer").hidden = false;
  $("viewer-title").textContent = "Image " + (index + 1) + ": " + rec.path + " (" + w + " \u00d7 " + h + " px)";
  $("base").setAttribute("aria-label", "Radiograph " + rec.path);
  for (const b of document.querySelectorAll("button.view")) b.setAttribute("aria-pressed", "false");
  const btn = document.querySelectorAll("button.view")[index];
  if (btn) btn.setAttribute("aria-pressed", "true");
  $("legend").hidden = !heat;
  $("legend-title").textContent = "Heatmap (" + (lastResult.heatmap || "") + "):";
  $("legend-note").textContent = model ? model.heatmap_note : "";
  fillPresets();
  drawBase();
  drawOverlay();
  fit();
}

function fillPresets() {
  // The image arrives after the file's own display transform (DICOM: its VOI LUT or window), so
  // "as stored" is the file's window; the others narrow it around bone-bright or dark values.
  const presets = [["file", "As in the file", 128, 256], ["contrast", "Higher contrast", 128, 160],
                   ["bright", "Bright (bone)", 180, 150], ["dark", "Dark (soft tissue)", 70, 150]];
  const sel = $("wl-preset");
  sel.replaceChildren(...presets.map(([v, label, c, w]) => {
    const o = el("option", { value: v }, label);
    o.dataset.c = c; o.dataset.w = w;
    return o;
  }));
}

function setWindow(wc, ww) {
  if (!viewer) return;
  viewer.wc = Math.max(0, Math.min(255, wc));
  viewer.ww = Math.max(2, Math.min(512, ww));
  scheduleBase();
}

let basePending = false;
function scheduleBase() {
  if (basePending) return;
  basePending = true;
  requestAnimationFrame(() => { basePending = false; drawBase(); });
}

function drawBase() {
  if (!viewer) return;
  const { values, out, wc, ww } = viewer;
  const lut = new Uint8ClampedArray(256);
  const lo = wc - ww / 2;
  // 256 levels over the window width: the file window (L 128, W 256) is the identity.
  for (let v = 0; v < 256; v++) lut[v] = Math.floor(((v - lo) / ww) * 256);
  const d = out.data;
  for (let i = 0, j = 0; i < values.length; i++, j += 4) {
    const g = lut[values[i]];
    d[j] = g; d[j + 1] = g; d[j + 2] = g; d[j + 3] = 255;
  }
  $("base").getContext("2d").putImageData(out, 0, 0);
  $("wl-readout").textContent = "W " + Math.round(ww) + " / L " + Math.round(wc);
}

function drawOverlay() {
  const c = $("overlay");
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!viewer || !$("show-overlay").checked) return;
  const { heat, rec, w, h } = viewer;
  if (heat && $("show-heatmap").checked) {
    const opacity = $("opacity").value / 100;
    const small = document.createElement("canvas");
    small.width = heat.width; small.height = heat.height;
    const sctx = small.getContext("2d");
    const img = sctx.createImageData(heat.width, heat.height);
    for (let i = 0; i < heat.width * heat.height; i++) {
      const v = heat.data[i * 4];
      img.data[i * 4] = HEAT_LUT[v * 3];
      img.data[i * 4 + 1] = HEAT_LUT[v * 3 + 1];
      img.data[i * 4 + 2] = HEAT_LUT[v * 3 + 2];
      img.data[i * 4 + 3] = 255 * opacity * (0.25 + 0.75 * v / 255);  // cold regions keep the image visible
    }
    sctx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(small, 0, 0, w, h);  // the map covers exactly the image: padding was cut off by the server
  }
  if ($("show-boxes").checked) {
    const line = Math.max(2, Math.round(Math.max(w, h) / 300));
    ctx.font = Math.max(12, line * 7) + "px sans-serif";
    ctx.textBaseline = "bottom";
    for (const b of rec.boxes || []) {
      ctx.lineWidth = line * 2;
      ctx.strokeStyle = "rgba(0,0,0,0.8)";  // a dark rim keeps the box visible on bright bone
      ctx.strokeRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
      ctx.lineWidth = line;
      ctx.strokeStyle = BOX_COLOUR;
      ctx.strokeRect(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0);
      ctx.fillStyle = BOX_COLOUR;
      ctx.fillText(b.score.toFixed(2), b.x0, Math.max(b.y0 - line, line * 8));
    }
  }
}

function fit() {
  if (!viewer) return;
  const vp = $("viewport");
  const s = Math.min(vp.clientWidth / viewer.w, vp.clientHeight / viewer.h);
  const stage = $("stage");
  stage.style.width = viewer.w * s + "px";
  stage.style.height = viewer.h * s + "px";
  viewer.fitScale = s;
  if (panzoom) panzoom.reset({ animate: false });
}

function oneToOne() {
  if (viewer && panzoom) panzoom.zoom(1 / viewer.fitScale, { animate: false });
}

function setupViewer() {
  const vp = $("viewport");
  const stage = $("stage");
  if (window.Panzoom) {
    panzoom = window.Panzoom(stage, { canvas: true, maxScale: 40, minScale: 0.25, step: 0.25, animate: false });
    vp.addEventListener("wheel", (e) => panzoom.zoomWithWheel(e));
  } else {
    showError("The zoom library did not load; the image is shown without zoom.");
  }
  $("zoom-in").addEventListener("click", () => panzoom && panzoom.zoomIn({ animate: false }));
  $("zoom-out").addEventListener("click", () => panzoom && panzoom.zoomOut({ animate: false }));
  $("zoom-fit").addEventListener("click", fit);
  $("zoom-1").addEventListener("click", oneToOne);
  for (const r of document.querySelectorAll("input[name=mode]")) {
    r.addEventListener("change", () => {
      const wl = document.querySelector("input[name=mode]:checked").value === "wl";
      vp.classList.toggle("wl", wl);
      if (panzoom) panzoom.setOptions({ disablePan: wl });
    });
  }
  // Window/level by dragging: right/left changes the width, up/down the level (as in PACS viewers).
  let drag = null;
  vp.addEventListener("pointerdown", (e) => {
    if (!viewer || !vp.classList.contains("wl")) return;
    drag = { x: e.clientX, y: e.clientY, wc: viewer.wc, ww: viewer.ww };
    vp.setPointerCapture(e.pointerId);
  });
  vp.addEventListener("pointermove", (e) => {
    if (!drag) return;
    setWindow(drag.wc - (e.clientY - drag.y) * 0.5, drag.ww + (e.clientX - drag.x) * 0.5);
  });
  const end = () => { drag = null; };
  vp.addEventListener("pointerup", end);
  vp.addEventListener("pointercancel", end);
  vp.addEventListener("keydown", (e) => {
    if (!viewer) return;
    const wl = vp.classList.contains("wl");
    const step = 20;
    const keys = {
      "+": () => panzoom && panzoom.zoomIn({ animate: false }), "=": () => panzoom && panzoom.zoomIn({ animate: false }),
      "-": () => panzoom && panzoom.zoomOut({ animate: false }), "0": fit, "1": oneToOne,
      ArrowLeft: () => (wl ? setWindow(viewer.wc, viewer.ww - 8) : panzoom && panzoom.pan(step, 0, { relative: true, animate: false })),
      ArrowRight: () => (wl ? setWindow(viewer.wc, viewer.ww + 8) : panzoom && panzoom.pan(-step, 0, { relative: true, animate: false })),
      ArrowUp: () => (wl ? setWindow(viewer.wc + 4, viewer.ww) : panzoom && panzoom.pan(0, step, { relative: true, animate: false })),
      ArrowDown: () => (wl ? setWindow(viewer.wc - 4, viewer.ww) : panzoom && panzoom.pan(0, -step, { relative: true, animate: false })),
    };
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
  $("wl-preset").addEventListener("change", () => {
    const o = $("wl-preset").selectedOptions[0];
    setWindow(Number(o.dataset.c), Number(o.dataset.w));
  });
  $("wl-reset").addEventListener("click", () => { $("wl-preset").value = "file"; setWindow(128, 256); });
  for (const id of ["show-overlay", "show-heatmap", "show-boxes"]) {
    $(id).addEventListener("change", () => { drawOverlay(); updateHeatmapNotes(); });
  }
  $("opacity").addEventListener("input", drawOverlay);
  window.addEventListener("resize", () => viewer && fit());
  drawLegend();
}

// ------------------------------------------------------------------ take it away

function stripPictures(result) {
  return JSON.parse(JSON.stringify(result, (k, v) => (k.endsWith("_png") ? undefined : v)));
}

function composite(maxSide) {
  // The image as shown (current window/level) with the overlays, at original resolution or smaller.
  const s = Math.min(1, (maxSide || Infinity) / Math.max(viewer.w, viewer.h));
  const c = document.createElement("canvas");
  c.width = Math.round(viewer.w * s);
  c.height = Math.round(viewer.h * s);
  const ctx = c.getContext("2d");
  ctx.drawImage($("base"), 0, 0, c.width, c.height);
  ctx.drawImage($("overlay"), 0, 0, c.width, c.height);
  return c;
}

function stem(name) { return name.replace(/\.[^.]*$/, "") || "image"; }

function downloadJson() {
  if (!lastResult) return;
  const out = { model: model, result: stripPictures(lastResult), downloaded: new Date().toISOString() };
  download("bonexray-result.json", new Blob([JSON.stringify(out, null, 2)], { type: "application/json" }));
}

function downloadPng() {
  if (!viewer) return;
  composite().toBlob((blob) => download(stem(viewer.rec.path) + "-overlay.png", blob), "image/png");
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function reportHtml() {
  // A standalone page (no script) that prints on one sheet: image with overlays, verdicts, boxes,
  // model card summary, date and the disclaimer.
  const r = lastResult, t = r.threshold;
  const rec = viewer.rec;
  const state = stateOf(rec, t);
  const rows = (pairs) => pairs.map(([k, v]) => "<tr><th>" + esc(k) + "</th><td>" + esc(v) + "</td></tr>").join("");
  const studies = (r.studies || [r.study]).map((s) => {
    const st = stateOf(s, t);
    return "<li>" + esc((s.n_images === 1 ? "1 image" : "Study of " + s.n_images + " images") + ": " + st.word
      + ", mean p(abnormal) " + pct(s.prob_abnormal) + ", body part " + (s.body_part || "n/a")) + "</li>";
  }).join("");
  const boxes = (rec.boxes || []).map((b) => "<li>" + esc("x " + Math.round(b.x0) + "\u2013" + Math.round(b.x1) + ", y "
    + Math.round(b.y0) + "\u2013" + Math.round(b.y1) + " px, score " + b.score.toFixed(2)) + "</li>").join("") || "<li>none</li>";
  return "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bonexray report: " + esc(rec.path) + "</title>"
    + "<style>body{font:11pt/1.4 system-ui,sans-serif;color:#111;margin:16px}h1{font-size:15pt;margin:0 0 4px}"
    + ".grid{display:grid;grid-template-columns:1fr 1fr;gap:14px}img{max-width:100%;max-height:150mm;border:1px solid #999}"
    + "table{border-collapse:collapse}th{text-align:left;padding:2px 10px 2px 0;vertical-align:top;color:#444}td{padding:2px 0}"
    + ".notice{border-left:4px solid #b7791f;padding:6px 10px;background:#fdf6e7}.verdict{font-weight:700;font-size:13pt}"
    + "@page{size:A4;margin:12mm}@media print{body{margin:0}.grid{break-inside:avoid}}</style></head><body>"
    + "<h1>bonexray report</h1><p>" + esc(new Date().toLocaleString("en-GB")) + " &middot; " + esc(rec.path) + "</p>"
    + "<p class=\"notice\">" + esc(model ? model.intended_use : "") + "</p>"
    + "<div class=\"grid\"><div><img alt=\"" + esc("Radiograph " + rec.path + " with overlays") + "\" src=\"" + composite(1400).toDataURL("image/png") + "\"></div><div>"
    + "<p class=\"verdict\">" + esc(state.word + (state.detail ? " (" + state.detail + ")" : "")) + "</p><table>"
    + rows([["p(abnormal)", pct(rec.prob_abnormal) + " (threshold " + pct(t) + ")"], ["Body part", bodyPartText(rec)],
            ["Heatmap", r.heatmap || "none"]])
    + "</table><h2 style=\"font-size:12pt\">Boxes</h2><ul>" + boxes + "</ul>"
    + "<h2 style=\"font-size:12pt\">Studies</h2><ul>" + studies + "</ul>"
    + "<h2 style=\"font-size:12pt\">Model</h2><table>"
    + (model ? rows([["Trained on", trainingText(model.training_data)], ["Test result", evaluationText(model.evaluation)],
                     ["Threshold", model.threshold.toFixed(3) + ": " + model.threshold_source],
                     ["Model", model.model_file + ", " + model.backbone + ", bonexray " + model.version]]) : "")
    + "</table></div></div></body></html>";
}

function downloadReport() {
  if (!viewer) return;
  download("bonexray-report-" + stem(viewer.rec.path) + ".html", new Blob([reportHtml()], { type: "text/html" }));
}

// ------------------------------------------------------------------ start

function init() {
  const input = $("file-input");
  input.addEventListener("change", () => { predict(Array.from(input.files)); input.value = ""; });
  // Drops are caught anywhere on the page: a missed drop zone would make the browser open the file.
  const drop = $("drop");
  document.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) drop.classList.remove("over"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) predict(Array.from(e.dataTransfer.files));
  });
  $("cancel").addEventListener("click", () => {
    cancelCurrent();
    requestSeq++;
    setBusy(false);
    $("status").textContent = "Cancelled.";
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value);
    $("key-input").value = "";
    showError("");
    loadModel();
  });
  $("download-json").addEventListener("click", downloadJson);
  $("download-png").addEventListener("click", downloadPng);
  $("download-report").addEventListener("click", downloadReport);
  setupViewer();
  loadModel();
}

init();
