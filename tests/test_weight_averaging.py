"""Weight averaging (callbacks.ema, in the default callbacks; callbacks=ema names it): validation, the
selected checkpoint, the test in train.py, eval, predict and export all use the averaged weights, while
the raw ones stay in the checkpoint for resuming."""

import json
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.swa_utils import AveragedModel

from mnist_adder.data.preprocess import preprocess_image
from mnist_adder.evaluation.evaluate import evaluate
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.export import export
from mnist_adder.inference.predict import predict
from mnist_adder.training.callbacks import WarmupEMA
from mnist_adder.training.train import train

from conftest import compose_config, make_tiny_mnist, require_extra, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "digits" / "seven_on_paper.png"
# A short decay so that the average of a 28-step run is neither the start nor the last step's weights.
EMA = ["callbacks=ema", "callbacks.ema.decay=0.8"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(data folder, the results of a tiny EMA run, its selected checkpoint loaded raw)."""
    data_dir = make_tiny_mnist(tmp_path_factory.mktemp("data"))
    # calibrate=false: these tests compare the raw logits of the averaged and raw weights.
    overrides = [*tiny_train_overrides(data_dir), *EMA, "calibrate=false"]
    results = train(compose_config(overrides, tmp_path_factory.mktemp("run")))
    return data_dir, results, torch.load(results["ckpt_path"], map_location="cpu", weights_only=False)


def _module_with(ckpt_path: str, state: dict) -> pl.LightningModule:
    module, _ = load_checkpoint(ckpt_path)
    module.load_state_dict(state)
    return module.eval()


def _run(stage: str, module: pl.LightningModule, data_dir: Path, ckpt_path: str) -> dict[str, float]:
    _, config = load_checkpoint(ckpt_path)
    config.data.data_dir = str(data_dir)
    datamodule = hydra.utils.instantiate(config.data)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return getattr(trainer, stage)(module, datamodule=datamodule, verbose=False)[0]


def test_the_checkpoint_holds_the_average_and_the_raw_weights_apart(ema_run):
    _, results, checkpoint = ema_run
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if k.startswith("net."))
    module, _ = load_checkpoint(results["ckpt_path"])  # the one loader eval, predict and export use
    assert all(torch.equal(v, averaged[k]) for k, v in module.state_dict().items())


def test_validation_and_selection_score_the_averaged_weights(ema_run):
    data_dir, results, checkpoint = ema_run
    ckpt_path = results["ckpt_path"]
    run_dir = Path(ckpt_path).parent.parent
    logged = {
        e.step: e.value for e in EventAccumulator(str(run_dir / "tensorboard")).Reload().Scalars("val/loss")
    }
    averaged = _run("validate", _module_with(ckpt_path, checkpoint["state_dict"]), data_dir, ckpt_path)
    raw = _run("validate", _module_with(ckpt_path, checkpoint["current_model_state"]), data_dir, ckpt_path)
    # The selected epoch's logged validation loss is the averaged weights', not the raw ones'.
    # Epoch-end metrics are logged at the index of the epoch's last step, one less than the step count.
    assert logged[checkpoint["global_step"] - 1] == pytest.approx(averaged["val/loss"], rel=1e-6)
    assert averaged["val/loss"] != pytest.approx(raw["val/loss"], rel=1e-4)
    assert results["best_val/both_acc"] == pytest.approx(averaged["val/both_acc"])


def test_train_tests_and_eval_reproduces_the_averaged_weights(ema_run, tmp_path):
    data_dir, results, checkpoint = ema_run
    ckpt_path = results["ckpt_path"]
    evaluated = evaluate(
        compose_config([f"ckpt_path={ckpt_path}", f"paths.data_dir={data_dir}"], tmp_path, config_name="eval")
    )
    for key in (k for k in results if k.startswith("test/")):
        assert evaluated[key] == results[key], key  # exactly, as for a run without averaging
    raw = _run("test", _module_with(ckpt_path, checkpoint["current_model_state"]), data_dir, ckpt_path)
    assert raw["test/loss"] != pytest.approx(results["test/loss"], rel=1e-4)


def _outputs(
    module: pl.LightningModule, image: torch.Tensor, number: int
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return module.net.eval()(image, torch.eye(10)[[number]])


@pytest.mark.slow  # the ONNX export alone takes seconds
def test_predict_and_export_use_the_averaged_weights(ema_run, tmp_path, capsys):
    require_extra("onnx", "export")  # export() writes ONNX beside TorchScript
    _, results, checkpoint = ema_run
    ckpt_path = results["ckpt_path"]
    image = preprocess_image(str(IMAGE)).unsqueeze(0)
    averaged = _outputs(_module_with(ckpt_path, checkpoint["state_dict"]), image, 3)
    raw = _outputs(_module_with(ckpt_path, checkpoint["current_model_state"]), image, 3)
    assert not torch.allclose(averaged[1], raw[1], atol=1e-4)

    predict(
        compose_config(
            [f"ckpt_path={ckpt_path}", f"image={IMAGE}", "number=3", "format=json"],
            config_name="predict",
        )
    )
    predicted = json.loads(capsys.readouterr().out.splitlines()[-1])
    sum_prob, total = averaged[1].softmax(dim=-1).max(dim=-1)
    assert predicted["sum"] == int(total) and predicted["sum_prob"] == pytest.approx(
        float(sum_prob), abs=1e-6
    )

    paths = export(
        compose_config(
            [f"ckpt_path={ckpt_path}", f"output_dir={tmp_path / 'export'}"],
            config_name="export",
        )
    )
    scripted = torch.jit.load(str(paths["torchscript"]))
    with torch.inference_mode():
        exported = scripted(image, torch.eye(10)[[3]])
    # The two heads (the not-a-digit score and decision follow them).
    assert all(torch.allclose(e, a, atol=1e-5) for e, a in zip(exported[:2], averaged, strict=True))


def test_the_default_callbacks_average_and_the_short_presets_do_not():
    ema_target = "mnist_adder.training.callbacks.WarmupEMA"
    assert compose_config().callbacks.ema._target_ == ema_target
    assert compose_config(["callbacks=ema"]).callbacks == compose_config().callbacks  # the alias
    for preset in ("fast", "fast_gpu", "smoke"):
        assert compose_config([f"experiment={preset}"]).callbacks.get("ema") is None, preset


def test_best_large_is_the_measured_command_with_the_fixed_decay():
    # The README's 3-seed table of experiment=best_large was run as these overrides.
    measured = ["model=large", "trainer.max_epochs=18", "callbacks.ema.warmup=1"]
    preset = compose_config(["experiment=best_large"])
    assert preset == compose_config(measured)
    ema = hydra.utils.instantiate(preset.callbacks.ema)
    assert isinstance(ema, WarmupEMA) and _averages(ema, 3) == pytest.approx([1.0, 1.001, 1.002999])


def _averages(ema: WarmupEMA, steps: int) -> list[float]:
    """The average after each update, when the weight is 1, 2, ..., steps in turn."""
    weight = torch.nn.Linear(1, 1, bias=False)
    averaged = AveragedModel(weight, avg_fn=ema._kwargs["avg_fn"])
    averages = []
    for step in range(1, steps + 1):
        weight.weight.data.fill_(float(step))
        averaged.update_parameters(weight)
        averages.append(averaged.module.weight.item())
    return averages


def test_the_warmed_up_decay_spans_the_last_part_of_a_run_then_the_fixed_horizon():
    ema = WarmupEMA(decay=0.999, warmup=4)
    averages = _averages(ema, 4000)
    # average_n = d * average_(n-1) + (1 - d) * n: solve for the decay d of each update after the first
    pairs = zip(range(2, 4001), averages[1:], averages[:-1], strict=True)
    decays = [(n - average) / (n - previous) for n, average, previous in pairs]
    # The first update copies the weights; the n-th after it moves by 1 - (1 + n) / (4 + n) ...
    assert averages[0] == 1.0
    assert decays[0] == pytest.approx(2 / 5) and decays[99] == pytest.approx(101 / 104, abs=1e-5)
    # ... until that reaches the fixed decay, after about 3,000 updates.
    assert decays[2990] < 0.999 and decays[3010] == pytest.approx(0.999, abs=1e-6)
    # So the start is forgotten: after one epoch (215 steps) the average sits in the run's last part.
    assert 0.6 * 215 < _averages(ema, 215)[-1] < 215


def test_warmup_one_is_the_fixed_decay_and_below_one_is_refused():
    fixed = _averages(WarmupEMA(decay=0.9, warmup=1), 50)
    expected = 1.0
    for step in range(2, 51):
        expected = 0.9 * expected + 0.1 * step  # Lightning's EMAWeightAveraging, from a copy of step 1
        assert fixed[step - 1] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        WarmupEMA(warmup=0.5)
