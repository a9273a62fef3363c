// The mask painted over the first input image. OpenAI's semantics: the mask is a PNG the size of the
// image whose transparent pixels mark the area to edit; everything else is opaque and kept.

export class MaskEditor {
  /**
   * @param {HTMLCanvasElement} canvas drawn over the image (same box), at the image's own resolution
   * @param {{brush: HTMLInputElement, erase: HTMLInputElement, onChange: () => void}} controls
   */
  constructor(canvas, { brush, erase, onChange }) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.brush = brush;
    this.erase = erase;
    this.onChange = onChange || (() => {});
    this.painted = false;
    this.last = null;
    this.pointer = null;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      canvas.addEventListener(type, (e) => this.up(e));
    }
  }

  /** Start over on an image of this size (its natural pixels). */
  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
    this.onChange();
  }

  point(e) {
    const rect = this.canvas.getBoundingClientRect();
    const sx = this.canvas.width / rect.width;
    const sy = this.canvas.height / rect.height;
    return { x: (e.clientX - rect.left) * sx, y: (e.clientY - rect.top) * sy, scale: (sx + sy) / 2 };
  }

  down(e) {
    if (e.button !== 0 || !this.canvas.width) return;
    e.preventDefault();
    this.pointer = e.pointerId;
    this.canvas.setPointerCapture?.(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (this.pointer !== e.pointerId || !this.last) return;
    e.preventDefault();
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  up(e) {
    if (this.pointer !== e.pointerId) return;
    this.pointer = null;
    this.last = null;
    if (this.erase.checked) this.painted = this.hasPaint();
    this.onChange();
  }

  stroke(from, to) {
    const ctx = this.ctx;
    ctx.save();
    // The brush size is in screen pixels: the same feel whatever the image's resolution.
    ctx.lineWidth = Math.max(1, Number(this.brush.value || 40) * to.scale);
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = "#ff2d55";
    ctx.globalCompositeOperation = this.erase.checked ? "destination-out" : "source-over";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    ctx.restore();
    if (!this.erase.checked) this.painted = true;
  }

  hasPaint() {
    const { width, height } = this.canvas;
    if (!width || !height) return false;
    const data = this.ctx.getImageData(0, 0, width, height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i]) return true;
    return false;
  }

  /** The mask as a PNG Blob: opaque black, transparent where painted. Null when nothing is painted. */
  async toBlob() {
    if (!this.painted) return null;
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(this.canvas, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }
}
