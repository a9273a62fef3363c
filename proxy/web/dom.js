// The page's DOM helpers, and the two lines it reports on: the status line and the error box.

import { ApiError } from "./api.js";

// API `param` -> the control that sets it, to mark it invalid.
const PARAM_INPUT = { model: "model", prompt: "prompt", negative_prompt: "negative", size: "size", n: "n",
  seed: "seed", aspect_ratio: "aspect", resolution: "resolution", num_inference_steps: "steps", cfg_scale: "cfg",
  output_format: "format", output_compression: "compression", prompt_enhancement: "enhance", tier: "tier",
  partial_images: "partials", image: "images-input", loras: "add-lora" };

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
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

// ---- status and errors ------------------------------------------------------------------------------

export function setStatus(text) {
  $("status").textContent = text;
}

export function clearError() {
  const box = $("error");
  box.hidden = true;
  box.replaceChildren();
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

export function showError(err) {
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
