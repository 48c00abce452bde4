"""`fit-head`: fit a linear or MLP head on labelled CLIP embeddings and save it as a file `score` loads.

Embeddings are `embeddings/{shard}.npy` (rows in the order of `scores/{shard}.parquet`); labels are a
csv/parquet with `key` and the target column. Binary targets (0/1, true/false) make a classifier
(sigmoid output, a probability; metrics: accuracy and ROC AUC), anything else a regressor (metrics:
MAE and Spearman's rho). A seeded split holds out a validation fraction. A linear regressor is ridge
regression solved in closed form, its penalty chosen by cross-validation on the training split; the other
heads are trained with AdamW.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentmill.curate.storage import load_npy, location, read_parquet
from latentmill.errors import InputError
from latentmill.filters.embeddings import checked_embeddings, scores_folder
from latentmill.schema import StageConfig, opt


@dataclass
class FitHeadConfig(StageConfig):
    """One head to fit: `latentmill fit-head`'s options, and one item of a recipe's `fit_head:` list."""

    SECTION = "fit_head"
    target: str = opt(
        help="Label column to fit (a labels file's column, or a URL-table column carried in the image "
        "shards' JSON such as AESTHETIC_SCORE)."
    )
    column: str | None = opt(None, "Score column the head will write (default: the target's name).")
    kind: str = opt("linear", "linear (ridge regression or logistic) or mlp.", choices=("linear", "mlp"))
    hidden: list[int] = opt(factory=lambda: [64], cli=False, help="Hidden layer widths of an mlp head.")
    validation_fraction: float = opt(
        0.2, "Held-out share of the labelled rows for the metrics.", low=0.0, low_open=True, high=0.99
    )
    epochs: int = opt(300, "AdamW epochs (classifiers and MLPs).", low=1)
    learning_rate: float = opt(1e-2, "AdamW learning rate.", low=0.0, low_open=True, cli=False)
    weight_decay: float = opt(1e-4, "AdamW weight decay.", low=0.0, cli=False)
    seed: int = opt(0, "Seed of the split and the initialisation.")
    alpha: float | None = opt(
        None, "Ridge penalty of a linear regressor (default: chosen by 5-fold CV).", low=0.0, low_open=True
    )


def read_labels(labels: str | Path, target: str) -> dict[str, float]:
    """key -> target from a csv or parquet with `key` and the target column."""
    import pandas as pd

    labels = location(labels)
    if not labels.exists():
        raise InputError(f"{labels}: no such labels file.")
    try:
        table = (
            pd.read_parquet(labels)
            if labels.suffix == ".parquet"
            else pd.read_csv(labels, dtype={"key": str})
        )
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise InputError(
            f"{labels}: cannot be read as {'parquet' if labels.suffix == '.parquet' else 'csv'} "
            f"({str(err).splitlines()[0][:160]})."
        ) from None
    for column in ("key", target):
        if column not in table.columns:
            raise InputError(
                f"{labels}: no column {column!r}. Columns found: {', '.join(map(str, table.columns))}."
            )
    values = pd.to_numeric(table[target], errors="coerce")
    bad = table[values.isna() | ~np.isfinite(values.fillna(0))]
    if len(bad):
        row = bad.index[0]
        raise InputError(
            f"{labels}: column {target!r} must hold numbers (0/1 for a classifier), but row {row + 2} "
            f"(key {table['key'].iloc[row]}) has {table[target].iloc[row]!r}"
            f"{f' ({len(bad) - 1} more such rows)' if len(bad) > 1 else ''}."
        )
    if table.empty:
        raise InputError(f"{labels}: no labelled rows.")
    return dict(zip(table["key"].astype(str), values.astype(float), strict=True))


def labelled_embeddings(
    embeddings: str | Path, labels: dict[str, float], scores: str | Path | None = None, source: str = "labels"
):
    """(X float32 (N, D), y float32 (N,)) for the labelled keys that have an embedding; embedding rows are
    matched to keys through the score parquets (default: ../scores beside the embeddings)."""

    embeddings = location(embeddings)
    scores = location(scores) if scores else scores_folder(embeddings)
    files = sorted(embeddings.glob("*.npy"))
    if not files:
        raise InputError(f"{embeddings}: no embeddings. Run `latentmill score --save-embeddings` first.")
    rows, ys, width = [], [], None
    for file in files:
        parquet = scores / f"{file.stem}.parquet"
        if not parquet.exists():
            raise InputError(
                f"{parquet}: missing; embeddings rows are matched to keys through the score parquet "
                f"(give --scores)."
            )
        keys = read_parquet(parquet, columns=["key"]).column("key").to_pylist()
        width = checked_embeddings(file, rows=len(keys), width=width)[1]
        for key, row in zip(keys, load_npy(file), strict=True):
            if key in labels and np.isfinite(row).all():
                rows.append(row.astype(np.float32))
                ys.append(float(labels[key]))
    if len(rows) < 10:
        raise InputError(f"{source}: only {len(rows)} labelled keys have embeddings; need at least 10.")
    return np.stack(rows), np.asarray(ys, dtype=np.float32)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (ties averaged)."""
    from scipy.stats import rankdata

    positives, negatives = y == 1, y == 0
    if not positives.any() or not negatives.any():
        return float("nan")
    ranks = rankdata(score)
    return float(
        (ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2)
        / (positives.sum() * negatives.sum())
    )


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def format_metrics(metrics: dict) -> str:
    """`task regression, mae 0.536, spearman 0.503, ...` for logs and the report."""
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """argmin_w |xw - y|^2 + alpha |w|^2 (x, y centred)."""
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def ridge_alpha(x: np.ndarray, y: np.ndarray, seed: int = 0, folds: int = 5) -> float:
    """The ridge penalty with the lowest k-fold cross-validated squared error, from a log grid."""
    grid = 10.0 ** np.arange(-2, 4.01, 0.5)
    fold = np.random.default_rng(seed).permutation(len(y)) % min(folds, len(y))
    errors = np.zeros(len(grid))
    for k in np.unique(fold):
        fit, held = fold != k, fold == k
        x_mean, y_mean = x[fit].mean(0), y[fit].mean()
        xf, yf, xh = x[fit] - x_mean, y[fit] - y_mean, x[held] - x_mean
        for i, alpha in enumerate(grid):
            errors[i] += ((xh @ ridge_solve(xf, yf, alpha) + y_mean - y[held]) ** 2).sum()
    return float(grid[int(np.argmin(errors))])


def fit_head(x: np.ndarray, y: np.ndarray, config: FitHeadConfig):
    """Train; return (module, metrics) with metrics on the held-out split."""
    import torch

    from latentmill.filters.heads import fitted_module

    if config.kind not in ("linear", "mlp"):
        raise InputError(f"--kind {config.kind!r}: use linear or mlp.")
    classification = set(np.unique(y)) <= {0.0, 1.0}
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(y))
    n_val = max(1, int(round(len(y) * config.validation_fraction)))
    val, train = order[:n_val], order[n_val:]
    torch.manual_seed(config.seed)
    module = fitted_module(config.kind, x.shape[1], list(config.hidden), classification)
    # train on standardised features (normalised CLIP embeddings are tiny per dimension), then fold the
    # standardisation into the first layer so the saved head takes raw normalised embeddings
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    # regression targets are standardised too (an aesthetic score near 6 is far from a fresh layer's 0)
    y_mean, y_std = (0.0, 1.0) if classification else (float(y[train].mean()), float(y[train].std() + 1e-6))
    xt, yt = torch.from_numpy((x[train] - mean) / std), torch.from_numpy((y[train] - y_mean) / y_std)
    alpha = None
    if config.kind == "linear" and not classification:
        # a linear regressor is ridge regression, solved exactly: with a few hundred labels and hundreds of
        # embedding dimensions, the penalty (picked by cross-validation) is what keeps it from memorising
        xs, ys = xt.double().numpy(), yt.double().numpy()
        alpha = config.alpha if config.alpha is not None else ridge_alpha(xs, ys, config.seed)
        with torch.no_grad():
            module[0].weight.copy_(torch.from_numpy(ridge_solve(xs, ys, alpha))[None])
            module[0].bias.zero_()  # standardised features and targets have mean 0
    else:
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        loss_fn = torch.nn.BCELoss() if classification else torch.nn.MSELoss()
        for _ in range(config.epochs):
            optimizer.zero_grad()
            loss = loss_fn(module(xt).reshape(-1), yt)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        first = module[0]
        first.weight /= torch.from_numpy(std).to(first.weight.dtype)
        first.bias -= first.weight @ torch.from_numpy(mean).to(first.weight.dtype)
        if not classification:  # the last layer is the output Linear (classifiers end in a Sigmoid)
            last = module[-1]
            last.weight *= y_std
            last.bias.mul_(y_std).add_(y_mean)
    module.eval()
    with torch.no_grad():
        predicted = module(torch.from_numpy(x[val])).reshape(-1).numpy()
    truth = y[val]
    if classification:
        metrics = {
            "task": "classification",
            "accuracy": float(((predicted >= 0.5) == (truth == 1)).mean()),
            "auc": roc_auc(truth, predicted),
        }
    else:
        metrics = {
            "task": "regression",
            "mae": float(np.abs(predicted - truth).mean()),
            "spearman": spearman(predicted, truth),
        }
    metrics |= {"train": int(len(train)), "validation": int(len(val))} | (
        {"alpha": float(alpha)} if alpha is not None else {}
    )
    return module, metrics


def save_head(module, path: str | Path, config: FitHeadConfig, input_dim: int, metrics: dict) -> Path:
    """safetensors weights with the metadata `heads.load_fitted` needs."""
    from safetensors.torch import save_file

    from latentmill.curate.storage import atomic_path
    from latentmill.filters.heads import check_column

    path = location(path)
    check_column(
        config.column or config.target,
        "fit-head --column" if config.column else f"fit-head --target {config.target}",
    )
    meta = {
        "format": "latentmill.head/1",
        "column": config.column or config.target,
        "target": config.target,
        "kind": config.kind,
        "input_dim": str(input_dim),
        "task": metrics["task"],
        "hidden": json.dumps(list(config.hidden)),
        "metrics": json.dumps(metrics),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp), metadata=meta)
    return path


def labels_from_image_shards(images: str | Path, target: str) -> dict[str, float]:
    """key -> the `target` value carried in each sample's JSON (a URL-table column such as AESTHETIC_SCORE)."""
    from latentmill.curate.imageshards import iter_image_shard, list_image_shards

    labels = {}
    for shard in list_image_shards(images):
        for sample in iter_image_shard(shard):
            value = sample.meta.get(target)
            if isinstance(value, (int, float)) and np.isfinite(value):
                labels[sample.key] = float(value)
    if not labels:
        raise InputError(f"{images}: no sample carries a numeric {target!r} in its JSON to learn from.")
    return labels


def add_head_column(head_path: str | Path, scores: str | Path, embeddings: str | Path) -> str:
    """Apply a fitted head to the saved embeddings and add its column to every score parquet (atomically).
    Thresholds on a new head need no new pass over the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from latentmill.curate.storage import atomic_path
    from latentmill.filters.heads import load_fitted

    head = load_fitted(head_path)
    parquets = sorted(location(scores).glob("*.parquet"))
    for parquet in parquets:  # every shard checked before the first is rewritten
        rows = read_parquet(parquet, columns=["key"]).num_rows
        checked_embeddings(location(embeddings) / f"{parquet.stem}.npy", rows=rows, width=head.input_dim)
    for parquet in parquets:
        table = read_parquet(parquet)
        matrix = load_npy(location(embeddings) / f"{parquet.stem}.npy").astype(np.float32)
        values = head(torch.from_numpy(np.nan_to_num(matrix)))
        values = np.where(np.isnan(matrix).any(axis=1), np.nan, values).astype(np.float32)
        if head.column in table.column_names:
            table = table.drop([head.column])
        table = table.append_column(head.column, pa.array(values, mask=np.isnan(values)))
        with atomic_path(parquet) as tmp:
            pq.write_table(table, tmp)
    return head.column


def fit_and_add(
    config: FitHeadConfig,
    labels: str | Path,
    embeddings: str | Path,
    scores: str | Path | None,
    output: str | Path,
    add_column: bool = False,
    overwrite: bool = False,
) -> dict:
    """Fit one head on the embeddings' labelled rows and save it to `output`; with `add_column`, add its
    column to the score parquets. `labels`: a csv/parquet with `key` and the target, or a folder of image
    shards whose sample JSON carries the target. An existing `output` fitted from the same settings,
    labels and embeddings is not fitted again (a resumed run); one fitted from others is refused, or with
    `overwrite` fitted again (its record: OUTPUT.lineage.json)."""
    from latentmill.curate.lineage import claim, make_record, read_record, record_path
    from latentmill.curate.storage import write_json
    from latentmill.filters.heads import check_column, fitted_metadata

    config.validate()
    check_column(config.column or config.target, "--column" if config.column else f"--target {config.target}")
    output, scores = location(output), location(scores) if scores else scores_folder(embeddings)
    # the embeddings by the record of the score run that wrote them beside its scores (hashing every
    # embedding file on each call would read the whole dataset); by content when there is no such record
    made_by = scores if read_record(scores) else embeddings
    record = make_record("fit-head", config, inputs={"labels": labels, "embeddings": made_by})
    if output.exists() and (read_record(output) or record)["fingerprint"] != record["fingerprint"]:
        claim(output, record, overwrite, clear=lambda: output.unlink())  # refused, or removed to fit again
    if not output.exists():
        labels = location(labels)
        table = (
            labels_from_image_shards(labels, config.target)
            if labels.is_dir()
            else read_labels(labels, config.target)
        )
        x, y = labelled_embeddings(embeddings, table, scores, source=str(labels))
        module, metrics = fit_head(x, y, config)
        save_head(module, output, config, x.shape[1], metrics)
    write_json(record_path(output), record)
    if add_column:
        add_head_column(output, scores, embeddings)
    return fitted_metadata(output)["metrics"] | {"column": config.column or config.target}
