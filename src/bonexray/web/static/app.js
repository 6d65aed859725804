"use strict";
// The bonexray page: send the chosen images to /api/predict?heatmap=1 and show what comes back.
// The page renders what the server decides (finding, verdict, borderline, scope) and decides nothing
// itself. Each radiograph is drawn at its own resolution on a canvas (window/level is a lookup table
// over its pixels; for an uncompressed DICOM over its stored values, read here with dicom-parser);
// pan/zoom/rotate/flip is one transform shared by the side-by-side views; boxes, labels, reference
// boxes and the ruler are drawn in screen space (SVG) so their lines keep one width at any zoom.
// Text from the server is only ever set with textContent.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "bonexray-api-key";
const LOW_PART_CONFIDENCE = 0.6; // body part probability below this gets a low-confidence note (display only)
const BOX_COLOUR = "#ffd400";
const REF_COLOUR = "#35e0ff";
const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_VIEWS = 4;

let model = null;
let lastResult = null;   // the last response (JSON)
let notSent = [];        // files the page did not send, with the reason
let sentFiles = {};      // name -> File of what was sent (DICOM headers and stored values are read from it)
let refBoxes = {};       // image name -> [{x0, y0, x1, y1, label}] from a dropped COCO or YOLO file
let refSource = "";
let current = null;      // { xhr } of the request in flight
let requestSeq = 0;      // answers to anything but the latest request are dropped
let views = [];          // the views on show (see showImage)
let activeIndex = 0;     // the image of the first view
// One transform for all views (linked zoom): zoom relative to fit, the image point at the view's centre
// (as a fraction of its size), rotation and flips.
const tf = { z: 1, cx: 0.5, cy: 0.5, rot: 0, fx: 1, fy: 1 };
let invert = false;
let boxThreshold = 0;

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

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

const pct = (p) => (100 * p).toFixed(1) + "%";
const num = (p) => (typeof p === "number" && isFinite(p) ? pct(p) : "n/a");
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

// ------------------------------------------------------------------ what the server decided

// Out of scope (or no verdict from the server) means nothing to read: no probability, bar, heatmap or boxes.
function readable(rec) {
  return rec.in_scope !== false && typeof rec.prob_abnormal === "number" && isFinite(rec.prob_abnormal)
    && !(("finding" in rec) && rec.finding === null);
}

const FINDING_WORDS = { negative: "Negative", suspicious: "Suspicious", positive: "Positive" };

// The server's words for one image: its finding when it sends one, else its verdict and confidence.
function stateOf(rec) {
  if (rec.in_scope === false) {
    return { key: "cannot", word: "Cannot assess", detail: rec.scope_reason || "outside what this model knows" };
  }
  if (rec.finding && FINDING_WORDS[rec.finding]) return { key: rec.finding, word: FINDING_WORDS[rec.finding], detail: "" };
  if (("finding" in rec && rec.finding === null) || typeof rec.abnormal !== "boolean") {
    return { key: "cannot", word: "Cannot assess", detail: rec.scope_reason || "the server gave no verdict" };
  }
  if (rec.confidence === "borderline") {
    return { key: "borderline", word: "Borderline", detail: "near the threshold (the server's band), leaning " + (rec.abnormal ? "abnormal" : "normal") };
  }
  return rec.abnormal ? { key: "abnormal", word: "Abnormal", detail: "" } : { key: "normal", word: "Normal", detail: "" };
}

function imagesOf(study) {
  return lastResult ? lastResult.images.filter((r) => r.study === study.study) : [];
}

// A study's headline: counts the server's own per-image answers, never a mean.
function studyCounts(study, images) {
  const n = typeof study.n_images === "number" ? study.n_images : images.length;
  const oos = typeof study.n_out_of_scope === "number" ? study.n_out_of_scope : images.filter((r) => r.in_scope === false).length;
  let text;
  if (typeof study.n_positive === "number") {
    text = study.n_positive + " of " + plural(n, "image", "images") + " positive, " + (study.n_suspicious || 0) + " suspicious, "
      + (study.n_negative || 0) + " negative";
  } else {
    const abn = images.filter((r) => r.in_scope !== false && r.abnormal === true).length;
    text = abn + " of " + plural(n, "image", "images") + " abnormal";
  }
  if (oos > 0) text += "; " + oos + " could not be assessed";
  return text;
}

function bodyPartsOf(study, images) {
  if (Array.isArray(study.body_parts)) return { parts: study.body_parts, mixed: !!study.mixed_body_parts };
  const parts = [...new Set(images.filter((r) => r.in_scope !== false && r.body_part).map((r) => r.body_part))];
  return { parts, mixed: parts.length > 1 };
}

function studyState(study) {
  if (study.finding && FINDING_WORDS[study.finding]) return { key: study.finding, word: FINDING_WORDS[study.finding] };
  if (study.in_scope === false) return { key: "cannot", word: "Cannot assess" };
  return null;  // the server gave no study finding: the counts say it
}

function bodyPartText(rec) {
  if (!rec.body_part || rec.in_scope === false) return "not assessed";
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

function imageLine(rec, t) {
  const state = stateOf(rec);
  let line = rec.path + ": " + state.word + (state.detail ? " (" + state.detail + ")" : "");
  if (readable(rec)) line += ", p(abnormal) " + pct(rec.prob_abnormal) + " (threshold " + pct(t) + "), body part " + bodyPartText(rec);
  return line;
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

// The card's box operating point, when the server sends it (else the lowest box it reported).
function cardBoxThreshold() {
  if (!model) return null;
  if (typeof model.box_threshold === "number") return model.box_threshold;
  if (model.boxes && typeof model.boxes.threshold === "number") return model.boxes.threshold;
  return null;
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

// ------------------------------------------------------------------ reference boxes (COCO / YOLO)

const isReference = (f) => /\.(json|txt)$/i.test(f.name);
const stemOf = (name) => name.replace(/^.*[\\/]/, "").replace(/\.[^.]*$/, "");

async function readReferences(files) {
  // COCO: {images: [{id, file_name}], annotations: [{image_id, bbox: [x, y, w, h]}]} in pixels.
  // YOLO: IMAGE_STEM.txt, one "class cx cy w h" line per box, as fractions of the image size.
  const out = { coco: {}, yolo: {}, problems: [] };
  for (const f of files) {
    const text = await f.text();
    if (/\.json$/i.test(f.name)) {
      try {
        const coco = JSON.parse(text);
        const names = {};
        for (const im of coco.images || []) names[im.id] = String(im.file_name || "").replace(/^.*[\\/]/, "");
        for (const a of coco.annotations || []) {
          const name = names[a.image_id];
          const b = a.bbox;
          if (!name || !Array.isArray(b) || b.length !== 4) continue;
          (out.coco[name] = out.coco[name] || []).push({ x0: b[0], y0: b[1], x1: b[0] + b[2], y1: b[1] + b[3] });
        }
      } catch (e) {
        out.problems.push({ file: f.name, reason: "not sent: not a COCO JSON file (" + e.message + ")" });
      }
    } else {
      const rows = text.split(/\r?\n/).map((l) => l.trim().split(/\s+/).map(Number)).filter((r) => r.length >= 5 && r.every(isFinite));
      if (rows.length) out.yolo[stemOf(f.name)] = rows.map((r) => ({ cx: r[1], cy: r[2], w: r[3], h: r[4] }));
      else out.problems.push({ file: f.name, reason: "not sent: no YOLO box lines (class cx cy w h) in it" });
    }
  }
  return out;
}

function attachReferences(refs, result) {
  refBoxes = {};
  let n = 0;
  for (const rec of result.images) {
    const list = [];
    for (const b of refs.coco[rec.path] || []) list.push(b);
    const w = rec.original_width, h = rec.original_height;
    for (const y of refs.yolo[stemOf(rec.path)] || []) {
      if (!w || !h) continue;
      list.push({ x0: (y.cx - y.w / 2) * w, y0: (y.cy - y.h / 2) * h, x1: (y.cx + y.w / 2) * w, y1: (y.cy + y.h / 2) * h });
    }
    if (list.length) { refBoxes[rec.path] = list; n += list.length; }
  }
  refSource = n ? plural(n, "reference box", "reference boxes") + " for " + plural(Object.keys(refBoxes).length, "image", "images") : "";
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
  // Aborting closes the connection: the server sees the client leave and stops this request's work.
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

function clearResults() {
  $("reading").hidden = true;
  $("results").replaceChildren();
  $("studies").replaceChildren();
  $("views").replaceChildren();
  views = [];
  lastResult = null;
}

async function predict(all) {
  if (!all.length) return;
  cancelCurrent();  // a later drop replaces the request in flight (and stops its server work)
  const seq = ++requestSeq;
  const refsFiles = all.filter(isReference);
  const files = all.filter((f) => !isReference(f));
  const refs = await readReferences(refsFiles);
  const { send, refused } = checkLimits(files);
  showError("");
  notSent = refused.concat(refs.problems);
  showFileErrors(notSent);
  clearResults();
  $("restored").hidden = true;
  if (!send.length) {
    $("status").textContent = files.length ? "Nothing was sent: every file is over the limits." : "No image among the files.";
    return;
  }
  const one = $("group-one").checked;
  const form = new FormData();
  form.append("grouping", one ? "one" : "auto");
  for (const f of send) form.append("files", f, f.name);
  sentFiles = Object.fromEntries(send.map((f) => [f.name, f]));
  const what = plural(send.length, "image", "images");
  $("status").textContent = "Uploading " + what + "\u2026";
  $("progress").removeAttribute("value");
  setBusy(true);
  const req = post("/api/predict?heatmap=1", form, (fraction) => {
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
    if (body && body.errors) showFileErrors(notSent.concat(body.errors));
    return;
  }
  attachReferences(refs, body);
  lastResult = body;
  render(body, body.errors || [], false);
  saveResult(body, send.concat(refsFiles));
}

// ------------------------------------------------------------------ kept across reloads (this browser only)

function openStore() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open("bonexray", 1);
    req.onupgradeneeded = () => req.result.createObjectStore("results");
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function storeDo(mode, fn) {
  try {
    const db = await openStore();
    return await new Promise((resolve, reject) => {
      const tx = db.transaction("results", mode);
      const req = fn(tx.objectStore("results"));
      tx.oncomplete = () => resolve(req && req.result);
      tx.onerror = () => reject(tx.error);
    });
  } catch (e) {
    return null;  // a browser without storage (private mode) just does not keep results
  }
}

function saveResult(result, files) {
  const entry = { result, notSent, files, saved: new Date().toISOString() };
  return storeDo("readwrite", (s) => s.put(entry, "last"));
}

async function restoreResult() {
  const entry = await storeDo("readonly", (s) => s.get("last"));
  if (!entry || !entry.result || lastResult || current) return;
  notSent = entry.notSent || [];
  const files = entry.files || [];
  sentFiles = Object.fromEntries(files.filter((f) => !isReference(f)).map((f) => [f.name, f]));
  attachReferences(await readReferences(files.filter(isReference)), entry.result);
  lastResult = entry.result;
  $("restored").textContent = "Restored from this browser: the results of " + new Date(entry.saved).toLocaleString("en-GB") + ".";
  $("restored").hidden = false;
  render(entry.result, entry.result.errors || [], true);
}

async function forgetResults() {
  await storeDo("readwrite", (s) => s.delete("last"));
  clearResults();
  notSent = [];
  showFileErrors([]);
  showError("");
  $("status").textContent = "The results were removed from this browser.";
}

// ------------------------------------------------------------------ results

function render(result, problems, restored) {
  const t = result.threshold;
  const all = notSent.concat(problems);
  showFileErrors(all);
  const nBad = problems.length + notSent.length;
  if (nBad) showError(plural(nBad, "file was", "files were") + " not analysed (named below); the others were.");
  const studies = result.studies || [result.study];
  const multi = result.images.length > 1;
  const lines = [];
  const box = $("studies");
  box.replaceChildren();
  for (const study of studies) {
    const images = imagesOf(study);
    const line = el("div", { class: "study-line" });
    if (images.length === 1 && (study.n_images || 1) === 1) {
      const rec = images[0];
      const state = stateOf(rec);
      line.dataset.state = state.key;
      line.append(el("h3", {}, rec.path), verdictBadge(state));
      if (readable(rec)) {
        line.append(el("span", {}, "p(abnormal) " + pct(rec.prob_abnormal) + " (threshold " + pct(t) + ")"),
          el("span", {}, "body part " + bodyPartText(rec)));
      }
      if (state.detail) line.append(el("span", { class: "note" }, state.detail));
      lines.push(imageLine(rec, t));
    } else {
      const state = studyState(study);
      line.dataset.state = state ? state.key : "counts";
      const counts = studyCounts(study, images);
      const bp = bodyPartsOf(study, images);
      line.append(el("h3", {}, "Study of " + plural(study.n_images || images.length, "image", "images")));
      if (state) line.append(verdictBadge(state));
      line.append(el("span", { class: "counts" }, counts));
      if (bp.parts.length) line.append(el("span", {}, "body " + (bp.parts.length > 1 ? "parts " : "part ") + bp.parts.join(", ")));
      if (bp.mixed) line.append(el("span", { class: "flag" }, "Mixed body parts in one study: check the grouping"));
      lines.push("Study of " + plural(study.n_images || images.length, "image", "images") + ": " + (state ? state.word + ", " : "") + counts
        + (bp.mixed ? " (mixed body parts: " + bp.parts.join(", ") + ")" : ""));
    }
    box.append(line);
  }
  const frag = document.createDocumentFragment();
  result.images.forEach((rec, i) => frag.append(renderCard(rec, i, t, result.heatmap, multi)));
  for (const p of problems) frag.append(renderProblem(p, "cannot", "Cannot read"));
  for (const p of notSent) frag.append(renderProblem(p, "not-sent", "Not sent"));
  $("results").replaceChildren(frag);
  $("reading").hidden = false;
  // The verdicts are announced (role=status); the image is brought into view.
  $("status").textContent = (restored ? "Restored: " : "Done: ") + plural(result.images.length, "image", "images") + ". " + lines.join(". ") + ".";
  updateHeatmapNotes();
  if (result.images.length) showImage(0, true);
}

function renderCard(rec, index, threshold, heatmapName, multi) {
  const state = stateOf(rec);
  const canRead = readable(rec);
  const facts = el("dl", { class: "facts" },
    el("dt", {}, "p(abnormal)"),
    el("dd", {}, canRead ? pct(rec.prob_abnormal) + " (threshold " + pct(threshold) + ")" : "n/a"),
    el("dt", {}, "Body part"), el("dd", { class: "body-part" }, bodyPartText(rec)));
  const boxes = canRead ? rec.boxes || [] : [];
  if (boxes.length) {
    const susp = boxes.filter((b) => b.level === "suspicious").length;
    facts.append(el("dt", {}, "Boxes"), el("dd", {}, plural(boxes.length, "box", "boxes") + ", best score " + boxes[0].score.toFixed(2)
      + (susp ? " (" + susp + " suspicious)" : "")));
  }
  const body = el("div", { class: "body" }, el("p", { class: "fname" }, rec.path), verdictBadge(state));
  if (state.detail) body.append(el("span", { class: "state-detail" }, " " + state.detail));
  body.append(facts);
  if (canRead) body.append(probBar(rec.prob_abnormal, threshold));
  const note = el("p", { class: "note heatmap-note" });
  note.dataset.heatmap = canRead && rec.heatmap_gray_png ? heatmapName || "heatmap" : "";
  body.append(note);
  if (rec.truncated) body.append(el("p", { class: "note" }, "This file ends early; the part that was there was read."));
  const thumb = el("img", { class: "thumb", alt: "", src: rec.original_png ? "data:image/png;base64," + rec.original_png : "data:," });
  const view = el("button", { type: "button", class: "secondary view", "aria-pressed": "false" }, thumb,
    multi ? "Show image " + (index + 1) : "Show image");
  view.addEventListener("click", () => showImage(index, true));
  return el("article", { class: "result", "data-state": state.key, "data-abnormal": String(rec.abnormal === true) }, view, body);
}

function renderProblem(p, key, word) {
  return el("article", { class: "result", "data-state": key },
    el("div", { class: "body" }, el("p", { class: "fname" }, p.file), verdictBadge({ key, word }),
      el("p", { class: "note" }, p.reason)));
}

function updateHeatmapNotes() {
  const on = $("show-heatmap").checked && $("show-overlay").checked;
  for (const note of document.querySelectorAll(".heatmap-note")) {
    if (note.dataset.heatmap) note.textContent = on ? "Heatmap: " + note.dataset.heatmap + " (shown on the image)." : "Heatmap hidden.";
    else note.textContent = model && !model.heatmap ? "No heatmap: " + model.heatmap_note + "." : "";
  }
}

// ------------------------------------------------------------------ DICOM read in the browser

const UNCOMPRESSED = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"];

function dicomInfo(buffer) {
  // Header facts and, for an uncompressed little-endian file, the stored values as modality values.
  if (!window.dicomParser) return null;
  let ds;
  try {
    ds = dicomParser.parseDicom(new Uint8Array(buffer));
  } catch (e) {
    return null;
  }
  const str = (tag) => { try { const v = ds.string(tag); return v === undefined ? null : v.trim(); } catch (e) { return null; } };
  const nums = (tag) => { const v = str(tag); return v ? v.split("\\").map(Number).filter(isFinite) : []; };
  const info = {
    modality: str("x00080060"), bodyPart: str("x00180015"), view: str("x00185101"),
    laterality: str("x00200060") || str("x00200062"), orientation: str("x00200020"),
    photometric: str("x00280004"), rows: ds.uint16("x00280010"), cols: ds.uint16("x00280011"),
    bitsStored: ds.uint16("x00280101"), bitsAllocated: ds.uint16("x00280100"), signed: ds.uint16("x00280103") === 1,
    slope: nums("x00281053")[0] || 1, intercept: nums("x00281052")[0] || 0,
    centers: nums("x00281050"), widths: nums("x00281051"), explanations: (str("x00281055") || "").split("\\"),
    pixelSpacing: nums("x00280030"), imagerSpacing: nums("x00181164"), manufacturer: str("x00080070"),
    studyDate: str("x00080020"), transfer: str("x00020010"), frames: Number(str("x00280008") || 1),
    samples: ds.uint16("x00280002") || 1, values: null, why: "",
  };
  const px = ds.elements.x7fe00010;
  if (!px) info.why = "no pixel data";
  else if (!UNCOMPRESSED.includes(info.transfer)) info.why = "its pixels are compressed (" + info.transfer + "), which this page does not decode";
  else if (info.samples !== 1 || info.frames !== 1 || ![8, 16].includes(info.bitsAllocated)) info.why = "not a single-frame grayscale image";
  else {
    const n = info.rows * info.cols;
    const bytes = new Uint8Array(buffer, 0);
    const stored = info.bitsAllocated === 16
      ? (info.signed ? new Int16Array(bytes.slice(px.dataOffset, px.dataOffset + 2 * n).buffer)
        : new Uint16Array(bytes.slice(px.dataOffset, px.dataOffset + 2 * n).buffer))
      : (info.signed ? new Int8Array(bytes.slice(px.dataOffset, px.dataOffset + n).buffer) : bytes.slice(px.dataOffset, px.dataOffset + n));
    const shift = 32 - (info.bitsStored || info.bitsAllocated);
    const values = new Float32Array(n);
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < n; i++) {
      // Only the stored bits count (the rest of the word may hold overlays).
      let v = info.signed ? ((stored[i] << shift) >> shift) : ((stored[i] << shift) >>> shift);
      v = v * info.slope + info.intercept;
      values[i] = v;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    info.values = values; info.min = lo; info.max = hi;
  }
  return info;
}

// ------------------------------------------------------------------ the views

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

function makePane(k) {
  // The first view keeps the ids the tests and the print style know (viewport, stage, base, overlay).
  const sfx = k === 0 ? "" : "-" + (k + 1);
  const base = el("canvas", { id: "base" + sfx, class: "layer", role: "img" });
  const heat = el("canvas", { id: "overlay" + sfx, class: "layer", "aria-hidden": "true" });
  const stage = el("div", { id: "stage" + sfx, class: "stage" }, base, heat);
  const marks = svg("svg", { class: "marks", "aria-hidden": "true" });
  const corner = el("div", { class: "corner" });
  const vp = el("div", { id: "viewport" + sfx, class: "viewport", tabindex: "0",
    "aria-label": "Radiograph. Plus and minus zoom, arrow keys pan (or change window and level in window/level mode), 0 fits, question mark lists every key." },
  stage, marks, corner);
  const pane = el("div", { class: "pane" }, vp);
  return { pane, vp, stage, base, heatCanvas: heat, marks, corner };
}

async function showImage(index, scroll) {
  const rec = lastResult && lastResult.images[index];
  if (!rec || !rec.original_png) return;
  activeIndex = index;
  const seq = requestSeq;
  let indices = [index];
  const study = lastResult.images.filter((r) => r.study === rec.study);
  const side = $("side-by-side");
  $("side-by-side-label").hidden = study.length < 2;
  if (side.checked && study.length > 1) {
    // The chosen image first, then the rest of its study, up to MAX_VIEWS side by side.
    const members = lastResult.images.map((r, i) => i).filter((i) => lastResult.images[i].study === rec.study);
    indices = [index].concat(members.filter((i) => i !== index)).slice(0, MAX_VIEWS);
  }
  const loaded = [];
  for (const i of indices) loaded.push(await loadView(i));
  if (seq !== requestSeq) return;
  const container = $("views");
  if (resizeWatch) resizeWatch.disconnect();
  container.replaceChildren();
  container.dataset.count = String(loaded.length);
  views = loaded.map((v, k) => {
    const pane = makePane(k);
    Object.assign(v, pane);
    container.append(pane.pane);
    for (const c of [v.base, v.heatCanvas]) { c.width = v.w; c.height = v.h; }
    v.out = v.base.getContext("2d").createImageData(v.w, v.h);
    v.base.setAttribute("aria-label", "Radiograph " + v.rec.path);
    bindPane(v);
    return v;
  });
  const v0 = views[0];
  $("viewer-title").textContent = "Image " + (index + 1) + ": " + rec.path + " (" + v0.w + " \u00d7 " + v0.h + " px)"
    + (views.length > 1 ? " and " + (views.length - 1) + " more of its study, side by side" : "");
  const state = stateOf(rec);
  $("viewer-verdict").replaceChildren(verdictBadge(state), " " + (readable(rec) ? "p(abnormal) " + pct(rec.prob_abnormal)
    + " \u00b7 body part " + bodyPartText(rec) : state.detail));
  for (const b of document.querySelectorAll("button.view")) b.setAttribute("aria-pressed", "false");
  for (const i of indices) {
    const btn = document.querySelectorAll("button.view")[i];
    if (btn) btn.setAttribute("aria-pressed", "true");
  }
  fillPresets(v0);
  showMeta(v0);
  setupBoxScore();
  resetView();
  for (const v of views) { drawBase(v); drawHeat(v); }
  updateLegend();
  if (scroll) $("reading").scrollIntoView({ block: "start" });
}

async function loadView(index) {
  const rec = lastResult.images[index];
  const img = await loadImage("data:image/png;base64," + rec.original_png);
  let heat = null;
  if (rec.heatmap_gray_png && readable(rec)) heat = pixelsOf(await loadImage("data:image/png;base64," + rec.heatmap_gray_png));
  const gray = pixelsOf(img);
  const w = gray.width, h = gray.height;
  const values8 = new Uint8Array(w * h);
  for (let i = 0; i < values8.length; i++) values8[i] = gray.data[i * 4];
  const v = { index, rec, w, h, values8, heat, dicom: null, raw: false, wc: 128, ww: 256, measure: null };
  const file = sentFiles[rec.path];
  if (file && window.dicomParser) {
    const head = new Uint8Array(await file.slice(128, 132).arrayBuffer());
    if (String.fromCharCode(...head) === "DICM") {
      const info = dicomInfo(await file.arrayBuffer());
      if (info) {
        v.dicom = info;
        if (info.values && info.rows === h && info.cols === w) {
          v.raw = true;
          const c = info.centers[0], ww = info.widths[0];
          if (isFinite(c) && ww > 0) { v.wc = c; v.ww = ww; } else { v.wc = (info.min + info.max) / 2; v.ww = Math.max(1, info.max - info.min); }
        } else if (info.values) {
          info.why = "its stored image size differs from the server's picture";
        }
      }
    }
  }
  return v;
}

function fillPresets(v) {
  const presets = [];
  if (v.raw) {
    const d = v.dicom;
    d.centers.forEach((c, i) => {
      const w = d.widths[i];
      if (isFinite(c) && w > 0) presets.push(["file" + i, "From the file" + (d.explanations[i] ? ": " + d.explanations[i] : "") + " (W " + w + " / L " + c + ")", c, w, true]);
    });
    presets.push(["full", "Full stored range (W " + Math.round(d.max - d.min) + " / L " + Math.round((d.max + d.min) / 2) + ")", (d.max + d.min) / 2, Math.max(1, d.max - d.min), true]);
    presets.push(["server", "As the server sent it (8-bit)", 128, 256, false]);
  } else {
    // The image arrives after the file's own display transform (DICOM: its VOI LUT or window), so
    // "as in the file" is the identity; the others narrow it around bone-bright or dark values.
    presets.push(["file", "As in the file", 128, 256, false], ["contrast", "Higher contrast", 128, 160, false],
      ["bright", "Bright (bone)", 180, 150, false], ["dark", "Dark (soft tissue)", 70, 150, false]);
  }
  const sel = $("wl-preset");
  sel.replaceChildren(...presets.map(([val, label, c, w, raw]) => {
    const o = el("option", { value: val }, label);
    o.dataset.c = c; o.dataset.w = w; o.dataset.raw = raw ? "1" : "";
    return o;
  }));
  const note = v.raw ? "Window/level on the file's stored values (" + (v.dicom.bitsStored || "?") + " bits)."
    : v.dicom ? "Window/level on the server's 8-bit picture: " + (v.dicom.why || "stored values unavailable") + "." : "";
  sel.title = note;
}

function showMeta(v) {
  const d = v.dicom;
  $("dicom-meta").hidden = !d;
  if (!d) return;
  const spacing = d.pixelSpacing.length === 2 ? d.pixelSpacing.join(" \u00d7 ") + " mm (PixelSpacing)"
    : d.imagerSpacing.length === 2 ? d.imagerSpacing.join(" \u00d7 ") + " mm at the detector (ImagerPixelSpacing)" : "not in the file";
  const rows = [["Modality", d.modality], ["Body part examined", d.bodyPart], ["View", d.view], ["Laterality", d.laterality],
    ["Patient orientation", d.orientation], ["Pixel spacing", spacing],
    ["Stored", (d.bitsStored || "?") + " of " + (d.bitsAllocated || "?") + " bits, " + (d.photometric || "?")],
    ["Window in the file", d.centers.length ? d.centers.map((c, i) => "W " + d.widths[i] + " / L " + c).join("; ") : "none"],
    ["Window/level uses", v.raw ? "the stored values" : "the server's 8-bit picture (" + (d.why || "no stored values") + ")"],
    ["Manufacturer", d.manufacturer], ["Study date", d.studyDate]];
  fillList($("dicom-meta-list"), rows.filter(([, val]) => val));
}

function setWindow(wc, ww) {
  for (const v of views) {
    // Linked: every view in the same units (stored values or 8-bit) takes the window.
    if (v.raw !== views[0].raw) continue;
    if (v.raw) { v.wc = wc; v.ww = Math.max(1, ww); } else { v.wc = Math.max(0, Math.min(255, wc)); v.ww = Math.max(2, Math.min(512, ww)); }
    scheduleBase(v);
  }
}

function scheduleBase(v) {
  if (v.pending) return;
  v.pending = true;
  requestAnimationFrame(() => { v.pending = false; drawBase(v); });
}

function drawBase(v) {
  const { out, wc, ww, w, h } = v;
  const d = out.data;
  const n = w * h;
  if (v.raw) {
    // The DICOM linear window (PS3.3 C.11.2.1.2) on modality values; MONOCHROME1 shows low values bright.
    const { values, min, max, photometric } = v.dicom;
    const span = Math.max(1, Math.ceil(max - min) + 1);
    const lut = new Uint8ClampedArray(span);
    const mono1 = photometric === "MONOCHROME1";
    for (let k = 0; k < span; k++) {
      const x = min + k;
      let y = ww <= 1 ? (x < wc - 0.5 ? 0 : 255) : ((x - (wc - 0.5)) / (ww - 1) + 0.5) * 255;
      y = Math.max(0, Math.min(255, y));
      if (mono1) y = 255 - y;
      lut[k] = invert ? 255 - y : y;
    }
    for (let i = 0, j = 0; i < n; i++, j += 4) {
      const g = lut[Math.round(values[i] - min)];
      d[j] = g; d[j + 1] = g; d[j + 2] = g; d[j + 3] = 255;
    }
  } else {
    const lut = new Uint8ClampedArray(256);
    const lo = wc - ww / 2;
    // 256 levels over the window width: the file window (L 128, W 256) is the identity.
    for (let x = 0; x < 256; x++) { const g = Math.floor(((x - lo) / ww) * 256); lut[x] = invert ? 255 - Math.max(0, Math.min(255, g)) : g; }
    const values = v.values8;
    for (let i = 0, j = 0; i < n; i++, j += 4) {
      const g = lut[values[i]];
      d[j] = g; d[j + 1] = g; d[j + 2] = g; d[j + 3] = 255;
    }
  }
  v.base.getContext("2d").putImageData(out, 0, 0);
  if (v === views[0]) $("wl-readout").textContent = "W " + Math.round(ww) + " / L " + Math.round(wc) + (v.raw ? " (stored values)" : "");
}

function drawHeat(v) {
  const c = v.heatCanvas;
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const { heat, w, h } = v;
  if (!heat || !readable(v.rec) || !$("show-overlay").checked || !$("show-heatmap").checked) return;
  const opacity = $("opacity").value / 100;
  const small = document.createElement("canvas");
  small.width = heat.width; small.height = heat.height;
  const sctx = small.getContext("2d");
  const img = sctx.createImageData(heat.width, heat.height);
  for (let i = 0; i < heat.width * heat.height; i++) {
    const val = heat.data[i * 4];
    img.data[i * 4] = HEAT_LUT[val * 3];
    img.data[i * 4 + 1] = HEAT_LUT[val * 3 + 1];
    img.data[i * 4 + 2] = HEAT_LUT[val * 3 + 2];
    img.data[i * 4 + 3] = 255 * opacity * (0.25 + 0.75 * val / 255);  // cold regions keep the image visible
  }
  sctx.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, w, h);  // the map covers exactly the image: padding was cut off by the server
}

function updateLegend() {
  const v = views[0];
  const on = v && v.heat && readable(v.rec) && $("show-heatmap").checked && $("show-overlay").checked;
  $("legend").hidden = !on;
  $("legend-title").textContent = "Heatmap (" + ((lastResult && lastResult.heatmap) || "") + "):";
  $("legend-note").textContent = model ? model.heatmap_note : "";
}

// ------------------------------------------------------------------ one transform, every view

function fitScale(v) {
  const turned = tf.rot % 180 !== 0;
  const iw = turned ? v.h : v.w, ih = turned ? v.w : v.h;
  return Math.min(v.vp.clientWidth / iw, v.vp.clientHeight / ih) || 1;
}

// Image pixels -> viewport pixels: centre of the view, scale, rotation, flips, minus the centre point.
function matrixOf(v, withCentre) {
  const s = fitScale(v) * tf.z;
  let m = new DOMMatrix().translate(v.vp.clientWidth / 2, v.vp.clientHeight / 2).scale(s).rotate(tf.rot).scale(tf.fx, tf.fy);
  if (withCentre !== false) m = m.translate(-tf.cx * v.w, -tf.cy * v.h);
  return m;
}

function applyTransform() {
  for (const v of views) {
    v.m = matrixOf(v);
    v.stage.style.width = v.w + "px";
    v.stage.style.height = v.h + "px";
    v.stage.style.transform = v.m.toString();
    drawMarks(v);
  }
}

function resetView() {
  Object.assign(tf, { z: 1, cx: 0.5, cy: 0.5, rot: 0, fx: 1, fy: 1 });
  for (const id of ["flip-h", "flip-v"]) $(id).setAttribute("aria-pressed", "false");
  applyTransform();
}

function fit() { Object.assign(tf, { z: 1, cx: 0.5, cy: 0.5 }); applyTransform(); }

// Zoom by ``factor`` keeping the image point under viewport point (qx, qy) of view ``v`` where it is.
function zoomAt(v, qx, qy, factor) {
  const p = matrixOf(v).inverse().transformPoint(new DOMPoint(qx, qy));
  tf.z = Math.max(0.2, Math.min(60, tf.z * factor));
  const d = matrixOf(v, false).inverse().transformPoint(new DOMPoint(qx, qy));
  tf.cx = (p.x - d.x) / v.w;
  tf.cy = (p.y - d.y) / v.h;
  applyTransform();
}

function zoomBy(factor) {
  const v = views[0];
  if (v) zoomAt(v, v.vp.clientWidth / 2, v.vp.clientHeight / 2, factor);
}

function oneToOne() {
  const v = views[0];
  if (v) { tf.z = 1 / fitScale(v); applyTransform(); }
}

function panBy(v, dx, dy) {
  const c = matrixOf(v, false).inverse();
  const a = c.transformPoint(new DOMPoint(0, 0)), b = c.transformPoint(new DOMPoint(dx, dy));
  tf.cx -= (b.x - a.x) / v.w;
  tf.cy -= (b.y - a.y) / v.h;
  applyTransform();
}

function toImage(v, e) {
  const r = v.vp.getBoundingClientRect();
  return matrixOf(v).inverse().transformPoint(new DOMPoint(e.clientX - r.left, e.clientY - r.top));
}

const mode = () => document.querySelector("input[name=mode]:checked").value;

let resizeWatch = null;

function bindPane(v) {
  const vp = v.vp;
  // The layout may resize a view (a note appears, a panel wraps): keep the drawing and the mapping one.
  resizeWatch = resizeWatch || new ResizeObserver(() => views.length && applyTransform());
  resizeWatch.observe(vp);
  vp.classList.toggle("wl", mode() === "wl");
  vp.classList.toggle("measure", mode() === "measure");
  vp.addEventListener("wheel", (e) => {
    // The wheel zooms only once the image is chosen (focused) or with Ctrl: otherwise the page scrolls.
    if (document.activeElement !== vp && !e.ctrlKey && !e.metaKey) return;
    e.preventDefault();
    const r = vp.getBoundingClientRect();
    zoomAt(v, e.clientX - r.left, e.clientY - r.top, Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015)));
  }, { passive: false });
  const pointers = new Map();
  let drag = null, pinch = null;
  vp.addEventListener("pointerdown", (e) => {
    vp.focus({ preventScroll: true });
    pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    vp.setPointerCapture(e.pointerId);
    if (pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      pinch = { d: Math.hypot(a.x - b.x, a.y - b.y), mx: (a.x + b.x) / 2, my: (a.y + b.y) / 2 };
      drag = null;
      return;
    }
    const m = mode();
    drag = { m, x: e.clientX, y: e.clientY, wc: views[0].wc, ww: views[0].ww };
    if (m === "measure") {
      const p = toImage(v, e);
      for (const o of views) o.measure = null;
      v.measure = { x0: p.x, y0: p.y, x1: p.x, y1: p.y };
      drawMarks(v);
    }
  });
  vp.addEventListener("pointermove", (e) => {
    if (!pointers.has(e.pointerId)) return;
    const last = pointers.get(e.pointerId);
    pointers.set(e.pointerId, { x: e.clientX, y: e.clientY });
    if (pinch && pointers.size === 2) {
      const [a, b] = [...pointers.values()];
      const d = Math.hypot(a.x - b.x, a.y - b.y), mx = (a.x + b.x) / 2, my = (a.y + b.y) / 2;
      const r = vp.getBoundingClientRect();
      panBy(v, mx - pinch.mx, my - pinch.my);
      zoomAt(v, mx - r.left, my - r.top, d / (pinch.d || d));
      pinch = { d, mx, my };
      return;
    }
    if (!drag) return;
    if (drag.m === "pan") panBy(v, e.clientX - last.x, e.clientY - last.y);
    else if (drag.m === "wl") {
      const scale = views[0].raw ? Math.max(1, (views[0].dicom.max - views[0].dicom.min) / 512) : 0.5;
      setWindow(drag.wc - (e.clientY - drag.y) * scale, drag.ww + (e.clientX - drag.x) * scale);
    } else if (drag.m === "measure" && v.measure) {
      const p = toImage(v, e);
      v.measure.x1 = p.x; v.measure.y1 = p.y;
      drawMarks(v);
    }
  });
  const end = (e) => {
    pointers.delete(e.pointerId);
    if (pointers.size < 2) pinch = null;
    if (!pointers.size) drag = null;
  };
  vp.addEventListener("pointerup", end);
  vp.addEventListener("pointercancel", end);
  vp.addEventListener("keydown", (e) => {
    const wl = mode() === "wl";
    const step = 20;
    const keys = {
      ArrowLeft: () => (wl ? setWindow(views[0].wc, views[0].ww - wlStep(8)) : panBy(v, step, 0)),
      ArrowRight: () => (wl ? setWindow(views[0].wc, views[0].ww + wlStep(8)) : panBy(v, -step, 0)),
      ArrowUp: () => (wl ? setWindow(views[0].wc + wlStep(4), views[0].ww) : panBy(v, 0, step)),
      ArrowDown: () => (wl ? setWindow(views[0].wc - wlStep(4), views[0].ww) : panBy(v, 0, -step)),
    };
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
}

function wlStep(n) {
  const v = views[0];
  return v && v.raw ? n * Math.max(1, (v.dicom.max - v.dicom.min) / 512) : n;
}

// ------------------------------------------------------------------ boxes, labels, ruler (screen space)

function setupBoxScore() {
  const v = views[0];
  const boxes = v && readable(v.rec) ? v.rec.boxes || [] : [];
  const card = cardBoxThreshold();
  const scores = lastResult ? lastResult.images.filter(readable).flatMap((r) => (r.boxes || []).map((b) => b.score)) : [];
  const start = card !== null ? card : scores.length ? Math.max(0, Math.floor(Math.min(...scores) * 100) / 100) : 0;
  const input = $("box-score");
  if (!input.dataset.touched) {
    input.value = String(start);
    boxThreshold = start;
  }
  $("box-score-value").textContent = Number(input.value).toFixed(2);
  const susp = boxes.filter((b) => b.level === "suspicious").length;
  $("box-score-note").textContent = (card !== null ? "Box score starts at the model card's box operating point " + card.toFixed(2)
    : "Box score starts at the lowest box the server reported (it sends boxes at its operating point only)")
    + "; solid boxes are definite" + (susp ? ", dashed boxes suspicious" : "") + (refSource ? "; cyan: " + refSource + " (dropped with the images)" : "") + ".";
  $("show-refs-label").hidden = !refSource;
}

function placeLabel(placed, rect, wLab, hLab, W, H) {
  // Greedy: the first spot beside the box that no other label covers, else the nearest free one below.
  const cands = [[rect.x0, rect.y0 - hLab - 2], [rect.x0, rect.y1 + 2], [rect.x1 - wLab, rect.y0 - hLab - 2], [rect.x0 + 2, rect.y0 + 2]];
  const free = (x, y) => placed.every((p) => x + wLab <= p.x || p.x + p.w <= x || y + hLab <= p.y || p.y + p.h <= y);
  const clampXY = ([x, y]) => [Math.max(0, Math.min(W - wLab, x)), Math.max(0, Math.min(H - hLab, y))];
  for (const c of cands) {
    const [x, y] = clampXY(c);
    if (free(x, y)) return { x, y, w: wLab, h: hLab };
  }
  let [x, y] = clampXY(cands[0]);
  for (let k = 0; k < 200 && !free(x, y); k++) {
    y += hLab + 1;
    if (y + hLab > H) { y = 0; x = Math.min(W - wLab, x + wLab + 4); }
  }
  return { x, y, w: wLab, h: hLab };
}

let measureCtx = null;
function textWidth(text) {
  measureCtx = measureCtx || document.createElement("canvas").getContext("2d");
  measureCtx.font = "600 12px system-ui, sans-serif";
  return Math.ceil(measureCtx.measureText(text).width);
}

function screenRect(v, b) {
  const pts = [[b.x0, b.y0], [b.x1, b.y0], [b.x0, b.y1], [b.x1, b.y1]].map(([x, y]) => v.m.transformPoint(new DOMPoint(x, y)));
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
  return { x0: Math.min(...xs), y0: Math.min(...ys), x1: Math.max(...xs), y1: Math.max(...ys) };
}

function drawMarks(v) {
  const g = v.marks;
  g.replaceChildren();
  const W = v.vp.clientWidth, H = v.vp.clientHeight;
  g.setAttribute("width", W); g.setAttribute("height", H);
  g.setAttribute("viewBox", "0 0 " + W + " " + H);
  v.corner.textContent = v.dicom ? [v.dicom.laterality, v.dicom.view].filter(Boolean).join(" ") : "";
  if (!v.m || !$("show-overlay").checked) return;
  const placed = [];
  const shown = [];
  if ($("show-boxes").checked && readable(v.rec)) {
    for (const b of v.rec.boxes || []) if (b.score >= boxThreshold - 1e-9) shown.push(b);
  }
  for (const b of shown) {
    const r = screenRect(v, b);
    const dashed = b.level === "suspicious";
    const attrs = { x: r.x0, y: r.y0, width: r.x1 - r.x0, height: r.y1 - r.y0, fill: "none" };
    g.append(svg("rect", { ...attrs, class: "box-rim", stroke: "rgba(0,0,0,0.8)", "stroke-width": 4 }));
    g.append(svg("rect", { ...attrs, class: "box" + (dashed ? " suspicious" : ""), stroke: BOX_COLOUR, "stroke-width": 2,
      ...(dashed ? { "stroke-dasharray": "6 4" } : {}), "data-score": b.score }));
  }
  // Labels last, best score first, none over another.
  for (const b of shown) {
    const r = screenRect(v, b);
    const text = b.score.toFixed(2) + (b.level === "suspicious" ? " suspicious" : "");
    const spot = placeLabel(placed, r, textWidth(text) + 8, 17, W, H);
    placed.push(spot);
    const lab = svg("g", { class: "box-label" });
    lab.append(svg("rect", { x: spot.x, y: spot.y, width: spot.w, height: spot.h, rx: 3, fill: "rgba(0,0,0,0.75)" }));
    const t = svg("text", { x: spot.x + 4, y: spot.y + 13, fill: BOX_COLOUR, "font-size": 12, "font-weight": 600 });
    t.textContent = text;
    lab.append(t);
    g.append(lab);
  }
  if ($("show-refs").checked && refBoxes[v.rec.path]) {
    for (const b of refBoxes[v.rec.path]) {
      const r = screenRect(v, b);
      g.append(svg("rect", { x: r.x0, y: r.y0, width: r.x1 - r.x0, height: r.y1 - r.y0, fill: "none", class: "ref",
        stroke: REF_COLOUR, "stroke-width": 2, "stroke-dasharray": "2 3" }));
    }
  }
  if (v.measure) {
    const a = v.m.transformPoint(new DOMPoint(v.measure.x0, v.measure.y0));
    const b = v.m.transformPoint(new DOMPoint(v.measure.x1, v.measure.y1));
    g.append(svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: "#000", "stroke-width": 4 }));
    g.append(svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: "#7CFC00", "stroke-width": 2, class: "ruler" }));
    const text = measureText(v);
    const t = svg("text", { x: b.x + 6, y: b.y - 6, fill: "#7CFC00", "font-size": 13, "font-weight": 600, stroke: "#000", "stroke-width": 3, "paint-order": "stroke" });
    t.textContent = text;
    g.append(t);
    $("measure-readout").textContent = "Distance: " + text;
  }
}

function measureText(v) {
  const dx = v.measure.x1 - v.measure.x0, dy = v.measure.y1 - v.measure.y0;
  const d = v.dicom;
  const sp = d && d.pixelSpacing.length === 2 ? [d.pixelSpacing, ""] : d && d.imagerSpacing.length === 2 ? [d.imagerSpacing, " at the detector"] : null;
  if (sp) {
    // PixelSpacing is (row spacing, column spacing): y first.
    return Math.hypot(dx * sp[0][1], dy * sp[0][0]).toFixed(1) + " mm" + sp[1];
  }
  return Math.hypot(dx, dy).toFixed(0) + " px (no pixel spacing in the file, so no mm)";
}

function redrawOverlays() {
  for (const v of views) { drawHeat(v); drawMarks(v); }
  updateLegend();
  updateHeatmapNotes();
}

function setupViewer() {
  $("zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("zoom-fit").addEventListener("click", fit);
  $("zoom-1").addEventListener("click", oneToOne);
  $("rotate").addEventListener("click", () => { tf.rot = (tf.rot + 90) % 360; applyTransform(); });
  $("flip-h").addEventListener("click", () => { tf.fx = -tf.fx; $("flip-h").setAttribute("aria-pressed", String(tf.fx < 0)); applyTransform(); });
  $("flip-v").addEventListener("click", () => { tf.fy = -tf.fy; $("flip-v").setAttribute("aria-pressed", String(tf.fy < 0)); applyTransform(); });
  $("invert").addEventListener("click", () => {
    invert = !invert;
    $("invert").setAttribute("aria-pressed", String(invert));
    for (const v of views) drawBase(v);
  });
  $("view-reset").addEventListener("click", () => { resetView(); resetWindow(); });
  for (const r of document.querySelectorAll("input[name=mode]")) {
    r.addEventListener("change", () => {
      for (const v of views) { v.vp.classList.toggle("wl", mode() === "wl"); v.vp.classList.toggle("measure", mode() === "measure"); }
    });
  }
  $("wl-preset").addEventListener("change", applyPreset);
  $("wl-reset").addEventListener("click", resetWindow);
  for (const id of ["show-overlay", "show-heatmap", "show-boxes", "show-refs"]) $(id).addEventListener("change", redrawOverlays);
  $("opacity").addEventListener("input", () => views.forEach(drawHeat));
  $("box-score").addEventListener("input", () => {
    $("box-score").dataset.touched = "1";
    boxThreshold = Number($("box-score").value);
    $("box-score-value").textContent = boxThreshold.toFixed(2);
    views.forEach(drawMarks);
  });
  $("side-by-side").addEventListener("change", () => showImage(activeIndex, false));
  $("help-open").addEventListener("click", openHelp);
  window.addEventListener("resize", () => views.length && applyTransform());
  document.addEventListener("keydown", shortcut);
  drawLegend();
}

function applyPreset() {
  const o = $("wl-preset").selectedOptions[0];
  if (!o || !views.length) return;
  const raw = o.dataset.raw === "1";
  for (const v of views) if (v.dicom && v.dicom.values && v.raw !== raw && (raw ? v.dicom.rows === v.h : true)) v.raw = raw;
  setWindow(Number(o.dataset.c), Number(o.dataset.w));
}

function resetWindow() {
  const sel = $("wl-preset");
  if (!sel.options.length) return;
  sel.selectedIndex = 0;
  applyPreset();
}

function openHelp() {
  if (!$("help").open) $("help").showModal();
}

function shortcut(e) {
  if (e.target.closest && e.target.closest("input, select, textarea, dialog") && e.key !== "Escape") return;
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const setMode = (m) => { document.querySelector("input[name=mode][value=" + m + "]").click(); };
  const toggle = (id) => { $(id).click(); };
  const n = lastResult ? lastResult.images.length : 0;
  const keys = {
    "?": openHelp,
    "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8), "0": fit, "1": oneToOne,
    r: () => $("rotate").click(), h: () => $("flip-h").click(), v: () => $("flip-v").click(), i: () => $("invert").click(),
    w: () => setMode("wl"), p: () => setMode("pan"), m: () => setMode("measure"),
    b: () => toggle("show-boxes"), t: () => toggle("show-heatmap"),
    n: () => n && showImage((activeIndex + 1) % n, false), N: () => n && showImage((activeIndex - 1 + n) % n, false),
    s: () => !$("side-by-side-label").hidden && toggle("side-by-side"),
    Escape: () => { if ($("help").open) $("help").close(); else if (views.length) { resetView(); resetWindow(); } },
  };
  if (!views.length && e.key !== "?") return;
  if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
}

// ------------------------------------------------------------------ take it away

// Out of scope means nothing to read in a download either: no probability, boxes or heatmap.
function withoutReadings(rec) {
  if (readable(rec)) return rec;
  const out = {};
  for (const [k, v] of Object.entries(rec)) out[k] = k.startsWith("prob_") || k === "boxes" ? null : v;
  delete out.heatmap_png; delete out.heatmap_gray_png;
  return out;
}

function stripPictures(result) {
  const clean = JSON.parse(JSON.stringify(result, (k, v) => (k.endsWith("_png") ? undefined : v)));
  clean.images = clean.images.map(withoutReadings);
  return clean;
}

// The image with its overlays at original resolution or smaller, drawn in image space.
function compositeOf(v, maxSide) {
  const s = Math.min(1, (maxSide || Infinity) / Math.max(v.w, v.h));
  const c = document.createElement("canvas");
  c.width = Math.round(v.w * s);
  c.height = Math.round(v.h * s);
  const ctx = c.getContext("2d");
  ctx.drawImage(v.base, 0, 0, c.width, c.height);
  if (readable(v.rec) && $("show-overlay").checked) {
    ctx.drawImage(v.heatCanvas, 0, 0, c.width, c.height);
    if ($("show-boxes").checked) {
      const line = Math.max(2, Math.round(Math.max(c.width, c.height) / 400));
      ctx.font = "600 " + Math.max(12, line * 6) + "px sans-serif";
      ctx.textBaseline = "bottom";
      for (const b of v.rec.boxes || []) {
        if (b.score < boxThreshold - 1e-9) continue;
        ctx.setLineDash(b.level === "suspicious" ? [line * 3, line * 2] : []);
        ctx.lineWidth = line * 2; ctx.strokeStyle = "rgba(0,0,0,0.8)";
        ctx.strokeRect(b.x0 * s, b.y0 * s, (b.x1 - b.x0) * s, (b.y1 - b.y0) * s);
        ctx.lineWidth = line; ctx.strokeStyle = BOX_COLOUR;
        ctx.strokeRect(b.x0 * s, b.y0 * s, (b.x1 - b.x0) * s, (b.y1 - b.y0) * s);
        ctx.fillStyle = BOX_COLOUR;
        ctx.fillText(b.score.toFixed(2), b.x0 * s, Math.max(b.y0 * s - line, line * 8));
      }
      ctx.setLineDash([]);
    }
  }
  return c;
}

function stem(name) { return name.replace(/\.[^.]*$/, "") || "image"; }

function downloadJson() {
  if (!lastResult) return;
  const out = { model: model, result: stripPictures(lastResult), downloaded: new Date().toISOString() };
  download("bonexray-result.json", new Blob([JSON.stringify(out, null, 2)], { type: "application/json" }));
}

function downloadPng() {
  const v = views[0];
  if (!v) return;
  compositeOf(v).toBlob((blob) => download(stem(v.rec.path) + "-overlay.png", blob), "image/png");
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function reportHtml() {
  // A standalone page (no script) for the whole batch: per image its picture with overlays (as
  // windowed now for the images on show, else as sent), the server's answer, boxes; studies, model card.
  const r = lastResult, t = r.threshold;
  const rows = (pairs) => pairs.map(([k, v]) => "<tr><th>" + esc(k) + "</th><td>" + esc(v) + "</td></tr>").join("");
  const studies = (r.studies || [r.study]).map((s) => {
    const images = imagesOf(s);
    const st = studyState(s);
    const bp = bodyPartsOf(s, images);
    return "<li>" + esc((images.length === 1 ? images[0].path : "Study of " + plural(s.n_images || images.length, "image", "images")) + ": "
      + (images.length === 1 ? stateOf(images[0]).word : (st ? st.word + ", " : "") + studyCounts(s, images))
      + (bp.mixed ? " (mixed body parts: " + bp.parts.join(", ") + ")" : "")) + "</li>";
  }).join("");
  let sections = "";
  for (let i = 0; i < r.images.length; i++) {
    const rec = r.images[i];
    let v = views.find((x) => x.index === i);
    if (!v) {
      v = await loadView(i);
      v.base = el("canvas"); v.heatCanvas = el("canvas");
      for (const c of [v.base, v.heatCanvas]) { c.width = v.w; c.height = v.h; }
      v.out = v.base.getContext("2d").createImageData(v.w, v.h);
      drawBase(v);
      drawHeat(v);
    }
    const state = stateOf(rec);
    const canRead = readable(rec);
    const boxes = canRead ? (rec.boxes || []).filter((b) => b.score >= boxThreshold - 1e-9) : [];
    const boxList = boxes.map((b) => "<li>" + esc("x " + Math.round(b.x0) + "\u2013" + Math.round(b.x1) + ", y " + Math.round(b.y0) + "\u2013"
      + Math.round(b.y1) + " px, score " + b.score.toFixed(2) + (b.level ? ", " + b.level : "")) + "</li>").join("") || "<li>none</li>";
    sections += "<section class=\"img\"><h2>" + esc("Image " + (i + 1) + ": " + rec.path) + "</h2><div class=\"grid\"><div><img alt=\""
      + esc("Radiograph " + rec.path + (canRead ? " with overlays" : "")) + "\" src=\"" + compositeOf(v, 1400).toDataURL("image/png") + "\"></div><div>"
      + "<p class=\"verdict\">" + esc(state.word + (state.detail ? " (" + state.detail + ")" : "")) + "</p><table>"
      + rows([["p(abnormal)", canRead ? pct(rec.prob_abnormal) + " (threshold " + pct(t) + ")" : "n/a"], ["Body part", bodyPartText(rec)],
        ["Heatmap", canRead && rec.heatmap_gray_png && $("show-heatmap").checked ? r.heatmap || "shown" : "not shown"], ["Study", rec.study || "n/a"]])
      + "</table><h3>Boxes</h3><ul>" + boxList + "</ul></div></div></section>";
  }
  const problems = notSent.concat(r.errors || []).map((p) => "<li>" + esc(p.file + ": " + p.reason) + "</li>").join("");
  return "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bonexray report: " + esc(plural(r.images.length, "image", "images")) + "</title>"
    + "<style>body{font:11pt/1.4 system-ui,sans-serif;color:#111;margin:16px}h1{font-size:15pt;margin:0 0 4px}h2{font-size:12pt}h3{font-size:11pt}"
    + ".grid{display:grid;grid-template-columns:1fr 1fr;gap:14px}img{max-width:100%;max-height:120mm;border:1px solid #999}"
    + "table{border-collapse:collapse}th{text-align:left;padding:2px 10px 2px 0;vertical-align:top;color:#444}td{padding:2px 0}"
    + ".notice{border-left:4px solid #b7791f;padding:6px 10px;background:#fdf6e7}.verdict{font-weight:700;font-size:13pt}"
    + "section.img{break-inside:avoid;border-top:1px solid #ccc;margin-top:10px}"
    + "@page{size:A4;margin:12mm}@media print{body{margin:0}}</style></head><body>"
    + "<h1>bonexray report</h1><p>" + esc(new Date().toLocaleString("en-GB") + " \u00b7 " + plural(r.images.length, "image", "images") + " analysed") + "</p>"
    + "<p class=\"notice\">" + esc(model ? model.intended_use : "") + "</p>"
    + "<h2>Studies</h2><ul>" + studies + "</ul>"
    + (problems ? "<h2>Files not analysed</h2><ul>" + problems + "</ul>" : "")
    + sections
    + "<h2>Model</h2><table>"
    + (model ? rows([["Trained on", trainingText(model.training_data)], ["Test result", evaluationText(model.evaluation)],
      ["Threshold", model.threshold.toFixed(3) + ": " + model.threshold_source],
      ["Model", model.model_file + ", " + model.backbone + ", bonexray " + model.version]]) : "")
    + "</table></body></html>";
}

async function downloadReport() {
  if (!lastResult) return;
  const html = await reportHtml();
  download("bonexray-report.html", new Blob([html], { type: "text/html" }));
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
    $("status").textContent = "Cancelled. The server stops its work for this request.";
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value);
    $("key-input").value = "";
    showError("");
    loadModel().then(restoreResult);
  });
  $("download-json").addEventListener("click", downloadJson);
  $("download-png").addEventListener("click", downloadPng);
  $("download-report").addEventListener("click", downloadReport);
  $("forget").addEventListener("click", forgetResults);
  setupViewer();
  loadModel().then(() => model && restoreResult());
}

init();
