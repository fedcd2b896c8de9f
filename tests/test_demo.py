"""scripts/demo.py: the real Gradio server, asked through gradio_client and through a real browser.

Both read real MNIST test digits saved as PNG files, and both must get what predict's code gets from
the same files (same loader, same preprocessing, same probabilities); bad input shows predict's words,
and an image that is not a digit predict's refusal.
"""

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from mnist_adder.data import load_mnist, normalize
from mnist_adder.data.preprocess import read_grayscale, to_mnist_pixels
from mnist_adder.inference.checkpoint import load_checkpoint
from mnist_adder.inference.demo import NOT_A_DIGIT_LABEL, DigitSumDemo, build_app
from mnist_adder.inference.predict import Failure, NotDigit, Prediction, predict_images

from conftest import compose_config, require_extra, save_letter, save_noise

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 300  # importing Gradio and torch on a busy 2-core machine
# Every wait on the running demo, ours rather than a library's default (Playwright's 5 s for `expect`,
# httpx's 5 s under gradio_client, no limit at all on a client's result): a prediction on a 2-core
# machine running two test workers can take several seconds.
WAIT_S = 120
BROWSER_WAIT_MS = WAIT_S * 1000
NUM_DIGITS_ASKED = 20


def _serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:  # refused while starting, or a timeout
        return False


def _client(client_module, url: str):
    """A gradio_client Client whose HTTP requests wait WAIT_S, not httpx's default."""
    return client_module.Client(url, verbose=False, httpx_kwargs={"timeout": WAIT_S})


def _ask(client, *inputs, api_name: str) -> tuple:
    """The demo's answer to one call, waited for at most WAIT_S (`Client.predict` waits without a limit)."""
    return client.submit(*inputs, api_name=api_name).result(timeout=WAIT_S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(
    handed_over_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(URL, checkpoint) of `python scripts/demo.py` serving the trained run's best checkpoint, calibrated
    (with its not-a-digit detector)."""
    require_extra("gradio", "demo")
    ckpt_path = str(handed_over_ckpt)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("demo") / "server.log"
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "scripts/demo.py", f"ckpt_path={ckpt_path}", f"port={port}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _serving(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo did not start (status {server.poll()}):\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, ckpt_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def digit_files(real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, int]]:
    """Real MNIST test digits as grayscale PNG files, each with the number to add (0..9 in turn)."""
    images, _ = load_mnist(real_data_dir, train=False)
    folder = tmp_path_factory.mktemp("digits")
    files = []
    for i, index in enumerate(range(0, 10_000, 10_000 // NUM_DIGITS_ASKED)):
        path = folder / f"mnist_test_{index:05d}.png"
        Image.fromarray(images[index].numpy()).save(path)
        files.append((path, i % 10))
    return files


def _predict_file(
    ckpt_path: str, path: Path, number: int, shown_as: str | None = None
) -> Prediction | NotDigit | Failure:
    """What predict's code says of one file; `shown_as` the name the page gives the image (default: the
    file's name, as the page shows an upload)."""
    module, _ = load_checkpoint(ckpt_path)
    result = predict_images(module, [str(path)], [number])[0]
    return replace(result, image=shown_as or path.name)


def _elements(node: dict, names: dict[int, str]) -> list[str]:
    """The names of the components under a layout node, in page order, depth first."""
    found = [names[node["id"]]] if node["id"] in names else []
    return found + [name for child in node.get("children", []) for name in _elements(child, names)]


def test_the_page_predicts_on_every_change_and_picks_the_number_above_predict():
    require_extra("gradio", "demo")
    module = hydra.utils.instantiate(compose_config([]).model).eval()  # untrained: only the page is read
    page = build_app(module).get_config_file()
    names = {c["id"]: c["props"]["elem_id"] for c in page["components"] if c["props"].get("elem_id")}
    answers = [
        names[i]
        for i in next(d for d in page["dependencies"] if d["api_name"] == "predict_upload")["outputs"]
    ]
    assert answers == ["message", "digit", "sum", "seen"]
    by_id = {d["id"]: d for d in page["dependencies"]}

    def trigger(dependency: dict) -> tuple[str, str]:
        # A `.then` step is triggered by the event of the step it follows.
        if dependency["trigger_after"] is not None:
            return trigger(by_id[dependency["trigger_after"]])
        ((target, event),) = dependency["targets"]
        return names[target], event

    predicting = {trigger(d) for d in page["dependencies"] if [names.get(o) for o in d["outputs"]] == answers}
    assert predicting == {
        ("sketch", "input"),  # a stroke (its change event also fires as the empty canvas starts)
        ("upload", "change"),
        ("draw-tab", "select"),
        ("upload-tab", "select"),
        ("number", "change"),
        ("predict", "click"),
    }
    order = _elements(page["layout"], names)
    assert order.index("upload") < order.index("number") < order.index("predict") < order.index("message")


def test_changes_that_bring_no_image_stay_quiet_and_predict_says_what_is_missing():
    module = hydra.utils.instantiate(compose_config([]).model).eval()  # untrained: the answers' form only
    demo = DigitSumDemo(module)
    untouched = {"composite": np.zeros((64, 64, 4), dtype=np.uint8)}  # a transparent canvas
    # The number, a tab shown, the page opening: nothing to read yet, so nothing shown and no error.
    assert demo.refresh("drawing", untouched, None, 3) == ("", None, None, None)
    assert demo.refresh("upload", untouched, None, 3) == ("", None, None, None)
    # The Predict button says what is missing, in predict's words.
    assert demo.from_source("drawing", untouched, None, 3)[0].startswith("error: drawing: no digit found")
    assert demo.from_source("upload", untouched, None, 3)[0] == demo.from_upload(None, 3)[0]
    # With a stroke drawn, every trigger gives the stroke's own answer, the 28x28 image enlarged 8 times.
    stroke = np.zeros((64, 64, 4), dtype=np.uint8)
    stroke[10:54, 30:35, 3] = 255
    drawn = {"composite": stroke}
    message, *_, seen = demo.from_drawing(drawn, 3)
    assert message.startswith("drawing: number 3 -> digit ") and seen.shape == (224, 224)
    assert (
        demo.refresh("drawing", drawn, None, 3)[0]
        == demo.from_source("drawing", drawn, None, 3)[0]
        == message
    )


def test_the_page_answers_an_upload_as_predict_does_and_bad_input_with_predicts_words(tiny_run, tmp_path):
    # What the page does with its inputs, without Gradio (tiny_run: a model of a few seconds); the slow
    # tests below ask the real server and a browser.
    ckpt_path = json.loads((tiny_run / "metrics.json").read_text())["ckpt_path"]
    module, _ = load_checkpoint(ckpt_path)
    demo = DigitSumDemo(module)
    path = ROOT / "examples" / "digits" / "seven_on_paper.png"
    message, digit, total, seen = demo.from_upload(str(path), 4)
    want = _predict_file(ckpt_path, path, 4)
    assert isinstance(want, Prediction) and message == want.as_text()
    assert max(digit, key=digit.get) == str(want.digit) and max(total, key=total.get) == str(want.sum)
    assert digit[str(want.digit)] == pytest.approx(want.digit_prob, abs=1e-6)
    pixels = to_mnist_pixels(read_grayscale(path)).numpy()  # shown enlarged, each pixel an 8x8 square
    np.testing.assert_array_equal(seen, np.kron(pixels, np.ones((8, 8), dtype=np.uint8)))

    (tmp_path / "notes.txt").write_text("not a picture\n")
    failure = _predict_file(ckpt_path, tmp_path / "notes.txt", 4)
    assert isinstance(failure, Failure)
    assert demo.from_upload(str(tmp_path / "notes.txt"), 4) == (
        f"error: notes.txt: {failure.error}",
        None,
        None,
        None,
    )
    message, *cleared = demo.from_drawing(None, 4)  # an untouched sketchpad
    assert message.startswith("error: drawing: no digit found") and cleared == [None, None, None]


@pytest.mark.slow  # a real server, with a model trained on real MNIST (trained_run)
def test_client_gets_what_predict_gets(demo_server, digit_files, real_data_dir):
    client_module = require_extra("gradio_client", "demo")
    url, ckpt_path = demo_server
    module, _ = load_checkpoint(ckpt_path)
    client = _client(client_module, url)

    images, _ = load_mnist(real_data_dir, train=False)
    indices = [int(path.stem.rsplit("_", 1)[1]) for path, _ in digit_files]
    numbers = [number for _, number in digit_files]
    with torch.inference_mode():  # the model on the original tensors, no files involved
        digit_logits, sum_logits = module(normalize(images[indices]).unsqueeze(1), torch.eye(10)[numbers])
    expected = [
        replace(result, image=path.name)
        for result, (path, _) in zip(
            predict_images(module, [str(path) for path, _ in digit_files], numbers), digit_files, strict=True
        )
    ]

    agree = 0
    for (path, number), want, tensor_digit, tensor_sum in zip(
        digit_files, expected, digit_logits.argmax(1), sum_logits.argmax(1), strict=True
    ):
        message, digit, total, seen = _ask(
            client, client_module.handle_file(str(path)), number, api_name="/predict_upload"
        )
        # Predict's own line for this file, its digit and sum on top of the bars with predict's probabilities
        # (or, for a digit refused as not one, about 1 in 100, the refusal where they would be).
        assert message == want.as_text()
        if isinstance(want, NotDigit):
            assert digit["label"] == total["label"] == NOT_A_DIGIT_LABEL
            continue
        assert isinstance(want, Prediction)
        assert (int(digit["label"]), int(total["label"])) == (want.digit, want.sum)
        # (Read per head: with n=0 the digit and the sum carry the same label.)
        assert digit["confidences"][0]["confidence"] == pytest.approx(want.digit_prob, abs=1e-6)
        assert total["confidences"][0]["confidence"] == pytest.approx(want.sum_prob, abs=1e-6)
        # The 28x28 picture shown is what predict's preprocessing made of the file, each pixel an 8x8
        # square (enlarged without smoothing, 224x224).
        shown = np.asarray(Image.open(seen).convert("L"))
        pixels = to_mnist_pixels(read_grayscale(path)).numpy()
        assert shown.shape == (224, 224)
        np.testing.assert_array_equal(shown, np.kron(pixels, np.ones((8, 8), dtype=np.uint8)))
        agree += (want.digit, want.sum) == (int(tensor_digit), int(tensor_sum))
    # Files are re-centred as users' images are: nearly always what the tensors give (see test_predict).
    assert agree >= 0.9 * len(digit_files)


@pytest.mark.slow  # a real server, with a model trained on real MNIST (trained_run)
def test_blank_drawing_and_non_image_show_predicts_message_and_the_app_keeps_serving(
    demo_server, digit_files, tmp_path
):
    client_module = require_extra("gradio_client", "demo")
    url, ckpt_path = demo_server
    client = _client(client_module, url)

    blank = tmp_path / "blank.png"
    Image.new("RGBA", (200, 200), (0, 0, 0, 0)).save(blank)  # an untouched sketchpad: all transparent
    drawing = {"background": None, "layers": [], "composite": client_module.handle_file(str(blank))}
    message, digit, total, seen = _ask(client, drawing, 3, api_name="/predict_drawing")
    blank_failure = _predict_file(ckpt_path, blank, 3)
    assert isinstance(blank_failure, Failure) and blank_failure.error.startswith("no digit found")
    assert message == f"error: drawing: {blank_failure.error}"
    assert not digit and not total and not seen  # cleared (the client gives {} or None)

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    message, *outputs = _ask(client, client_module.handle_file(str(notes)), 3, api_name="/predict_upload")
    failure = _predict_file(ckpt_path, notes, 3)
    assert isinstance(failure, Failure) and failure.error.startswith("not an image")
    assert message == f"error: notes.txt: {failure.error}" and not any(outputs)

    # Still serving: a drawing of a real digit (RGBA as the sketchpad sends it) is read.
    path, number = digit_files[0]
    ink = np.asarray(Image.open(path))
    drawn = np.zeros((*ink.shape, 4), dtype=np.uint8)
    drawn[..., 3] = ink  # black strokes on a transparent canvas, as drawn
    Image.fromarray(drawn, "RGBA").resize((280, 280)).save(tmp_path / "drawn.png")
    drawing = {
        "background": None,
        "layers": [],
        "composite": client_module.handle_file(str(tmp_path / "drawn.png")),
    }
    message, digit, total, seen = _ask(client, drawing, number, api_name="/predict_drawing")
    want = _predict_file(ckpt_path, tmp_path / "drawn.png", number, shown_as="drawing")
    assert isinstance(want, Prediction)
    assert message == want.as_text() and int(digit["label"]) == want.digit


@pytest.mark.slow  # a real server, with a model trained on real MNIST (trained_run)
def test_noise_and_a_letter_show_predicts_refusal(demo_server, tmp_path):
    client_module = require_extra("gradio_client", "demo")
    url, ckpt_path = demo_server
    client = _client(client_module, url)
    for path in (save_noise(tmp_path / "noise.png"), save_letter(tmp_path / "letter_w.png")):
        want = _predict_file(ckpt_path, path, 3)
        assert isinstance(want, NotDigit)
        message, digit, total, seen = _ask(
            client, client_module.handle_file(str(path)), 3, api_name="/predict_upload"
        )
        # Predict's refusal, and "not a digit" where the digit and the sum would be; what it saw is shown.
        assert message == want.as_text() and message.startswith(f"{path.name}: not a digit (score ")
        assert digit["label"] == total["label"] == NOT_A_DIGIT_LABEL
        assert not digit.get("confidences")
        shown = np.asarray(Image.open(seen).convert("L"))
        pixels = to_mnist_pixels(read_grayscale(path)).numpy()  # enlarged: each pixel an 8x8 square
        np.testing.assert_array_equal(shown, np.kron(pixels, np.ones((8, 8), dtype=np.uint8)))


@pytest.mark.slow  # a real server, with a model trained on real MNIST (trained_run)
def test_browser_upload_shows_digit_and_sum(demo_server, digit_files):
    sync_api = require_extra("playwright.sync_api", "demo")
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium missing: apt-get install -y chromium")
    url, ckpt_path = demo_server
    path, number = digit_files[3]
    want = _predict_file(ckpt_path, path, number)
    assert isinstance(want, Prediction)

    with sync_api.sync_playwright() as playwright:
        # Debian's Chromium: Playwright's own browser download is not reachable here.
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox"], timeout=BROWSER_WAIT_MS
        )
        try:
            page = browser.new_page()
            # Every wait below is bounded by the same limit: actions and navigation here, the assertions
            # by their own argument (`expect` does not read the page's default timeout).
            page.set_default_timeout(BROWSER_WAIT_MS)
            page.set_default_navigation_timeout(BROWSER_WAIT_MS)
            expect = sync_api.expect
            page.goto(url)
            page.get_by_role("tab", name="Upload").click()
            # The number first: a page that predicts on every change then predicts once the file is in.
            page.locator("#number").get_by_label(str(number), exact=True).check()
            # Done uploading when the server has the file, as the user sees the upload finish; not what
            # the file widget writes (Gradio has split the name from its extension in separate elements).
            with page.expect_response(
                lambda r: r.request.method == "POST" and "/upload" in r.url, timeout=BROWSER_WAIT_MS
            ) as upload:
                page.locator("#upload input[type=file]").set_input_files(str(path))
            assert upload.value.ok, upload.value.status
            # The upload tab's Predict button, where the page has one (a page may predict on change).
            predict = page.locator("#upload-tab").get_by_role("button", name="Predict")
            if predict.count():
                predict.click()
            # What the user waits for: predict's line for this file, and the digit and the sum on top of
            # the bar charts.
            message = page.locator("#message [data-testid=textbox]")
            expect(message).to_have_value(want.as_text(), timeout=BROWSER_WAIT_MS)
            expect(page.locator("#digit h2")).to_have_text(str(want.digit), timeout=BROWSER_WAIT_MS)
            expect(page.locator("#sum h2")).to_have_text(str(want.sum), timeout=BROWSER_WAIT_MS)
        finally:
            browser.close()


def test_every_browser_wait_is_bounded_by_our_limit():
    """Each Playwright assertion and `expect_*` wait in the tests passes `timeout=`: Playwright's own
    defaults (5 s for `expect`) are what failed CI on a busy machine, and `page.set_default_timeout`
    does not reach the assertions."""
    unbounded = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            target = node.func.value
            called = getattr(target, "func", None)  # `expect(...)` or `sync_api.expect(...)`
            asserted = "expect" in (getattr(called, "id", None), getattr(called, "attr", None))
            waits = node.func.attr.startswith(("expect_", "wait_for"))
            if (asserted or waits) and "timeout" not in {k.arg for k in node.keywords}:
                unbounded.append(f"{path.name}:{node.lineno}: {node.func.attr}")
    assert not unbounded, unbounded
