// What the page holds between events, and what the chosen model can do.

// Edit models that do not say how many images they take: Qwen-Image-Edit takes 1 to 3.
const DEFAULT_MAX_IMAGES = 3;

export const state = {
  models: [],
  model: null,
  images: [], // {file, url, name, width, height}
  running: null, // AbortController of the request in flight
  runs: 0,
};

export function caps(card = state.model) {
  return (card && card.capabilities) || {};
}

export function maxImages(card = state.model) {
  const c = caps(card);
  if (Number(c.max_input_images) > 0) return Number(c.max_input_images);
  return c.edits === true ? DEFAULT_MAX_IMAGES : 0;
}

export function editMode() {
  return maxImages() > 0 && document.querySelector('input[name="mode"]:checked')?.value === "edit";
}
