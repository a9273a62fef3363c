// The LoRA rows of the form (local diffusers routes only): up to MAX_LORAS, numbered in their labels.

import { $ } from "./dom.js";

const MAX_LORAS = 3;

export function addLoraRow() {
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
