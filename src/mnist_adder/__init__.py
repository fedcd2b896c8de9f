"""mnist-adder: an MNIST image and a number 0..9 in, the digit and the sum out."""

from omegaconf import OmegaConf

from mnist_adder.ranks import on_rank_zero, rank_log_suffix

__version__ = "0.1.0"


def _auto_precision(accelerator: str = "auto") -> str:
    from mnist_adder.devices import auto_precision  # torch is imported only when a config asks

    return auto_precision(accelerator)


# conf/trainer/auto.yaml: `precision: ${auto_precision:${.accelerator}}`, decided on the machine that runs.
OmegaConf.register_new_resolver("auto_precision", _auto_precision, replace=True)
# conf/hydra/default.yaml: ranks > 0 of torchrun or srun log to train_rank<R>.log and write no .hydra/.
OmegaConf.register_new_resolver("rank_log_suffix", rank_log_suffix, replace=True)
OmegaConf.register_new_resolver("on_rank_zero", on_rank_zero, replace=True)


def _setting_for_digits(schedule: object, digits: object, key: str) -> object:
    from mnist_adder.config_checks import setting_for_digits

    return setting_for_digits(schedule, digits, key)


# conf/data/mnist_addition.yaml: MNIST addition's per-N schedule (examples per step, lr, warm-up, epochs).
OmegaConf.register_new_resolver("for_digits", _setting_for_digits, replace=True)
