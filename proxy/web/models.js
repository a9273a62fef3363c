// The model picker: the models this proxy lists, and the form fitted to the chosen one (its mode, sizes,
// speed tiers, LoRAs).

import { ApiError, listModels } from "./api.js";
import { $, clearError, el, setStatus, showError } from "./dom.js";
import { renderImages } from "./edit-images.js";
import { caps, editMode, maxImages, state } from "./state.js";

const RESOLUTIONS = ["0.5K", "1K", "2K", "4K"];

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

export async function loadModels() {
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

export function applyModel() {
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

export function applySize() {
  $("ratio-fields").hidden = $("size").value !== "@ratio";
  $("custom-fields").hidden = $("size").value !== "@custom";
}

export function applyMode() {
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
