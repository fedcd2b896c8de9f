"""An MNIST-addition checkpoint in a user's hands: eval, predict (text and JSON), export and summary, and
a checkpoint of either task handed to what only the other has is one error line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_input import assert_one_clear_line, run_cli

from mnist_adder.data.mnist import load_mnist
from mnist_adder.data.preprocess import preprocess_image
from mnist_adder.errors import UserError
from mnist_adder.evaluation.evaluate import evaluate
from mnist_adder.inference.calibrate import calibrate
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.export import export
from mnist_adder.inference.predict import predict
from mnist_adder.tools.summary import summary
from mnist_adder.training.train import train

from conftest import compose_config, make_tiny_mnist


@pytest.fixture(scope="module")
def addition_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("addition_data"))


@pytest.fixture(scope="module")
def addition_run(addition_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short MNIST-addition run (N = 2, the papers' protocol: no validation split) on a tiny MNIST."""
    data_dir = addition_data
    run_dir = tmp_path_factory.mktemp("addition_run")
    overrides = ["experiment=addition_protocol", "data.digits=2", f"paths.data_dir={data_dir}"]
    overrides += ["data.examples_per_step=10", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    overrides += ["logger=csv"]
    train(compose_config(overrides, run_dir))
    return run_dir


def checkpoint_of(run_dir: Path) -> Path:
    return Path(json.loads((run_dir / "metrics.json").read_text())["ckpt_path"])


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four digit images as a user hands them in: dark ink on white paper, 56 px."""
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i, size in enumerate((56, 40, 28, 64)):
        pixels = np.full((size, size), 255, dtype=np.uint8)
        pixels[size // 4 : 3 * size // 4, size // 2 - 2 + i : size // 2 + 2 + i] = 0  # a stroke
        paths.append(folder / f"digit_{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_eval_gives_the_numbers_training_wrote(addition_run, addition_data, tmp_path):
    trained = json.loads((addition_run / "metrics.json").read_text())
    overrides = [f"ckpt_path={checkpoint_of(addition_run)}", f"paths.data_dir={addition_data}"]
    cfg = compose_config(overrides, tmp_path / "eval", "eval")
    results = evaluate(cfg)
    for key in ("test/sum_acc", "test/digit_acc", "test/sum_acc_map", "test/sum_acc_ceiling", "test/loss"):
        assert results[key] == pytest.approx(trained[key], abs=1e-6), key
    assert (
        json.loads((tmp_path / "eval" / "metrics.json").read_text())["test/sum_acc"]
        == results["test/sum_acc"]
    )


def backbone_digits(ckpt_path: Path, paths: list[Path]) -> tuple[list[int], torch.Tensor]:
    module, _ = load_checkpoint(ckpt_path)
    with torch.no_grad():
        probs = module.net.backbone(torch.stack([preprocess_image(p) for p in paths])).softmax(dim=-1)
    return probs.argmax(dim=-1).tolist(), probs


def as_number(digits: list[int]) -> int:
    return int("".join(map(str, digits)))


def test_predict_reads_each_digit_and_adds_the_two_numbers_as_json(addition_run, digit_images, capsys):
    ckpt_path = checkpoint_of(addition_run)
    first, second = digit_images[:3], digit_images[3:]  # numbers of 3 digits and 1: added as written
    overrides = [f"ckpt_path={ckpt_path}", f"first=[{','.join(map(str, first))}]", f"second={second[0]}"]
    predict(compose_config([*overrides, "format=json"], None, "predict"))
    answer = json.loads(capsys.readouterr().out)
    digits, probs = backbone_digits(ckpt_path, digit_images)
    assert [d["digit"] for d in answer["first"] + answer["second"]] == digits
    assert [d["image"] for d in answer["first"]] == [str(p) for p in first]
    assert answer["first"][0]["digit_prob"] == pytest.approx(float(probs[0].max()), abs=1e-6)
    assert int(answer["digits_sum"]) == as_number(digits[:3]) + digits[3]
    assert 0 < answer["most_probable_sum_prob"] <= 1
    # The most probable sum is at least as probable as the sum of the most probable digits.
    assert answer["most_probable_sum_prob"] >= float(probs.max(dim=-1).values.prod()) - 1e-6


def test_predict_takes_a_folder_per_number_and_prints_text(addition_run, digit_images, capsys):
    folder = digit_images[0].parent  # its four images, by name: a four-digit number
    overrides = [f"ckpt_path={checkpoint_of(addition_run)}", f"first={folder}", f"second={folder}"]
    predict(compose_config(overrides, None, "predict"))
    lines = capsys.readouterr().out.splitlines()
    digits, _ = backbone_digits(checkpoint_of(addition_run), digit_images)
    assert lines[0].startswith(f"first: {as_number(digits)}") and lines[1].startswith("second: ")
    assert lines[2] == f"sum of the digits read: {2 * as_number(digits)}"
    assert lines[3].startswith("most probable sum: ") and lines[3].endswith("%)")


def test_export_writes_the_backbone_that_reads_the_digits(addition_run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    ckpt_path = checkpoint_of(addition_run)
    paths = export(compose_config([f"ckpt_path={ckpt_path}", f"output_dir={tmp_path}"], None, "export"))
    module, _ = load_checkpoint(ckpt_path)
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = module.net.backbone(images)
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["digit_logits"]
    np.testing.assert_allclose(session.run(None, {"image": images.numpy()})[0], expected, atol=1e-4)
    traced = torch.jit.load(str(paths["torchscript"]))
    torch.testing.assert_close(traced(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("backbone", "parameters"), [("conv", "21,154"), ("lenet", "44,426")])
def test_summary_gives_the_addition_nets_parameters(backbone, parameters):
    cfg = compose_config(["model=addition", f"model/backbone={backbone}"], None, "summary")
    assert f"Total params: {parameters}" in summary(cfg)


def test_an_addition_checkpoint_where_only_the_other_task_goes_is_refused(
    addition_run, addition_data, digit_images, tmp_path
):
    ckpt_path = checkpoint_of(addition_run)
    refused = [
        ("predict", [f"image={digit_images[0]}", "number=3"], "give first=<images or folder> second="),
        ("calibrate", [], "scripts/calibrate.py works on checkpoints of the (image, number)"),
        ("eval", ["robustness=true"], "scripts/eval.py robustness=true works on checkpoints of the (image"),
        ("eval", ["not_digits=true"], "scripts/eval.py not_digits=true works on checkpoints of the (image"),
    ]
    tools = {"predict": predict, "calibrate": calibrate, "eval": evaluate}
    for tool, overrides, message in refused:
        data = [f"paths.data_dir={addition_data}"] if tool == "eval" else []
        output_dir = tmp_path / tool if tool == "eval" else None
        cfg = compose_config([f"ckpt_path={ckpt_path}", *data, *overrides], output_dir, tool)
        with pytest.raises(UserError, match="is a checkpoint of MNIST addition") as err:
            tools[tool](cfg)
        assert message in str(err.value), (tool, str(err.value))


def test_a_checkpoint_of_the_image_and_number_task_asked_to_add_numbers_is_refused(tiny_run, digit_images):
    ckpt_path = json.loads((tiny_run / "metrics.json").read_text())["ckpt_path"]
    overrides = [f"ckpt_path={ckpt_path}", f"first={digit_images[0]}", f"second={digit_images[1]}"]
    with pytest.raises(UserError, match=r"is a checkpoint of the \(image, number\).*image=<file or folder>"):
        predict(compose_config(overrides, None, "predict"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["first=a.png"], "no image given for second"),
        (["first=a.png", "second=b.png", "number=3"], "give one pair"),
        (["first=a.png", "second=b.png", "reject_threshold=0.5"], "has no not-a-digit detector"),
    ],
)
def test_bad_addition_questions_are_one_line(addition_run, overrides, message):
    cfg = compose_config([f"ckpt_path={checkpoint_of(addition_run)}", *overrides], None, "predict")
    with pytest.raises(UserError, match=message):
        predict(cfg)


@pytest.mark.slow
def test_a_short_real_run_adds_mnist_test_digits_from_the_command_line(real_data_dir, tmp_path):
    # 150 steps at N = 1 on real MNIST, no digit label in the loss; then two numbers of MNIST test digits,
    # saved as PNG files, through scripts/predict.py as a user runs it; and refused where it cannot go.
    overrides = ["experiment=addition_protocol", "data.digits=1", f"paths.data_dir={real_data_dir}", "seed=1"]
    overrides += [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=150",
        "trainer.enable_progress_bar=false",
    ]
    overrides += ["logger=csv", "callbacks.ema=null"]
    train(compose_config(overrides, tmp_path / "run"))
    ckpt_path = checkpoint_of(tmp_path / "run")
    images, labels = load_mnist(real_data_dir, train=False)
    folders = [tmp_path / "first", tmp_path / "second"]
    for folder, start in zip(folders, (0, 3), strict=True):
        folder.mkdir()
        for position in range(3):
            Image.fromarray(images[start + position].numpy()).save(folder / f"{position}.png")
    first, second = (as_number(labels[start : start + 3].tolist()) for start in (0, 3))
    result = run_cli(
        f"ckpt_path={ckpt_path}",
        f"first={folders[0]}",
        f"second={folders[1]}",
        "format=json",
        script="predict",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout)
    assert (int(answer["first_number"]), int(answer["second_number"])) == (first, second)
    assert int(answer["digits_sum"]) == int(answer["most_probable_sum"]) == first + second
    refused = run_cli(f"ckpt_path={ckpt_path}", script="calibrate")
    assert_one_clear_line(refused, "is a checkpoint of MNIST addition", "scripts/calibrate.py works on")
