"""A training step with nothing on the host, fused optimizers, torch.compile of the network (issue 25).

The GPU side is measured by scripts/gpu_check.sh; what a CPU can check is checked here, on real parts:
the real Trainer and callbacks, configs composed by Hydra, torch's own AveragedModel as the reference.
"""

import collections
import copy
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.optim.swa_utils import AveragedModel
from torch.utils._python_dispatch import TorchDispatchMode

from mnist_adder.cli import build
from mnist_adder.config_checks import check_config, config_problems
from mnist_adder.data.batches import one_hot
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.training.callbacks import WarmupEMA
from mnist_adder.training.step_speed import compile_net, fused_default
from mnist_adder.training.train import instantiate_group, train

from conftest import NO_DETECTOR, compose_config, make_tiny_mnist, tiny_train_overrides

FUSED = "+model.optimizer.fused=true"


class HostReads(TorchDispatchMode):
    """Counts every read of a tensor's value into Python (`.item()`, `bool(t)`, `int(t)`, `float(t)`:
    all go through aten._local_scalar_dense), with where it came from. On a GPU each is a device sync."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            import traceback

            frames = traceback.extract_stack()[-8:-1]
            self.reads[" < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))] += 1
        return func(*args, **(kwargs or {}))


class WatchSteps(Callback):
    """Runs HostReads over the training steps first..last (global steps), nothing else."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.mode: HostReads | None = None
        self.reads: collections.Counter[str] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.first:
            self.mode = HostReads()
            self.mode.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.last and self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.reads, self.mode = self.mode.reads, None


def test_training_steps_read_nothing_back_to_the_host(tmp_path):
    # The default model, callbacks (weight averaging on) and logger; fused AdamW, as a GPU gets it
    # (fused_default): the unfused CPU AdamW reads its step count, a CPU tensor, every step (on a GPU that
    # count stays on the host anyway). Steps 3 to 8 are between logging steps (every 50): Lightning reads
    # the logged loss only there, and the NaN guard its flags.
    data = make_tiny_mnist(tmp_path / "data", n_train=1000)
    cfg = compose_config(
        [*tiny_train_overrides(data), "trainer.max_epochs=1", "trainer.log_every_n_steps=50", FUSED],
        tmp_path / "run",
    )
    watch = WatchSteps(3, 8)
    callbacks = [*instantiate_group(cfg.callbacks, "callbacks"), watch]
    trainer = build(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=instantiate_group(cfg.logger, "logger"),
        limit_train_batches=10,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(build(cfg.model, "model"), datamodule=build(cfg.data, "data"))
    assert watch.reads is not None and any(isinstance(cb, WarmupEMA) for cb in trainer.callbacks)
    assert dict(watch.reads) == {}


def test_one_hot_is_f_one_hot_and_reads_nothing_back():
    classes = torch.tensor([3, 0, 9, 9, 18])
    with HostReads() as mode:
        rows = one_hot(classes, 19)
    assert dict(mode.reads) == {}
    assert torch.equal(rows, torch.nn.functional.one_hot(classes, 19).float())


def _net_with_bn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())


def test_ema_update_gives_averaged_models_bits():
    # Torch's AveragedModel.update_parameters with the same avg_fn is the reference: same tensors, bit for
    # bit, over updates 0 (the copy), 1... with BatchNorm's float and integer buffers averaged too.
    torch.manual_seed(0)
    model = _net_with_bn()
    ema = WarmupEMA(decay=0.9, warmup=3)
    ema._average_model = AveragedModel(model, use_buffers=True, avg_fn=ema._kwargs["avg_fn"])
    reference = AveragedModel(copy.deepcopy(model), use_buffers=True, avg_fn=ema._kwargs["avg_fn"])
    reference.module = copy.deepcopy(ema._average_model.module)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 1, 6, 6))  # moves the BatchNorm statistics and its step count
        with HostReads() as mode:
            ema._update_average(model)
        reference.update_parameters(model)
        assert sum(mode.reads.values()) <= 1  # the count, once per fit
    ours = [*ema._average_model.module.parameters(), *ema._average_model.module.buffers()]
    theirs = [*reference.module.parameters(), *reference.module.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert int(ema._average_model.n_averaged) == int(reference.n_averaged) == 6


def test_fused_optimizer_where_the_device_has_it():
    adamw = build({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.01}, "model.optimizer")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert fused_default(adamw, cuda) == {"fused": True}
    assert fused_default(adamw, cpu) == {}  # CPU runs keep their numbers (fused is a choice there)
    explicit = build({"_target_": "torch.optim.AdamW", "_partial_": True, "fused": False}, "model.optimizer")
    assert fused_default(explicit, cuda) == {}  # the config's word wins
    sgd = build({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}, "model.optimizer")
    assert fused_default(sgd, cuda) == {"fused": True}
    lbfgs = build({"_target_": "torch.optim.LBFGS", "_partial_": True}, "model.optimizer")
    assert fused_default(lbfgs, cuda) == {}  # no fused kernel: nothing added


def test_compile_switch_is_checked_with_the_config():
    cfg = compose_config(["model.compile=yes", "model.compile_mode=fastest"])
    problems = config_problems(cfg)
    assert any(p.startswith("model.compile='yes' is not allowed: it must be true or false") for p in problems)
    assert any(
        "model.compile_mode='fastest' is not allowed: null" in p and "reduce-overhead" in p for p in problems
    )
    ok = compose_config(
        ["model.compile=true", "model.compile_mode=reduce-overhead", "model.channels_last=true"]
    )
    assert config_problems(ok) == []
    with pytest.raises(UserError):
        check_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer=gpu"], {"accelerator": "gpu", "precision": "bf16-mixed", "batch": 256, "epochs": 20}),
        (
            ["experiment=fast_gpu"],
            {"accelerator": "gpu", "precision": "bf16-mixed", "batch": 1024, "epochs": 3},
        ),
        (
            ["experiment=fast_gpu", "model.compile=true", "model.compile_mode=reduce-overhead"],
            {"accelerator": "gpu", "precision": "bf16-mixed", "batch": 1024, "epochs": 3},
        ),
    ],
)
def test_gpu_presets_compose(overrides, expected):
    # Composed, not run (no GPU here): tests/test_train.py trains both presets on the CPU.
    cfg = compose_config(overrides)
    got = {
        "accelerator": cfg.trainer.accelerator,
        "precision": cfg.trainer.precision,
        "batch": cfg.data.batch_size,
        "epochs": cfg.trainer.max_epochs,
    }
    assert got == expected and cfg.trainer.benchmark is True and cfg.data.on_device is True
    assert cfg.model.compile is ("model.compile=true" in overrides)


@pytest.mark.slow
def test_compiled_net_gives_the_eager_nets_numbers():
    # The small model (dropout off: compiled dropout draws other masks), in training mode (BatchNorm on the
    # batch's statistics): outputs and gradients of the joint loss within 1e-4 relative, 1e-5 absolute.
    cfg = compose_config(["model.net.backbone.dropout=0.0"])
    torch.manual_seed(0)
    eager = build(cfg.model, "model").net.train()
    compiled_twin = copy.deepcopy(eager)
    compiled = compile_net(compiled_twin)
    image, number = torch.randn(64, 1, 28, 28), torch.eye(10)[torch.arange(64) % 10]
    outputs = [net(image, number) for net in (eager, compiled)]
    for out_eager, out_compiled in zip(*outputs, strict=True):
        torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    for out in outputs:
        (out[0].logsumexp(-1).mean() + out[1].logsumexp(-1).mean()).backward()
    for p_eager, p_compiled in zip(eager.parameters(), compiled_twin.parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_runs_checkpoint_is_an_eager_ones(tmp_path):
    # Trained with model.compile=true: the checkpoint has the eager run's keys (no _orig_mod.), loads
    # with load_checkpoint, predicts and exports (TorchScript) as any checkpoint does.
    from mnist_adder.inference.export import export_torchscript

    data = make_tiny_mnist(tmp_path / "data")
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["model.compile=true"])):
        overrides = [*tiny_train_overrides(data), "trainer.max_epochs=1", *extra, *NO_DETECTOR]
        runs[name] = train(compose_config(overrides, tmp_path / name))
    states = {n: torch.load(r["ckpt_path"], weights_only=False)["state_dict"] for n, r in runs.items()}
    assert not any("_orig_mod" in key for key in states["compiled"])
    assert states["compiled"].keys() == states["eager"].keys()
    module, cfg = load_checkpoint(runs["compiled"]["ckpt_path"])
    assert cfg.model.compile is True
    image, number = torch.randn(5, 1, 28, 28), torch.eye(10)[torch.arange(5)]
    digit_logits, sum_logits = module.net.eval()(image, number)
    assert digit_logits.shape == (5, 10) and sum_logits.shape == (5, 19)
    scripted = torch.jit.load(str(export_torchscript(module.net, tmp_path / "net.pt")))
    torch.testing.assert_close(scripted(image, number)[0], digit_logits)
