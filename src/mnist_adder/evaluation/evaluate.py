"""Testing a checkpoint on the MNIST test set, behind scripts/eval.py.

The checkpoint's stored run config decides everything that changes the numbers (the model, the data
and its fixed test pairs, the trainer's precision and test limits), so a checkpoint gives here exactly
the test numbers its training run wrote to metrics.json. The eval run folder also gets a reliability
diagram per head (PNG, and in its own TensorBoard events) and, with robustness=true, the test under
corruptions (robustness.json); with not_digits=true, the measurement of "not a digit" against its
baselines (not_digits.json, see `mnist_adder.evaluation.not_digit`).
"""

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter

from mnist_adder.data.preprocess import is_image_name
from mnist_adder.errors import UserError
from mnist_adder.evaluation.not_digit import (
    format_not_digits,
    format_unseen_families,
    measure,
    operating_points,
    unseen_families,
)
from mnist_adder.evaluation.robustness import evaluate_robustness, format_robustness
from mnist_adder.inference.checkpoint import evaluation_trainer, load_given_checkpoint, run_datamodule
from mnist_adder.inference.predict import reject_threshold
from mnist_adder.postfit.fit import detector_fit
from mnist_adder.postfit.not_digit import DEFAULT_ACCEPT, fit_not_digit_detector
from mnist_adder.render import reliability_diagram_figure, selective_prediction_figure
from mnist_adder.results import format_per_class, format_results, write_json_atomic

log = logging.getLogger(__name__)


def _reliability_diagrams(results: dict[str, Any], output_dir: Path, writer: SummaryWriter) -> None:
    """`reliability_<head>.png` in the run folder and `test/<head>_reliability` in its TensorBoard."""
    for head in ("digit", "sum"):
        bins = results.get(f"test/{head}_reliability")
        if bins is None:
            continue
        title = f"{head} head, test set: ECE {results[f'test/{head}_ece']:.4f} (15 bins)"
        figure = reliability_diagram_figure(bins, title)
        figure.savefig(output_dir / f"reliability_{head}.png")
        writer.add_figure(f"test/{head}_reliability", figure, 0)
        writer.add_scalar(f"test/{head}_ece", results[f"test/{head}_ece"], 0)


def _robustness(
    cfg: DictConfig, trainer: pl.Trainer, module: Any, datamodule: Any, writer: SummaryWriter
) -> None:
    """The test under every corruption: a table in the log, robustness.json, and TensorBoard curves of
    accuracy against severity (step 0: clean)."""
    limit = cfg.robustness_images
    test_batches = datamodule.test_dataloader()
    rows = evaluate_robustness(trainer, module, test_batches, cfg.robustness_seed, limit=limit)
    images = len(test_batches.labels) if limit is None else min(limit, len(test_batches.labels))
    report = {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "seed": cfg.robustness_seed, "images": images}
    write_json_atomic(Path(cfg.paths.output_dir) / "robustness.json", report | {"results": rows})
    clean = rows[0]
    for row in rows[1:]:
        for key in ("digit_acc", "sum_acc"):
            tag = f"robustness/{row['corruption']}/{key}"
            if row["severity"] == 1:
                writer.add_scalar(tag, clean[key], 0)
            writer.add_scalar(tag, row[key], row["severity"])
    log.info(
        "Robustness (MNIST test set, first %d images with their fixed pairs, seed %d):\n%s",
        images,
        cfg.robustness_seed,
        format_robustness(rows),
    )


def _not_digits(cfg: DictConfig, module: Any, datamodule: Any) -> None:
    """The detector and the baselines on the not-digit set, MNIST test digits and photos of them:
    a table in the log and not_digits.json. A checkpoint without a detector gets one fitted here (as
    scripts/calibrate.py would; it is not saved)."""
    accept = cfg.get("not_digit_accept", DEFAULT_ACCEPT)
    datamodule.setup("fit")
    net = module.net
    fit = detector_fit(cfg)
    fitted = None
    if not net.not_digit.fitted:
        log.info("The checkpoint has no not-a-digit detector: fitting one as scripts/calibrate.py does.")
        fitted = fit_not_digit_detector(
            net, datamodule.split_tensors("train"), datamodule.split_tensors("val"), accept, fit
        )
    threshold = reject_threshold(cfg.get("reject_threshold"), module)
    if threshold is None:
        raise UserError(
            "not_digits=true with reject_threshold=off: there is no threshold to measure. Leave "
            "reject_threshold=null (the checkpoint's) or give a number."
        )
    # The project's sample photos, which must all be accepted.
    example_dir = Path(cfg.paths.root_dir) / "examples" / "digits"
    examples = sorted(p for p in example_dir.iterdir() if is_image_name(p)) if example_dir.is_dir() else []
    report = measure(
        net,
        datamodule.split_tensors("train"),
        datamodule.split_tensors("val"),
        datamodule.split_tensors("test"),
        examples,
        threshold=threshold,
        seed=cfg.get("not_digits_seed", 0),
        accept=accept,
        fit=fit,
    )
    report = {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), "fitted_here": fitted, **report}
    write_json_atomic(Path(cfg.paths.output_dir) / "not_digits.json", report)
    log.info("Not a digit (see docs/not_a_digit.md):\n%s", format_not_digits(report))


def _not_digits_unseen(cfg: DictConfig, module: Any, datamodule: Any) -> None:
    """The detector on families it was not fitted to (`unseen_families`): a table in the log and
    not_digits_unseen.json. A checkpoint without a detector gets one fitted here first (not saved)."""
    accept = cfg.get("not_digit_accept", DEFAULT_ACCEPT)
    datamodule.setup("fit")
    net, fit = module.net, detector_fit(cfg)
    train, val = datamodule.split_tensors("train"), datamodule.split_tensors("val")
    if not net.not_digit.fitted:
        log.info("The checkpoint has no not-a-digit detector: fitting one as scripts/calibrate.py does.")
        fit_not_digit_detector(net, train, val, accept, fit)
    report = unseen_families(
        net, train, val, datamodule.split_tensors("test"), accept, fit, seed=cfg.get("not_digits_seed", 0)
    )
    report = {"ckpt_path": str(Path(cfg.ckpt_path).resolve()), **report}
    write_json_atomic(Path(cfg.paths.output_dir) / "not_digits_unseen.json", report)
    operating = operating_points(report)
    figure = selective_prediction_figure(report["selective"], operating, "Digits the detector accepts")
    figure.savefig(Path(cfg.paths.output_dir) / "selective_prediction.png")
    log.info("Not a digit, on families it was not fitted to:\n%s", format_unseen_families(report))


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test `cfg.ckpt_path`; return the results also written to `<output_dir>/metrics.json`."""
    # Corruptions and "not a digit" are measured on the (image, number) task's test and detector.
    only_digit_sum = [
        f"{key}=true" for key in ("robustness", "not_digits", "not_digits_unseen") if cfg.get(key)
    ]
    tasks = ("digit_sum",) if only_digit_sum else None
    used_by = f"scripts/eval.py {' '.join(only_digit_sum)}"
    ckpt_path, module, run_config = load_given_checkpoint(cfg, "eval", tasks, used_by)
    output_dir = Path(cfg.paths.output_dir)

    datamodule = run_datamodule(run_config, cfg)
    trainer = evaluation_trainer(run_config.trainer, cfg, output_dir)
    test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    results: dict[str, Any] = {name: float(value) for name, value in test_metrics.items()}
    results |= module.test_result_lists()
    results |= module.calibration_results
    results |= {
        "ckpt_path": str(ckpt_path),
        "num_parameters": sum(p.numel() for p in module.net.parameters()),
        "precision": str(trainer.precision),
        "seed": run_config.get("seed"),
    }
    write_json_atomic(output_dir / "metrics.json", results)
    log.info("Results (MNIST test set, fixed pairs):\n%s", format_results(results))
    if per_class := format_per_class(results):  # the (image, number) task's heads have them
        log.info("Accuracy per true class:\n%s", per_class)
    with SummaryWriter(str(output_dir / "tensorboard")) as writer:
        _reliability_diagrams(results, output_dir, writer)
        if diagrams := sorted(output_dir.glob("reliability_*.png")):  # none in MNIST addition
            log.info("Reliability diagrams: %s", ", ".join(str(p) for p in diagrams))
        if cfg.robustness:
            _robustness(cfg, trainer, module, datamodule, writer)
    if cfg.get("not_digits"):
        _not_digits(cfg, module, datamodule)
    if cfg.get("not_digits_unseen"):
        _not_digits_unseen(cfg, module, datamodule)
    log.info("Run folder: %s", output_dir)
    return results
