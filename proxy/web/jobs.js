// Background jobs: follow one until it ends (its status and progress on its run), and this key's job list.

import { ApiError, apiFetch, errorFrom } from "./api.js";
import { $, el } from "./dom.js";

const POLL_MS = 500;
const LIST_LIMIT = 10;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export function progressText(job) {
  const p = job.progress;
  return p && p.steps_total ? ` · step ${p.steps_done}/${p.steps_total}` : "";
}

async function getJob(id) {
  const response = await apiFetch(`/v1/images/jobs/${encodeURIComponent(id)}`, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

/**
 * Poll a job (the 202 body) until it ends; its state is shown through onUpdate(job). Resolves with the
 * job's result once completed; a failed job throws its ApiError, a cancelled one an AbortError. An abort
 * of `signal` (the Cancel button) asks the proxy to cancel the job, and the poll goes on until it says so.
 */
export async function followJob(job, signal, onUpdate) {
  const cancel = () => {
    apiFetch(`/v1/images/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }).catch(() => {});
  };
  signal.addEventListener("abort", cancel, { once: true });
  try {
    for (;;) {
      onUpdate(job);
      if (job.status === "completed") return job.result;
      if (job.status === "failed") {
        const err = job.error || {};
        throw new ApiError(String(err.message || "The job failed."),
          { type: err.type ?? null, code: err.code ?? null, param: err.param ?? null });
      }
      if (job.status === "cancelled") throw new DOMException("The job was cancelled.", "AbortError");
      await sleep(POLL_MS);
      job = await getJob(job.id);
    }
  } finally {
    signal.removeEventListener("abort", cancel);
  }
}

/** The newest jobs of this key, listed under "Background jobs"; `show(job)` displays a completed one. */
export async function refreshJobs(show) {
  const section = $("jobs-section");
  let page;
  try {
    const response = await apiFetch(`/v1/images/jobs?limit=${LIST_LIMIT}`, { headers: { Accept: "application/json" } });
    if (!response.ok) {
      section.hidden = true; // no key yet, or background jobs switched off on this server
      return;
    }
    page = await response.json();
  } catch {
    return;
  }
  const items = (page.data || []).map((job) => {
    const when = new Date(job.created_at * 1000).toLocaleTimeString();
    const text = `${job.model} · ${job.status}${progressText(job)} · ${when}`;
    const prompt = job.request && job.request.prompt ? job.request.prompt : "";
    const li = el("li", { class: "job", "data-id": job.id, "data-status": job.status },
      el("span", { class: "job-prompt", text: prompt.slice(0, 80) || "(no prompt)" }),
      el("span", { class: "job-meta", text }));
    if (job.status === "completed") {
      const button = el("button", { type: "button", text: "Show", "aria-label": `Show the images of ${job.id}` });
      button.addEventListener("click", async () => show(await getJob(job.id)));
      li.append(button);
    }
    return li;
  });
  $("jobs").replaceChildren(...items);
  $("jobs-empty").hidden = items.length > 0;
  section.hidden = false;
}
