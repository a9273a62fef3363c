"""One lock, process-wide, for every step that builds or patches torch modules; it undoes what they leak.

Loading weights patches torch for the whole process while it runs: accelerate's and peft's
init_empty_weights replace nn.Module.register_parameter (peft's with a version that hands every
attribute of a parameter, transformers' `_is_hf_initialized` included, to Parameter.__new__: a
TypeError), diffusers' and transformers' no_init_weights replace torch.nn.init's functions with
no-ops, transformers sets torch's default dtype and replaces torch.linspace and
PreTrainedModel.init_weights / tie_weights. Each saves what it finds and puts it back when it ends,
so two of them interleaved on two threads (one provider loading its LoRAs while another runs
from_pretrained) put back each other's patch, and it stays for the life of the process: every later
load fails. (diffusers' set_attention_backend also sets the process-wide default attention backend:
local_backend.accel puts it back itself, and so does this, should anything else set it.)

So every step that creates, loads or patches modules (a pipeline, base / tier / request LoRAs, the
speed options and their warm-up calls, the inpaint pipeline) runs inside `exclusive()`: one at a
time in the process (reentrant: a load holds it while it loads its LoRAs), and on the way out
whatever `_targets()` lists that differs from what was there on the way in is put back, with a
warning that names it.

Inside it, diffusers' and transformers' progress bars are off (and put back after): their "Loading
pipeline components" and "Loading weights" bars went to the server's stderr between its log lines,
lines no log collector reads (log_format: json); the load reports its stages through `progress`.

A pipeline call does not take it (it creates no modules): a load would otherwise stop every other
provider's requests for minutes. The one process-wide value a load changes that a call could read is
torch's default dtype (bf16 while transformers builds a bf16 model): the tiny fp32 model on the CPU
gives the same pixels with it flipped to bf16 mid-process; not checked on a GPU in bf16.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_LOCK = threading.RLock()
_MISSING = object()

# Where transformers' no_init_weights / guard_torch_init_functions swap the init functions.
_INIT_MODULES = (
    "torch.nn.init", "torch.nn.modules.activation", "torch.nn.modules.transformer", "torch.nn.modules.linear",
    "torch.nn.modules.loss", "torch.nn.modules.batchnorm", "torch.nn.modules.conv",
    "torch.nn.modules.normalization", "torch.nn.modules.sparse",
)
_TORCH_FACTORIES = ("empty", "zeros", "ones", "full", "linspace", "arange", "tensor")
# Imported on entry where installed, so that their attributes are seen before a load can patch them.
_LIBRARIES = ("transformers.modeling_utils", "diffusers.models.modeling_utils", "diffusers.models.attention_dispatch")


class _Attr:
    """One attribute of a module or class, read and written raw (a staticmethod stays one)."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name
        self.label = f"{getattr(owner, '__name__', owner)}.{name}"

    def get(self) -> Any:
        return vars(self.owner).get(self.name, _MISSING)

    def set(self, value: Any) -> None:
        if value is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, value)


class _Value:
    """A process-wide value behind a getter and a setter (torch's default dtype)."""

    def __init__(self, label: str, get: Callable, set: Callable):
        self.label, self.get, self.set = label, get, set


def _targets() -> list:
    """What loads patch process-wide: torch's module registration, parameters, init functions, tensor
    factories and default dtype; transformers' and diffusers' model hooks and default attention backend."""
    import torch

    found: list = [_Attr(torch.nn.Module, "register_parameter"), _Attr(torch.nn.Module, "register_buffer"),
                   _Attr(torch.nn.Module, "register_module"), _Attr(torch.nn.Parameter, "__new__"),
                   _Value("torch default dtype", torch.get_default_dtype, torch.set_default_dtype)]
    found += [_Attr(torch, name) for name in _TORCH_FACTORIES]
    for module_name in _INIT_MODULES:
        module = sys.modules.get(module_name)
        if module is not None:
            found += [_Attr(module, name) for name in vars(torch.nn.init)
                      if not name.startswith("_") and callable(getattr(torch.nn.init, name))
                      and name in vars(module)]
    transformers = sys.modules.get("transformers.modeling_utils")
    if transformers is not None:
        found += [_Attr(transformers.PreTrainedModel, name)
                  for name in ("init_weights", "tie_weights", "_init_weights", "_initialize_weights")]
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    if dispatch is not None:
        found.append(_Attr(dispatch._AttentionBackendRegistry, "_active_backend"))
    return found


def _import_libraries() -> None:
    for name in _LIBRARIES:
        if name in sys.modules or importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # a broken install: the load itself will say what is wrong
            log.debug("could not import %s", name, exc_info=True)


@contextlib.contextmanager
def exclusive(progress: Callable[[str], None] | None = None) -> Iterator[None]:
    """Run the block alone among the process's module-building steps, and undo what it leaks.

    `progress` hears "waiting for another model to finish loading" when another step holds the lock.
    """
    if not _LOCK.acquire(blocking=False):
        if progress is not None:
            progress("waiting for another model to finish loading")
        _LOCK.acquire()
    try:
        _import_libraries()
        before = snapshot()
        failed = True
        try:
            with _no_progress_bars():
                yield
            failed = False
        finally:
            restored = restore(before)
            if restored:
                log.warning("put back what %s left patched process-wide: %s",
                            "a failed model load" if failed else "a model load", ", ".join(restored))
    finally:
        _LOCK.release()


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """diffusers' and transformers' tqdm bars off for the block (each library's own switch), then as they were."""
    switches = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            switches.append((module, module.is_progress_bar_enabled()))
            module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in switches:
            if enabled:
                module.enable_progress_bar()


def snapshot() -> list:
    """(target, its current value) for everything `exclusive` guards."""
    return [(target, target.get()) for target in _targets()]


def restore(before: list) -> list[str]:
    """Put back every target of a snapshot() that changed since; returns what was put back."""
    restored = []
    for target, value in before:
        now = target.get()
        if now is not value and now != value:
            target.set(value)
            restored.append(target.label)
    return restored
