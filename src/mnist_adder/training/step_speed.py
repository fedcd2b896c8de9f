"""How a training step runs fast, shared by the LightningModule and the benchmark's bare loop: a fused
optimizer where the device has one, `torch.compile` of the network, channels-last weights.

All three change how a step is computed, not what it computes (to float rounding): the same config
trains the same model with them on or off. Compile and channels-last are switches of the model config
(`model.compile`, `model.compile_mode`, `model.channels_last`, off by default); the fused optimizer is
chosen by the device (`fused_default`), and `model.optimizer.fused=true|false` decides it explicitly.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.profilers import PyTorchProfiler
from torch import nn

# torch.compile's modes are those of config_checks.COMPILE_MODES (checked with the config). Mode
# "reduce-overhead" replays the compiled forward and backward as CUDA graphs on a GPU (a few launches for
# a net this small); a CPU runs it as the default mode.

# The devices where the fused optimizers are chosen: one kernel for the whole update, and the step count
# kept on the device (the unfused CUDA path keeps it on the host). The installed torch has fused CPU
# kernels too, but they are left to `model.optimizer.fused=true` there: CPU runs keep the numbers they had.
FUSED_DEVICES = ("cuda",)


def fused_default(optimizer_factory: Callable[..., torch.optim.Optimizer], device: torch.device) -> dict:
    """The keyword to add to `optimizer_factory(params=...)` on `device`: {"fused": True} where the
    optimizer takes `fused`, the config leaves it unset (None) and the device is in FUSED_DEVICES; else {}."""
    given = getattr(optimizer_factory, "keywords", {})
    target = getattr(optimizer_factory, "func", optimizer_factory)
    try:
        takes_fused = "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or something else without a signature
        takes_fused = False
    if takes_fused and given.get("fused") is None and device.type in FUSED_DEVICES:
        return {"fused": True}
    return {}


def make_optimizer(
    optimizer_factory: Callable[..., torch.optim.Optimizer], params: Any, device: torch.device
) -> torch.optim.Optimizer:
    """`optimizer_factory(params=params)`, fused where `fused_default` says so."""
    return optimizer_factory(params=params, **fused_default(optimizer_factory, device))


def compile_net(net: nn.Module, mode: str | None = None) -> Callable[..., Any]:
    """`net` compiled by torch.compile (the same parameters; nothing is copied).

    dynamic=False: the training batches all have one shape (the last partial batch is dropped), so one
    static graph is compiled, which is what CUDA graphs need; a batch of another shape compiles another.
    The caller keeps it apart from its registered submodules (`CompiledNet`), so state dicts keep the
    plain keys (no `_orig_mod.` prefix) and a checkpoint loads as an eager run's.
    """
    return torch.compile(net, mode=mode, dynamic=False)


class CompiledNet:
    """A holder for the compiled callable that nn.Module does not register (it is no Module): so it is
    in no state dict, and a deep copy (weight averaging copies the module) starts without it."""

    def __init__(self, fn: Callable[..., Any] | None = None) -> None:
        self.fn = fn

    def __deepcopy__(self, memo: dict) -> "CompiledNet":
        return CompiledNet()

    def __getstate__(self) -> dict:
        return {"fn": None}


def to_channels_last(net: nn.Module) -> nn.Module:
    """The 4-d weights of `net` (its convolutions) in channels-last memory order, in place."""
    return net.to(memory_format=torch.channels_last)


@functools.cache
def _mark_step() -> Callable[[], None]:
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    return mark if mark is not None else lambda: None


def mark_step_begin(mode: str | None) -> None:
    """Tell CUDA graph trees that a new training step begins (mode "reduce-overhead" only), so that the
    last step's graph outputs may be overwritten, as torch's docs advise for a training loop."""
    if mode == "reduce-overhead":
        _mark_step()()


class StepProfiler(PyTorchProfiler):
    """Lightning's PyTorchProfiler for a few chosen training steps (a `schedule` that skips the first).

    A stage too short to reach the schedule's first recorded step (the test after a profiled fit, say)
    leaves torch's profiler unstarted, and Lightning asks it for its events at teardown anyway, which
    fails; here such a stage has no events and no table. scripts/gpu_check.sh's profile stage uses it.
    """

    def _cache_functions_events(self) -> None:
        try:
            super()._cache_functions_events()
        except AssertionError:  # "Profiler must be initialized before accessing events"
            self.function_events = None
