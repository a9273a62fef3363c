// The input images of an edit: chosen, dropped or pasted; shown as thumbnails; the first one takes a mask.

import { $, el, setStatus } from "./dom.js";
import { MaskEditor } from "./mask.js";
import { editMode, maxImages, state } from "./state.js";

let mask;

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

export function renderImages(firstChanged = true) {
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

export function initEdits() {
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

/** The mask painted over the first image, as a PNG (null when nothing is painted). */
export function maskBlob() {
  return mask.toBlob();
}
