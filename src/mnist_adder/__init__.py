"""mnist-adder: an MNIST image and a number 0..9 in, the digit and the sum out."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _auto_precision(accelerator: str = "auto") -> str:
    from mnist_adder.devices import auto_precision  # torch is imported only when a config asks

    return auto_precision(accelerator)


# conf/trainer/auto.yaml: `precision: ${auto_precision:${.accelerator}}`, decided on the machine that runs.
OmegaConf.register_new_resolver("auto_precision", _auto_precision, replace=True)
