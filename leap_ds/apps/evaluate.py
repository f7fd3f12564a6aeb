"""Validation accuracy (and F1 for two classes), exact across ranks.

Every rank runs the same number of batches (ZeRO-3 gathers parameters
collectively), padded rows are not counted, and one all-reduce sums the counts.
Inputs and the counts' reduction go through leap_ds.apps.device, on ``device``.
"""
import math

import torch

from . import device as placement


def _counts(predict, dataset, batch_size, rank, world, num_labels, device):
    share = math.ceil(len(dataset) / world)
    lo, hi = rank * share, min(len(dataset), (rank + 1) * share)
    counts = torch.zeros(2 + 3 * (num_labels == 2), dtype=torch.float64)
    for start in range(0, share, batch_size):
        idx = [min(i, len(dataset) - 1) for i in range(lo + start, lo + min(start + batch_size, share))]
        valid = torch.tensor([lo + start + j < hi for j in range(len(idx))])
        batch = dataset[idx]
        labels = batch.pop("labels")
        with torch.no_grad():
            pred = predict(placement.to_device(batch, device)).argmax(-1).cpu()
        labels, pred = labels[valid], pred[valid]
        counts[0] += (pred == labels).sum()
        counts[1] += len(labels)
        if num_labels == 2:
            counts[2] += ((pred == 1) & (labels == 1)).sum()
            counts[3] += ((pred == 1) & (labels == 0)).sum()
            counts[4] += ((pred == 0) & (labels == 1)).sum()
    return counts


def evaluate(predict, dataset, batch_size, num_labels, rank=0, world=1, module=None, device="cpu") -> dict:
    """``predict(batch dict) -> logits``. Returns accuracy (and f1) on every rank.

    ``device``: where ``predict`` takes its inputs (the engine's device); with ``world`` > 1
    the counts are all-reduced there.

    ``module`` (the engine or model behind ``predict``) is put in eval mode
    (no dropout) for the evaluation and back in its previous mode after.
    """
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        counts = _counts(predict, dataset, batch_size, rank, world, num_labels, device)
    finally:
        if was_training:
            module.train()
    if world > 1:
        counts = placement.all_reduce_(counts, device).cpu()
    result = {"accuracy": float(counts[0] / counts[1]), "examples": int(counts[1])}
    if num_labels == 2:
        tp, fp, fn = counts[2:].tolist()
        result["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return result
