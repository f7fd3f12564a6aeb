"""``export_compact``: the compact model beside the masked one, and the numbers for metrics.json."""
from __future__ import annotations

import os
import statistics
import time

import torch

from ..algorithm.selection import COUPLED
from .compact import compact, parameter_count
from .storage import save_compact

LATENCY_SEQUENCE = 128     # tokens per sequence in the latency probe
LATENCY_RUNS = 5           # timed runs per model (after LATENCY_WARMUP), median reported
LATENCY_WARMUP = 2


def has_structured_groups(engine) -> bool:
    """True when LEAP on this engine has head or channel groups (so a compact model exists)."""
    from ..integration.engine import pruner_of
    return any(g.plan.rule.granularity in COUPLED for g in pruner_of(engine).groups)


def directory_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def probe_batch(model, batch_size: int, sequence: int = LATENCY_SEQUENCE, seed: int = 0) -> dict:
    vocab = model.config.vocab_size
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    sequence = min(sequence, context or sequence)   # a model with a shorter context than the probe
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, sequence), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def median_latency_s(model, batch: dict, runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP) -> float:
    model.eval()
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def export_compact(engine, tokenizer, out_dir, is_main: bool, masked_dir=None) -> dict:
    """Compact the engine's model and save it to ``out_dir`` (rank 0). A collective at
    ZeRO-3: call it on every rank, after training (before or after ``leap_ds.finalize``;
    label names already set on ``engine.module.config`` are kept). Returns, on the main
    rank, the metrics for metrics.json (parameter counts, directory sizes, median CPU latency
    at batch 1 x 128 tokens, and the largest logit difference between the two models on that
    batch); ``{}`` elsewhere. ``masked_dir``: the masked model's directory, for its size."""
    pair = compact(engine, keep_masked=True)
    if pair is None or not is_main:
        return {}
    masked, small = pair
    info = save_compact(small, out_dir, tokenizer)
    batch = probe_batch(masked, 1)
    with torch.no_grad():
        diff = (masked(**batch).logits.float() - small(**batch).logits.float()).abs().max().item()
    metrics = {
        "compact_dir": os.fspath(out_dir),
        "compact_loads_with_plain_transformers": info["plain_loadable"],
        "masked_parameters": parameter_count(masked),
        "compact_parameters": parameter_count(small),
        "compact_bytes": directory_bytes(out_dir),
        "latency_threads": torch.get_num_threads(),
        "masked_latency_s_batch1_seq128": median_latency_s(masked, batch),
        "compact_latency_s_batch1_seq128": median_latency_s(small, batch),
        "compact_max_abs_logit_diff": diff,
        "compact_layers": info["layers"],
    }
    if masked_dir is not None:
        metrics["masked_bytes"] = directory_bytes(masked_dir)
    return metrics
