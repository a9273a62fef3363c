"""Where a pipeline's parts go on one GPU: the placements, the peak GPU memory of each (from
local_backend.memory's estimate), and the fastest one that fits (`offload: auto`). Pure: no torch here.

A placement is an offload mode plus where the text encoder runs:
- none: everything on the GPU. Fastest.
- model: one component on the GPU at a time (diffusers' model CPU offload): each call moves the text
  encoder, then the transformer, then the VAE over PCIe (about 1-3 s a call for the 20B model).
- text encoder on the CPU: the transformer and VAE stay on the GPU; the prompt is encoded on the CPU
  (seconds per prompt for a 7-8B encoder), and prompt enhancement generates there (slow).
- group: leaf-level group offload with a CUDA stream: the GPU holds a couple of layers at a time,
  prefetching the next while one runs. Close to `none` when PCIe keeps up, slower when it does not.
- sequential: one layer at a time, no prefetch. The slowest; the least memory.
The order of PLACEMENTS is the order of preference (fastest first). The offloading modes keep the
weights in CPU memory (group offload pins them): the host needs about the weights' size in RAM.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .memory import Estimate

GIB = 1024**3
MARGIN = 0.10  # of the estimate: kernels' workspaces, allocator fragmentation, the estimate's own error
RESERVE = 1 * GIB  # besides: what CUDA and cuBLAS take outside the estimate (the context is already outside "free")


@dataclass(frozen=True)
class Placement:
    offload: str  # none | model | group | sequential
    text_encoder: str  # cuda | cpu

    @property
    def name(self) -> str:
        return self.offload if self.text_encoder == "cuda" else f"{self.offload} + text encoder on cpu"


PLACEMENTS = [
    Placement("none", "cuda"),
    Placement("model", "cuda"),
    Placement("none", "cpu"),
    Placement("model", "cpu"),
    Placement("group", "cuda"),
    Placement("group", "cpu"),
    Placement("sequential", "cuda"),
]


@dataclass
class Row:
    placement: str
    offload: str
    text_encoder: str
    gpu_peak: int  # bytes, with the margin
    host: int  # bytes of CPU memory the placement keeps weights in
    fits: bool


@dataclass
class Plan:
    gpu_memory: int | None  # what the plan had to fit in (None: nothing known: no pick)
    rows: list[Row]
    pick: Row | None
    smallest_gpu: int  # the least GPU memory any placement needs

    def as_dict(self) -> dict:
        return {"gpu_memory": self.gpu_memory, "pick": self.pick.placement if self.pick else None,
                "smallest_gpu": self.smallest_gpu, "rows": [asdict(r) for r in self.rows]}


def peak(e: Estimate, p: Placement) -> tuple[int, int]:
    """(GPU peak bytes before the margin, host bytes) of a placement."""
    c, a = e.components, e.activations
    te_gpu = p.text_encoder == "cuda"
    te_w, tr_w, vae_w = c["text_encoder"].bytes, c["transformer"].bytes, c["vae"].bytes
    te_a = a["text_encoder"] if te_gpu else 0
    if p.offload == "none":
        gpu = tr_w + vae_w + (te_w if te_gpu else 0) + max(te_a, a["transformer"], a["vae"])
        host = 0 if te_gpu else te_w
    elif p.offload == "model":
        gpu = max((te_w + te_a) if te_gpu else 0, tr_w + a["transformer"], vae_w + a["vae"])
        host = e.weights
    else:  # group keeps two leaves (this one and the prefetched next), sequential one
        leaves = 2 if p.offload == "group" else 1
        te_leaf = c["text_encoder"].largest_leaf if te_gpu else 0
        gpu = max(leaves * te_leaf + te_a, leaves * c["transformer"].largest_leaf + a["transformer"],
                  leaves * c["vae"].largest_leaf + a["vae"])
        host = e.weights
    return gpu, host


def with_margin(nbytes: int) -> int:
    return int(nbytes * (1 + MARGIN)) + RESERVE


def plan(e: Estimate, gpu_memory: int | None, text_encoder: str | None = None) -> Plan:
    """Every placement's peak, and the fastest that fits in `gpu_memory` bytes. `text_encoder` (cpu | cuda)
    pins the text encoder's place when the config sets it."""
    rows = []
    for p in PLACEMENTS:
        if text_encoder and p.text_encoder != text_encoder:
            continue
        gpu, host = peak(e, p)
        need = with_margin(gpu)
        rows.append(Row(p.name, p.offload, p.text_encoder, need, host,
                        gpu_memory is not None and need <= gpu_memory))
    pick = next((r for r in rows if r.fits), None)
    return Plan(gpu_memory, rows, pick, min(r.gpu_peak for r in rows))


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: str | int | float) -> int:
    """"24GiB", "24 GB", "80g", 25769803776 -> bytes. ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"not a memory size: {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"not a memory size: {value!r} (e.g. 24GiB, 80GB, 16g)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB"


def no_fit_message(e: Estimate, result: Plan) -> str:
    """The load error of a model that fits nowhere: the smallest card it needs."""
    return (f"{e.model} does not fit in {gib(result.gpu_memory or 0)} of GPU memory with any placement: "
            f"it needs a GPU with at least {gib(result.smallest_gpu)} free "
            f"({next(r.placement for r in result.rows if r.gpu_peak == result.smallest_gpu)}, estimated); "
            "use a smaller transformer (a GGUF file), a lower max_pixels or max_batch, or a bigger GPU")


def cpu_memory(e: Estimate) -> int:
    """The RAM a route on the CPU needs (no margin): all the weights, plus the largest phase's activations."""
    return e.weights + max(e.activations.values())


def table(e: Estimate, result: Plan | None) -> str:
    """The plan as text: the components, then one line per placement, then the pick. `result` None: a
    route on the CPU, which has no placement to pick (its line says the RAM it needs instead)."""
    lines = [f"{e.model} ({e.family}): up to {e.batch} x {e.size[0]}x{e.size[1]}"
             + (f", {e.references} reference image(s)" if e.references else "")]
    for c in e.components.values():
        lines.append(f"  {c.name:<13} {c.params / 1e9:7.3f} B params  {gib(c.bytes):>10}  {c.precision}")
    act = ", ".join(f"{k} {gib(v)}" for k, v in e.activations.items())
    lines.append(f"  activations (peak per phase): {act}")
    if result is None:
        lines.append(f"runs on the CPU (device: cpu): no GPU placement to plan; RAM for the weights and the "
                     f"largest phase: {gib(cpu_memory(e))} (estimated, no margin)")
        return "\n".join(lines)
    budget = f"{gib(result.gpu_memory)}" if result.gpu_memory is not None else "unknown (no GPU here; use --gpu-memory)"
    lines.append(f"GPU memory to fit in: {budget}; estimates include a {MARGIN:.0%} margin + {gib(RESERVE)}")
    for r in result.rows:
        mark = "fits" if r.fits else ("-" if result.gpu_memory is None else "does not fit")
        lines.append(f"  {r.placement:<34} peak {gib(r.gpu_peak):>10}   host RAM {gib(r.host):>10}   {mark}")
    if result.gpu_memory is not None:
        lines.append(f"auto picks: {result.pick.placement}" if result.pick else
                     f"auto: nothing fits; the smallest GPU it needs: {gib(result.smallest_gpu)}")
    return "\n".join(lines)
