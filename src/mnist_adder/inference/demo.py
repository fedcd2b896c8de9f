"""A live demo of a trained model in the browser (Gradio), behind scripts/demo.py.

Draw a digit or upload an image, choose the number n, and see the digit and the sum with their
probabilities, and the 28x28 image the model saw (enlarged, each pixel a square). The page predicts as
soon as the drawing, the uploaded file, the tab or the number changes. It is `predict` with a page in
front: the same
checkpoint loader, the same preprocessing and the same probabilities, so the page and
`scripts/predict.py` answer alike for the same image. A bad input (a blank drawing, a file that is not
an image) shows predict's error text in the message box, and the app keeps serving. An image that does
not look like a handwritten digit shows predict's "not a digit" line, and "not a digit" where the digit
and the sum would be.
"""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mnist_adder.classes import NUM_DIGITS, NUM_SUMS
from mnist_adder.config_checks import check_config
from mnist_adder.data.preprocess import read_grayscale, to_grayscale, to_mnist_pixels, to_model_input
from mnist_adder.errors import UserError
from mnist_adder.inference.checkpoint import HOW_TO_GET_ONE, load_checkpoint
from mnist_adder.inference.predict import (
    NotDigit,
    best_prediction,
    class_probabilities,
    not_digit_scores,
    numbers_for,
    reject_threshold,
)

log = logging.getLogger(__name__)

USAGE = "python scripts/demo.py ckpt_path=<file.ckpt> [port=7860] [share=false]"
# How many classes each bar chart shows, most probable first.
TOP_CLASSES = 5
# What the page returns for each output: (message, digit bars, sum bars, the 28x28 pixels enlarged); the
# bars are the refusal's words instead for an image that is not a digit.
Answer = tuple[str, dict[str, float] | str | None, dict[str, float] | str | None, np.ndarray | None]
# Where the digit and the sum would be shown, for an image refused as not a digit.
NOT_A_DIGIT_LABEL = "not a digit"
# Each of the 28x28 pixels the model saw is shown as a square of SEEN_SCALE x SEEN_SCALE screen pixels
# (224 x 224), enlarged here by repetition: a browser asked to enlarge a 28x28 image smooths it into a blur.
SEEN_SCALE = 8
# Which input the page reads: the tab shown ("drawing" or "upload").
SOURCES = ("drawing", "upload")


# An untouched sketchpad may arrive as nothing at all: it is read as the blank white page it shows.
BLANK_DRAWING = np.full((64, 64), 255, dtype=np.uint8)


class DigitSumDemo:
    """What the page does with its inputs, without the page: testable with a model alone."""

    def __init__(self, module: torch.nn.Module, threshold: Any = None) -> None:
        """`threshold` as `reject_threshold=` (None: the checkpoint's; off: refuse nothing)."""
        self.module = module
        self.threshold = reject_threshold(threshold, module)

    def answer(self, name: str, gray: np.ndarray, number: Any) -> Answer:
        """Gray levels of one image and a number -> the page's outputs (raises UserError on bad input)."""
        (number,) = numbers_for(number, 1)
        pixels = to_mnist_pixels(gray)
        image = to_model_input(pixels)[None]
        digit_probs, sum_probs = class_probabilities(self.module, image, [number])
        score = float(not_digit_scores(self.module, image)[0])
        prediction = best_prediction(name, number, digit_probs[0], sum_probs[0], score, self.threshold)
        if isinstance(prediction, NotDigit):
            return prediction.as_text(), NOT_A_DIGIT_LABEL, NOT_A_DIGIT_LABEL, enlarge(pixels.numpy())
        return (
            prediction.as_text(),
            {str(c): float(p) for c, p in zip(range(NUM_DIGITS), digit_probs[0], strict=True)},
            {str(c): float(p) for c, p in zip(range(NUM_SUMS), sum_probs[0], strict=True)},
            enlarge(pixels.numpy()),
        )

    def from_upload(self, path: str | None, number: Any) -> Answer:
        """An uploaded file: read as `scripts/predict.py` reads a file, errors named after the file."""
        if not path:
            return _failed("no image uploaded: choose an image file (PNG, JPEG, ...) first.")
        name = Path(path).name
        try:
            return self.answer(name, read_grayscale(path), number)
        except UserError as err:
            return _failed(f"{name}: {err}")

    def from_drawing(self, drawing: Any, number: Any) -> Answer:
        """The sketchpad's value (Gradio's editor value: its `composite` is the picture as drawn)."""
        composite = drawing.get("composite") if isinstance(drawing, dict) else drawing
        image = BLANK_DRAWING if composite is None else composite
        try:
            return self.answer("drawing", to_grayscale(image), number)
        except UserError as err:
            return _failed(f"drawing: {err}")

    def from_source(self, source: str, drawing: Any, path: str | None, number: Any) -> Answer:
        """The input of the tab shown (`source`: "drawing" or "upload"): the Predict button."""
        return self.from_upload(path, number) if source == "upload" else self.from_drawing(drawing, number)

    def refresh(self, source: str, drawing: Any, path: str | None, number: Any) -> Answer:
        """`from_source` for what changes no image (the number, a tab shown, the page opening): while the
        tab shown holds no image yet the outputs are cleared, with no error for what was not done."""
        if (source == "upload" and not path) or (source == "drawing" and _untouched(drawing)):
            return "", None, None, None
        return self.from_source(source, drawing, path, number)


def _untouched(drawing: Any) -> bool:
    # An untouched sketchpad sends nothing or a canvas of one colour.
    composite = drawing.get("composite") if isinstance(drawing, dict) else drawing
    return composite is None or np.ptp(np.asarray(composite)) == 0


def enlarge(pixels: np.ndarray, scale: int = SEEN_SCALE) -> np.ndarray:
    """Pixels [H, W] as [H * scale, W * scale], each pixel a scale x scale square (nearest neighbour)."""
    return np.asarray(pixels).repeat(scale, axis=0).repeat(scale, axis=1)


def _failed(message: str) -> Answer:
    # The same words as predict's `error: <image>: <what went wrong>` line; the outputs are cleared.
    return f"error: {message}", None, None, None


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError as err:
        raise UserError('the demo needs Gradio, which is not installed: pip install -e ".[demo]"') from err
    return gr


def build_app(module: torch.nn.Module, threshold: Any = None) -> Any:
    """The Gradio page around a loaded model (a `gr.Blocks`; call `.launch()` to serve it); `threshold`
    as `reject_threshold=`."""
    gr = _gradio()
    demo = DigitSumDemo(module, threshold)
    with gr.Blocks(title="mnist-adder", analytics_enabled=False) as app:
        gr.Markdown(
            "# mnist-adder\nDraw a digit or upload an image of one and choose a number n: the model "
            "reads the digit and adds n to it, again at every change."
        )
        with gr.Row():
            with gr.Column():
                with gr.Tab("Draw", elem_id="draw-tab") as draw_tab:
                    sketch = gr.Sketchpad(label="digit", type="numpy", image_mode="RGBA", elem_id="sketch")
                with gr.Tab("Upload", elem_id="upload-tab") as upload_tab:
                    upload = gr.File(label="image file", type="filepath", elem_id="upload")
                number = gr.Radio(list(range(NUM_DIGITS)), value=3, label="number n", elem_id="number")
                # Every change predicts already; the button asks again on purpose, and it is what says
                # what is missing (a blank drawing, no file) where the automatic updates stay quiet.
                predict_button = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column():
                message = gr.Textbox(label="prediction", interactive=False, elem_id="message")
                with gr.Row():
                    digit = gr.Label(num_top_classes=TOP_CLASSES, label="digit", elem_id="digit")
                    total = gr.Label(num_top_classes=TOP_CLASSES, label="sum = digit + n", elem_id="sum")
                seen = gr.Image(
                    label="what the model saw (28x28, after preprocessing)",
                    image_mode="L",
                    format="png",
                    # Room for the label above the image: it is shown at its own size (Gradio only
                    # ever shrinks an image to fit), each pixel sharp.
                    height=28 * SEEN_SCALE + 64,
                    interactive=False,
                    elem_id="seen",
                )
        source = gr.State(SOURCES[0])
        outputs = [message, digit, total, seen]
        # The named endpoints (gradio_client: api_name="/predict_drawing", "/predict_upload") are the
        # image changes: a stroke (`input`: the canvas's own start is no change by the user) and a file.
        # The rest predict the tab shown and are no API of their own; a tab is selected as the page opens.
        sketch.input(demo.from_drawing, [sketch, number], outputs, api_name="predict_drawing")
        upload.change(demo.from_upload, [upload, number], outputs, api_name="predict_upload")
        inputs = [source, sketch, upload, number]
        for tab, name in ((draw_tab, "drawing"), (upload_tab, "upload")):
            tab.select(lambda name=name: name, None, source, api_visibility="private").then(
                demo.refresh, inputs, outputs, api_visibility="private"
            )
        number.change(demo.refresh, inputs, outputs, api_visibility="private")
        predict_button.click(demo.from_source, inputs, outputs, api_visibility="private")
    return app


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise UserError(f"port={value!r} is not allowed: a whole number from 1 to 65535, e.g. port=7860.")
    return value


def serve(cfg: DictConfig) -> None:
    """Load the checkpoint and serve the demo until Ctrl-C (raises UserError on bad options)."""
    check_config(cfg)
    if not cfg.get("ckpt_path"):
        raise UserError(f"no checkpoint given: {USAGE}. {HOW_TO_GET_ONE}")
    port = _port(cfg.get("port", 7860))
    share = cfg.get("share", False)
    if not isinstance(share, bool):
        raise UserError(f"share={share!r} is not allowed: true or false.")
    _gradio()  # a missing extra is reported before the model is loaded
    module, _ = load_checkpoint(cfg.ckpt_path, tasks=("digit_sum",), used_by="scripts/demo.py")
    app = build_app(module, cfg.get("reject_threshold"))
    try:
        app.launch(server_name=cfg.get("host", "127.0.0.1"), server_port=port, share=share)
    except OSError as err:  # Gradio's words for a taken port: "Cannot find empty port in range: ..."
        raise UserError(
            f"cannot serve on {cfg.get('host')}:{port} ({err}). Choose a free port: port=<1..65535>."
        ) from err
