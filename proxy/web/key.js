// The API key form: kept in this tab only (api.js stores it); a new key reloads the models.

import { getKey, setKey } from "./api.js";
import { $, clearError, setStatus, showError } from "./dom.js";
import { loadModels } from "./models.js";

export function initKey() {
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
