"""scripts/export.py: the ONNX and TorchScript files predict what the PyTorch model predicts, and refuse
what it refuses as not a digit (the detector and its threshold travel in the files)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_adder.data import load_mnist, normalize
from mnist_adder.data.preprocess import preprocess_image
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.export import ExportedNet, export_onnx, export_paths, export_torchscript
from mnist_adder.models import ConvBackbone, DigitSumNet, MLPAdder

from conftest import require_extra, save_letter, save_noise

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(handed_over_ckpt, tmp_path_factory):
    require_extra("onnx", "export")  # scripts/export.py writes both formats
    ckpt_path = str(handed_over_ckpt)  # with temperatures and the not-a-digit detector
    output_dir = tmp_path_factory.mktemp("exported")
    result = subprocess.run(
        [sys.executable, "scripts/export.py", f"ckpt_path={ckpt_path}", f"output_dir={output_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paths = export_paths(ckpt_path, output_dir)
    assert result.stdout.splitlines() == [f"onnx: {paths['onnx']}", f"torchscript: {paths['torchscript']}"]
    return ckpt_path, paths


@pytest.fixture(scope="module")
def test_batch(real_data_dir, tmp_path_factory):
    """500 MNIST test digits, then a noise image and a typed letter as predict preprocesses them."""
    images, _ = load_mnist(real_data_dir, train=False)
    folder = tmp_path_factory.mktemp("not_digits")
    others = [preprocess_image(save(folder / f"{i}.png")) for i, save in enumerate((save_noise, save_letter))]
    count = 500 + len(others)
    numbers = torch.arange(count) % 10
    return torch.cat([normalize(images[:500]).unsqueeze(1), torch.stack(others)]), torch.eye(10)[numbers]


def _pytorch(ckpt_path, image, number_onehot):
    """(digit logits, sum logits, not-a-digit score, refused) of the checkpoint in PyTorch."""
    module, _ = load_checkpoint(ckpt_path)
    with torch.inference_mode():
        digit_logits, sum_logits, score = module.net.forward_with_not_digit(image, number_onehot)
    return digit_logits, sum_logits, score, score > module.net.not_digit.threshold


@pytest.mark.slow
def test_onnx_runtime_predicts_like_pytorch(exported, test_batch):
    ort = require_extra("onnxruntime", "export")
    ckpt_path, paths = exported
    image, number_onehot = test_batch
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [
        ("image", [1, 28, 28]),
        ("number_onehot", [10]),
    ]
    # The two heads first, as before "not a digit" existed; its score and decision after them.
    assert [(o.name, o.shape[1:]) for o in session.get_outputs()] == [
        ("digit_logits", [10]),
        ("sum_logits", [19]),
        ("not_digit_score", []),
        ("not_digit", []),
    ]
    digit_logits, sum_logits, score, refused = _pytorch(ckpt_path, image, number_onehot)
    # The noise and the letter (the last two) are refused, as predict refuses them.
    assert refused[-2:].all() and refused[:500].float().mean() < 0.05
    for batch in (502, 7):  # the batch dimension is free
        onnx_digit, onnx_sum, onnx_score, onnx_refused = session.run(
            None, {"image": image[-batch:].numpy(), "number_onehot": number_onehot[-batch:].numpy()}
        )
        assert onnx_digit.shape == (batch, 10) and onnx_sum.shape == (batch, 19)
        assert np.array_equal(onnx_digit.argmax(1), digit_logits[-batch:].argmax(1).numpy())
        assert np.array_equal(onnx_sum.argmax(1), sum_logits[-batch:].argmax(1).numpy())
        assert np.allclose(onnx_sum, sum_logits[-batch:].numpy(), atol=1e-4)
        assert np.allclose(onnx_score, score[-batch:].numpy(), rtol=1e-4, atol=1e-3)
        assert onnx_refused.dtype == np.bool_ and np.array_equal(onnx_refused, refused[-batch:].numpy())
    # The threshold is in the file's metadata too, for people reading it.
    import onnx

    props = {p.key: p.value for p in onnx.load(str(paths["onnx"])).metadata_props}
    module, _ = load_checkpoint(ckpt_path)
    assert float(props["not_digit_threshold"]) == float(module.net.not_digit.threshold)


@pytest.mark.slow
def test_torchscript_predicts_like_pytorch(exported, test_batch):
    ckpt_path, paths = exported
    image, number_onehot = test_batch
    scripted = torch.jit.load(str(paths["torchscript"]))
    digit_logits, sum_logits, score, refused = _pytorch(ckpt_path, image, number_onehot)
    with torch.inference_mode():
        for batch in (502, 3):
            ts_digit, ts_sum, ts_score, ts_refused = scripted(image[-batch:], number_onehot[-batch:])
            assert torch.equal(ts_digit.argmax(1), digit_logits[-batch:].argmax(1))
            assert torch.allclose(ts_sum, sum_logits[-batch:], atol=1e-5)
            assert torch.allclose(ts_score, score[-batch:], rtol=1e-5, atol=1e-3)
            assert torch.equal(ts_refused, refused[-batch:])


def test_a_net_without_a_detector_exports_nan_scores_and_refuses_nothing(tmp_path):
    net = DigitSumNet(ConvBackbone(), MLPAdder(), "softmax").eval()
    image, number_onehot = torch.randn(4, 1, 28, 28), torch.eye(10)[:4]
    scripted = torch.jit.load(str(export_torchscript(ExportedNet(net).eval(), tmp_path / "net.pt")))
    with torch.inference_mode():
        digit_logits, sum_logits, score, refused = scripted(image, number_onehot)
        expected_digit, expected_sum = net(image, number_onehot)
    assert torch.equal(digit_logits, expected_digit) and torch.equal(sum_logits, expected_sum)
    assert torch.isnan(score).all() and not refused.any()


def test_torchscript_of_a_tiny_run_predicts_like_pytorch_at_any_batch_size(tiny_run, tmp_path):
    # The fast version (tiny_run: a model of a few seconds); the ONNX export alone takes seconds more, so
    # ONNX Runtime is checked by the slow tests above.
    ckpt_path = json.loads((tiny_run / "metrics.json").read_text())["ckpt_path"]
    module, _ = load_checkpoint(ckpt_path)
    scripted = torch.jit.load(str(export_torchscript(module.net.eval(), tmp_path / "net.torchscript.pt")))
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 7):
        image = torch.randn(batch, 1, 28, 28, generator=generator)
        number_onehot = torch.eye(10)[torch.arange(batch) % 10]
        with torch.inference_mode():
            for got, want in zip(scripted(image, number_onehot), module(image, number_onehot), strict=True):
                assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.slow  # the ONNX export takes seconds
def test_a_net_with_test_shifts_exports_them(tmp_path):
    # experiment=fast's net averages shifted views out of training: the exports must do the same. (No
    # detector here: the ONNX file then gives NaN scores and refuses nothing, at any batch size.)
    onnxruntime = require_extra("onnxruntime", "export")
    net = DigitSumNet(ConvBackbone(), MLPAdder(), "softmax", test_shifts=True).eval()
    exported = ExportedNet(net).eval()
    image, number_onehot = torch.randn(3, 1, 28, 28), torch.eye(10)[:3]
    with torch.inference_mode():
        expected = net(image, number_onehot)
        scripted = torch.jit.load(str(export_torchscript(exported, tmp_path / "net.pt")))
        for got, want in zip(scripted(image, number_onehot)[:2], expected, strict=True):
            assert torch.allclose(got, want, atol=1e-5)
    session = onnxruntime.InferenceSession(str(export_onnx(exported, tmp_path / "net.onnx")))
    outputs = session.run(None, {"image": image.numpy(), "number_onehot": number_onehot.numpy()})
    for got, want in zip(outputs[:2], expected, strict=True):
        assert np.allclose(got, want.numpy(), atol=1e-4)
    assert np.isnan(outputs[2]).all() and not outputs[3].any()


def test_files_go_beside_the_checkpoint_unless_told(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_003.ckpt"
    assert export_paths(ckpt) == {
        "onnx": ckpt.parent / "epoch_003.onnx",
        "torchscript": ckpt.parent / "epoch_003.torchscript.pt",
    }
    assert export_paths(ckpt, tmp_path / "out")["onnx"] == tmp_path / "out" / "epoch_003.onnx"
