"""scripts/export.py: the ONNX and TorchScript files predict what the PyTorch model predicts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_adder.data import load_mnist, normalize
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.export import export_paths, export_torchscript

ROOT = Path(__file__).resolve().parents[1]


def _import_onnxruntime():
    """onnxruntime comes with the export extra: skipped where it is missing, but a failure in CI."""
    try:
        import onnxruntime
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail('onnxruntime missing: .ci/run installs ".[dev,export]"')
        pytest.skip('onnxruntime missing: pip install -e ".[export]"')
    return onnxruntime


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    ckpt_path = json.loads((trained_run / "metrics.json").read_text())["ckpt_path"]
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
def test_batch(real_data_dir):
    images, _ = load_mnist(real_data_dir, train=False)
    count = 500
    numbers = torch.arange(count) % 10
    return normalize(images[:count]).unsqueeze(1), torch.eye(10)[numbers]


def _pytorch(ckpt_path, image, number_onehot):
    module, _ = load_checkpoint(ckpt_path)
    with torch.inference_mode():
        return module(image, number_onehot)


@pytest.mark.slow
def test_onnx_runtime_predicts_like_pytorch(exported, test_batch):
    ort = _import_onnxruntime()
    ckpt_path, paths = exported
    image, number_onehot = test_batch
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [
        ("image", [1, 28, 28]),
        ("number_onehot", [10]),
    ]
    assert [(o.name, o.shape[1:]) for o in session.get_outputs()] == [
        ("digit_logits", [10]),
        ("sum_logits", [19]),
    ]
    digit_logits, sum_logits = _pytorch(ckpt_path, image, number_onehot)
    for batch in (500, 7):  # the batch dimension is free
        onnx_digit, onnx_sum = session.run(
            None, {"image": image[:batch].numpy(), "number_onehot": number_onehot[:batch].numpy()}
        )
        assert onnx_digit.shape == (batch, 10) and onnx_sum.shape == (batch, 19)
        assert np.array_equal(onnx_digit.argmax(1), digit_logits[:batch].argmax(1).numpy())
        assert np.array_equal(onnx_sum.argmax(1), sum_logits[:batch].argmax(1).numpy())
        assert np.allclose(onnx_sum, sum_logits[:batch].numpy(), atol=1e-4)


@pytest.mark.slow
def test_torchscript_predicts_like_pytorch(exported, test_batch):
    ckpt_path, paths = exported
    image, number_onehot = test_batch
    scripted = torch.jit.load(str(paths["torchscript"]))
    digit_logits, sum_logits = _pytorch(ckpt_path, image, number_onehot)
    with torch.inference_mode():
        for batch in (500, 3):
            ts_digit, ts_sum = scripted(image[:batch], number_onehot[:batch])
            assert torch.equal(ts_digit.argmax(1), digit_logits[:batch].argmax(1))
            assert torch.allclose(ts_sum, sum_logits[:batch], atol=1e-5)


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


def test_files_go_beside_the_checkpoint_unless_told(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_003.ckpt"
    assert export_paths(ckpt) == {
        "onnx": ckpt.parent / "epoch_003.onnx",
        "torchscript": ckpt.parent / "epoch_003.torchscript.pt",
    }
    assert export_paths(ckpt, tmp_path / "out")["onnx"] == tmp_path / "out" / "epoch_003.onnx"
