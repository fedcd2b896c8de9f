"""Testing a checkpoint on the MNIST test set, behind scripts/eval.py.

The checkpoint's stored run config decides everything that changes the numbers (the model, the data
and its fixed test pairs, the trainer's precision and test limits), so a checkpoint gives here exactly
the test numbers its training run wrote to metrics.json.
"""

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from mnist_adder.cli import build
from mnist_adder.config_checks import accelerator_problem, check_config
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import HOW_TO_GET_ONE, load_checkpoint
from mnist_adder.results import format_per_class, format_results, write_json_atomic

log = logging.getLogger(__name__)


def _test_trainer(stored: DictConfig, cfg: DictConfig, output_dir: Path) -> pl.Trainer:
    """The checkpoint's own trainer config, on one device, without callbacks, loggers or checkpoints."""
    overrides: dict[str, Any] = {
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "sync_batchnorm": False,
        "fast_dev_run": False,
        "logger": False,
        "callbacks": [],
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "default_root_dir": str(output_dir),
        "enable_progress_bar": cfg.trainer.enable_progress_bar,
    }
    for key in ("accelerator", "precision"):
        if cfg.trainer.get(key) is not None:
            overrides[key] = cfg.trainer[key]
    # The checkpoint's accelerator may be one this machine lacks (trained on a GPU, tested on a laptop).
    problem = accelerator_problem(overrides.get("accelerator", stored.get("accelerator")), by_group=False)
    if problem is not None:
        raise UserError(
            f"{problem} (the checkpoint was trained with accelerator={stored.get('accelerator')}; on another "
            "accelerator the numbers may differ from training's in the last digits)."
        )
    return build(stored, "trainer", **overrides)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `cfg.ckpt_path`; return the results also written to `<output_dir>/metrics.json`."""
    if not cfg.get("ckpt_path"):
        raise UserError(
            f"no checkpoint given: python scripts/eval.py ckpt_path=<file.ckpt>. {HOW_TO_GET_ONE}"
        )
    check_config(cfg)
    ckpt_path = Path(cfg.ckpt_path).resolve()
    output_dir = Path(cfg.paths.output_dir)
    module, run_config = load_checkpoint(ckpt_path)

    data_config = run_config.data.copy()
    # The data as the run saw it (batch sizes, pair seeds), read from this machine's data folder.
    data_config.data_dir = cfg.paths.data_dir
    datamodule = build(data_config, "data")
    datamodule.prepare_data()
    trainer = _test_trainer(run_config.trainer, cfg, output_dir)
    test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    results: dict[str, Any] = {name: float(value) for name, value in test_metrics.items()}
    results |= {k: v for k, v in module.per_class_results.items() if k.startswith("test/")}
    results |= {
        "ckpt_path": str(ckpt_path),
        "num_parameters": sum(p.numel() for p in module.net.parameters()),
        "precision": str(trainer.precision),
        "seed": run_config.get("seed"),
    }
    write_json_atomic(output_dir / "metrics.json", results)
    log.info("Results (MNIST test set, fixed pairs):\n%s", format_results(results))
    log.info("Accuracy per true class:\n%s", format_per_class(results))
    log.info("Run folder: %s", output_dir)
    return results
