"""What this machine can train on: the accelerators it has, and the precision `trainer=auto` runs at.

`config_checks.py` asks `machine_accelerators()` before anything is built, so that `trainer=gpu` on a
machine without a CUDA GPU is one clear line and not Lightning's traceback. `auto_precision` is the one
place where a precision is chosen at run time: conf/trainer/auto.yaml reads it through the OmegaConf
resolver `auto_precision` (registered when `mnist_adder` is imported), and the resolved value is what the
run config, the checkpoint and metrics.json then hold.

torch is imported inside the functions: a config check that does not ask about devices (a bad seed, a
typo) then stops in a second, without loading it.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CUDA_ACCELERATORS = ("gpu", "cuda")


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def has_mps() -> bool:
    import torch

    return torch.backends.mps.is_available()


def torch_device(accelerator: str = "auto") -> "torch.device":
    """The device a `trainer.accelerator` lands on, as Lightning picks it: a CUDA GPU first, then MPS,
    then the CPU."""
    import torch

    if str(accelerator) in CUDA_ACCELERATORS or (accelerator == "auto" and has_cuda()):
        return torch.device("cuda", 0)
    if accelerator == "mps" or (accelerator == "auto" and has_mps()):
        return torch.device("mps")
    return torch.device("cpu")


def machine_accelerators() -> str:
    """What this machine has, in words, for error messages."""
    import torch

    if has_cuda():
        return f"a CUDA GPU ({torch.cuda.get_device_name(0)})"
    if has_mps():
        return "an Apple MPS device and no CUDA GPU"
    return "only a CPU (no CUDA GPU, no Apple MPS device)"


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where `accelerator` lands on a CUDA GPU that supports bf16 (Ampere and newer), else 32-true.

    Lightning's `accelerator=auto` picks a CUDA GPU first, then MPS, then the CPU; bf16 autocast pays off
    only on the GPU's tensor cores (on MPS and the CPU it is slower or unsupported), and a GPU without
    bf16 (before Ampere) would need fp16 with loss scaling, so it trains in 32-bit.
    """
    import torch

    on_cuda = str(accelerator) in (*CUDA_ACCELERATORS, "auto") and has_cuda()
    return "bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true"
