"""Callbacks that keep a run's work: a checkpoint on Ctrl-C or SIGTERM, the random state in every
checkpoint (so a resumed run draws what an uninterrupted one would), and a stop on a NaN/inf loss."""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint, WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mnist_adder.errors import UserError

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the message says where and which checkpoint is kept."""


class InterruptCheckpoint(Callback):
    """On Ctrl-C (KeyboardInterrupt) or SIGTERM during training, save `<dirpath>/<filename>.ckpt`.

    Lightning turns SIGTERM into an exception at the end of the current batch, so the checkpoint is
    taken between two steps and `ckpt_path=` continues with the next batch. The default name is
    `last`, the file LastCheckpoint keeps, so `checkpoints/last.ckpt` is always the newest state.
    Other exceptions (a bug, a non-finite loss) save nothing: the newest good checkpoint is kept.

    Not Lightning's OnExceptionCheckpoint: with one of those, `fit(ckpt_path=None)` silently resumes
    from the newest checkpoint it finds, and the callback deletes its file when a run ends normally.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.ckpt_path = str(Path(dirpath) / f"{filename}.ckpt")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.global_step == 0:  # nothing trained yet: nothing to keep
            return
        if trainer.validating:
            # Weight averaging swaps the averaged weights into the module for a validation pass and back
            # at its end, which an interrupted pass never reaches: swap back, or the checkpoint would
            # keep the average as the weights to train on and the raw weights as the average.
            for callback in trainer.callbacks:
                if isinstance(callback, WeightAveraging):
                    callback.on_validation_epoch_end(trainer, pl_module)
        trainer.save_checkpoint(self.ckpt_path)
        log.warning(
            "Training interrupted (%s) at epoch %d, step %d; saved %s. Continue with: "
            "python scripts/train.py ckpt_path=%s",
            "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM",
            trainer.current_epoch,
            trainer.global_step,
            self.ckpt_path,
            self.ckpt_path,
        )


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, rewritten at the end of every epoch and every `every_n_train_steps` steps.

    Not ModelCheckpoint's `save_last`: since Lightning 2.6 that rewrites last.ckpt only at an epoch
    where a top-k checkpoint was saved too, so after an epoch that did not improve the monitored
    metric, last.ckpt held an older epoch. This one saves unconditionally (monitor None, top 1).

    Step saves skip an epoch's last batch: a checkpoint taken between it and the epoch's validation
    resumes after that validation (Lightning skips it), so that epoch would never be scored; the
    epoch-end save, written after validation, covers that point instead.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 0, **kwargs: Any) -> None:
        kwargs = {"filename": "last", "monitor": None, "save_top_k": 1, **kwargs}
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, **kwargs)
        # Every epoch's end as well: ModelCheckpoint's constructor takes steps or epochs, not both.
        self._every_n_epochs = 1

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class WarmupEMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging with its decay warmed up, as TensorFlow's ExponentialMovingAverage
    does with `num_updates`: after n updates the average moves by 1 - min(decay, (1 + n) / (warmup + n)).

    With a fixed decay the average starts as a copy of the untrained weights and forgets them slowly:
    at 0.999 they still weigh 0.999^215 = 81 % after one epoch of batch 256, and a one-epoch run tested
    at chance. Warmed up, the average spans about the last 1 / (warmup - 1) of the steps taken, until
    that reaches the 1 / (1 - decay) steps of the fixed decay (at 0.999: after 9,000 updates with
    TensorFlow's warmup of 10, after 3,000 with warmup 4). Warmup 1 is the fixed decay from the start.
    """

    def __init__(self, decay: float = 0.999, warmup: float = 10.0, **kwargs: Any) -> None:
        if not warmup >= 1:
            raise ValueError(f"warmup must be >= 1 (1: no warm-up, the fixed decay), not {warmup}")
        super().__init__(decay=decay, **kwargs)
        self.decay, self.warmup = decay, warmup
        self._kwargs["avg_fn"] = _warmup_ema_avg_fn(decay, warmup)  # in place of the fixed-decay one
        self._updates: int | None = None  # the average's update count, on the host (see _update_average)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._updates = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning's condition, with _update_average in place of AveragedModel.update_parameters.
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update_average(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update_average(self, pl_module: pl.LightningModule) -> None:
        """AveragedModel.update_parameters with the same numbers, without its two host reads per step.

        It asks `n_averaged == 0` and `n_averaged > 0` of a device tensor every update (on a GPU, two
        syncs in every training step); here the count is read once per fit (a resumed run's comes from
        its checkpoint) and then counted on the host. The float tensors are updated by three foreach
        kernels with the decay computed once (the same multiplications and addition as the per-tensor
        avg_fn, so the same bits); others (BatchNorm's step count) by the avg_fn as before.
        """
        average = self._average_model
        if self._updates is None:
            self._updates = int(average.n_averaged)
        if self._use_buffers:
            averaged = [*average.module.parameters(), *average.module.buffers()]
            current = [*pl_module.parameters(), *pl_module.buffers()]
        else:
            averaged, current = list(average.parameters()), list(pl_module.parameters())
        current = [c.detach().to(a.device) for a, c in zip(averaged, current, strict=True)]
        averaged = [a.detach() for a in averaged]
        if self._updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            n = average.n_averaged
            floats = [i for i, a in enumerate(averaged) if a.is_floating_point()]
            step_decay = ((1 + n) / (self.warmup + n)).clamp(max=self.decay)
            float_avg, float_cur = [averaged[i] for i in floats], [current[i] for i in floats]
            torch._foreach_mul_(float_avg, step_decay)
            torch._foreach_add_(float_avg, torch._foreach_mul(float_cur, 1 - step_decay))
            avg_fn = self._kwargs["avg_fn"]
            for i in sorted(set(range(len(averaged))) - set(floats)):
                averaged[i].copy_(avg_fn(averaged[i], current[i], n))
        if not self._use_buffers:
            for b_avg, b_model in zip(average.module.buffers(), pl_module.buffers(), strict=True):
                b_avg.detach().copy_(b_model.detach().to(b_avg.device))
        average.n_averaged += 1
        self._updates += 1


def _warmup_ema_avg_fn(decay: float, warmup: float) -> Any:
    def ema_update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        step_decay = ((1 + num_averaged) / (warmup + num_averaged)).clamp(max=decay)
        return step_decay * averaged + (1 - step_decay) * current

    return ema_update


class FlushLoggers(Callback):
    """Write the loggers' queued events to disk with every checkpoint.

    TensorBoard buffers events (up to 10, or 2 minutes); a run killed outright loses the buffer. With
    this, the curves on disk reach (nearly) as far as the checkpoint a resumed run continues from: only
    the point logged for the step that completed the checkpoint, written just after it, can be lost.
    """

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for logger in trainer.loggers:
            logger.save()


class RandomState(Callback):
    """Save torch's random generators (CPU, and the current GPU's) in every checkpoint; restore them
    when training resumes, so dropout after a resume draws exactly what an uninterrupted run would."""

    def __init__(self) -> None:
        self._device: torch.device | None = None
        self._to_restore: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self._device is not None and self._device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self._device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Applied here, after the sanity check and all set-up, right before the first resumed batch.
        if self._to_restore is None:
            return
        torch.set_rng_state(self._to_restore["cpu"])
        if "cuda" in self._to_restore and self._device is not None and self._device.type == "cuda":
            torch.cuda.set_rng_state(self._to_restore["cuda"], self._device)
        self._to_restore = None


class NonFiniteLossGuard(Callback):
    """Stop training when the training loss becomes NaN or infinite, naming the epoch and the step.

    Each step only queues a finiteness flag computed on the device; reading flags on the host forces a
    device sync, so they are read at logging steps (every `check_every_n_steps`, by default the
    trainer's `log_every_n_steps`, where Lightning brings the step loss to the host anyway), at the end
    of every epoch, before validation, and before any checkpoint is written. The last check means no
    checkpoint is ever written after a non-finite loss: the newest one from before it is kept.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        self.check_every_n_steps = check_every_n_steps
        self._pending: list[tuple[torch.Tensor, int, int, int]] = []  # (finite?, epoch, step, batch_idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        # The step index as on TensorBoard's x-axis: global_step has already counted this step.
        step = trainer.global_step - 1
        self._pending.append((torch.isfinite(loss.detach()).all(), trainer.current_epoch, step, batch_idx))
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if trainer.global_step % every == 0:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Raising here aborts the save before the file is written.
        self.check(trainer)

    def check(self, trainer: pl.Trainer) -> None:
        """Read the queued flags (one device sync); raise NonFiniteLossError if any loss was NaN/inf."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        finite = torch.stack([flag for flag, *_ in pending])
        first_bad = int((~finite).nonzero()[0]) if not bool(finite.all()) else len(pending)
        if trainer.world_size > 1:  # every rank stops together, at the first step bad on any rank
            first_bad = int(
                trainer.strategy.reduce(torch.tensor(first_bad, device=finite.device), reduce_op="min")
            )
        if first_bad == len(pending):
            return
        _, epoch, step, batch_idx = pending[first_bad]
        raise NonFiniteLossError(
            f"the training loss became non-finite (NaN or inf) at epoch {epoch}, step {step} "
            f"(batch {batch_idx} of that epoch; counted from 0, as on TensorBoard); training stopped. "
            f"{_kept_checkpoint(trainer)} Lower the learning rate (model.optimizer.lr) or clip the "
            "gradients (trainer.gradient_clip_val=1.0) and train again."
        )


def newest_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The checkpoint file the trainer's checkpoint callbacks wrote last, or None if none is there yet."""
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    saved = [path for folder in folders if folder.is_dir() for path in folder.glob("*.ckpt")]
    return max(saved, key=lambda path: path.stat().st_mtime) if saved else None


def _kept_checkpoint(trainer: pl.Trainer) -> str:
    newest = newest_checkpoint(trainer)
    if newest is None:
        return "No checkpoint had been saved yet."
    return f"The newest checkpoint, saved before it, is kept: {newest}."


def selected_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that selects on validation (one with a monitor); without one, the first
    (its best_model_path is the newest, last.ckpt); None without checkpoints (fast_dev_run)."""
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    return next((cb for cb in checkpoints if cb.monitor), checkpoints[0] if checkpoints else None)


def drop_weight_averaging(trainer: pl.Trainer) -> None:
    """Take weight averaging out of the trainer once the fit is done.

    The selected checkpoint's "state_dict" holds the averaged weights; the callback would load the raw
    ones ("current_model_state", kept for resuming) over them when a test restores the checkpoint. Without
    a checkpoint, on_train_end has already copied the average into the module.
    """
    trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, WeightAveraging)]
