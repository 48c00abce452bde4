"""LAION's CLIP-based NSFW detector, read from the Keras/autokeras SavedModel LAION published, without
TensorFlow (numpy only).

The published model (`clip_autokeras_binary_nsfw.zip` for ViT-L/14, `clip_autokeras_nsfw_b32.zip` for
ViT-B/32) computes, on a float64 embedding:

1. cast to float32; a few embedding dimensions are categorical (autokeras' MultiCategoryEncoding marks
   them "int"): the value is formatted as text (TensorFlow's AsString, i.e. printf "%f") and looked up in a
   vocabulary (a StringLookup: unknown text gives 0); the column becomes that index. The others pass, NaN
   replaced by 0;
2. Normalization: (x - mean) / max(sqrt(variance), epsilon);
3. Dense layers with ReLU between and a sigmoid at the end.

Where each part lives in the SavedModel: the layer sequence and the categorical columns in
`keras_metadata.pb` (the model's Keras config, JSON); mean, variance and dense kernels in the checkpoint
(`variables/`); the vocabularies as constant tensors of `saved_model.pb`, handed to the lookup tables'
initialisers; epsilon as the constant of the Normalization's Maximum.
"""

from __future__ import annotations

import json
import math
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.filters.tfbundle import BundleError, proto_fields, read_checkpoint

KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), Normalization's floor on the standard deviation
ACTIVATIONS = ("relu", "sigmoid", "linear")
# What is read from a zip, checked before anything is extracted: LAION's zips hold 7 members, 4.7 MB, at
# most 17:1. A member claiming more (a zip bomb) is refused; one whose data runs past its claim is too.
ZIP_LIMITS = {"members": 256, "member_bytes": 128 << 20, "total_bytes": 256 << 20, "ratio": 200}


@dataclass
class KerasNsfw:
    """The detector's parameters: apply with `forward_numpy` (reference) or `unsafehead.keras_nsfw_module`."""

    input_dim: int
    lookups: dict[int, dict[str, int]]  # categorical column -> {"%f" text of the value: index}
    mean: np.ndarray
    variance: np.ndarray
    dense: list[tuple[np.ndarray, np.ndarray]]  # (weight (out, in), bias (out,)), torch's layout
    activations: list[str]  # after each dense layer: relu, sigmoid or linear
    epsilon: float = KERAS_EPSILON
    source: str = ""

    def check(self) -> KerasNsfw:
        """Every tensor of the right shape (a chain from input_dim to one output) and finite; the
        activations known. A problem raises BundleError naming the tensor."""
        if not isinstance(self.input_dim, int) or not 0 < self.input_dim <= 1 << 16:
            raise BundleError(f"input_dim {self.input_dim!r}: expected an embedding width")
        named = {"norm.mean": self.mean, "norm.variance": self.variance}
        for name, value in named.items():
            if np.shape(value) != (self.input_dim,):
                raise BundleError(f"{name} has shape {list(np.shape(value))}, expected [{self.input_dim}]")
        if len(self.dense) != len(self.activations) or not self.dense:
            raise BundleError(f"{len(self.dense)} dense layers for {len(self.activations)} activations")
        width = self.input_dim
        for i, ((weight, bias), activation) in enumerate(zip(self.dense, self.activations, strict=True)):
            if np.ndim(weight) != 2 or np.shape(weight)[1] != width or np.shape(bias) != np.shape(weight)[:1]:
                raise BundleError(
                    f"dense.{i}: weight {list(np.shape(weight))}, bias {list(np.shape(bias))} do not follow a "
                    f"{width}-wide layer"
                )
            if activation not in ACTIVATIONS:
                raise BundleError(
                    f"dense.{i}: activation {activation!r}, expected one of {', '.join(ACTIVATIONS)}"
                )
            named |= {f"dense.{i}.weight": weight, f"dense.{i}.bias": bias}
            width = np.shape(weight)[0]
        if width != 1:
            raise BundleError(f"the last dense layer has {width} outputs, expected 1 (the probability)")
        for name, value in named.items():
            if not np.isfinite(np.asarray(value, dtype=np.float64)).all():
                raise BundleError(
                    f"{name} holds NaN or infinite values; a usable detector has finite weights"
                )
        if not isinstance(self.epsilon, float) or not math.isfinite(self.epsilon) or self.epsilon < 0:
            raise BundleError(f"epsilon {self.epsilon!r}: expected a finite number >= 0")
        return self

    def encode_categorical(self, x: np.ndarray) -> np.ndarray:
        """Step 1: float32 copy of `x` (N, D) with NaN -> 0 and each categorical column replaced by its index."""
        x = np.array(x, dtype=np.float32, copy=True)
        for column, table in self.lookups.items():
            values = x[:, column].astype(np.float64)
            x[:, column] = [table.get(f"{v:f}", 0) for v in values]
        return np.where(np.isnan(x), np.float32(0), x)

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:
        h = (self.encode_categorical(x) - self.mean) / np.maximum(
            np.sqrt(self.variance), np.float32(self.epsilon)
        )
        for (weight, bias), activation in zip(self.dense, self.activations, strict=True):
            h = h @ weight.T + bias
            h = apply_activation(h, activation)
        return h.reshape(-1)


def apply_activation(h: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(h, 0)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-h))
    return h


def _keras_config(metadata: bytes) -> dict:
    """The root model's Keras config, from keras_metadata.pb (SavedMetadata: nodes with JSON metadata)."""
    for _, _, node in proto_fields(metadata):
        if not isinstance(node, bytes):
            continue
        for _, wire, value in proto_fields(node):
            if wire == 2 and value[:1] == b"{":
                config = json.loads(value)
                if config.get("class_name") in ("Functional", "Sequential", "Model"):
                    return config
    raise BundleError("keras_metadata.pb holds no Functional model config")


def _layer_plan(config: dict) -> tuple[int, list[int], list[int], list[str]]:
    """(input width, categorical columns, dense widths, activation after each dense) from the config."""
    layers = config["config"]["layers"]
    width, categorical, dense, activations = None, [], [], []
    for layer in layers:
        kind, conf = layer["class_name"], layer["config"]
        if kind == "InputLayer":
            width = int(conf["batch_input_shape"]["items"][-1])
        elif kind.endswith("MultiCategoryEncoding"):
            categorical = [i for i, encoding in enumerate(conf["encoding"]) if encoding != "none"]
            if any(e not in ("none", "int") for e in conf["encoding"]):
                raise BundleError(
                    f"MultiCategoryEncoding with encodings {sorted(set(conf['encoding']))}: only none and int are read"
                )
        elif kind == "Normalization":
            if dense:
                raise BundleError("a Normalization after a Dense layer is not the detector's layout")
        elif kind == "Dense":
            dense.append(int(conf["units"]))
            activations.append(conf.get("activation", "linear"))
        elif kind == "ReLU":
            activations[-1] = "relu"
        elif kind == "Activation":
            activations[-1] = conf["activation"]
        elif kind != "Dropout":
            raise BundleError(
                f"layer {conf.get('name')} of class {kind} is not part of LAION's detector layout"
            )
    if width is None or not dense:
        raise BundleError("no InputLayer or no Dense layer in the model config")
    unknown = [a for a in activations if a not in ACTIVATIONS]
    if unknown:
        raise BundleError(f"activations {unknown}: only relu, sigmoid and linear are supported")
    return width, categorical, dense, activations


def _sub(message: bytes, number: int) -> list:
    return [value for n, _, value in proto_fields(message) if n == number]


def _tensor_proto(tensor: bytes) -> np.ndarray:
    """A TensorProto's value: strings (string_val), int64 (tensor_content or int64_val) or float."""
    dtype = (_sub(tensor, 1) or [0])[0]
    dims = [(_sub(d, 1) or [0])[0] for shape in _sub(tensor, 2) for d in _sub(shape, 2)]
    if dtype == 7:
        return np.array(_sub(tensor, 8), dtype=object)
    content = _sub(tensor, 4)
    if dtype == 9:
        if content:
            return np.frombuffer(content[0], "<i8").reshape(dims)
        values = []
        for packed in _sub(tensor, 10):
            values.extend(_varints(packed) if isinstance(packed, bytes) else [packed])
        return np.array(values, dtype=np.int64)
    if dtype == 1:
        if content:
            return np.frombuffer(content[0], "<f4").reshape(dims)
        values = []
        for packed in _sub(tensor, 5):
            values.extend(np.frombuffer(packed, "<f4").tolist())
        return np.array(values, dtype=np.float32)
    raise BundleError(f"constant of dtype enum {dtype} not read")


def _varints(packed: bytes) -> list[int]:
    from latentmill.filters.tfbundle import read_varint

    out, pos = [], 0
    while pos < len(packed):
        value, pos = read_varint(packed, pos)
        out.append(value - (1 << 64) if value >= 1 << 63 else value)
    return out


def _const_value(node: bytes) -> np.ndarray | None:
    for attr in _sub(node, 5):
        if _sub(attr, 1) == [b"value"]:
            return _tensor_proto(_sub(_sub(attr, 2)[0], 8)[0])
    return None


def _vocabularies(saved_model: bytes, count: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """The (keys, indices) of each lookup table, in the order the serving function takes the tables (the
    order the model's layers use them, i.e. column order), and the Normalization's epsilon."""
    graph = _sub(_sub(saved_model, 2)[0], 2)[0]
    nodes = {}
    for node in _sub(graph, 1):
        nodes[_sub(node, 1)[0].decode()] = node
    inputs = {
        name: [i.decode().split(":")[0].lstrip("^") for i in _sub(node, 3)] for name, node in nodes.items()
    }
    ops = {name: _sub(node, 2)[0].decode() for name, node in nodes.items()}
    # a table initialiser: a call on (table handle, string constant, int64 constant)
    initialised = {}
    for args in inputs.values():
        if len(args) == 3 and all(a in ops for a in args) and ops[args[1]] == ops[args[2]] == "Const":
            keys, values = _const_value(nodes[args[1]]), _const_value(nodes[args[2]])
            if keys is not None and keys.dtype == object and values is not None and values.dtype == np.int64:
                initialised[args[0]] = (keys, values)
    serving = [
        name
        for name, args in inputs.items()
        if args and ops.get(args[0]) == "Placeholder" and args[0].startswith("serving_default")
    ]
    if not serving:
        raise BundleError("saved_model.pb has no serving_default function call")
    tables = [a for a in inputs[serving[0]] if a in initialised]
    if len(tables) != count:
        raise BundleError(f"found {len(tables)} initialised lookup tables for {count} categorical columns")
    epsilon = KERAS_EPSILON
    for library in _sub(graph, 2):
        for function in _sub(library, 1):
            for node in _sub(function, 3):
                if _sub(node, 1) == [b"normalization/Maximum/y"]:
                    value = _const_value(node)
                    if value is not None and value.size == 1:
                        epsilon = float(value.reshape(-1)[0])
    return [initialised[t] for t in tables], epsilon


def read_keras_nsfw(path: str | Path) -> KerasNsfw:
    """LAION's NSFW detector from its published zip (or the unzipped SavedModel folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    if path.is_dir():
        return _read_folder(path, str(path))
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as archive:
        _extract_bounded(archive, Path(tmp))
        folders = sorted({p.parent for p in Path(tmp).rglob("saved_model.pb")})
        if len(folders) != 1:
            raise BundleError(f"expected one SavedModel (saved_model.pb) in the zip, found {len(folders)}")
        return _read_folder(folders[0], path.name)


def _extract_bounded(archive: zipfile.ZipFile, folder: Path) -> None:
    """Extract `archive` into `folder` within ZIP_LIMITS (checked on what the zip claims before anything is
    written, then on the bytes as they come). Encrypted members and links are refused."""
    members = [m for m in archive.infolist() if not m.is_dir()]
    limits = ZIP_LIMITS
    if len(members) > limits["members"]:
        raise BundleError(f"{len(members)} members; a SavedModel zip has a handful")
    for member in members:
        if member.flag_bits & 0x1:
            raise BundleError(f"{member.filename}: an encrypted member")
        if member.external_attr >> 28 == 0o12:  # a symbolic link (unix mode in the high bits)
            raise BundleError(f"{member.filename}: a symbolic link")
        if member.file_size > limits["member_bytes"]:
            raise BundleError(
                f"{member.filename}: {member.file_size:,} bytes uncompressed, more than the "
                f"{limits['member_bytes']:,} a predictor head needs"
            )
        if member.file_size > 1 << 20 and member.file_size > limits["ratio"] * max(member.compress_size, 1):
            raise BundleError(
                f"{member.filename}: compressed {member.file_size // max(member.compress_size, 1):,}:1 "
                f"(a zip bomb?); at most {limits['ratio']}:1 is read"
            )
    total = sum(m.file_size for m in members)
    if total > limits["total_bytes"]:
        raise BundleError(
            f"{total:,} bytes uncompressed, more than the {limits['total_bytes']:,} read from a zip"
        )
    for member in members:
        target = folder / member.filename
        if not target.resolve().is_relative_to(folder.resolve()):
            raise BundleError(f"{member.filename}: a path out of the archive's folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with archive.open(member) as source, open(target, "wb") as out:
            while block := source.read(1 << 20):
                written += len(block)
                if written > member.file_size:
                    raise BundleError(f"{member.filename}: more data than the zip claims")
                out.write(block)


def _read_folder(folder: Path, source: str) -> KerasNsfw:
    for needed in ("saved_model.pb", "keras_metadata.pb", "variables/variables.index"):
        if not (folder / needed).exists():
            raise BundleError(f"no {needed}: not a Keras SavedModel")
    width, categorical, units, activations = _layer_plan(
        _keras_config((folder / "keras_metadata.pb").read_bytes())
    )
    variables = read_checkpoint(folder / "variables")
    by_layer: dict[int, dict[str, np.ndarray]] = {}
    for name, value in variables.items():
        parts = name.split("/")
        if parts[0].startswith("layer_with_weights-") and parts[-2] == ".ATTRIBUTES":
            by_layer.setdefault(int(parts[0].split("-")[1]), {})[parts[1]] = value
    norm = next((w for w in by_layer.values() if "mean" in w and "variance" in w), None)
    dense = [by_layer[i] for i in sorted(by_layer) if "kernel" in by_layer[i]]
    if norm is None or len(dense) != len(units):
        raise BundleError(
            f"checkpoint: expected a Normalization and {len(units)} Dense layers, found "
            f"{'a' if norm is not None else 'no'} Normalization and {len(dense)} kernels"
        )
    pairs = []
    previous = width
    for layer, out in zip(dense, units, strict=True):
        kernel, bias = layer["kernel"], layer["bias"]
        if kernel.shape != (previous, out) or bias.shape != (out,):
            raise BundleError(
                f"Dense kernel {kernel.shape}, bias {bias.shape}: expected ({previous}, {out}), ({out},)"
            )
        pairs.append((np.ascontiguousarray(kernel.T, dtype=np.float32), np.asarray(bias, dtype=np.float32)))
        previous = out
    vocabularies, epsilon = _vocabularies((folder / "saved_model.pb").read_bytes(), len(categorical))
    lookups = {}
    for column, (keys, values) in zip(categorical, vocabularies, strict=True):
        lookups[column] = {k.decode("utf-8"): int(v) for k, v in zip(keys, values, strict=True)}
    return KerasNsfw(
        width,
        lookups,
        np.asarray(norm["mean"], np.float32).reshape(width),
        np.asarray(norm["variance"], np.float32).reshape(width),
        pairs,
        activations,
        float(epsilon),
        source,
    ).check()
