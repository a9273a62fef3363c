// The playground: a form for the proxy's image API, results streamed in, and the request as code.
// Plain ES modules, no build step; everything it shows comes from this proxy's own /v1 endpoints.

import { ApiError, MIME, b64ToBlob, getKey, listModels, sendImageRequest, setKey } from "./api.js";
import { MaskEditor } from "./mask.js";
import { SNIPPETS, safeFileName } from "./snippets.js";

const SEED_MAX = 4294967295;
// Edit models that do not say how many images they take: Qwen-Image-Edit takes 1 to 3.
const DEFAULT_MAX_IMAGES = 3;
const MAX_LORAS = 3;
const LOSSY = new Set(["jpeg", "webp", "avif"]);
const RESOLUTIONS = ["0.5K", "1K", "2K", "4K"];
const LABELS = { curl: "curl", python: "Python", node: "Node" };
// API `param` -> the control that sets it, to mark it invalid.
const PARAM_INPUT = { model: "model", prompt: "prompt", negative_prompt: "negative", size: "size", n: "n",
  seed: "seed", aspect_ratio: "aspect", resolution: "resolution", num_inference_steps: "steps", cfg_scale: "cfg",
  output_format: "format", output_compression: "compression", prompt_enhancement: "enhance", tier: "tier",
  partial_images: "partials", image: "images-input", loras: "add-lora" };

const $ = (id) => document.getElementById(id);

const state = {
  models: [],
  model: null,
  images: [], // {file, url, name, width, height}
  running: null, // AbortController of the request in flight
  runs: 0,
};

let mask;

// sessionStorage, where the browser allows it (it may be switched off).
function remember(name, value) {
  try {
    sessionStorage.setItem(name, value);
  } catch {
    // not kept: fine
  }
}

function recall(name) {
  try {
    return sessionStorage.getItem(name);
  } catch {
    return null;
  }
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function caps(card = state.model) {
  return (card && card.capabilities) || {};
}

function maxImages(card = state.model) {
  const c = caps(card);
  if (Number(c.max_input_images) > 0) return Number(c.max_input_images);
  return c.edits === true ? DEFAULT_MAX_IMAGES : 0;
}

function editMode() {
  return maxImages() > 0 && document.querySelector('input[name="mode"]:checked')?.value === "edit";
}

function speedTiers(card = state.model) {
  const tiers = caps(card).tiers;
  if (Array.isArray(tiers)) {
    return tiers.map((t) => (typeof t === "string" ? { value: t, label: t }
      : { value: String(t.name ?? t.id ?? ""), label: String(t.label ?? t.name ?? t.id ?? ""), hint: t.description }))
      .filter((t) => t.value);
  }
  if (tiers && typeof tiers === "object") {
    return Object.entries(tiers).map(([name, info]) => ({ value: name, label: name,
      hint: info && typeof info === "object" ? info.description : undefined }));
  }
  return [];
}

// ---- status and errors ------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function clearError() {
  const box = $("error");
  box.hidden = true;
  box.replaceChildren();
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

function showError(err) {
  const box = $("error");
  const message = err && err.message ? err.message : String(err);
  const details = [];
  if (err instanceof ApiError) {
    if (err.status) details.push(`HTTP ${err.status}`);
    if (err.type) details.push(err.type);
    if (err.code) details.push(`code ${err.code}`);
    if (err.param) details.push(`param ${err.param}`);
    const input = err.param && $(PARAM_INPUT[String(err.param).replace(/\[.*$/, "")] || "");
    if (input) input.setAttribute("aria-invalid", "true");
  }
  box.replaceChildren(
    el("p", { class: "error-title" }, el("strong", { text: "Error" }), details.length ? ` (${details.join(", ")})` : ""),
    el("p", { class: "error-message", text: message }),
  );
  box.hidden = false;
}

// ---- the API key ---------------------------------------------------------------------------------------

function initKey() {
  const input = $("api-key");
  input.value = getKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = input.value.trim();
    // Keys are printable ASCII. Past Latin-1, fetch() refuses the header on every request and the page
    // said "Could not reach the proxy"; a key pasted from rich text often hides a zero-width space.
    const bad = /[^\x20-\x7e]/.exec(key);
    if (bad) {
      clearError();
      setStatus("");
      const code = `U+${bad[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
      showError(new Error(`The key has a character an API key cannot hold (${code} at position ${bad.index + 1}): `
        + "paste it again as plain text. The key was not saved."));
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    setKey(key);
    setStatus(key ? "Key saved for this tab." : "Key removed.");
    loadModels();
  });
  $("forget-key").addEventListener("click", () => {
    input.value = "";
    setKey("");
    setStatus("Key removed from this tab.");
  });
}

// ---- models ---------------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  clearError();
  setStatus("Loading models…");
  let models;
  try {
    models = await listModels();
  } catch (err) {
    setStatus("");
    showError(err);
    if (err instanceof ApiError && err.status === 401) {
      $("error").append(el("p", { text: "Enter the proxy's API key above and press “Use key”." }));
      $("api-key").focus();
    }
    return;
  }
  state.models = models.filter((m) => m && typeof m.id === "string" && m.capabilities);
  const previous = recall("qip.model") || select.value;
  select.replaceChildren(...state.models.map((m) => {
    const routes = caps(m).routes || [];
    const ready = !routes.length || routes.some((r) => r.state === "ready");
    const notes = [maxImages(m) > 0 ? "edits" : "", ready ? "" : "not ready"].filter(Boolean);
    return el("option", { value: m.id, text: notes.length ? `${m.id} (${notes.join(", ")})` : m.id });
  }));
  if (!state.models.length) {
    setStatus("");
    showError(new ApiError("This proxy lists no image models (GET /v1/models)."));
    return;
  }
  const firstReady = state.models.find((m) => (caps(m).routes || []).some((r) => r.state === "ready"));
  select.value = state.models.some((m) => m.id === previous) ? previous : (firstReady || state.models[0]).id;
  applyModel();
  setStatus(`${state.models.length} model${state.models.length === 1 ? "" : "s"} available.`);
}

function applyModel() {
  const card = state.models.find((m) => m.id === $("model").value) || null;
  state.model = card;
  if (!card) return;
  remember("qip.model", card.id);
  const c = caps(card);
  const routes = (c.routes || []).map((r) => `${r.name} (${String(r.state || "?").replace(/_/g, " ")})`);
  const info = [card.description, routes.length ? `Routes: ${routes.join(", ")}.` : "",
    maxImages(card) > 0 ? `Edits up to ${maxImages(card)} image${maxImages(card) === 1 ? "" : "s"}.` : ""];
  $("model-info").replaceChildren(...info.filter(Boolean).map((line) => el("p", { text: line })));

  const edits = maxImages(card) > 0;
  $("mode-field").hidden = !edits;
  if (edits) document.querySelector('input[name="mode"][value="edit"]').checked = true;
  $("n").max = String(c.max_n || 10);
  $("width").max = $("height").max = String(c.max_side || 16384);

  const tiers = speedTiers(card);
  $("tier-field").hidden = !tiers.length;
  $("tier").replaceChildren(el("option", { value: "", text: "Model default" }),
    ...tiers.map((t) => el("option", { value: t.value, text: t.hint ? `${t.label} — ${t.hint}` : t.label })));

  const local = (c.routes || []).some((r) => r.kind === "diffusers");
  $("loras-field").hidden = !local;
  fillSizes();
  applyMode();
}

function fillSizes() {
  const c = caps();
  const select = $("size");
  const before = select.value;
  const sizes = c.sizes && typeof c.sizes === "object" ? c.sizes : {};
  const groups = Object.entries(sizes).map(([tier, ratios]) => el("optgroup", { label: `${tier} sizes` },
    ...Object.entries(ratios).map(([ratio, size]) => el("option", { value: size, text: `${ratio} — ${size}` }))));
  const auto = editMode() ? "Auto (follows the first image)" : `Default (${c.default_size || "model default"})`;
  select.replaceChildren(el("option", { value: "", text: auto }), ...groups,
    el("optgroup", { label: "Other" },
      el("option", { value: "@ratio", text: "Aspect ratio and resolution…" }),
      el("option", { value: "@custom", text: "Custom width × height…" })));
  select.value = [...select.options].some((o) => o.value === before) ? before : "";

  const ratios = new Set();
  for (const table of Object.values(sizes)) for (const ratio of Object.keys(table)) ratios.add(ratio);
  $("aspect-list").replaceChildren(...[...ratios].map((r) => el("option", { value: r })));
  const resolutions = [...new Set([...Object.keys(sizes), ...RESOLUTIONS])];
  $("resolution").replaceChildren(el("option", { value: "", text: "Model default" }),
    ...resolutions.map((r) => el("option", { value: r, text: r })));
  if (c.default_size) {
    const [w, h] = String(c.default_size).split("x");
    if (!$("width").dataset.touched) $("width").value = w;
    if (!$("height").dataset.touched) $("height").value = h;
  }
  applySize();
}

function applySize() {
  $("ratio-fields").hidden = $("size").value !== "@ratio";
  $("custom-fields").hidden = $("size").value !== "@custom";
}

function applyMode() {
  const edit = editMode();
  $("edit-section").hidden = !edit;
  $("submit").textContent = edit ? "Edit" : "Generate";
  const first = $("size").options[0];
  if (first) first.textContent = edit ? "Auto (follows the first image)" : `Default (${caps().default_size || "model default"})`;
  const max = maxImages();
  $("images-input").multiple = max > 1;
  $("images-hint").textContent = max > 1 ? `PNG, JPEG, WebP or GIF; up to ${max} images. The first one can take a mask.`
    : "PNG, JPEG, WebP or GIF; one image.";
  if (state.images.length > max && max > 0) {
    for (const img of state.images.splice(max)) URL.revokeObjectURL(img.url);
    renderImages();
  }
}

// ---- input images and the mask ------------------------------------------------------------------------

async function addImages(files) {
  const max = maxImages();
  const accepted = [...files].filter((f) => /^image\/(png|jpeg|webp|gif)$/.test(f.type));
  if (accepted.length < files.length) setStatus("Skipped files that are not PNG, JPEG, WebP or GIF images.");
  const room = max - state.images.length;
  if (accepted.length > room) {
    setStatus(`This model takes at most ${max} image${max === 1 ? "" : "s"}; kept the first ${max}.`);
  }
  const firstBefore = state.images[0];
  for (const file of accepted.slice(0, Math.max(0, room))) {
    const url = URL.createObjectURL(file);
    const size = await imageSize(url).catch(() => null);
    if (!size) {
      URL.revokeObjectURL(url);
      setStatus(`Could not read ${file.name} as an image.`);
      continue;
    }
    state.images.push({ file, url, name: file.name || "image.png", ...size });
  }
  renderImages(state.images[0] !== firstBefore);
}

function imageSize(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve({ width: img.naturalWidth, height: img.naturalHeight });
    img.onerror = () => reject(new Error("not an image"));
    img.src = url;
  });
}

function renderImages(firstChanged = true) {
  const list = $("thumbs");
  list.replaceChildren(...state.images.map((img, i) => {
    const label = `Image ${i + 1}: ${img.name}, ${img.width}×${img.height}`;
    const remove = el("button", { type: "button", text: "Remove", "aria-label": `Remove image ${i + 1} (${img.name})` });
    remove.addEventListener("click", () => {
      const [gone] = state.images.splice(i, 1);
      URL.revokeObjectURL(gone.url);
      renderImages(i === 0);
      $("images-input").focus();
    });
    const first = i > 0 ? el("button", { type: "button", text: "Make first",
      "aria-label": `Make image ${i + 1} (${img.name}) the first` }) : null;
    first?.addEventListener("click", () => {
      state.images.unshift(...state.images.splice(i, 1));
      renderImages(true);
    });
    return el("li", {}, el("img", { src: img.url, alt: label }),
      el("span", { class: "thumb-text", text: `${i === 0 ? "First · " : ""}${img.name} · ${img.width}×${img.height}` }),
      first, remove);
  }));
  const max = maxImages();
  $("drop-text").textContent = state.images.length >= max ? `${max} of ${max} images chosen`
    : "Drop images here, or choose files";
  if (!firstChanged) return;
  const firstImage = state.images[0];
  $("mask-editor").hidden = !firstImage;
  if (firstImage) {
    $("mask-image").src = firstImage.url;
    $("mask-image").alt = `The first input image (${firstImage.name}); paint over it to mark the area to edit`;
    mask.reset(firstImage.width, firstImage.height);
  } else {
    $("mask-image").removeAttribute("src");
    mask.reset(0, 0);
  }
}

function initEdits() {
  mask = new MaskEditor($("mask-canvas"), { brush: $("brush"), erase: $("erase"), onChange: maskChanged });
  $("clear-mask").addEventListener("click", () => mask.clear());
  $("images-input").addEventListener("change", async (e) => {
    await addImages(e.target.files);
    e.target.value = "";
  });
  const zone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) zone.addEventListener(type, () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer?.files?.length) addImages(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    if (!editMode() || !e.clipboardData?.files?.length) return;
    e.preventDefault();
    addImages(e.clipboardData.files);
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", applyMode);
}

let maskUrl = null;

async function maskChanged() {
  const link = $("mask-download");
  if (maskUrl) URL.revokeObjectURL(maskUrl);
  maskUrl = null;
  const blob = mask && mask.painted ? await mask.toBlob() : null;
  link.hidden = !blob;
  if (blob) {
    maskUrl = URL.createObjectURL(blob);
    link.href = maskUrl;
  } else {
    link.removeAttribute("href");
  }
}

// ---- LoRAs ----------------------------------------------------------------------------------------------

function addLoraRow() {
  const rows = $("lora-rows");
  if (rows.children.length >= MAX_LORAS) return;
  const row = $("lora-row").content.firstElementChild.cloneNode(true);
  const n = rows.children.length + 1;
  const [pathLabel, scaleLabel] = row.querySelectorAll("label");
  const path = row.querySelector(".lora-path");
  const scale = row.querySelector(".lora-scale");
  path.id = `lora-path-${Date.now()}-${n}`;
  scale.id = `${path.id}-scale`;
  pathLabel.htmlFor = path.id;
  scaleLabel.htmlFor = scale.id;
  pathLabel.textContent = `LoRA ${n} path`;
  scaleLabel.textContent = `LoRA ${n} scale`;
  row.querySelector(".remove-lora").addEventListener("click", () => {
    row.remove();
    renumberLoras();
    $("add-lora").focus();
  });
  rows.append(row);
  renumberLoras();
  path.focus();
}

function renumberLoras() {
  const rows = [...$("lora-rows").children];
  rows.forEach((row, i) => {
    const [pathLabel, scaleLabel] = row.querySelectorAll("label");
    pathLabel.textContent = `LoRA ${i + 1} path`;
    scaleLabel.textContent = `LoRA ${i + 1} scale`;
    row.querySelector(".remove-lora").setAttribute("aria-label", `Remove LoRA ${i + 1}`);
  });
  $("add-lora").disabled = rows.length >= MAX_LORAS;
}

// ---- the request ----------------------------------------------------------------------------------------

function number(input) {
  const text = input.value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : text;
}

function randomSeed() {
  const buf = new Uint32Array(1);
  crypto.getRandomValues(buf);
  return buf[0];
}

/** The exact request the form describes: fields in order, and the files of an edit. */
async function buildRequest() {
  const fields = {};
  const edit = editMode();
  fields.model = $("model").value;
  fields.prompt = $("prompt").value;
  if ($("negative").value.trim()) fields.negative_prompt = $("negative").value;
  const size = $("size").value;
  if (size === "@ratio") {
    if ($("aspect").value.trim()) fields.aspect_ratio = $("aspect").value.trim();
    if ($("resolution").value) fields.resolution = $("resolution").value;
  } else if (size === "@custom") {
    fields.size = `${$("width").value.trim()}x${$("height").value.trim()}`;
  } else if (size) {
    fields.size = size;
  }
  const n = number($("n"));
  if (n !== undefined) fields.n = n;
  const seed = number($("seed"));
  fields.seed = seed === undefined ? randomSeed() : seed;
  const steps = number($("steps"));
  if (steps !== undefined) fields.num_inference_steps = steps;
  const cfg = number($("cfg"));
  if (cfg !== undefined) fields.cfg_scale = cfg;
  if (!$("tier-field").hidden && $("tier").value) fields.tier = $("tier").value;
  if (!$("loras-field").hidden) {
    const loras = [...$("lora-rows").children]
      .map((row) => ({ path: row.querySelector(".lora-path").value.trim(), scale: number(row.querySelector(".lora-scale")) }))
      .filter((l) => l.path)
      .map((l) => (l.scale === undefined ? { path: l.path } : l));
    if (loras.length) fields.loras = loras;
  }
  fields.output_format = $("format").value;
  if (LOSSY.has($("format").value)) fields.output_compression = Number($("compression").value);
  if ($("enhance").value) fields.prompt_enhancement = $("enhance").value;
  fields.response_format = "b64_json";
  const stream = $("partials").value !== "off";
  if (stream) {
    fields.stream = true;
    fields.partial_images = Number($("partials").value);
  }

  // Images a stream must bring (the API's default n is 1): fewer is a stream cut short.
  const expected = stream ? (Number.isInteger(fields.n) && fields.n > 0 ? fields.n : 1) : 0;
  const request = { endpoint: edit ? "edits" : "generations", fields, files: [], stream, expected,
    baseUrl: location.origin, hasKey: Boolean(getKey()) };
  if (!edit) {
    request.body = fields;
    return request;
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    form.append(name, typeof value === "object" ? JSON.stringify(value) : String(value));
  }
  const field = state.images.length > 1 ? "image[]" : "image";
  state.images.forEach((img, i) => {
    const name = safeFileName(img.name, `image-${i + 1}.png`);
    form.append(field, img.file, name);
    request.files.push({ field, name });
  });
  const maskBlob = await mask.toBlob();
  if (maskBlob && state.images.length) {
    form.append("mask", maskBlob, "mask.png");
    request.files.push({ field: "mask", name: "mask.png" });
  }
  request.form = form;
  return request;
}

// ---- results --------------------------------------------------------------------------------------------

function seconds(ms) {
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function createRun(request) {
  state.runs += 1;
  const id = `run-${state.runs}`;
  const f = request.fields;
  const code = el("pre", { class: "code", id: `${id}-code`, tabindex: "0", "aria-label": "Request as code" });
  const codeBox = el("details", { class: "code-box" }, el("summary", { text: "Request as code" }), code);
  const copyButtons = Object.keys(SNIPPETS).map((kind) => {
    const button = el("button", { type: "button", class: `copy copy-${kind}`, text: `Copy as ${LABELS[kind]}`,
      "aria-controls": code.id });
    button.addEventListener("click", () => copySnippet(kind, request, code, codeBox));
    return button;
  });
  const meta = el("p", { class: "run-meta", text: `${f.model} · ${request.endpoint === "edits" ? "edit" : "generate"} · working…` });
  const images = el("div", { class: "run-images" });
  const article = el("article", { class: "run", id, "aria-labelledby": `${id}-title`, "data-state": "running" },
    el("header", { class: "run-head" },
      el("h3", { id: `${id}-title`, class: "run-prompt", text: f.prompt || "(no prompt)" }),
      meta,
      el("div", { class: "copy-row", role: "group", "aria-label": "Copy the request" }, copyButtons)),
    codeBox, images);
  $("empty")?.remove();
  $("gallery").prepend(article);
  // One column (a phone): the results are below the form, so bring the new run into view.
  if (matchMedia("(max-width: 860px)").matches) article.scrollIntoView({ block: "start" });
  return { article, meta, images, request, count: 0, started: performance.now() };
}

async function copySnippet(kind, request, code, box) {
  const text = SNIPPETS[kind](request);
  code.textContent = text;
  code.dataset.kind = kind;
  box.open = true;
  try {
    await navigator.clipboard.writeText(text);
    setStatus(`Copied the ${LABELS[kind]} code for this request.`);
  } catch {
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    code.focus();
    setStatus(`The ${LABELS[kind]} code is shown and selected: copy it with Ctrl+C.`);
  }
}

function addImage(run, { blob, seed, size, format, route, attempts, revised }) {
  const index = run.count;
  run.count += 1;
  const elapsed = performance.now() - run.started;
  const url = URL.createObjectURL(blob);
  const ext = format === "jpeg" ? "jpg" : format;
  const prompt = run.request.fields.prompt || "";
  const facts = [["Seed", seed ?? "—"], ["Size", size || "—"], ["Format", format || "—"],
    ["Route", route || (run.request.stream ? "— (stream)" : "—")], ["Attempts", attempts || "—"],
    ["Time", seconds(elapsed)]];
  const useSeed = el("button", { type: "button", text: "Use this seed", disabled: seed === undefined || seed === null });
  useSeed.addEventListener("click", () => {
    $("seed").value = String(seed);
    setStatus(`Seed set to ${seed}.`);
  });
  const figure = el("figure", { class: "image", "data-seed": seed ?? "", "data-size": size || "",
      "data-format": format || "", "data-route": route || "", "data-attempts": attempts || "" },
    el("a", { href: url, target: "_blank", rel: "noopener", class: "image-link",
      "aria-label": `Open image ${index + 1} in a new tab` },
    el("img", { src: url, alt: `Image ${index + 1} for “${prompt.slice(0, 120)}”, seed ${seed ?? "unknown"}` })),
    el("figcaption", {},
      el("dl", { class: "facts" }, facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })])),
      revised && revised !== prompt ? el("p", { class: "revised" }, el("strong", { text: "Revised prompt: " }), revised) : null,
      el("div", { class: "image-actions" },
        el("a", { href: url, download: `qwen-image-${seed ?? index}.${ext || "png"}`, class: "button-link",
          text: "Download" }),
        useSeed)));
  run.images.append(figure);
}

function showPartial(data) {
  const box = $("previews");
  box.hidden = false;
  const index = Number(data.image_index || 0);
  let slot = box.querySelector(`[data-index="${index}"]`);
  if (!slot) {
    slot = el("figure", { class: "preview", "data-index": String(index) }, el("img", { alt: "" }), el("figcaption"));
    box.append(slot);
  }
  const img = slot.querySelector("img");
  const previous = img.src;
  img.src = URL.createObjectURL(b64ToBlob(data.b64_json, MIME[data.output_format] || "image/png"));
  img.alt = `Preview ${Number(data.partial_image_index) + 1} of image ${index + 1}`;
  slot.querySelector("figcaption").textContent = `Image ${index + 1}: preview ${Number(data.partial_image_index) + 1}`;
  if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
  setStatus(`Preview ${Number(data.partial_image_index) + 1} of image ${index + 1} arrived.`);
}

function clearPreviews(index) {
  const box = $("previews");
  const slots = index === undefined ? [...box.children] : [...box.querySelectorAll(`[data-index="${index}"]`)];
  for (const slot of slots) {
    const src = slot.querySelector("img")?.src;
    if (src && src.startsWith("blob:")) URL.revokeObjectURL(src);
    slot.remove();
  }
  box.hidden = !box.children.length;
}

function seedOf(fields, index) {
  return typeof fields.seed === "number" ? (fields.seed + index) % (SEED_MAX + 1) : undefined;
}

async function submit(e) {
  e.preventDefault();
  if (state.running) return;
  clearError();
  let request;
  try {
    request = await buildRequest();
  } catch (err) {
    showError(err);
    return;
  }
  const controller = new AbortController();
  state.running = controller;
  setBusy(true);
  const run = createRun(request);
  const timer = setInterval(() => {
    run.meta.textContent = `${request.fields.model} · working… ${seconds(performance.now() - run.started)}`;
  }, 250);
  setStatus(request.endpoint === "edits" ? "Editing…" : "Generating…");
  try {
    const { response, payload } = await sendImageRequest(request, {
      signal: controller.signal,
      onEvent(type, data) {
        if (type.endsWith(".partial_image")) {
          showPartial(data);
        } else if (type.endsWith(".completed")) {
          const index = run.count;
          clearPreviews(data.image_index ?? index);
          addImage(run, { blob: b64ToBlob(data.b64_json, MIME[data.output_format] || "image/png"),
            seed: seedOf(request.fields, index), size: data.size, format: data.output_format,
            revised: data.revised_prompt });
          setStatus(`Image ${index + 1} arrived.`);
        }
      },
    });
    if (payload) {
      const route = response.headers.get("x-qip-route") || "";
      const attempts = response.headers.get("x-qip-attempts") || "";
      (payload.data || []).forEach((item, i) => {
        if (!item.b64_json) return;
        const seed = Array.isArray(payload.seeds) ? payload.seeds[i] : seedOf(request.fields, i);
        addImage(run, { blob: b64ToBlob(item.b64_json, MIME[payload.output_format] || "image/png"), seed,
          size: payload.size, format: payload.output_format, route, attempts, revised: item.revised_prompt });
      });
    }
    const took = seconds(performance.now() - run.started);
    run.meta.textContent = `${request.fields.model} · ${run.count} image${run.count === 1 ? "" : "s"} · ${took}`;
    run.article.dataset.state = "done";
    setStatus(`${run.count} image${run.count === 1 ? "" : "s"} in ${took}.`);
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("Cancelled.");
    } else {
      showError(err);
      setStatus("The request failed.");
    }
    if (!run.count) {
      run.article.remove();
      if (!$("gallery").children.length) {
        $("gallery").append(el("p", { id: "empty", class: "empty", text: "Images you make appear here, newest first." }));
      }
    } else {
      run.article.dataset.state = "failed";
      run.meta.textContent = `${request.fields.model} · ${run.count} image${run.count === 1 ? "" : "s"}, then an error`;
    }
  } finally {
    clearInterval(timer);
    clearPreviews();
    state.running = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("submit").disabled = busy;
  $("cancel").hidden = !busy;
  document.querySelector(".results").setAttribute("aria-busy", busy ? "true" : "false");
}

// ---- start ----------------------------------------------------------------------------------------------

function init() {
  initKey();
  initEdits();
  const form = $("gen-form");
  form.addEventListener("submit", submit);
  form.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  $("cancel").addEventListener("click", () => state.running?.abort());
  $("model").addEventListener("change", applyModel);
  $("size").addEventListener("change", applySize);
  for (const id of ["width", "height"]) $(id).addEventListener("input", () => { $(id).dataset.touched = "1"; });
  $("dice").addEventListener("click", () => {
    $("seed").value = String(randomSeed());
    setStatus(`Seed set to ${$("seed").value}.`);
  });
  $("add-lora").addEventListener("click", addLoraRow);
  const syncFormat = () => {
    $("compression-field").hidden = !LOSSY.has($("format").value);
  };
  $("format").addEventListener("change", syncFormat);
  $("compression").addEventListener("input", () => { $("compression-value").textContent = $("compression").value; });
  syncFormat();
  loadModels();
}

init();
