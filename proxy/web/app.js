// The playground: a form for the proxy's image API, results streamed in, and the request as code.
// Plain ES modules, no build step; everything it shows comes from this proxy's own /v1 endpoints.
// This module sends the form and wires the page; the parts live in the modules it imports.

import { MIME, b64ToBlob, sendImageRequest } from "./api.js";
import { $, clearError, el, setStatus, showError } from "./dom.js";
import { initEdits } from "./edit-images.js";
import { followJob, progressText, refreshJobs } from "./jobs.js";
import { initKey } from "./key.js";
import { addLoraRow } from "./loras.js";
import { applyMode, applyModel, applySize, loadModels } from "./models.js";
import { LOSSY, buildRequest, randomSeed } from "./request.js";
import { addImage, clearPreviews, createRun, seconds, seedOf, showPartial } from "./results.js";
import { state } from "./state.js";
import { initUsage } from "./usage.js";

// ---- sending the form ------------------------------------------------------------------------------------

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
    run.meta.textContent = `${request.fields.model} · ${run.note || "working…"} ${seconds(performance.now() - run.started)}`;
  }, 250);
  setStatus(request.endpoint === "edits" ? "Editing…" : "Generating…");
  try {
    let { response, payload } = await sendImageRequest(request, {
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
    if (request.background) { // the answer is a job (202): follow it to its result
      run.article.dataset.job = payload.id;
      refreshJobs(showJob);
      payload = await followJob(payload, controller.signal, (job) => {
        run.note = `background job ${job.status}${progressText(job)} ·`;
        setStatus(`Background job ${job.id}: ${job.status}${progressText(job)}.`);
      });
    }
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
    if (request.background) refreshJobs(showJob);
  }
}

/** A finished background job's images, as a run of their own. */
function showJob(job) {
  const r = job.request || {};
  const fields = { model: job.model, prompt: r.prompt || "", seed: r.seed };
  const run = createRun({ endpoint: job.kind === "edit" ? "edits" : "generations", fields, files: [], stream: false,
    baseUrl: location.origin, hasKey: true });
  const result = job.result || { data: [] };
  (result.data || []).forEach((item, i) => {
    if (!item.b64_json) return;
    const seed = Array.isArray(result.seeds) ? result.seeds[i] : seedOf(fields, i);
    addImage(run, { blob: b64ToBlob(item.b64_json, MIME[result.output_format] || "image/png"), seed,
      size: result.size, format: result.output_format, revised: item.revised_prompt });
  });
  run.meta.textContent = `${job.model} · background job ${job.id} · ${run.count} image${run.count === 1 ? "" : "s"}`;
  run.article.dataset.state = "done";
  run.article.dataset.job = job.id;
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
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", applyMode);
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
  $("refresh-jobs").addEventListener("click", () => refreshJobs(showJob));
  initUsage();
  loadModels();
  refreshJobs(showJob);
}

init();
