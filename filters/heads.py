"""Predictor heads, each loaded from the file its authors published, keys and shapes checked.

- aesthetic v2 (LAION "improved aesthetic predictor"): `layers.{0,2,4,6,7}` Linear 768→1024→128→64→16→1,
  dropout between the first four, no activations; on normalised OpenAI ViT-L/14 embeddings.
- aesthetic v1 (LAION-Aesthetics): one Linear(D, 1): keys `weight` (1, D), `bias` (1,).
- unsafe (LAION's CLIP-based NSFW detector): the published Keras zip itself (read without TensorFlow by
  `kerasnsfw`, exact forward with its categorical lookup), or that converted to safetensors by
  `latentmill convert-head laion-nsfw`; the public PyTorch port (`norm.mean`, `norm.variance`,
  `linear_1..4`, no lookup: warned); LAION's ViT-H/14 detector (`h14_nsfw.pth`, `layers.{0,3,..,15,16}`).
- watermark (LAION-5B's detector, on pixels): timm `efficientnet_b3a` whose classifier is
  Linear(1536,625) ReLU Dropout(0.3) Linear(625,256) ReLU Linear(256,2); 256×256 input, ImageNet
  normalisation; pwatermark = softmax class 0. A plain state dict or {"weights": state dict}.
- fitted (by `latentmill fit-head`): a safetensors file whose metadata names its column and kind.
Files saved on `cuda:0` load with `map_location="cpu"`; pickles load with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.errors import InputError

log = logging.getLogger(__name__)
# the columns `score` writes for every image: a head writing one of them would overwrite it
RESERVED_COLUMNS = ("key", "url", "caption", "width", "height", "original_width", "original_height", "clip_similarity",
                    "error")


def check_column(column: str, source: str) -> str:
    """A head's output column: not one of the score table's own columns, not empty."""
    if not column or column in RESERVED_COLUMNS:
        raise InputError(f"{source}: a head cannot write column {column!r}: {', '.join(RESERVED_COLUMNS)} are the score "
                         f"table's own. Name it something else (fit-head --column NAME).")
    return column


def load_state_dict(path: str | Path) -> dict:
    """Tensors from a .pth/.pt/.bin (weights only, mapped to CPU) or a .safetensors file."""
    import torch

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such head file. Download the published weights and pass their path.")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty. Download the published weights again.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise InputError(f"{path}: not a readable safetensors file ({_first_line(err)}).") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-checkpoint files
        raise InputError(f"{path}: not a PyTorch state dict ({_first_line(err)}).") from None
    if isinstance(state, dict) and "weights" in state and isinstance(state["weights"], dict):
        state = state["weights"]
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}.")
    return state


def _first_line(err: BaseException) -> str:
    return ((str(err).splitlines() or [""])[0] or type(err).__name__)[:120]


def check_layout(path, state: dict, expected: dict[str, tuple | None], what: str) -> None:
    """Every expected key present with its shape (None: any shape); a clear message otherwise."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"{path}: not a {what} file: missing keys {', '.join(missing)}. Expected keys: "
                         f"{', '.join(expected)}; found: {', '.join(list(state)[:12])}{' ...' if len(state) > 12 else ''}.")
    for key, shape in expected.items():
        if shape is not None and tuple(state[key].shape) != shape:
            raise InputError(f"{path}: {what} key {key} has shape {list(state[key].shape)}, expected {list(shape)}.")


@dataclass
class Head:
    """A head that maps normalised CLIP embeddings (N, D) to one score column."""

    column: str
    input_dim: int
    module: object  # torch.nn.Module
    on_pixels: bool = False

    def __call__(self, embeddings):
        import torch

        with torch.inference_mode():
            return self.module(embeddings.float()).reshape(-1).float().cpu().numpy()


def aesthetic_v2_module(input_dim: int = 768):
    from torch import nn

    class AestheticV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    return AestheticV2()


def load_aesthetic(path: str | Path, column: str = "aesthetic") -> Head:
    """LAION aesthetic predictor v2 (MLP) or v1 (linear), told apart by their keys."""
    from torch import nn

    state = load_state_dict(path)
    if "layers.0.weight" in state:
        dim = int(state["layers.0.weight"].shape[1])
        check_layout(path, state, {"layers.0.weight": (1024, dim), "layers.2.weight": (128, 1024),
                                   "layers.4.weight": (64, 128), "layers.6.weight": (16, 64), "layers.7.weight": (1, 16),
                                   "layers.7.bias": (1,)}, "LAION aesthetic v2")
        module = aesthetic_v2_module(dim)
    else:
        check_layout(path, state, {"weight": None, "bias": (1,)}, "LAION aesthetic (v2 layers.* or v1 linear)")
        dim = int(state["weight"].shape[-1])
        check_layout(path, state, {"weight": (1, dim)}, "LAION aesthetic v1")
        module = nn.Linear(dim, 1)
    module.load_state_dict(state)
    return Head(column, dim, module.eval())


NSFW_FORMAT = "latentmill.head/laion-nsfw-1"


def keras_nsfw_module(model):
    """LAION's Keras NSFW detector (a `kerasnsfw.KerasNsfw`) as a torch module with its exact forward:
    categorical lookup (on the CPU: it formats values as text), NaN -> 0, Normalization with Keras' floor on
    the standard deviation, Dense layers and their activations."""
    import numpy as np
    import torch
    from torch import nn

    class LaionNsfw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lookups = model.lookups
            self.activations = list(model.activations)
            self.epsilon = float(model.epsilon)
            self.register_buffer("mean", torch.from_numpy(np.array(model.mean, dtype=np.float32)))
            self.register_buffer("variance", torch.from_numpy(np.array(model.variance, dtype=np.float32)))
            self.dense = nn.ModuleList()
            for weight, bias in model.dense:
                layer = nn.Linear(weight.shape[1], weight.shape[0])
                with torch.no_grad():
                    layer.weight.copy_(torch.from_numpy(np.array(weight)))
                    layer.bias.copy_(torch.from_numpy(np.array(bias)))
                self.dense.append(layer)

        def forward(self, x):
            x = x.float()
            if self.lookups:
                columns = sorted(self.lookups)
                values = x[:, columns].cpu().numpy().astype(np.float64)
                indices = np.array([[self.lookups[c].get(f"{v:f}", 0) for c, v in zip(columns, row, strict=True)]
                                    for row in values], dtype=np.float32).reshape(len(values), len(columns))
                x = x.clone()
                x[:, columns] = torch.from_numpy(indices).to(x.device)
            x = torch.nan_to_num(x, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
            x = (x - self.mean) / torch.clamp_min(torch.sqrt(self.variance), self.epsilon)
            for layer, activation in zip(self.dense, self.activations, strict=True):
                x = _activation(layer(x), activation)
            return x

    return LaionNsfw()


def _activation(x, name: str):
    import torch

    if name == "relu":
        return torch.relu(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    return x


def save_keras_nsfw(model, path: str | Path) -> None:
    """Write a converted detector as safetensors: norm.mean/variance, dense.{i}.weight/bias and per
    categorical column lookup.{c}.keys (UTF-8 texts joined by newlines) and lookup.{c}.values (int64);
    metadata: format, input_dim, activations, epsilon, source."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from latentmill.curate.atomic import atomic_path

    tensors = {"norm.mean": torch.from_numpy(np.array(model.mean, np.float32)),
               "norm.variance": torch.from_numpy(np.array(model.variance, np.float32))}
    for i, (weight, bias) in enumerate(model.dense):
        tensors[f"dense.{i}.weight"] = torch.from_numpy(np.array(weight, np.float32))
        tensors[f"dense.{i}.bias"] = torch.from_numpy(np.array(bias, np.float32))
    for column, table in model.lookups.items():
        keys = sorted(table, key=table.get)
        tensors[f"lookup.{column}.keys"] = torch.frombuffer(bytearray("\n".join(keys).encode()), dtype=torch.uint8)
        tensors[f"lookup.{column}.values"] = torch.tensor([table[k] for k in keys], dtype=torch.int64)
    metadata = {"format": NSFW_FORMAT, "column": "punsafe", "input_dim": str(model.input_dim),
                "activations": json.dumps(model.activations), "epsilon": repr(float(model.epsilon)),
                "source": model.source}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_converted_nsfw(path: str | Path, state: dict, meta: dict):
    """A `KerasNsfw` from a file written by `save_keras_nsfw`."""
    from latentmill.filters.kerasnsfw import KerasNsfw

    dim = int(meta["input_dim"])
    activations = json.loads(meta["activations"])
    dense = [(state[f"dense.{i}.weight"].numpy(), state[f"dense.{i}.bias"].numpy()) for i in range(len(activations))]
    lookups = {}
    for key in state:
        if key.startswith("lookup.") and key.endswith(".keys"):
            column = int(key.split(".")[1])
            texts = bytes(state[key].numpy()).decode().split("\n")
            values = state[f"lookup.{column}.values"].tolist()
            if len(texts) != len(values):
                raise InputError(f"{path}: lookup.{column} has {len(texts)} keys and {len(values)} values.")
            lookups[column] = dict(zip(texts, values, strict=True))
    return KerasNsfw(dim, lookups, state["norm.mean"].numpy(), state["norm.variance"].numpy(), dense, activations,
                     float(meta["epsilon"]), meta.get("source", str(path)))


PORT_KEYS = {f"{name}.{p}": None for name in ("linear_1", "linear_2", "linear_3", "linear_4") for p in ("weight", "bias")}
PORT_KEYS |= {"norm.mean": None, "norm.variance": None}
H14_LINEAR = (0, 3, 6, 9, 12, 15, 16)
H14_SIZES = (1024, 2048, 1024, 256, 128, 16, 1)
UNSAFE_LAYOUTS = ("LAION's published Keras zip (clip_autokeras_binary_nsfw.zip, clip_autokeras_nsfw_b32.zip) or its "
                  "unzipped folder; a file made by `latentmill convert-head laion-nsfw`; the PyTorch port "
                  "(norm.mean, norm.variance, linear_1..4); LAION's ViT-H/14 detector h14_nsfw.pth (layers.0 .. layers.16)")


def load_unsafe(path: str | Path, column: str = "punsafe") -> Head:
    """LAION's CLIP-based NSFW detector, from any of its published forms (see UNSAFE_LAYOUTS)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such unsafe-head file. Accepted: {UNSAFE_LAYOUTS}.")
    if path.is_dir() or path.suffix == ".zip":
        model = read_laion_nsfw(path)
        return Head(column, model.input_dim, keras_nsfw_module(model).eval())
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise InputError(f"{path}: not a readable safetensors file ({_first_line(err)}).") from None
        if meta.get("format") == NSFW_FORMAT:
            model = read_converted_nsfw(path, load_state_dict(path), meta)
            return Head(column, model.input_dim, keras_nsfw_module(model).eval())
    state = load_state_dict(path)
    if "norm.variance" in state or "linear_1.weight" in state:
        return Head(column, *_port_module(path, state))
    if f"layers.{H14_LINEAR[-1]}.weight" in state:
        return Head(column, *_h14_module(path, state))
    raise InputError(f"{path}: not a LAION NSFW detector (keys: {', '.join(list(state)[:8])}). Accepted: {UNSAFE_LAYOUTS}.")


def read_laion_nsfw(path: Path):
    import zipfile

    from latentmill.filters.kerasnsfw import read_keras_nsfw
    from latentmill.filters.tfbundle import BundleError

    try:
        return read_keras_nsfw(path)
    except (BundleError, zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        raise InputError(f"{path}: not LAION's Keras NSFW detector as published ({err}). Accepted: {UNSAFE_LAYOUTS}.") from None


def _port_module(path, state: dict):
    """The public PyTorch port of the Keras detector: Normalization without Keras' floor and, like the
    port, without the categorical lookup (warned: it differs from LAION's model on real embeddings)."""
    from latentmill.filters.kerasnsfw import KerasNsfw

    check_layout(path, state, PORT_KEYS, "LAION NSFW detector (PyTorch port layout)")
    dim = int(state["norm.mean"].shape[0])
    check_layout(path, state, {"norm.mean": (dim,), "norm.variance": (dim,), "linear_1.weight": (64, dim),
                               "linear_2.weight": (512, 64), "linear_3.weight": (256, 512), "linear_4.weight": (1, 256)},
                 "LAION NSFW detector (PyTorch port layout)")
    log.warning("%s: the PyTorch port of LAION's NSFW detector skips the categorical lookup of the Keras model "
                "(its punsafe differs by up to ~0.35 on float16 embeddings); convert the published zip instead: "
                "latentmill convert-head laion-nsfw clip_autokeras_binary_nsfw.zip -o punsafe.safetensors", path)
    dense = [(state[f"linear_{i}.weight"].float().numpy(), state[f"linear_{i}.bias"].float().numpy()) for i in range(1, 5)]
    model = KerasNsfw(dim, {}, state["norm.mean"].float().numpy(), state["norm.variance"].float().numpy(), dense,
                      ["relu", "relu", "relu", "sigmoid"], epsilon=0.0, source=str(path))
    return dim, keras_nsfw_module(model).eval()


def h14_nsfw_module(input_dim: int = 1024):
    """LAION's ViT-H/14 NSFW detector (h14_nsfw_model.py): Linear/ReLU/Dropout x5, Linear(128,16),
    Linear(16,1); its output is the score as is (no sigmoid)."""
    from torch import nn

    layers, width = [], input_dim
    for size in H14_SIZES[:5]:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(0.2)]
        width = size
    layers += [nn.Linear(128, 16), nn.Linear(16, 1)]

    class H14Nsfw(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*layers)

        def forward(self, x):
            return self.layers(x)

    return H14Nsfw()


def _h14_module(path, state: dict):
    dim = int(state["layers.0.weight"].shape[1])
    widths = (dim, *H14_SIZES)
    check_layout(path, state, {f"layers.{i}.weight": (widths[n + 1], widths[n]) for n, i in enumerate(H14_LINEAR)},
                 "LAION ViT-H/14 NSFW detector (h14_nsfw.pth)")
    module = h14_nsfw_module(dim)
    module.load_state_dict(state)
    return dim, module.eval()


def watermark_module():
    import timm
    from torch import nn

    model = timm.create_model("efficientnet_b3", pretrained=False)  # timm's current name for efficientnet_b3a
    model.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(0.3), nn.Linear(625, 256), nn.ReLU(),
                                     nn.Linear(256, 2))
    return model


def load_watermark(path: str | Path, column: str = "pwatermark") -> Head:
    """LAION-5B's watermark detector: runs on 256x256 ImageNet-normalised pixels, not on embeddings."""
    state = load_state_dict(path)
    check_layout(path, state, {"conv_stem.weight": None, "classifier.0.weight": (625, 1536),
                               "classifier.3.weight": (256, 625), "classifier.5.weight": (2, 256)},
                 "LAION-5B watermark detector (timm efficientnet_b3a)")
    import torch
    from torch import nn

    net = watermark_module()
    net.load_state_dict(state)

    class WatermarkProbability(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, pixels):
            return torch.softmax(self.net(pixels), dim=-1)[:, 0]

    return Head(column, 0, WatermarkProbability().eval(), on_pixels=True)


def fitted_metadata(path: str | Path) -> dict:
    """The metadata of a head saved by `latentmill fit-head` (column, target, kind, input_dim, task, and
    `metrics`, decoded), checked to be one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such head file.")
    try:
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise InputError(f"{path}: not a head saved by `latentmill fit-head` ({_first_line(err)}).") from None
    if meta.get("format") != "latentmill.head/1":
        raise InputError(f"{path}: not a head saved by `latentmill fit-head` (no latentmill.head/1 metadata).")
    return meta | {"metrics": json.loads(meta.get("metrics", "{}"))}


def load_fitted(path: str | Path) -> Head:
    """A head saved by `latentmill fit-head` (safetensors, metadata: column, kind, input_dim, task)."""
    meta = fitted_metadata(path)
    check_column(meta.get("column", ""), str(path))
    dim, kind = int(meta["input_dim"]), meta["kind"]
    module = fitted_module(kind, dim, json.loads(meta.get("hidden", "[]")), meta["task"] == "classification")
    module.load_state_dict(load_state_dict(path))
    return Head(meta["column"], dim, module.eval())


def fitted_module(kind: str, input_dim: int, hidden: list[int], sigmoid: bool):
    """linear: Linear(D, 1); mlp: Linear/ReLU stack through `hidden`; a sigmoid for classification."""
    from torch import nn

    sizes = [input_dim, *(hidden if kind == "mlp" else []), 1]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)
