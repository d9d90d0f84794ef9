// vidgen portal: model-aware form, the queue with live progress (SSE over fetch, so the API key
// header works), previews, player, download and cancel. No build step: served as is by `vidgen serve`.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
const jobs = new Map();        // id -> { el, video, streaming, blobUrl }
let apiKey = localStorage.getItem("vidgen-api-key") || "";

function authHeaders(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (resp.status === 401) {
    $("key-form").hidden = false;
    throw new Error("This server needs an API key: enter it above.");
  }
  if (!resp.ok) {
    let message = `${resp.status} ${resp.statusText}`;
    try { message = (await resp.json()).error.message || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return resp;
}

// ---------------------------------------------------------------- the form

function currentModel() {
  return models.find((m) => m.id === $("model").value) || models[0];
}

function setNumber(id, spec, value) {
  const el = $(id);
  el.value = value;
  if (spec) { el.min = spec.min; el.max = spec.max; }
}

function applyModel() {
  const m = currentModel();
  if (!m) return;
  $("model-info").textContent =
    `${m.task.toUpperCase()} · ${m.fps} fps · frames ${m.frames.rule} in ${m.frames.min}–${m.frames.max}` +
    (m.free_size ? ` · any size in multiples of ${m.size_multiple} up to ${m.max_pixels} pixels` : "");
  const size = $("size");
  size.innerHTML = "";
  for (const s of m.sizes) size.add(new Option(s, s));
  if (m.free_size) size.add(new Option("custom…", "custom"));
  setNumber("frames", m.frames, m.frames.default);
  $("frames").step = m.frames.step;
  $("fps").value = m.fps;
  setNumber("steps", m.steps, m.steps.default);
  $("guidance").value = m.guidance.default;
  $("guidance_2-label").hidden = !m.guidance_2;
  if (m.guidance_2) $("guidance_2").value = m.guidance_2.default;
  $("shift").value = m.shift.default;
  const sched = $("scheduler");
  sched.innerHTML = "";
  for (const s of m.scheduler.values) sched.add(new Option(s, s, false, s === m.scheduler.default));
  // Memory and precision knobs: {default, values} each, as /v1/models lists them.
  for (const id of ["offload", "weights", "vae_dtype"]) {
    const sel = $(id), spec = m[id];
    sel.innerHTML = "";
    for (const o of spec.values) sel.add(new Option(o, o, false, o === spec.default));
  }
  $("negative_prompt").value = m.default_negative_prompt;
  $("image-label").hidden = !m.image_conditioning;
  $("image").required = m.image_required;
  sizeChanged();
  showDuration();
}

function sizeChanged() {
  const custom = $("size").value === "custom";
  for (const el of document.querySelectorAll(".custom-size")) el.hidden = !custom;
  if (custom) {
    const m = currentModel();
    $("width").step = $("height").step = m.size_multiple;
    const [w, h] = m.sizes[0].split("x");
    if (!$("width").value) $("width").value = w;
    if (!$("height").value) $("height").value = h;
  }
}

function showDuration() {
  const frames = Number($("frames").value), fps = Number($("fps").value);
  $("duration").textContent = frames && fps ? `${(frames / fps).toFixed(2)} s` : "";
}

async function submitJob(ev) {
  ev.preventDefault();
  $("form-error").textContent = "";
  const m = currentModel();
  const body = new FormData();
  body.append("model", m.id);
  body.append("prompt", $("prompt").value);
  if ($("negative_prompt").value !== m.default_negative_prompt) {
    body.append("negative_prompt", $("negative_prompt").value);
  }
  if ($("size").value === "custom") {
    body.append("width", $("width").value);
    body.append("height", $("height").value);
  } else {
    body.append("size", $("size").value);
  }
  for (const id of ["frames", "fps", "steps", "guidance", "shift", "scheduler", "seed", "output_format", "offload", "weights", "vae_dtype"]) {
    if ($(id).value !== "") body.append(id, $(id).value);
  }
  if (m.guidance_2 && $("guidance_2").value !== "") body.append("guidance_2", $("guidance_2").value);
  const file = $("image").files[0];
  if (file && m.image_conditioning) body.append("input_reference", file, file.name);
  $("submit").disabled = true;
  try {
    const video = await (await api("/v1/videos", { method: "POST", body })).json();
    render(video);
    follow(video.id);
  } catch (e) {
    $("form-error").textContent = e.message;
  } finally {
    $("submit").disabled = false;
  }
}

// ---------------------------------------------------------------- the queue

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function describe(v) {
  const parts = [`${v.model}`, v.size, `${v.frames} frames @ ${v.fps} fps (${v.seconds} s)`, `seed ${v.seed}`];
  if (v.status === "queued" && v.queue_position != null) parts.push(`position ${v.queue_position + 1} in queue`);
  if (v.status === "in_progress") {
    if (v.stage) parts.push(v.step != null ? `${v.stage} ${v.step}/${v.total_steps}` : v.stage);
    if (v.eta_s != null) parts.push(`ETA ${Math.ceil(v.eta_s)} s`);
  }
  if (v.error) parts.push(`${v.error.code}: ${v.error.message}`);
  return parts.join(" · ");
}

function render(v) {
  let job = jobs.get(v.id);
  if (!job) {
    const li = el("li", { class: "job", "data-id": v.id });
    li.append(
      el("div", { class: "prompt" }), el("div", { class: "actions" }),
      el("progress", { max: "100", value: "0" }), el("div", { class: "meta muted" }),
      el("div", { class: "media" }));
    job = { el: li, video: v, streaming: false, blobUrl: null };
    jobs.set(v.id, job);
    const list = $("jobs");
    // Newest first.
    const after = [...list.children].find((c) => (jobs.get(c.dataset.id)?.video.created_at ?? 0) < v.created_at);
    list.insertBefore(li, after || null);
  }
  job.video = v;
  const li = job.el;
  li.dataset.status = v.status;
  li.querySelector(".prompt").replaceChildren(el("span", { class: `status ${v.status}` }, v.status), " ", v.prompt);
  li.querySelector("progress").value = v.progress;
  li.querySelector("progress").hidden = v.status !== "queued" && v.status !== "in_progress";
  li.querySelector(".meta").textContent = describe(v);
  const actions = li.querySelector(".actions");
  actions.replaceChildren();
  if (v.status === "queued" || v.status === "in_progress") {
    const b = el("button", { class: "secondary cancel" }, "Cancel");
    b.onclick = () => act(`/v1/videos/${v.id}/cancel`, "POST");
    actions.append(b);
  } else {
    const b = el("button", { class: "secondary delete" }, "Delete");
    b.onclick = async () => { await act(`/v1/videos/${v.id}`, "DELETE"); forget(v.id); };
    actions.append(b);
  }
  if (v.status === "completed" && !job.blobUrl && !v.expired) loadVideo(job);
}

async function act(path, method) {
  try {
    const resp = await api(path, { method });
    const body = await resp.json();
    if (body.object === "video") render(body);
  } catch (e) {
    $("form-error").textContent = e.message;
  }
}

function forget(id) {
  const job = jobs.get(id);
  if (!job) return;
  if (job.blobUrl) URL.revokeObjectURL(job.blobUrl);
  job.el.remove();
  jobs.delete(id);
}

// The content endpoint needs the API key header, which <video src> cannot send: fetch a blob.
async function loadVideo(job) {
  const v = job.video;
  job.blobUrl = "loading";
  try {
    const blob = await (await api(`/v1/videos/${v.id}/content?variant=video`)).blob();
    job.blobUrl = URL.createObjectURL(blob);
    const player = el("video", { controls: "", loop: "", muted: "", playsinline: "", src: job.blobUrl });
    player.muted = true;
    const name = `${v.id}.${v.output_format}`;
    const link = el("a", { href: job.blobUrl, download: name, class: "download" }, `Download ${name}`);
    job.el.querySelector(".media").replaceChildren(player, link);
  } catch (e) {
    job.blobUrl = null;
    job.el.querySelector(".media").replaceChildren(el("span", { class: "error" }, e.message));
  }
}

function showPreview(id, ev) {
  const job = jobs.get(id);
  if (!job) return;
  const media = job.el.querySelector(".media");
  let img = media.querySelector("img.preview");
  if (!img) { img = el("img", { class: "preview", alt: "preview" }); media.replaceChildren(img); }
  img.src = `data:image/png;base64,${ev.png_base64}`;
  img.title = `step ${ev.step}`;
}

// Server-Sent Events read with fetch (EventSource cannot send the Authorization header).
async function follow(id) {
  const job = jobs.get(id);
  if (!job || job.streaming) return;
  job.streaming = true;
  try {
    const resp = await api(`/v1/videos/${id}/events`);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        handleEvent(id, event, data);
      }
    }
  } catch (_) {
    // The periodic refresh keeps the list right if the stream drops.
  } finally {
    if (jobs.has(id)) jobs.get(id).streaming = false;
  }
}

function handleEvent(id, event, data) {
  if (!data) return;
  const job = jobs.get(id);
  const ev = JSON.parse(data);
  if (event === "video" && ev.id) render(ev);
  else if (event === "preview") showPreview(id, ev);
  else if ((event === "step" || event === "stage") && job) {
    const v = { ...job.video, status: "in_progress", progress: ev.progress ?? job.video.progress };
    v.stage = ev.stage;
    if (event === "step") { v.step = ev.step; v.total_steps = ev.total; v.eta_s = ev.eta_s; }
    else { v.step = null; v.eta_s = null; }
    render(v);
  }
}

async function refresh() {
  try {
    const list = await (await api("/v1/videos?limit=50")).json();
    const seen = new Set();
    for (const v of list.data) {
      seen.add(v.id);
      const known = jobs.get(v.id);
      // Live events are fresher than the list for a followed job.
      if (!known || !known.streaming || v.status !== known.video.status) render(v);
      if (v.status === "queued" || v.status === "in_progress") follow(v.id);
    }
    for (const id of [...jobs.keys()]) if (!seen.has(id)) forget(id);
    const active = list.data.filter((v) => v.status === "queued" || v.status === "in_progress").length;
    $("queue-summary").textContent = active ? `${active} active` : "";
  } catch (e) {
    $("queue-summary").textContent = e.message;
  }
}

async function start() {
  try {
    models = (await (await api("/v1/models")).json()).data;
    const sel = $("model");
    sel.innerHTML = "";
    for (const m of models) sel.add(new Option(m.id, m.id));
    applyModel();
    $("server-info").textContent = `${models.length} model${models.length === 1 ? "" : "s"}`;
  } catch (e) {
    $("form-error").textContent = e.message;
    return;
  }
  await refresh();
  setInterval(refresh, 3000);
}

$("model").addEventListener("change", applyModel);
$("size").addEventListener("change", sizeChanged);
$("frames").addEventListener("input", showDuration);
$("fps").addEventListener("input", showDuration);
$("create-form").addEventListener("submit", submitJob);
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("api-key").value.trim();
  localStorage.setItem("vidgen-api-key", apiKey);
  $("key-form").hidden = true;
  $("form-error").textContent = "";
  start();
});
start();
