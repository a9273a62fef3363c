"""Partial images: cheap previews of the images a pipeline call is still denoising.

When: for k previews over S steps, after steps round(S*(i+1)/(k+1)), i = 0..k-1 (kept distinct
and increasing while k <= S), so the last preview comes well before the final image.

What: the denoised estimate, not the noisy latents. The flow-matching Euler step is
x_next = x + (sigma_next - sigma) * v, so two consecutive latents give the step's velocity v and the
clean estimate x0 = x_next - sigma_next * v. (At step 1 the previous latents are not visible to a
step callback: that preview shows the latents as they are.)

How, two methods (EngineConfig.preview):

- "latent" (default): a fixed linear map of the latent channels (plus a bias) to RGB, one value per
  latent pixel, upscaled to the output size. The map is fitted once per engine, on the first
  preview, by least squares (fit_latent_rgb): latents of synthetic colour images, paired with the
  colours the model's own VAE decodes them to. That is the same kind of matrix ComfyUI ships per
  model family, derived here from whichever VAE is loaded (real, fine-tuned or the tiny random
  one). The fit is one small VAE encode and decode (about 0.1 s for the tiny model on a CPU).
  Cost per preview: a matrix product over h*w*C values and one resize.
- "vae": the VAE decodes the estimate at half the latent resolution (a quarter of a full decode);
  truer colours and detail, but a decoder pass per preview (and with offload: model, each one
  moves the VAE onto the GPU and the transformer off it).

The cost of both is measured by bench/bench_engine.py --partials.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image
    from torch import Tensor

log = logging.getLogger(__name__)

MAX_PARTIALS = 3


def preview_steps(total: int, count: int) -> list[int]:
    """After which denoising steps (1-based) to make `count` previews of a `total`-step run."""
    steps: list[int] = []
    for i in range(count):
        step = round(total * (i + 1) / (count + 1))
        if count <= total:  # room for distinct steps: keep them increasing, leave room for the rest
            step = max(step, steps[-1] + 1 if steps else 1)
            step = min(step, total - (count - 1 - i))
        steps.append(min(max(step, steps[-1] if steps else 1, 1), total))
    return steps


class Previewer:
    """Turns a call's packed latents into preview images. Used on the engine's worker thread only."""

    def __init__(self, pipe: Any, method: str = "latent") -> None:
        self.pipe = pipe
        self.method = method
        self._matrix: Tensor | None = None  # (C + 1, 3) float32: channels and bias -> RGB in [-1, 1]
        self._lock = threading.Lock()

    # ----- the clean estimate -----

    def estimate(self, latents: Tensor, previous: Tensor | None, scheduler: Any) -> Tensor:
        """x0 from this step's latents and the previous step's (None: the latents as they are)."""
        if previous is None:
            return latents
        sigmas = getattr(scheduler, "sigmas", None)
        index = getattr(scheduler, "step_index", None)
        if sigmas is None or index is None or not 1 <= index < len(sigmas):
            return latents
        sigma_next, sigma = float(sigmas[index]), float(sigmas[index - 1])
        if sigma_next == sigma:
            return latents
        latents = latents.float()  # bf16 would lose the small difference between two steps
        velocity = (latents - previous.float()) / (sigma_next - sigma)
        return latents - sigma_next * velocity

    # ----- rendering -----

    def render(self, packed: Tensor, work_size: tuple[int, int], out_sizes: list[tuple[int, int]]) -> list[Image]:
        """Preview images of the rows of `packed` (B, seq, C*4), the first len(out_sizes) rows."""
        import torch

        pipe = self.pipe
        with torch.no_grad():
            latents = pipe._unpack_latents(packed, work_size[1], work_size[0], pipe.vae_scale_factor)
            latents = latents[:, :, 0]  # (B, C, h, w): one frame
            rgb = self._decode(latents) if self.method == "vae" else self._project(latents)
            pixels = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
        return [_to_image(arrays[i], size) for i, size in enumerate(out_sizes)]

    def _project(self, latents: Tensor) -> Tensor:
        import torch

        matrix = self.matrix().to(latents.device, torch.float32)
        flat = latents.float().permute(0, 2, 3, 1)  # (B, h, w, C)
        rgb = flat @ matrix[:-1] + matrix[-1]
        return rgb.permute(0, 3, 1, 2)

    def _decode(self, latents: Tensor) -> Tensor:
        import torch.nn.functional as F

        vae = self.pipe.vae
        h, w = latents.shape[-2:]
        if h >= 4 and w >= 4:
            latents = F.interpolate(latents.float(), size=(h // 2, w // 2), mode="area")
        mean, std = _latent_stats(vae, latents)
        raw = (latents * std + mean).to(vae.dtype).unsqueeze(2)
        return vae.decode(raw, return_dict=False)[0][:, :3, 0]  # RGB of an RGBA VAE (Qwen-Image-2.1)

    def matrix(self) -> Tensor:
        """The fitted latent -> RGB map (fitted on first use)."""
        with self._lock:
            if self._matrix is None:
                self._matrix = fit_latent_rgb(self.pipe)
            return self._matrix


def _to_image(pixels: np.ndarray, size: tuple[int, int]) -> Image:
    from PIL import Image

    image = Image.fromarray(pixels, "RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def _latent_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE's per-channel latent mean and std, shaped to broadcast over (B, C, h, w)."""
    import torch

    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=like.device).view(1, channels, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32, device=like.device).view(1, channels, 1, 1)
    return mean, std


def synthetic_images(count: int, side: int, cell: int, seed: int = 0) -> Tensor:
    """Colour fields for fitting: blocks of random colours (two latent pixels wide), smooth colour
    gradients, and mixes, as a (count, 3, side, side) tensor in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    grid = max(1, side // (2 * cell))
    images = []
    for i in range(count):
        colours = torch.rand(1, 3, grid, grid, generator=generator)
        if i % 3 == 0:
            image = F.interpolate(colours, size=(side, side), mode="nearest")
        elif i % 3 == 1:
            corners = torch.rand(1, 3, 2, 2, generator=generator)
            image = F.interpolate(corners, size=(side, side), mode="bilinear", align_corners=True)
        else:
            blocks = F.interpolate(colours, size=(side, side), mode="nearest")
            smooth = F.interpolate(torch.rand(1, 3, 3, 3, generator=generator), size=(side, side),
                                   mode="bilinear", align_corners=True)
            image = 0.5 * (blocks + smooth)
        images.append(image)
    return torch.cat(images) * 2 - 1


def fit_latent_rgb(pipe: Any, count: int = 6, cells: int = 8, ridge: float = 1e-3) -> Tensor:
    """Fit the (C + 1, 3) map from normalized latents (as the denoising loop holds them) to RGB.

    The latents: the VAE encodes `count` synthetic images of cells x cells latent pixels, and the same
    latents again with noise added (denoising estimates are not clean image latents). The colours:
    what the VAE's decoder makes of each latent pixel (the mean of the patch it decodes to), so the
    map imitates the final decode even where encoder and decoder disagree (as in a random tiny VAE).
    Ridge-regularized least squares, in float64.
    """
    import torch
    import torch.nn.functional as F

    vae = pipe.vae
    scale = pipe.vae_scale_factor
    images = synthetic_images(count, cells * scale, scale)
    if vae.config.get("in_channels", 3) == 4:  # an RGBA VAE (Qwen-Image-2.1): opaque colours
        images = torch.cat([images, torch.ones_like(images[:, :1])], dim=1)
    device = pipe._execution_device  # right under every offload mode
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        encoded = vae.encode(images.to(device, vae.dtype).unsqueeze(2)).latent_dist.mode()
        mean, std = _latent_stats(vae, encoded[:, :, 0].float())
        noise = torch.randn(encoded.shape, generator=generator).to(device) * 0.5 * std.unsqueeze(2)
        raw = torch.cat([encoded.float(), encoded.float() + noise]).to(vae.dtype)
        decoded = vae.decode(raw, return_dict=False)[0][:, :3, 0].float().clamp(-1, 1)
    latents = ((raw[:, :, 0].float() - mean) / std).cpu().double()  # (N, C, h, w)
    targets = F.avg_pool2d(decoded.cpu().double(), scale)  # (N, 3, h, w)
    if targets.shape[-2:] != latents.shape[-2:]:
        targets = F.interpolate(targets, size=latents.shape[-2:], mode="area")
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    matrix = torch.linalg.solve(gram, x.T @ y)
    residual = (x @ matrix - y).pow(2).mean().sqrt().item()
    log.info("fitted the latent preview map on %d latent pixels (RMS error %.3f of a [-1, 1] range)",
             len(x), residual)
    return matrix.float()
