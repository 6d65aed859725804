"use strict";
// The bonexray page: send the chosen images to /api/predict?heatmap=1 and show what comes back.
// Plain DOM code, no libraries; text from the server is only ever set with textContent.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "bonexray-api-key";
let model = null;

function apiHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const pct = (p) => (100 * p).toFixed(1) + "%";

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function readError(response) {
  try {
    const body = await response.json();
    return body.detail || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  const response = await fetch("/api/model", { headers: apiHeaders() });
  if (response.status === 401) {
    $("key-box").hidden = false;
    $("status").textContent = "Enter the API key to start.";
    return;
  }
  if (!response.ok) { showError("Cannot read the model card: " + await readError(response)); return; }
  model = await response.json();
  $("key-box").hidden = true;
  $("intended-use").textContent = model.intended_use;
  const rows = [
    ["Model file", model.model_file + " (" + model.format + ")"],
    ["Backbone", model.backbone + ", " + model.image_size + " px input"],
    ["Body parts", model.body_parts.join(", ")],
    ["Threshold", model.threshold.toFixed(3) + " on p(abnormal), chosen on the validation split"],
    ["Heatmap", model.heatmap ? model.heatmap + ": " + model.heatmap_note : model.heatmap_note],
    ["Training data", trainingText(model.training_data)],
    ["Version", "model written by bonexray " + model.version + "; server " + model.server_version],
  ];
  const list = $("card-list");
  list.replaceChildren();
  for (const [k, v] of rows) list.append(el("dt", {}, k), el("dd", {}, v));
  if (!model.heatmap) {
    $("show-heatmap").checked = false;
    $("show-heatmap").disabled = true;
  }
}

function trainingText(t) {
  if (!t) return "not recorded with this model file";
  let text = t.dataset + (t.source ? " (" + t.source + ")" : "");
  if (t.images) text += ": " + Object.entries(t.images).map(([s, n]) => n + " " + s).join(", ") + " images";
  if (t.epochs) text += ", up to " + t.epochs + " epochs";
  return text;
}

function verdictBadge(abnormal) {
  return el("span", { class: "verdict " + (abnormal ? "abnormal" : "normal") }, abnormal ? "Abnormal" : "Normal");
}

function probBar(p, threshold) {
  const fill = el("span", { class: "fill" });
  fill.style.width = pct(p);
  const mark = el("span", { class: "mark", title: "threshold " + threshold.toFixed(3) });
  mark.style.left = pct(threshold);
  return el("div", { class: "bar", role: "img", "aria-label": "p(abnormal) " + pct(p) + ", threshold " + pct(threshold) }, fill, mark);
}

function setPictures() {
  const show = $("show-heatmap").checked;
  for (const img of document.querySelectorAll("img.xray")) {
    const src = show && img.dataset.heatmap ? img.dataset.heatmap : img.dataset.plain;
    if (src && img.src !== src) img.src = src;
    img.alt = (show && img.dataset.heatmap ? "Radiograph with heatmap: " : "Radiograph: ") + img.dataset.name;
  }
}

function renderImage(rec, threshold, heatmapName) {
  const img = el("img", { class: "xray", width: "512", height: "512" });
  img.dataset.name = rec.path;
  if (rec.image_png) img.dataset.plain = "data:image/png;base64," + rec.image_png;
  if (rec.heatmap_png) img.dataset.heatmap = "data:image/png;base64," + rec.heatmap_png;
  const facts = el("dl", { class: "facts" },
    el("dt", {}, "p(abnormal)"), el("dd", {}, pct(rec.prob_abnormal) + "  (threshold " + pct(threshold) + ")"),
    el("dt", {}, "Body part"), el("dd", { class: "body-part" }, rec.body_part + "  (" + pct(rec["prob_" + rec.body_part]) + ")"));
  const body = el("div", { class: "body" },
    el("p", { class: "fname" }, rec.path), verdictBadge(rec.abnormal), facts, probBar(rec.prob_abnormal, threshold));
  if (rec.heatmap_png) body.append(el("p", { class: "note" }, "Heatmap: " + heatmapName + "."));
  else if (model && !model.heatmap) body.append(el("p", { class: "note" }, "No heatmap: " + model.heatmap_note + "."));
  if (rec.truncated) body.append(el("p", { class: "note" }, "This file ends early; the part that was there was read."));
  return el("article", { class: "result", "data-abnormal": String(rec.abnormal) }, el("figure", {}, img), body);
}

function renderStudy(study, threshold) {
  const box = $("study");
  box.replaceChildren(
    el("h2", {}, "Study of " + study.n_images + " images"), verdictBadge(study.abnormal),
    el("span", {}, "mean p(abnormal) " + pct(study.prob_abnormal) + " (threshold " + pct(threshold) + ")"),
    el("span", {}, "body part " + study.body_part));
  box.hidden = false;
}

async function predict(files) {
  if (!files.length) return;
  showError("");
  $("study").hidden = true;
  $("results").replaceChildren();
  $("status").textContent = "Reading " + files.length + (files.length === 1 ? " image" : " images") + "\u2026";
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  let response;
  try {
    response = await fetch("/api/predict?heatmap=1", { method: "POST", body: form, headers: apiHeaders() });
  } catch (e) {
    $("status").textContent = "";
    showError("The server did not answer (" + e.message + ").");
    return;
  }
  if (!response.ok) {
    $("status").textContent = "";
    if (response.status === 401) $("key-box").hidden = false;
    showError(await readError(response));
    return;
  }
  const result = await response.json();
  const frag = document.createDocumentFragment();
  for (const rec of result.images) frag.append(renderImage(rec, result.threshold, result.heatmap));
  $("results").replaceChildren(frag);
  if (result.images.length > 1) renderStudy(result.study, result.threshold);
  setPictures();
  $("status").textContent = "Done: " + result.images.length + (result.images.length === 1 ? " image." : " images.");
}

function init() {
  const input = $("file-input");
  const drop = $("drop");
  input.addEventListener("change", () => { predict(Array.from(input.files)); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => predict(Array.from(e.dataTransfer.files)));
  $("show-heatmap").addEventListener("change", setPictures);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value);
    $("key-input").value = "";
    showError("");
    loadModel();
  });
  loadModel();
}

init();
