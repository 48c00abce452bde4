"""The predictors against the files LAION published and LAION's own forward passes.

The real files are read from ../shared/fixtures/laion/ (beside the project; never copied into it). The
NSFW references were computed once with the original Keras model by
tests/laion_reference/make_nsfw_reference.py (TensorFlow); only their outputs are kept here.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentmill.errors import InputError, LatentmillWarning
from latentmill.filters.heads import load_aesthetic
from latentmill.filters.kerasnsfw import KerasNsfw, read_keras_nsfw
from latentmill.filters.unsafehead import h14_nsfw_module, load_unsafe, save_keras_nsfw
from tests.conftest import FIXTURES, needs_fixtures

REFERENCE = Path(__file__).parent / "laion_reference"


def reference_module():
    spec = importlib.util.spec_from_file_location("make_nsfw_reference", REFERENCE / "make_nsfw_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_fixtures
@pytest.mark.parametrize("name", ["l14", "b32"])
def test_the_published_nsfw_zips_give_the_keras_models_outputs(name, tmp_path):
    ref = reference_module()
    zip_path = FIXTURES / ref.MODELS[name]
    model = read_keras_nsfw(zip_path)
    assert model.input_dim == {"l14": 768, "b32": 512}[name]
    assert sorted(model.lookups) == {"l14": [180, 316, 413, 440, 644], "b32": [92, 133, 312]}[name]
    converted = tmp_path / "punsafe.safetensors"
    save_keras_nsfw(model, converted)
    expected = np.load(REFERENCE / f"nsfw_{name}.npz")
    heads = {"zip": load_unsafe(zip_path), "converted": load_unsafe(converted)}
    for set_name, x in ref.reference_inputs(model).items():
        assert ref.digest(x) == str(expected[f"{set_name}_sha256"]), (
            "the reference inputs are regenerated identically"
        )
        for source, head in heads.items():
            tensor = torch.from_numpy(x)
            out = head(
                tensor.half() if set_name.endswith("f16") else tensor
            )  # float16 embeddings, as LAION stores them
            np.testing.assert_allclose(
                out, expected[set_name], atol=1e-4, rtol=0, err_msg=f"{source} {set_name}"
            )
    # what skipping the lookup (the PyTorch port) would give: the reference would catch it
    without = KerasNsfw(
        model.input_dim, {}, model.mean, model.variance, model.dense, model.activations, model.epsilon
    )
    x = ref.reference_inputs(model)["vocab_f16"]
    assert np.abs(without.forward_numpy(x) - expected["vocab_f16"]).max() > 0.1


@needs_fixtures
def test_convert_head_cli_writes_a_head_score_loads(tmp_path):
    out = tmp_path / "punsafe.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "latentmill",
            "convert-head",
            "laion-nsfw",
            str(FIXTURES / "clip_autokeras_binary_nsfw.zip"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "categorical columns 180 (10,425 values)" in run.stdout and out.exists()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "latentmill",
            "convert-head",
            "laion-nsfw",
            str(FIXTURES / "sac+logos+ava1-l14-linearMSE.pth"),
            "-o",
            str(tmp_path / "x.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not LAION's Keras NSFW detector" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


@needs_fixtures
def test_the_published_aesthetic_head_is_laions_mlp():
    path = FIXTURES / "sac+logos+ava1-l14-linearMSE.pth"
    state = {
        k: v.double().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
    }
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    head = load_aesthetic(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 768))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = x
    for i in (0, 2, 4, 6, 7):  # LAION's MLP: Linear 768-1024-128-64-16-1, dropout only, no activations
        expected = expected @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(head(torch.from_numpy(x.astype(np.float32))), expected[:, 0], atol=1e-4)


def test_the_lookup_formats_values_as_tensorflow_does():
    """AsString on float32 is printf("%f"); an unknown text is index 0; NaN elsewhere becomes 0."""
    model = KerasNsfw(
        3,
        {1: {"0.500000": 7, "-0.000000": 3, "0.007812": 9}},
        np.zeros(3, np.float32),
        np.ones(3, np.float32),
        [(np.eye(1, 3, 1, dtype=np.float32), np.zeros(1, np.float32))],
        ["linear"],
    )
    x = np.array(
        [[0, 0.5, 0], [0, 0.25, 0], [0, -1e-9, 0], [0, 0.0078125, 0], [np.nan, np.nan, 1]], np.float32
    )
    np.testing.assert_array_equal(
        model.encode_categorical(x)[:, 1], [7, 0, 3, 9, 0]
    )  # 0.0078125: ties to even
    assert model.encode_categorical(x)[4, 0] == 0
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lm-nsfw-{os.getpid()}.safetensors"
    save_keras_nsfw(model, path)
    try:
        head = load_unsafe(path)
        np.testing.assert_allclose(head(torch.from_numpy(x)), model.forward_numpy(x), atol=1e-6)
    finally:
        path.unlink()


def test_the_pytorch_port_layout_loads_with_a_warning(tmp_path):
    torch.manual_seed(0)
    state = {"norm.mean": torch.randn(32) * 0.1, "norm.variance": torch.rand(32) + 0.5}
    sizes = [32, 64, 512, 256, 1]
    for i in range(1, 5):
        state[f"linear_{i}.weight"] = torch.randn(sizes[i], sizes[i - 1]) * 0.1
        state[f"linear_{i}.bias"] = torch.randn(sizes[i]) * 0.1
    torch.save(state, tmp_path / "nsfw_port.pth")
    with pytest.warns(LatentmillWarning, match="skips the categorical lookup.*convert-head laion-nsfw"):
        head = load_unsafe(tmp_path / "nsfw_port.pth")
    x = torch.nn.functional.normalize(torch.randn(20, 32), dim=1)
    h = (
        (x - state["norm.mean"]) / state["norm.variance"].sqrt()
    ).double()  # the port's Normalization: no floor
    for i in range(1, 5):
        h = h @ state[f"linear_{i}.weight"].double().T + state[f"linear_{i}.bias"].double()
        h = torch.relu(h) if i < 4 else torch.sigmoid(h)
    np.testing.assert_allclose(head(x), h[:, 0].numpy(), atol=1e-5)
    state["linear_1.weight"] = torch.randn(63, 32)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="linear_1"):
        load_unsafe(tmp_path / "bad.pth")


def test_the_h14_detector_layout_loads_and_keeps_its_raw_output(tmp_path):
    torch.manual_seed(0)
    reference = h14_nsfw_module(1024).eval()
    state = reference.state_dict()
    assert sorted({k.split(".")[1] for k in state}, key=int) == ["0", "3", "6", "9", "12", "15", "16"]
    torch.save(state, tmp_path / "h14_nsfw.pth")
    head = load_unsafe(tmp_path / "h14_nsfw.pth")
    x = torch.nn.functional.normalize(torch.randn(8, 1024), dim=1)
    h = x.double()
    for n, i in enumerate((0, 3, 6, 9, 12, 15, 16)):
        h = h @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
        h = torch.relu(h) if n < 5 else h
    assert head.input_dim == 1024
    np.testing.assert_allclose(head(x), h[:, 0].numpy(), atol=1e-5)
    del state["layers.16.weight"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(InputError, match="not a LAION NSFW detector"):
        load_unsafe(tmp_path / "cut.pth")


def test_an_unknown_unsafe_head_file_says_what_is_accepted(tmp_path):
    torch.save({"weight": torch.zeros(1, 8)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="Accepted: LAION's published Keras zip"):
        load_unsafe(tmp_path / "other.pth")
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(InputError, match="broken.zip: not LAION's Keras NSFW detector"):
        load_unsafe(tmp_path / "broken.zip")
