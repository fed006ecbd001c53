// The diffae-ray web page: plain JS over the JSON API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, image: null, z: null, xT: null, editSeq: 0, interpA: null, interpB: null };

function status(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + kind;
}

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// POST a JSON body; returns parsed JSON, or a Blob for images; throws with the server's message.
async function api(path, body, as = "json") {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).message || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return as === "blob" ? response.blob() : response.json();
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

const png = (b64) => "data:image/png;base64," + b64;
const steps = () => Number($("steps").value);

function pixelate(img) {
  // Tiny models make tiny images: scale them up without blurring.
  if (state.model && state.model.image_size < 96) img.classList.add("pixel");
}

async function loadModel() {
  try {
    const response = await fetch("/v1/model", { headers: headers(false) });
    const body = await response.json();
    if (!response.ok) throw new Error(body.message || response.statusText);
    state.model = body;
    $("model-info").textContent =
      `${body.preset} · ${body.image_size}px · ${body.attributes.length} attributes`;
    $("steps").max = body.limits.max_steps;
    $("steps").value = Math.min(body.limits.default_steps, body.limits.max_steps);
    $("steps-out").textContent = $("steps").value;
    $("interp-n").max = $("sample-n").max = body.limits.max_n;
    $("sample-btn").disabled = !body.has_latent;
    buildSliders(body.attributes, body.limits.max_alpha);
    status("ready", "ok");
  } catch (err) {
    $("model-info").textContent = "model unavailable";
    status("cannot load the model: " + err.message + (/key/i.test(err.message) ? " (enter an API key above)" : ""), "error");
  }
}

function buildSliders(names, maxAlpha) {
  const box = $("attributes");
  box.innerHTML = "";
  for (const name of names) {
    const row = document.createElement("div");
    row.className = "attr";
    row.innerHTML = `<span class="name" title="${name}">${name.replace(/_/g, " ")}</span>
      <input type="range" min="${-maxAlpha}" max="${maxAlpha}" step="${maxAlpha / 20}" value="0" disabled>
      <output>0.00</output><div class="prob"><div></div></div>`;
    const slider = row.querySelector("input");
    slider.dataset.attribute = name;
    slider.addEventListener("input", () => {
      row.querySelector("output").textContent = Number(slider.value).toFixed(2);
      scheduleEdit();
    });
    box.appendChild(row);
  }
}

function sliders() { return Array.from(document.querySelectorAll("#attributes input[type=range]")); }

async function showProbabilities(z) {
  if (!state.model || !state.model.has_classifier) return;
  const body = await api("/v1/classify", { z_sem: z });
  for (const slider of sliders()) {
    const p = body.attributes[slider.dataset.attribute].probability;
    slider.parentElement.querySelector(".prob > div").style.width = (100 * p).toFixed(0) + "%";
    slider.parentElement.title = `P(${slider.dataset.attribute}) = ${p.toFixed(3)}`;
  }
}

async function reconstruct() {
  if (!state.image) return;
  const card = $("edit-card");
  card.classList.add("busy");
  $("reconstruct-btn").disabled = true;
  status("reconstructing…");
  try {
    const body = await api("/v1/reconstruct", { image: state.image, steps: steps(), format: "json" });
    state.z = body.z_sem;
    state.xT = body.x_T;
    $("recon-img").src = png(body.image);
    $("edit-img").src = png(body.image);
    sliders().forEach((s) => { s.value = 0; s.disabled = false; s.parentElement.querySelector("output").textContent = "0.00"; });
    $("reset-btn").disabled = false;
    status(`reconstructed in ${body.steps} steps (seed ${body.seed})`, "ok");
    await showProbabilities(body.z_sem);
  } catch (err) {
    status("reconstruction failed: " + err.message, "error");
  } finally {
    card.classList.remove("busy");
    $("reconstruct-btn").disabled = false;
  }
}

let editTimer = null;
function scheduleEdit() {
  clearTimeout(editTimer);
  editTimer = setTimeout(applyEdits, 150);
}

async function applyEdits() {
  if (!state.z) return;
  const edits = {};
  for (const s of sliders()) if (Number(s.value) !== 0) edits[s.dataset.attribute] = Number(s.value);
  const seq = ++state.editSeq;  // only the latest slider position may paint the image
  if (Object.keys(edits).length === 0) {
    $("edit-img").src = $("recon-img").src;
    await showProbabilities(state.z);
    return;
  }
  status("editing…");
  try {
    const body = await api("/v1/manipulate", { z_sem: state.z, x_T: state.xT, edits, steps: steps(), format: "json" });
    if (seq !== state.editSeq) return;
    $("edit-img").src = png(body.image);
    status("edited: " + Object.entries(edits).map(([k, v]) => `${k} ${v > 0 ? "+" : ""}${v}`).join(", "), "ok");
    await showProbabilities(body.z_sem);
  } catch (err) {
    status("edit failed: " + err.message, "error");
  }
}

async function onFile(input, key, preview) {
  const file = input.files[0];
  if (!file) return null;
  input.parentElement.classList.add("has-file");
  input.parentElement.querySelector("span").textContent = file.name;
  const b64 = await readBase64(file);
  state[key] = b64;
  if (preview) preview.src = URL.createObjectURL(file);
  return b64;
}

async function interpolate() {
  $("interp-btn").disabled = true;
  status("interpolating…");
  try {
    const n = Number($("interp-n").value);
    const blob = await api("/v1/interpolate", { image_a: state.interpA, image_b: state.interpB, n, steps: steps() }, "blob");
    const img = $("interp-img");
    img.src = URL.createObjectURL(blob);
    pixelate(img);
    status(`interpolated ${n} frames`, "ok");
  } catch (err) {
    status("interpolation failed: " + err.message, "error");
  } finally {
    $("interp-btn").disabled = !(state.interpA && state.interpB);
  }
}

async function sample() {
  $("sample-btn").disabled = true;
  status("sampling…");
  try {
    const body = { n: Number($("sample-n").value), steps: steps(), format: "json" };
    if ($("sample-seed").value !== "") body.seed = Number($("sample-seed").value);
    const out = await api("/v1/sample", body);
    const box = $("samples");
    box.innerHTML = "";
    for (const b64 of out.images || [out.image]) {
      const img = document.createElement("img");
      img.src = png(b64);
      pixelate(img);
      box.appendChild(img);
    }
    $("sample-info").textContent = `seed ${out.seed}`;
    status(`sampled ${body.n} image(s)`, "ok");
  } catch (err) {
    status("sampling failed: " + err.message, "error");
  } finally {
    $("sample-btn").disabled = false;
  }
}

function init() {
  // The key lives in this tab's sessionStorage only (gone when the tab closes), never in localStorage on disk;
  // earlier versions kept it there, so drop any copy they left.
  localStorage.removeItem("diffae-api-key");
  $("api-key").value = sessionStorage.getItem("diffae-api-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("diffae-api-key", $("api-key").value.trim());
    loadModel();
  });
  $("steps").addEventListener("input", () => { $("steps-out").textContent = $("steps").value; });
  $("file").addEventListener("change", async () => {
    if (await onFile($("file"), "image", $("input-img"))) {
      $("reconstruct-btn").disabled = false;
      reconstruct();
    }
  });
  $("reconstruct-btn").addEventListener("click", reconstruct);
  $("reset-btn").addEventListener("click", () => {
    sliders().forEach((s) => { s.value = 0; s.parentElement.querySelector("output").textContent = "0.00"; });
    applyEdits();
  });
  for (const [id, key] of [["interp-a", "interpA"], ["interp-b", "interpB"]]) {
    $(id).addEventListener("change", async () => {
      await onFile($(id), key, null);
      $("interp-btn").disabled = !(state.interpA && state.interpB);
    });
  }
  $("interp-btn").addEventListener("click", interpolate);
  $("sample-btn").addEventListener("click", sample);
  for (const id of ["recon-img", "edit-img"]) $(id).addEventListener("load", () => pixelate($(id)));
  loadModel();
}

init();
