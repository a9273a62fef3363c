// The results: one article per run (newest first) with its images and facts, stream previews, and the
// request as code.

import { MIME, b64ToBlob } from "./api.js";
import { $, el, setStatus } from "./dom.js";
import { SNIPPETS } from "./snippets.js";
import { state } from "./state.js";

const SEED_MAX = 4294967295;
const LABELS = { curl: "curl", python: "Python", node: "Node" };

export function seconds(ms) {
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

export function createRun(request) {
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

export function addImage(run, { blob, seed, size, format, route, attempts, revised }) {
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

export function showPartial(data) {
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

export function clearPreviews(index) {
  const box = $("previews");
  const slots = index === undefined ? [...box.children] : [...box.querySelectorAll(`[data-index="${index}"]`)];
  for (const slot of slots) {
    const src = slot.querySelector("img")?.src;
    if (src && src.startsWith("blob:")) URL.revokeObjectURL(src);
    slot.remove();
  }
  box.hidden = !box.children.length;
}

export function seedOf(fields, index) {
  return typeof fields.seed === "number" ? (fields.seed + index) % (SEED_MAX + 1) : undefined;
}
