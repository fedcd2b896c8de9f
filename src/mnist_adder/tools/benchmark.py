"""Training throughput of the project's real path next to a bare PyTorch loop, per model.

Both paths train the same model (built from the same config), with the same optimizer and schedule, on
the same in-memory tensors, in the same process; they are measured alternately and the median of the
repeats is reported, so slow drifts of the machine hit both alike.

With `fast=true` it compares instead the whole `experiment=fast` training (scripts/train.py's path: fit
with its validation and checkpoint selection, then the test), timed by its own Timer as `fit_seconds`,
with one epoch of the seed network in a bare loop over the same training tensors; and the cost of its
test-time shifts: predicting the test set with them and without, alternately.
"""

import contextlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from mnist_adder.cli import build
from mnist_adder.config_checks import check_config
from mnist_adder.data.batches import make_batch
from mnist_adder.devices import torch_device
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.training.step_speed import compile_net, make_optimizer, mark_step_begin, to_channels_last
from mnist_adder.training.train import train

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock(Callback):
    """Time from the end of the last warm-up step to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.warmup:
            _sync(pl_module.device)
            now = time.perf_counter()
            self.start = now if trainer.global_step == self.warmup else self.start
            self.end = now


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def project_throughput(cfg: DictConfig, steps: int, warmup: int, log_dir: str) -> float:
    """Images/s of Trainer + datamodule + module as scripts/train.py runs them, logging on."""
    datamodule = build(cfg.data, "data")
    module = build(cfg.model, "model")
    clock = _StepClock(warmup)
    with open_dict(cfg):
        trainer_cfg = cfg.trainer.copy()
        # Training steps only: validation is timed elsewhere and the max_steps end is mid-epoch.
        trainer_cfg.update(
            max_steps=warmup + steps,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
    logger = TensorBoardLogger(log_dir, name="", version="")
    trainer = build(trainer_cfg, "trainer", callbacks=[clock], logger=logger)
    trainer.fit(module, datamodule=datamodule)
    return steps * cfg.data.batch_size / (clock.end - clock.start)


def _random_batches(datamodule: Any, batch_size: int, device: torch.device) -> Iterator[tuple]:
    images, labels = datamodule._splits["train"]
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    while True:
        idx = torch.randint(0, len(labels), (batch_size,), device=device, generator=generator)
        numbers = torch.randint(0, 10, (batch_size,), device=device, generator=generator)
        x = images[idx]
        if datamodule.augment is not None:
            x = datamodule.augment(x, generator)
        yield make_batch(x, labels[idx], numbers)


def _bare_net(module: Any, device: torch.device) -> Any:
    """The module's network on `device` in training mode, as the module's training steps run it:
    channels-last and compiled where its config says so (model.channels_last, model.compile)."""
    net = module.net.to(device).train()
    if module.channels_last:
        to_channels_last(net)
    return compile_net(net, module.compile_mode) if module.compile_training else net


def _bare_step(module: Any, net: Any, optimizer: Any, scheduler: Any, batch: tuple, precision: str) -> None:
    """One training step as the module takes it (same loss and weights), without Lightning."""
    image, number_onehot, label, sum_onehot = batch
    if module.compile_training:
        mark_step_begin(module.compile_mode)
    with _autocast(image.device, precision):
        digit_logits, sum_logits = net(image, number_onehot)
        loss = module.digit_weight * F.cross_entropy(digit_logits, label) + module.sum_weight * (
            F.cross_entropy(sum_logits, sum_onehot.argmax(dim=-1))
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def raw_throughput(cfg: DictConfig, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of a bare loop: same net, optimizer, schedule, loss and tensors; no Lightning."""
    datamodule = build(cfg.data, "data", on_device=False)
    datamodule.setup("fit")
    module = build(cfg.model, "model")
    net = _bare_net(module, device)
    optimizer = make_optimizer(module.optimizer_factory, module.net.parameters(), device)
    scheduler = module.scheduler_factory(optimizer=optimizer, total_steps=warmup + steps + 1)
    batches = _random_batches(datamodule, cfg.data.batch_size, device)
    start = 0.0
    for step in range(warmup + steps + 1):
        if step == warmup + 1:
            _sync(device)
            start = time.perf_counter()
        _bare_step(module, net, optimizer, scheduler, next(batches), str(cfg.trainer.precision))
    _sync(device)
    return steps * cfg.data.batch_size / (time.perf_counter() - start)


def bare_epoch_seconds(cfg: DictConfig, device: torch.device) -> float:
    """Seconds of one epoch of a bare loop: every training image once, in full batches of a fresh
    permutation (as the project's batches), with cfg's net, optimizer, schedule, loss and augmentation."""
    datamodule = build(cfg.data, "data", on_device=False)
    datamodule.setup("fit")
    module = build(cfg.model, "model")
    net = _bare_net(module, device)
    images, labels = (t.to(device) for t in datamodule._splits["train"])
    batch_size = int(cfg.data.batch_size)
    steps = len(labels) // batch_size
    optimizer = make_optimizer(module.optimizer_factory, module.net.parameters(), device)
    scheduler = module.scheduler_factory(optimizer=optimizer, total_steps=steps)
    generator = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    start = time.perf_counter()
    order = torch.randperm(len(labels), device=device, generator=generator)
    numbers = torch.randint(0, 10, (len(labels),), device=device, generator=generator)
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = images[idx]
        if datamodule.augment is not None:
            x = datamodule.augment(x, generator)
        batch = make_batch(x, labels[idx], numbers[idx])
        _bare_step(module, net, optimizer, scheduler, batch, str(cfg.trainer.precision))
    _sync(device)
    return time.perf_counter() - start


def _compose_train(cfg: DictConfig, *overrides: str) -> DictConfig:
    """scripts/train.py's config for this benchmark's trainer, data folder and extra overrides."""
    return compose(
        config_name="train",
        overrides=[
            *overrides,
            f"trainer={_trainer_choice()}",
            f"paths.data_dir={cfg.paths.data_dir}",
            "trainer.enable_progress_bar=false",
            *cfg.get("overrides", []),
        ],
    )


@torch.inference_mode()
def predict_seconds(net: torch.nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Seconds for `net` (in eval mode) to give both heads for every image, in batches of `batch_size`."""
    numbers = torch.eye(10, device=images.device)[torch.arange(len(images), device=images.device) % 10]
    _sync(images.device)
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        net(images[first : first + batch_size], numbers[first : first + batch_size])
    _sync(images.device)
    return time.perf_counter() - start


def shifts_cost(ckpt_path: str, cfg: DictConfig, device: torch.device, repeats: int) -> dict[str, float]:
    """Predicting the test set with the checkpoint's net, with its test-time shifts and without,
    alternately `repeats` times: the medians."""
    module, _ = load_checkpoint(ckpt_path, tasks=("digit_sum",), used_by="scripts/benchmark.py")
    net = module.net.to(device).eval()
    datamodule = build(cfg.data, "data", on_device=False)
    datamodule.setup("test")
    images = datamodule.split_tensors("test")[0].to(device)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for shifts in (True, False):
            net.test_shifts = shifts
            seconds[shifts].append(predict_seconds(net, images, int(cfg.data.eval_batch_size)))
    return {
        "test_images": len(images),
        "predict_seconds_shifts": round(statistics.median(seconds[True]), 3),
        "predict_seconds_plain": round(statistics.median(seconds[False]), 3),
    }


def fast_vs_seed_epoch(cfg: DictConfig) -> dict[str, Any]:
    """`experiment=fast` trained as scripts/train.py does, against one bare-loop epoch of the seed network
    over the same training tensors, alternately, `repeats` times."""
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    # No "not a digit" detector: it is fitted after fit_seconds stops, and would add its fit to each repeat.
    fast_cfg = _compose_train(cfg, "experiment=fast", "not_digit_accept=null")
    # The seed network's own training config (batch 256 by default), without augmentation, as the fast
    # preset trains: the reference does not move with the fast preset's batch size.
    seed_cfg = _compose_train(cfg, "model=seed", "data.augment=null")
    with open_dict(seed_cfg):
        # The reference is the eager seed network, whatever the overrides ask of the fast run's step.
        seed_cfg.model.update(compile=False, channels_last=False)
    device = _device_of(fast_cfg)
    fits, epochs, runs = [], [], []
    for repeat in range(cfg.repeats):
        run_cfg = fast_cfg.copy()
        with open_dict(run_cfg):
            run_cfg.paths.output_dir = str(Path(cfg.paths.output_dir) / f"fast_{repeat}")
        results = train(run_cfg)
        runs.append(results)
        fits.append(results["fit_seconds"])
        epochs.append(bare_epoch_seconds(seed_cfg.copy(), device))
    fit, epoch = statistics.median(fits), statistics.median(epochs)
    row = {
        "fast_vs_seed_epoch": round(fit / epoch, 3),
        "fast_fit_seconds": round(fit, 3),
        "seed_epoch_seconds": round(epoch, 3),
        "fast_test_digit_acc": statistics.median(r["test/digit_acc"] for r in runs),
        "fast_test_sum_acc": statistics.median(r["test/sum_acc"] for r in runs),
        "repeats": int(cfg.repeats),
        "device": _describe(device),
    }
    if fast_cfg.model.net.get("test_shifts") and runs[-1].get("ckpt_path"):
        row |= shifts_cost(runs[-1]["ckpt_path"], fast_cfg, device, int(cfg.repeats))
    if cfg.format == "json":
        print(json.dumps(row))
    else:
        print(
            f"device: {row['device']}; median of {row['repeats']} alternating repeats\n"
            f"experiment=fast fit_seconds (train.py's Timer): {fit:.2f} s "
            f"(test digit {row['fast_test_digit_acc']:.2%}, sum {row['fast_test_sum_acc']:.2%})\n"
            f"one bare-loop epoch of the seed network:       {epoch:.2f} s\n"
            f"fast_vs_seed_epoch: {row['fast_vs_seed_epoch']:.3f}"
        )
        if "predict_seconds_shifts" in row:
            print(
                f"test-time shifts: predicting the {row['test_images']:,} test digits takes "
                f"{row['predict_seconds_shifts']:.2f} s with them, {row['predict_seconds_plain']:.2f} s "
                f"without ({row['predict_seconds_shifts'] / row['predict_seconds_plain']:.1f}x)"
            )
    return row


def benchmark(cfg: DictConfig) -> list[dict[str, Any]]:
    """Measure every model in cfg.models (with each of cfg.adders, if given; or, with cfg.fast, the fast
    preset against a seed epoch); print a table or JSON lines; return the rows."""
    if cfg.get("fast"):
        return [fast_vs_seed_epoch(cfg)]
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    rows = []
    device_name = None
    adders = cfg.get("adders")
    runs = (
        [
            (f"{model}/{adder}", [f"model={model}", f"model/adder={adder}"])
            for model in cfg.models
            for adder in adders
        ]
        if adders
        else [(model, [f"model={model}"]) for model in cfg.models]
    )
    for model, model_overrides in runs:
        run_cfg = compose(
            config_name="train",
            overrides=[
                *model_overrides,
                f"trainer={_trainer_choice()}",
                f"paths.data_dir={cfg.paths.data_dir}",
                *cfg.get("overrides", []),
            ],
        )
        with open_dict(run_cfg):
            run_cfg.paths.output_dir = cfg.paths.output_dir
        check_config(run_cfg)  # trainer=gpu without a GPU, a bad override: one line, before any work
        pl.seed_everything(0, workers=True, verbose=False)
        project, raw = [], []
        for _ in range(cfg.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                project.append(project_throughput(run_cfg.copy(), cfg.steps, cfg.warmup, tmp))
            device = _device_of(run_cfg)
            raw.append(raw_throughput(run_cfg.copy(), cfg.steps, cfg.warmup, device))
        device_name = _describe(device)
        module = build(run_cfg.model, "model")
        row = {
            "model": model,
            "device": device_name,
            "batch_size": int(run_cfg.data.batch_size),
            "params": sum(p.numel() for p in module.net.parameters()),
            "project_img_s": round(statistics.median(project), 1),
            "raw_img_s": round(statistics.median(raw), 1),
        }
        row["ratio"] = round(row["project_img_s"] / row["raw_img_s"], 3)
        rows.append(row)
        if cfg.format == "json":
            print(json.dumps({k: row[k] for k in ("model", "project_img_s", "raw_img_s", "ratio", "device")}))
    if cfg.format != "json":
        print(format_table(rows, cfg))
    return rows


def _trainer_choice() -> str:
    # trainer is a config group here too (a plain key named like a group is refused by Hydra).
    return HydraConfig.get().runtime.choices.get("trainer", "cpu") if HydraConfig.initialized() else "cpu"


def _device_of(cfg: DictConfig) -> torch.device:
    return torch_device(str(cfg.trainer.accelerator))


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple silicon)"
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(rows: list[dict[str, Any]], cfg: DictConfig) -> str:
    lines = [
        f"device: {rows[0]['device'] if rows else '-'}; {cfg.steps} timed steps after {cfg.warmup} warm-up, "
        f"median of {cfg.repeats} alternating repeats",
        f"{'model':<12}{'params':>9}{'batch':>7}{'project img/s':>15}{'raw img/s':>12}{'ratio':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<12}{r['params']:>9,}{r['batch_size']:>7}{r['project_img_s']:>15,.0f}"
            f"{r['raw_img_s']:>12,.0f}{r['ratio']:>8.3f}"
        )
    return "\n".join(lines)
