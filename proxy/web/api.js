// Talking to the proxy: the API key (this tab only), JSON and multipart calls, OpenAI errors, SSE events.

const KEY_STORAGE = "qip.apiKey";

export function getKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function setKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage switched off: the key lasts until the page is left
  }
}

/** An error as the API described it: OpenAI's {error: {message, type, param, code}} and the HTTP status. */
export class ApiError extends Error {
  constructor(message, { status = 0, type = null, param = null, code = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.param = param;
    this.code = code;
  }
}

function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** fetch() with the key; a network failure becomes an ApiError that says so. */
export async function apiFetch(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  try {
    return await fetch(path, { ...options, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Could not reach the proxy (${e.message}). Is it still running?`);
  }
}

/** The ApiError a failed response describes (its JSON error message, else its status and text). */
export async function errorFrom(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a reverse proxy's page, say
  }
  const err = body && typeof body === "object" ? body.error : null;
  if (err && typeof err === "object" && err.message) {
    return new ApiError(String(err.message), { status: response.status, ...pick(err) });
  }
  if (typeof err === "string") return new ApiError(err, { status: response.status });
  const snippet = text.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300);
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return new ApiError(`HTTP ${response.status}${reason}${snippet ? `: ${snippet}` : ""}`, { status: response.status });
}

function pick(err) {
  return { type: err.type ?? null, param: err.param ?? null, code: err.code ?? null };
}

export async function listModels() {
  const response = await apiFetch("/v1/models", { headers: { Accept: "application/json" } });
  if (!response.ok) throw await errorFrom(response);
  const body = await response.json();
  return Array.isArray(body.data) ? body.data : [];
}

/**
 * Send one image request. `request` is {endpoint, body (JSON) | form (FormData)}; `stream` says whether
 * the answer is SSE. Calls onEvent(type, data) for each event of a stream; returns {response, payload}
 * for a JSON answer. Errors (HTTP or an SSE `error` event) are thrown as ApiError.
 */
export async function sendImageRequest(request, { signal, onEvent }) {
  const init = { method: "POST", signal, headers: {} };
  if (request.form) {
    init.body = request.form;
  } else {
    init.body = JSON.stringify(request.body);
    init.headers["Content-Type"] = "application/json";
  }
  init.headers.Accept = request.stream ? "text/event-stream" : "application/json";
  const response = await apiFetch(`/v1/images/${request.endpoint}`, init);
  if (!response.ok) throw await errorFrom(response);
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("text/event-stream")) {
    const completed = await readEvents(response, onEvent);
    // The proxy ends every stream with all n images or an error event: fewer means the connection was
    // closed early (a restart, a reverse proxy's timeout), which is not a success.
    if (request.expected && completed < request.expected) {
      throw new ApiError(`The stream ended after ${completed} of ${request.expected} image${
        request.expected === 1 ? "" : "s"}, without an error: the connection was closed early.`);
    }
    return { response, payload: null };
  }
  const text = await response.text();
  try {
    return { response, payload: JSON.parse(text) };
  } catch {
    throw new ApiError(`The proxy answered with something that is not JSON: ${text.slice(0, 200)}`,
      { status: response.status });
  }
}

/**
 * Read an SSE body to its end: `event:` / `data:` lines, blank-line separated, `:` comments skipped.
 * Returns how many `*.completed` events (images) it carried.
 */
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const boundary = /\r?\n\r?\n/g;
  // The text after the last boundary, as the pieces it came in: a completed event is megabytes of
  // base64 in many chunks, and joining (or scanning) the whole of it on every chunk made a 32 MB
  // event cost seconds of the page's time. Only the new piece is scanned, with the 3 characters
  // before it (a boundary may begin there); the pieces are joined once a boundary is in sight.
  let pieces = [];
  let tail = "";
  let sawAny = false;
  let completed = 0;
  const count = (type, data) => {
    if (type.endsWith(".completed")) completed += 1;
    onEvent(type, data);
  };
  for (;;) {
    const { value, done } = await readChunk(reader);
    const text = decoder.decode(value || new Uint8Array(), { stream: !done });
    boundary.lastIndex = 0;
    if (boundary.test(tail + text)) {
      const buffer = pieces.join("") + text;
      boundary.lastIndex = Math.max(0, buffer.length - text.length - tail.length);
      let start = 0;
      let match;
      while ((match = boundary.exec(buffer))) {
        const block = buffer.slice(start, match.index);
        start = boundary.lastIndex;
        if (dispatch(block, count)) sawAny = true;
      }
      pieces = [buffer.slice(start)];
      tail = pieces[0].slice(-3);
    } else if (text) {
      pieces.push(text);
      tail = (tail + text).slice(-3);
    }
    if (done) break;
  }
  const rest = pieces.join("");
  if (rest.trim() && dispatch(rest, count)) sawAny = true;
  if (!sawAny) throw new ApiError("The stream ended without any image or error.");
  return completed;
}

async function readChunk(reader) {
  try {
    return await reader.read();
  } catch (e) {
    if (e.name === "AbortError") throw e;
    // Chromium says only "network error" when the connection drops mid-body.
    throw new ApiError(`The connection to the proxy broke while the images were streaming (${e.message}).`);
  }
}

function dispatch(block, onEvent) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return false;
  let parsed;
  try {
    parsed = JSON.parse(data.join("\n"));
  } catch {
    throw new ApiError(`The stream sent an event that is not JSON: ${data.join(" ").slice(0, 200)}`);
  }
  const type = parsed && typeof parsed.type === "string" ? parsed.type : event;
  if (type === "error" || event === "error") {
    const err = parsed && typeof parsed.error === "object" && parsed.error ? parsed.error : parsed;
    throw new ApiError(String(err.message || "The stream ended with an error."), pick(err));
  }
  onEvent(type, parsed);
  return true;
}

/** base64 -> Blob of the given MIME type. */
export function b64ToBlob(b64, mime) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Blob([bytes], { type: mime });
}

export const MIME = { png: "image/png", jpeg: "image/jpeg", jpg: "image/jpeg", webp: "image/webp",
  gif: "image/gif", avif: "image/avif" };
