"""What the main job trains: one small interface per task, so ``train.py`` stays task-agnostic.

A :class:`Task` owns the data preparation, the model class, the loss (with its
distillation variant), the validation metric, the baselines measured before
pruning and the export class. ``create_task`` picks one from ``--task`` or, with
``--task auto``, from the model's config.
"""
from __future__ import annotations


TASKS = ("classification", "causal-lm")
# architectures whose saved weights include a causal language-model head
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class Task:
    """The interface train.py calls. Subclasses: classification, causal_lm."""

    name: str
    metric: str                 # the headline validation metric in metrics.json and the logs
    higher_is_better: bool
    fine_tunes_teacher: bool    # True: a dense teacher is fine-tuned first; False: the given model is the teacher
    distill_hidden: bool        # distil hidden states too (--no-hidden-distill turns it off)
    # flags the user did not give take these values: the task's embedded default job, sized for
    # 2 CPU ranks (the one source of these defaults; --help prints them)
    defaults: dict = {}

    def __init__(self, args, model_path: str, load_kwargs: dict | None = None):
        self.args = args
        self.model_path = model_path
        self.load_kwargs = dict(load_kwargs or {})   # e.g. gguf_file for a GGUF checkpoint

    # data and model
    def load_data(self):
        raise NotImplementedError

    def load_tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.model_path, **self.load_kwargs)

    def check_model_config(self, config) -> None:
        """Refuse a model this task cannot train, before anything expensive."""

    def new_model(self, path: str | None = None):
        raise NotImplementedError

    def check_pruning(self, raw_config: dict) -> None:
        """Refuse a LEAP config this task's model cannot take (before anything is loaded or written)."""

    def prepare(self, data, tokenizer):
        """-> (train, validation) torch-format datasets."""
        raise NotImplementedError

    def describe(self, data, train, val) -> str:
        return f"data: {data.source}; {len(train)} train / {len(val)} validation rows"

    def save_extras(self, data, out_dir) -> None:
        """Task files written beside the outputs (rank 0)."""

    def inputs(self, train) -> list[str]:
        return [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in train.column_names]

    # training and evaluation
    def loss(self, engine, batch, teacher):
        """The training loss of one micro-batch; with a teacher, the distillation loss."""
        raise NotImplementedError

    def evaluate(self, forward, val, rank: int, world: int, device=None) -> dict:
        """Validation metrics, identical on every rank (a collective when world > 1). ``device``:
        where ``forward`` takes its inputs and the reduction runs (default: ``forward``'s)."""
        raise NotImplementedError

    def baselines(self, run, teacher, section, val, out_dir, device=None) -> dict:
        """Figures measured before pruning and printed beside LEAP's (e.g. dense, one-shot), on
        ``device`` (the accelerator the run trains on)."""
        return {}

    # export
    def export_model_class(self):
        raise NotImplementedError

    def export_config(self, model_config, data) -> None:
        """Task fields written into the exported config (e.g. label names)."""

    def final_metrics(self, final_eval: dict, exported_eval: dict | None, dense: dict | None,
                      baselines: dict) -> dict:
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        raise NotImplementedError


def _architectures(model_path: str, load_kwargs: dict) -> list[str] | None:
    from transformers import AutoConfig
    from ..train import UsageError
    try:
        config = AutoConfig.from_pretrained(model_path, **load_kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {model_path!r} does not load as a Hugging Face model ({e}); "
                         f"pass a local model directory or a hub name reachable from here") from None
    return config, list(config.architectures or [])


def task_classes() -> dict:
    from . import causal_lm, classification
    return {"classification": classification.ClassificationTask, "causal-lm": causal_lm.CausalLMTask}


def fill_defaults(args, task_name: str) -> None:
    """Every flag left unset (None) takes the task's default."""
    for key, value in task_classes()[task_name].defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def create_task(args) -> Task:
    """The task of ``--task`` (or inferred from the model), its model resolved and checked, and the
    flags the user left unset filled with that task's defaults."""
    from ..train import resolve_model_path
    from . import causal_lm
    requested = getattr(args, "task", "auto")
    if getattr(args, "model", None) is None:   # each task has its embedded model; auto: classification's
        args.model = task_classes()["causal-lm" if requested == "causal-lm" else "classification"].defaults["model"]
    embedded_lm = causal_lm.resolve_embedded(args.model)
    if embedded_lm is not None:
        model_path, load_kwargs = embedded_lm
    else:
        model_path, load_kwargs = resolve_model_path(args.model), {}
    config, archs = _architectures(model_path, load_kwargs)
    is_causal_lm = bool(archs) and all(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs)
    if requested == "auto":
        requested = "causal-lm" if is_causal_lm or embedded_lm is not None else "classification"
    fill_defaults(args, requested)
    task = task_classes()[requested](args, model_path, load_kwargs)
    task.check_model_config(config)
    return task


__all__ = ["Task", "TASKS", "create_task", "fill_defaults", "task_classes"]
