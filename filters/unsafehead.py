"""LAION's CLIP-based NSFW detector as a `punsafe` head, from each of its published forms:

- the Keras/autokeras zip LAION published (`clip_autokeras_binary_nsfw.zip` for ViT-L/14,
  `clip_autokeras_nsfw_b32.zip` for ViT-B/32), read without TensorFlow by `kerasnsfw`, with the exact forward
  including its categorical lookup; or that converted to one safetensors file by `convert-head laion-nsfw`;
- the public PyTorch port (`norm.mean`, `norm.variance`, `linear_1..4`), which skips the lookup: warned;
- LAION's ViT-H/14 detector (`h14_nsfw.pth`, `layers.{0,3,..,15,16}`), raw output as LAION uses it.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

from latentmill.errors import InputError, warn
from latentmill.filters.heads import Head, check_layout, load_into, load_state_dict, safetensors_metadata
from latentmill.filters.tfbundle import BundleError

NSFW_FORMAT = "latentmill.head/laion-nsfw-1"
# What reading a damaged or hostile SavedModel, zip or converted file raises: BadZipFile, zlib.error (a
# corrupt deflate stream), NotImplementedError (a compression method zipfile lacks), RuntimeError (a
# password needed), and the key, index, type and value errors of a parser fed garbage.
UNREADABLE = (
    BundleError,
    zipfile.BadZipFile,
    zlib.error,
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    AttributeError,
    OverflowError,
    RecursionError,
    NotImplementedError,
    RuntimeError,
    EOFError,
    OSError,
)


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
            self.model, self.activations, self.epsilon = model, list(model.activations), float(model.epsilon)
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
            # step 1 (lookup as text, NaN -> 0) is the model's own, on the CPU; the rest runs where x is
            x = torch.from_numpy(self.model.encode_categorical(x.float().cpu().numpy())).to(x.device)
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

    from latentmill.curate.storage import atomic_path

    tensors = {
        "norm.mean": torch.from_numpy(np.array(model.mean, np.float32)),
        "norm.variance": torch.from_numpy(np.array(model.variance, np.float32)),
    }
    for i, (weight, bias) in enumerate(model.dense):
        tensors[f"dense.{i}.weight"] = torch.from_numpy(np.array(weight, np.float32))
        tensors[f"dense.{i}.bias"] = torch.from_numpy(np.array(bias, np.float32))
    for column, table in model.lookups.items():
        keys = sorted(table, key=table.get)
        tensors[f"lookup.{column}.keys"] = torch.frombuffer(
            bytearray("\n".join(keys).encode()), dtype=torch.uint8
        )
        tensors[f"lookup.{column}.values"] = torch.tensor([table[k] for k in keys], dtype=torch.int64)
    metadata = {
        "format": NSFW_FORMAT,
        "column": "punsafe",
        "input_dim": str(model.input_dim),
        "activations": json.dumps(model.activations),
        "epsilon": repr(float(model.epsilon)),
        "source": model.source,
    }
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_converted_nsfw(path: str | Path, state: dict, meta: dict):
    """A `KerasNsfw` from a file written by `save_keras_nsfw`, checked (`KerasNsfw.check`)."""
    try:
        return _converted_nsfw(path, state, meta).check()
    except UNREADABLE as err:
        raise InputError(f"{path}: not a head written by `convert-head laion-nsfw` ({_why(err)}).") from None


def _converted_nsfw(path, state: dict, meta: dict):
    from latentmill.filters.kerasnsfw import KerasNsfw

    dim = int(meta["input_dim"])
    activations = json.loads(meta["activations"])
    dense = [
        (state[f"dense.{i}.weight"].numpy(), state[f"dense.{i}.bias"].numpy())
        for i in range(len(activations))
    ]
    lookups = {}
    known = {"norm.mean", "norm.variance"} | {
        f"dense.{i}.{t}" for i in range(len(dense)) for t in ("weight", "bias")
    }
    for key in state:
        if key not in known and not (key.startswith("lookup.") and key.endswith((".keys", ".values"))):
            raise BundleError(f"{key!r} is not a tensor of a converted detector")
        if key.startswith("lookup.") and key.endswith(".keys"):
            column = int(key.split(".")[1])
            texts = bytes(state[key].numpy()).decode().split("\n")
            values = state[f"lookup.{column}.values"].tolist()
            if len(texts) != len(values):
                raise InputError(f"{path}: lookup.{column} has {len(texts)} keys and {len(values)} values.")
            lookups[column] = dict(zip(texts, values, strict=True))
    return KerasNsfw(
        dim,
        lookups,
        state["norm.mean"].numpy(),
        state["norm.variance"].numpy(),
        dense,
        activations,
        float(meta["epsilon"]),
        meta.get("source", str(path)),
    )


PORT_KEYS = {
    f"{name}.{p}": None
    for name in ("linear_1", "linear_2", "linear_3", "linear_4")
    for p in ("weight", "bias")
}
PORT_KEYS |= {"norm.mean": None, "norm.variance": None}
H14_LINEAR = (0, 3, 6, 9, 12, 15, 16)
H14_SIZES = (1024, 2048, 1024, 256, 128, 16, 1)
UNSAFE_LAYOUTS = (
    "LAION's published Keras zip (clip_autokeras_binary_nsfw.zip, clip_autokeras_nsfw_b32.zip) or its "
    "unzipped folder; a file made by `latentmill convert-head laion-nsfw`; the PyTorch port "
    "(norm.mean, norm.variance, linear_1..4); LAION's ViT-H/14 detector h14_nsfw.pth (layers.0 .. layers.16)"
)


def load_unsafe(path: str | Path, column: str = "punsafe") -> Head:
    """LAION's CLIP-based NSFW detector, from any of its published forms (see UNSAFE_LAYOUTS)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such unsafe-head file. Accepted: {UNSAFE_LAYOUTS}.")
    if path.is_dir() or path.suffix == ".zip":
        model = read_laion_nsfw(path)
        return Head(column, model.input_dim, keras_nsfw_module(model).eval())
    if path.suffix == ".safetensors":
        meta = safetensors_metadata(path, "a readable safetensors file")
        if meta.get("format") == NSFW_FORMAT:
            model = read_converted_nsfw(path, load_state_dict(path), meta)
            return Head(column, model.input_dim, keras_nsfw_module(model).eval())
    state = load_state_dict(path)
    if "norm.variance" in state or "linear_1.weight" in state:
        return Head(column, *_port_module(path, state))
    if f"layers.{H14_LINEAR[-1]}.weight" in state:
        return Head(column, *_h14_module(path, state))
    raise InputError(
        f"{path}: not a LAION NSFW detector (keys: {', '.join(list(state)[:8])}). Accepted: {UNSAFE_LAYOUTS}."
    )


def read_laion_nsfw(path: Path):
    from latentmill.filters.kerasnsfw import read_keras_nsfw

    try:
        return read_keras_nsfw(path)
    except UNREADABLE as err:  # the boundary of a parser of untrusted binary formats
        raise InputError(
            f"{path}: not LAION's Keras NSFW detector as published ({_why(err)}). Accepted: {UNSAFE_LAYOUTS}."
        ) from None


def _why(err: BaseException) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}" if not isinstance(err, BundleError) else text


def _port_module(path, state: dict):
    """The public PyTorch port of the Keras detector: Normalization without Keras' floor and, like the
    port, without the categorical lookup (warned: it differs from LAION's model on real embeddings)."""
    from latentmill.filters.kerasnsfw import KerasNsfw

    check_layout(path, state, PORT_KEYS, "LAION NSFW detector (PyTorch port layout)")
    dim = int(state["norm.mean"].shape[0])
    check_layout(
        path,
        state,
        {
            "norm.mean": (dim,),
            "norm.variance": (dim,),
            "linear_1.weight": (64, dim),
            "linear_2.weight": (512, 64),
            "linear_3.weight": (256, 512),
            "linear_4.weight": (1, 256),
        },
        "LAION NSFW detector (PyTorch port layout)",
    )
    warn(
        f"{path}: the PyTorch port of LAION's NSFW detector skips the categorical lookup of the Keras model "
        "(its punsafe differs by up to ~0.35 on float16 embeddings); convert the published zip instead: "
        "latentmill convert-head laion-nsfw clip_autokeras_binary_nsfw.zip -o punsafe.safetensors"
    )
    dense = [
        (state[f"linear_{i}.weight"].float().numpy(), state[f"linear_{i}.bias"].float().numpy())
        for i in range(1, 5)
    ]
    model = KerasNsfw(
        dim,
        {},
        state["norm.mean"].float().numpy(),
        state["norm.variance"].float().numpy(),
        dense,
        ["relu", "relu", "relu", "sigmoid"],
        epsilon=0.0,
        source=str(path),
    )
    try:
        model.check()
    except BundleError as err:
        raise InputError(f"{path}: {err}.") from None
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
    check_layout(
        path,
        state,
        {f"layers.{i}.weight": (widths[n + 1], widths[n]) for n, i in enumerate(H14_LINEAR)},
        "LAION ViT-H/14 NSFW detector (h14_nsfw.pth)",
    )
    module = h14_nsfw_module(dim)
    load_into(module, state, path, "LAION ViT-H/14 NSFW detector")
    return dim, module.eval()
