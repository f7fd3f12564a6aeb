import os
import subprocess
import sys
import json

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dist_env():
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, script, *args, timeout=600, master_port=None):
    """Run a script on nproc CPU ranks with torchrun; fail with its output if it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={master_port or free_port()}", script, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def train(nproc, *args, check=True, timeout=900):
    """The main job (`python -m leap_ds.train`) on nproc CPU ranks under torchrun, or (0) in a plain process."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "leap_ds.train", *map(str, args)]
    else:  # a plain process, no launcher
        cmd = [sys.executable, "-m", "leap_ds.train", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def load_ranks(prefix, world):
    return [json.load(open(f"{prefix}.rank{r}.json")) for r in range(world)]


@pytest.fixture
def run_tiny(tmp_path):
    """Train the tiny worker; returns per-rank results."""
    def run(nproc=1, **kw):
        run.count += 1
        prefix = tmp_path / f"run{run.count}_n{nproc}"
        args = ["--out", prefix]
        for k, v in kw.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                args.append(flag)
            elif v is not False and v is not None:
                args += [flag, v]
        torchrun(nproc, os.path.join(ROOT, "tests/workers/train_tiny.py"), *args)
        return load_ranks(prefix, nproc)
    run.count = 0
    return run


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised 2-layer BERT that uses the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from leap_ds.apps.train import EMBEDDED_MODEL, resolve_model_path
    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    torch.manual_seed(0)
    # default dropout (0.1) on purpose: evaluation must switch it off
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
