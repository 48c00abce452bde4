"""Reference outputs of LAION's NSFW detectors, computed once with the original Keras model (TensorFlow).

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/pip install --no-deps -e . && /tmp/tfenv/bin/python tests/laion_reference/make_nsfw_reference.py ../shared/fixtures/laion

For each published zip it writes `nsfw_<name>.npz` here: for each input set, the model's outputs and the
sha256 of the inputs (the inputs are regenerated from `reference_inputs`, so only ~8 KB are kept).
TensorFlow runs the SavedModel's own serving function (`tf.saved_model.load`), i.e. LAION's graph as
published, categorical lookup included. Made with tensorflow-cpu 2.21.0 on 2026-11-23.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
MODELS = {"l14": "clip_autokeras_binary_nsfw.zip", "b32": "clip_autokeras_nsfw_b32.zip"}
COUNT = 500


def reference_inputs(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Four sets of 500 embeddings (float32): random unit vectors, the same rounded to float16, and both
    again with the categorical columns set to values from their vocabularies (90% of rows), the case random
    vectors never reach and where skipping the lookup goes wrong."""
    rng = np.random.default_rng(seed)
    unit = rng.standard_normal((COUNT, model.input_dim))
    unit = (unit / np.linalg.norm(unit, axis=1, keepdims=True)).astype(np.float32)
    vocab = unit.copy()
    for column in sorted(model.lookups):
        keys = np.array(sorted(model.lookups[column]), dtype=object)
        picked = keys[rng.integers(0, len(keys), COUNT)].astype(float).astype(np.float32)
        hit = rng.random(COUNT) < 0.9
        vocab[hit, column] = picked[hit]
    half = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    return {"unit_f32": unit, "unit_f16": half(unit), "vocab_f32": vocab, "vocab_f16": half(vocab)}


def digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype="<f4").tobytes()).hexdigest()


def main(fixtures: Path) -> None:
    import tensorflow as tf

    from latentmill.filters.kerasnsfw import read_keras_nsfw

    for name, zip_name in MODELS.items():
        model = read_keras_nsfw(fixtures / zip_name)
        with tempfile.TemporaryDirectory() as tmp:
            zipfile.ZipFile(fixtures / zip_name).extractall(tmp)
            folder = next(Path(tmp).rglob("saved_model.pb")).parent
            serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
            arrays = {}
            for set_name, x in reference_inputs(model).items():
                out = serve(tf.constant(x.astype(np.float64)))  # LAION feeds the float64 input layer
                arrays[set_name] = next(iter(out.values())).numpy().reshape(-1).astype(np.float32)
                arrays[f"{set_name}_sha256"] = np.array(digest(x))
                print(name, set_name, arrays[set_name][:4])
        np.savez_compressed(HERE / f"nsfw_{name}.npz", **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
