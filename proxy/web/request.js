// The request: what the form describes, as the fields, body and files the proxy's image API takes.

import { getKey } from "./api.js";
import { $ } from "./dom.js";
import { maskBlob } from "./edit-images.js";
import { safeFileName } from "./snippets.js";
import { editMode, state } from "./state.js";

export const LOSSY = new Set(["jpeg", "webp", "avif"]);

function number(input) {
  const text = input.value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : text;
}

export function randomSeed() {
  const buf = new Uint32Array(1);
  crypto.getRandomValues(buf);
  return buf[0];
}

/** The exact request the form describes: fields in order, and the files of an edit. */
export async function buildRequest() {
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
  const background = $("background").checked;
  if (background) fields.background = true;
  const stream = !background && $("partials").value !== "off";
  if (stream) {
    fields.stream = true;
    fields.partial_images = Number($("partials").value);
  }

  // Images a stream must bring (the API's default n is 1): fewer is a stream cut short.
  const expected = stream ? (Number.isInteger(fields.n) && fields.n > 0 ? fields.n : 1) : 0;
  const request = { endpoint: edit ? "edits" : "generations", fields, files: [], stream, expected, background,
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
  const mask = await maskBlob();
  if (mask && state.images.length) {
    form.append("mask", mask, "mask.png");
    request.files.push({ field: "mask", name: "mask.png" });
  }
  request.form = form;
  return request;
}
