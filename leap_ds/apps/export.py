"""Export: masks into the weights, then a plain Hugging Face model directory."""
import torch
import deepspeed

import leap_ds


def full_state_dict(engine) -> dict:
    """The full model state on every rank (ZeRO-3 partitions gathered), LEAP state dropped."""
    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else _null():
        state = {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v for k, v in state.items() if not any(p.startswith("leap_") for p in k.split("."))}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def export_pruned(engine, tokenizer, path, set_task_config, is_main: bool) -> dict:
    """Finalize LEAP in the engine and save a model loadable with plain transformers.
    ``set_task_config(config)`` writes the task's fields (e.g. label names) into the saved config."""
    leap_ds.finalize(engine)
    state = full_state_dict(engine)
    if is_main:
        model = engine.module
        set_task_config(model.config)
        model.save_pretrained(path, state_dict=state)
        tokenizer.save_pretrained(path)
    return state


def load_exported(path, model_class=None):
    """The exported model with plain transformers (``model_class``: the task's Auto class)."""
    if model_class is None:
        from transformers import AutoModelForSequenceClassification as model_class
    return model_class.from_pretrained(path).eval()


@torch.no_grad()
def count_zeros(state: dict, names: list[str]) -> tuple[int, int]:
    weights = [state[f"{n}.weight"] for n in names]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
