"""Save and load a compact model.

``save_compact`` writes a normal ``save_pretrained`` directory plus
``leap_compact.json`` (every shrunk module's stored weight shape, the head-count
attributes changed on attention / FFN modules, and each group's widths).

When every layer keeps the same widths and the model's config can say so
(Llama family: ``num_attention_heads``, ``num_key_value_heads`` and an explicit
``head_dim``; ``intermediate_size`` / GPT-2's ``n_inner`` for the FFN), the
saved config says so and the directory loads with plain
``AutoModel*.from_pretrained``; that is checked by building the model from the
new config (on the meta device) and comparing every shape and attribute.
Otherwise (per-layer widths, or BERT with fewer heads: BERT derives the head
size from hidden_size / num_attention_heads) the config is the original one,
and ``load_compact`` builds the model from it, shrinks each listed module and
loads the weights; a plain ``from_pretrained`` there refuses the shapes.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import shutil

import torch
from torch import nn

from ..algorithm.selection import LeapConfigError
from .compact import COMPACT_ATTR, load_parameters

COMPACT_FILE = "leap_compact.json"
FORMAT_VERSION = 1
FFN_CONFIG_ATTRS = ("intermediate_size", "n_inner")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _record(model: nn.Module) -> dict:
    record = getattr(model, COMPACT_ATTR, None)
    if record is None:
        raise LeapConfigError(f"{type(model).__name__} is not a compact model: build it with "
                              f"leap_ds.compact(...) or load it with leap_ds.load_compact(...)")
    return record


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def plain_config(model: nn.Module, record: dict):
    """A copy of the model's config that describes the compact model exactly, or None."""
    layers = list(record["layers"].values())
    config = copy.deepcopy(model.config)
    ffn = {layer["channels"] for layer in layers if layer["granularity"] == "channel"}
    heads = {(layer["heads"], layer["kv_heads"], layer["head_dim"]) for layer in layers
             if layer["granularity"] == "head"}
    if len(ffn) > 1 or len(heads) > 1:
        return None
    if ffn:
        attr = next((a for a in FFN_CONFIG_ATTRS if hasattr(config, a)), None)
        if attr is None:
            return None
        setattr(config, attr, ffn.pop())
    if heads:
        if not hasattr(config, "num_key_value_heads"):
            return None      # e.g. BERT: head size = hidden_size / num_attention_heads
        q, kv, head_dim = heads.pop()
        config.head_dim, config.num_attention_heads, config.num_key_value_heads = head_dim, q, kv
    with torch.device("meta"):
        probe = type(model)(copy.deepcopy(config))
    if _shapes(probe) != _shapes(model):
        return None     # some layers outside the groups keep other widths
    for name, attrs in record["attributes"].items():
        module = probe.get_submodule(name)
        if any(getattr(module, a, None) != v for a, v in attrs.items()):
            return None
    return config


def save_compact(model: nn.Module, path, tokenizer=None) -> dict:
    """Save a compact model to ``path``; returns what was written to leap_compact.json.
    Tokenizer: ``tokenizer.save_pretrained``, else the tokenizer files of the directory the
    model was compacted from, if any."""
    record = _record(model)
    config = plain_config(model, record)
    os.makedirs(path, exist_ok=True)
    original = model.config
    if config is not None:
        model.config = config
    try:
        model.save_pretrained(path)
    finally:
        model.config = original
    info = {"format": FORMAT_VERSION, "plain_loadable": config is not None,
            "modules": record["modules"], "attributes": record["attributes"], "layers": record["layers"]}
    with open(os.path.join(path, COMPACT_FILE), "w") as f:
        json.dump(info, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    elif record.get("source"):
        for name in TOKENIZER_FILES:
            src = os.path.join(record["source"], name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(path, name))
    return info


def _resize(module: nn.Module, stored_shape) -> None:
    """Give a Linear / Conv1D new (uninitialised) parameters of the stored shape."""
    weight = module.weight
    module.weight = nn.Parameter(torch.empty(stored_shape, dtype=weight.dtype, device=weight.device))
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = stored_shape
        out = stored_shape[0]
    else:   # Conv1D stores (in, out)
        module.nx, module.nf = stored_shape
        out = stored_shape[1]
    if module.bias is not None:
        module.bias = nn.Parameter(torch.empty(out, dtype=module.bias.dtype, device=module.bias.device))


def _read_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise LeapConfigError(f"{os.fspath(path)} holds no *.safetensors weights; save it with save_compact")
    values = {}
    for f in files:
        values.update(load_file(f))
    return values


def load_compact(path, model_class=None) -> nn.Module:
    """Load a directory written by :func:`save_compact` (eval mode). ``model_class``: the
    transformers class to build (default: the config's ``architectures[0]``)."""
    import transformers
    info_path = os.path.join(path, COMPACT_FILE)
    if not os.path.isfile(info_path):
        raise LeapConfigError(f"{os.fspath(path)} has no {COMPACT_FILE}: not written by save_compact "
                              f"(a plain model directory loads with from_pretrained)")
    with open(info_path) as f:
        info = json.load(f)
    if info.get("format") != FORMAT_VERSION:
        raise LeapConfigError(f"{info_path}: format {info.get('format')!r}, this leap_ds reads {FORMAT_VERSION}")
    config = transformers.AutoConfig.from_pretrained(path)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None:
            raise LeapConfigError(f"{os.fspath(path)}/config.json names no transformers class "
                                  f"(architectures={names}); pass model_class=")
    if info["plain_loadable"]:
        model = model_class.from_pretrained(path)
    else:
        model = model_class(config)
        for name, shape in info["modules"].items():
            _resize(model.get_submodule(name), shape)
        for name, attrs in info["attributes"].items():
            module = model.get_submodule(name)
            for attr, value in attrs.items():
                setattr(module, attr, value)
        load_parameters(model, _read_weights(path), buffers=True)
        model.tie_weights()
    setattr(model, COMPACT_ATTR, {k: info[k] for k in ("modules", "attributes", "layers")})
    return model.eval()
