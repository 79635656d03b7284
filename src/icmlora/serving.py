"""A registered adapter as an MLflow pyfunc model: images in, scored boxes out, as `icmlora score` predicts.

``icmlora register`` logs ``AdapterDetector`` in MLflow 3's models-from-code style (the file
``icmlora/served_model.py`` builds it; no pickle): the model's artifacts are the base model folder
(``base_model``) and one PEFT adapter folder over it (``adapter``), its ``model_config`` holds the
``predict`` section of params.yaml, and the ``icmlora`` package travels with it as code, so
``mlflow models serve`` needs only the Python packages, not this repository.

Input: a DataFrame with one column ``image``, each row one image's encoded file bytes (PNG, JPEG,
...) as base64 text. Output: a DataFrame with one row per box, ``image`` (the input row), ``label``,
``score`` and the corners ``x0, y0, x1, y1`` in pixels of that image; an image without boxes has
no row. The model is loaded as ``icmlora score`` loads it (float32 base, the adapter over it, on the
GPU when there is one) and predicts with ``florence.predict.predict``, the function behind
``Scorer``: the same images give the same boxes.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

IMAGE_COLUMN = "image"
BOX_COLUMNS = ("label", "score", "x0", "y0", "x1", "y1")
OUTPUT_COLUMNS = (IMAGE_COLUMN, *BOX_COLUMNS)


def encode_image(data: bytes | Path) -> str:
    """An image file (its bytes or its path) as the model's input: base64 text."""
    raw = Path(data).read_bytes() if isinstance(data, Path) else data
    return base64.b64encode(raw).decode("ascii")


def images_frame(images: list[bytes | Path]) -> pd.DataFrame:
    """The model's input for these image files (bytes or paths), in order."""
    return pd.DataFrame({IMAGE_COLUMN: [encode_image(i) for i in images]})


def decode_images(frame: pd.DataFrame) -> list:
    """PIL RGB images from the input frame, decoded as ``icmlora.images.load_images`` decodes a file."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(frame, pd.DataFrame) or IMAGE_COLUMN not in frame.columns:
        raise ValueError(f"input: a DataFrame with a column {IMAGE_COLUMN!r} of base64-encoded image files; got "
                         f"{list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__}")
    images = []
    for row, text in enumerate(frame[IMAGE_COLUMN]):
        try:
            with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
                images.append(im.convert("RGB"))
        except (binascii.Error, TypeError, ValueError, UnidentifiedImageError) as exc:
            raise ValueError(f"input row {row}: column {IMAGE_COLUMN!r} is not a base64-encoded image file ({exc})") from None
    return images


def boxes_frame(boxes: list[list]) -> pd.DataFrame:
    """The model's output: one row per box (``florence.format.Box``) of each image."""
    rows = [(i, b.label, float(b.score), float(b.x1), float(b.y1), float(b.x2), float(b.y2))
            for i, image_boxes in enumerate(boxes) for b in image_boxes]
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    return frame.astype({IMAGE_COLUMN: "int64", "label": "object", **{c: "float64" for c in BOX_COLUMNS[1:]}})


def frame_boxes(frame: pd.DataFrame | list[dict], images: int) -> list[list[tuple]]:
    """Output rows (a DataFrame, or the records a REST call returns) back to per-image lists of
    ``(label, score, x0, y0, x1, y1)``, for ``images`` images."""
    records = frame.to_dict("records") if isinstance(frame, pd.DataFrame) else frame
    out: list[list[tuple]] = [[] for _ in range(images)]
    for r in records:
        out[int(r[IMAGE_COLUMN])].append((r["label"], *(float(r[c]) for c in BOX_COLUMNS[1:])))
    return out


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("long", IMAGE_COLUMN), ColSpec("string", "label"),
                        *(ColSpec("double", c) for c in BOX_COLUMNS[1:])]))


def load_adapted_model(base_dir: Path, adapter: Path | None):
    """(model, processor): the base, with the adapter over it, as `icmlora score` loads them, in eval
    mode on the scoring device (as ``Scorer`` places it)."""
    from icmlora.artifacts.adapters import CONFIG_FILE as ADAPTER_CONFIG
    from icmlora.artifacts.base_model import read_base_model
    from icmlora.errors import InputError
    from icmlora.runtime import scoring_device

    model, processor = read_base_model(Path(base_dir))
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / ADAPTER_CONFIG).is_file():
            raise InputError(f"{adapter}: not a PEFT adapter folder ({ADAPTER_CONFIG} missing)")
        model = PeftModel.from_pretrained(model, Path(adapter))
    return model.eval().to(scoring_device()), processor


class AdapterDetector(mlflow.pyfunc.PythonModel):
    """Florence-2 ``<OD>`` detection with one adapter; see the module's docstring for input and output."""

    def load_context(self, context) -> None:
        from icmlora.config import PredictParams

        self.predict_params = PredictParams(**context.model_config["predict"])
        self.model, self.processor = load_adapted_model(Path(context.artifacts["base_model"]),
                                                        Path(context.artifacts["adapter"]))

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from icmlora.florence.predict import predict

        images = decode_images(model_input)
        return boxes_frame(predict(self.model, self.processor, images, self.predict_params, desc="predict"))
