"""Predictor heads, each loaded from the file its authors published, keys and shapes checked.

- aesthetic v2 (LAION "improved aesthetic predictor"): `layers.{0,2,4,6,7}` Linear 768→1024→128→64→16→1,
  dropout between the first four, no activations; on normalised OpenAI ViT-L/14 embeddings.
- aesthetic v1 (LAION-Aesthetics): one Linear(D, 1): keys `weight` (1, D), `bias` (1,).
- unsafe (LAION's CLIP-based NSFW detector): in `unsafehead`, from each of its published forms.
- watermark (LAION-5B's detector, on pixels): timm `efficientnet_b3a` whose classifier is
  Linear(1536,625) ReLU Dropout(0.3) Linear(625,256) ReLU Linear(256,2); 256×256 input, ImageNet
  normalisation; pwatermark = softmax class 0. A plain state dict or {"weights": state dict}.
- fitted (by `latentmill fit-head`): a safetensors file whose metadata names its column and kind.
Files saved on `cuda:0` load with `map_location="cpu"`; pickles load with `weights_only=True`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from latentmill.curate.storage import is_remote, local_file, location
from latentmill.errors import InputError

# the columns `score` writes for every image: a head writing one of them would overwrite it
RESERVED_COLUMNS = (
    "key",
    "url",
    "caption",
    "width",
    "height",
    "original_width",
    "original_height",
    "clip_similarity",
    "error",
)


def check_column(column: str, source: str) -> str:
    """A head's output column: a column name (curate/names.py), not one of the score table's own."""
    from latentmill.curate.names import check_column as check_name

    check_name(column, source, "head column")
    if column in RESERVED_COLUMNS:
        raise InputError(
            f"{source}: a head cannot write column {column!r}: {', '.join(RESERVED_COLUMNS)} are the score "
            f"table's own. Name it something else (fit-head --column NAME)."
        )
    return column


# LAION's published predictor files -> where each comes from (what a missing one's message names)
PUBLISHED = {
    "sac+logos+ava1-l14-linearMSE.pth": "christophschuhmann/improved-aesthetic-predictor on GitHub (the file of that "
    "name at the repository's top): LAION aesthetic predictor v2, for ViT-L-14 openai embeddings",
    "clip_autokeras_binary_nsfw.zip": "LAION-AI/CLIP-based-NSFW-Detector on GitHub (the file of that name): the NSFW "
    "detector for ViT-L-14",
    "clip_autokeras_nsfw_b32.zip": "LAION-AI/CLIP-based-NSFW-Detector on GitHub (the file of that name): the NSFW "
    "detector for ViT-B-32",
    "h14_nsfw.pth": "LAION-AI/CLIP-based-NSFW-Detector on GitHub (the file of that name): the NSFW detector for ViT-H-14",
    "watermark_model_v1.pt": "LAION-AI/LAION-5B-WatermarkDetection on GitHub "
    "(https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt): "
    "LAION-5B's watermark detector",
}


def where_from(name: str) -> str:
    """The fix for a missing head file: where LAION publishes it, by its file name."""
    if name in PUBLISHED:
        return f"It is published in {PUBLISHED[name]}; download it and pass its path."
    return f"Download the published weights (LAION's files: {', '.join(PUBLISHED)}) and pass their path."


def load_state_dict(path: str | Path) -> dict:
    """Tensors from a .pth/.pt/.bin (weights only, mapped to CPU) or a .safetensors file."""
    import torch

    if is_remote(path) and location(path).exists():  # a head in an object store: read from a local copy
        with local_file(path) as local:
            return load_state_dict(local)
    path = location(path)
    if not path.exists():
        raise InputError(f"{path}: no such head file. {where_from(path.name)}")
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


def load_into(module, state: dict, path, what: str):
    """`state` loaded into `module`, checked tensor by tensor first: no key missing or extra, every value a
    tensor of the module's shape, floats finite. Each problem is an InputError naming the key."""
    import torch

    expected = module.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise InputError(
                f"{path}: {key!r} is not a tensor of a {what} (it has {', '.join(list(expected)[:8])}"
                f"{' ...' if len(expected) > 8 else ''})."
            )
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: {key} is a {type(value).__name__}, not a tensor.")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InputError(
                f"{path}: {key} has shape {list(value.shape)}, expected {list(expected[key].shape)} for a {what}."
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InputError(
                f"{path}: {key} holds NaN or infinite values; a usable {what} has finite weights."
            )
    missing = [key for key in expected if key not in state]
    if missing:
        raise InputError(f"{path}: not a complete {what}: no {', '.join(missing[:8])}.")
    module.load_state_dict(state)
    return module


def _first_line(err: BaseException) -> str:
    return ((str(err).splitlines() or [""])[0] or type(err).__name__)[:120]


def safetensors_metadata(path: Path, what: str) -> dict:
    """The string metadata of a safetensors file; a damaged file is an InputError saying it is not `what`."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise InputError(f"{path}: not {what} ({_first_line(err)}).") from None


def check_layout(path, state: dict, expected: dict[str, tuple | None], what: str) -> None:
    """Every value a tensor, every expected key present with its shape (None: any shape); a clear message
    otherwise."""
    import torch

    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: {key} is a {type(value).__name__}, not a tensor; not a {what} file.")
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(
            f"{path}: not a {what} file: missing keys {', '.join(missing)}. Expected keys: "
            f"{', '.join(expected)}; found: {', '.join(list(state)[:12])}{' ...' if len(state) > 12 else ''}."
        )
    for key, shape in expected.items():
        if shape is not None and tuple(state[key].shape) != shape:
            raise InputError(
                f"{path}: {what} key {key} has shape {list(state[key].shape)}, expected {list(shape)}."
            )


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
                nn.Linear(input_dim, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return AestheticV2()


def load_aesthetic(path: str | Path, column: str = "aesthetic") -> Head:
    """LAION aesthetic predictor v2 (MLP) or v1 (linear), told apart by their keys."""
    from torch import nn

    state = load_state_dict(path)
    if "layers.0.weight" in state:
        dim = int(state["layers.0.weight"].shape[1])
        check_layout(
            path,
            state,
            {
                "layers.0.weight": (1024, dim),
                "layers.2.weight": (128, 1024),
                "layers.4.weight": (64, 128),
                "layers.6.weight": (16, 64),
                "layers.7.weight": (1, 16),
                "layers.7.bias": (1,),
            },
            "LAION aesthetic v2",
        )
        module = aesthetic_v2_module(dim)
    else:
        check_layout(
            path, state, {"weight": None, "bias": (1,)}, "LAION aesthetic (v2 layers.* or v1 linear)"
        )
        dim = int(state["weight"].shape[-1])
        check_layout(path, state, {"weight": (1, dim)}, "LAION aesthetic v1")
        module = nn.Linear(dim, 1)
    load_into(module, state, path, "LAION aesthetic head")
    return Head(column, dim, module.eval())


def watermark_module():
    import timm
    from torch import nn

    model = timm.create_model("efficientnet_b3", pretrained=False)  # timm's current name for efficientnet_b3a
    model.classifier = nn.Sequential(
        nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(0.3), nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2)
    )
    return model


def load_watermark(path: str | Path, column: str = "pwatermark") -> Head:
    """LAION-5B's watermark detector: runs on 256x256 ImageNet-normalised pixels, not on embeddings."""
    state = load_state_dict(path)
    check_layout(
        path,
        state,
        {
            "conv_stem.weight": None,
            "classifier.0.weight": (625, 1536),
            "classifier.3.weight": (256, 625),
            "classifier.5.weight": (2, 256),
        },
        "LAION-5B watermark detector (timm efficientnet_b3a)",
    )
    import torch
    from torch import nn

    net = watermark_module()
    load_into(net, state, path, "LAION-5B watermark detector")

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
    if is_remote(path) and location(path).exists():
        with local_file(path) as local:
            return fitted_metadata(local)
    path = location(path)
    if not path.exists():
        raise InputError(f"{path}: no such head file.")
    meta = safetensors_metadata(path, "a head saved by `latentmill fit-head`")
    if meta.get("format") != "latentmill.head/1":
        raise InputError(
            f"{path}: not a head saved by `latentmill fit-head` (no latentmill.head/1 metadata)."
        )
    return meta | {"metrics": json.loads(meta.get("metrics", "{}"))}


def load_fitted(path: str | Path) -> Head:
    """A head saved by `latentmill fit-head` (safetensors, metadata: column, kind, input_dim, task)."""
    meta = fitted_metadata(path)
    check_column(meta.get("column", ""), str(path))
    dim, kind, hidden = _fitted_shape(meta, path)
    module = fitted_module(kind, dim, hidden, meta.get("task") == "classification")
    load_into(module, load_state_dict(path), path, f"{kind} head")
    return Head(meta["column"], dim, module.eval())


def _fitted_shape(meta: dict, path) -> tuple[int, str, list[int]]:
    """(input_dim, kind, hidden sizes) from a fitted head's metadata, each checked."""

    def size(text) -> int | None:
        return int(text) if isinstance(text, str) and text.isdigit() and 0 < int(text) <= 1 << 16 else None

    if size(meta.get("input_dim")) is None:
        raise InputError(
            f"{path}: metadata input_dim is {meta.get('input_dim')!r}, expected an embedding width."
        )
    if meta.get("kind") not in ("linear", "mlp") or meta.get("task") not in ("regression", "classification"):
        raise InputError(
            f"{path}: metadata kind {meta.get('kind')!r} / task {meta.get('task')!r}: expected linear or mlp, "
            f"regression or classification."
        )
    try:
        hidden = json.loads(meta.get("hidden", "[]"))
    except ValueError:
        hidden = None
    if not isinstance(hidden, list) or not all(size(str(h)) for h in hidden):
        raise InputError(
            f"{path}: metadata hidden is {meta.get('hidden')!r}, expected a list of layer sizes."
        )
    return size(meta["input_dim"]), meta["kind"], [int(h) for h in hidden]


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
