"""The launch scripts (launch/*.sh, launch/slurm/leap.sbatch) against real launchers.

No mocks: the deepspeed launcher, OpenMPI's mpirun, two network namespaces joined by a
veth pair standing in for two hosts, and a one-node Slurm cluster started here. Every test
skips with the reason when what it needs is missing (root, ip netns, mpirun/mpi4py, the
Debian slurm packages). Total: a few minutes on 2 CPU cores with a warm extension cache
(TORCH_EXTENSIONS_DIR, default /tmp/leap_ds_torch_ext); the first run on a machine also
compiles DeepSpeed's small C++ op once (~2 min).

  0. -h / bad flags / --dry-run commands of every script; rank_exec.sh on its own (and its
     GPU LOCAL_RANK rule); leap_ds/apps/preemption.py in one process; leap.sbatch's
     LEAP_DRY_RUN settings (srun --cpus-per-task, MASTER_PORT outside the ephemeral
     ports, LEAP_IFNAME)
  1. local.sh / mpirun.sh: 2 ranks == 1 process (final loss, density, thresholds, 1e-4 rel.)
  2. multinode.sh --no-ssh: one rank in each of two network namespaces, rendezvous over
     the veth addresses 10.231.0.1/10.231.0.2, == 1 process
  3. leap.sbatch on a local Slurm cluster: the tiny job (1 node x 2 tasks, CPU) == 1
     process with one log per rank; then a long job that never reaches its checkpoint
     interval is stopped by SIGUSR1 to the batch script: every rank checkpoints at the
     current step before the script requeues the job, and the next attempt resumes there
     (every step trained exactly once); SIGTERM to a running job requeues it, a plain
     `scancel` cancels it for good. A requeued job is started at once (Slurm.start_now),
     in the second after the requeue at the earliest
  4. SIGKILL one rank mid-run under local.sh, mpirun.sh, multinode.sh (two namespaces)
     and Slurm: every rank and the launcher exit within KILL_DEADLINE_S, non-zero, and
     the output names the killed rank
"""
import datetime
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
HELPERS = REPO / "tests" / "launch_helpers"


# --------------------------------------------------------------------------------------
# What the launchers run. Two command-line shapes are supported:
#   TinyWorker: tests/workers/train_tiny.py  (--steps N --out PREFIX -> PREFIX.rank<r>.json)
#   TrainCLI:   the CLI of `python -m leap_ds.train` (--output-dir DIR --max-steps N
#               [--resume auto], DIR/metrics.json, DeepSpeed checkpoints in DIR/checkpoints,
#               rank 0 prints "resumed from PATH at step N");
#               tests/launch_helpers/resumable_tiny.py copies that CLI for a tiny model.
# PROGRAM runs the 2-ranks-vs-1-process comparisons; RESUMABLE the requeue and kill tests.
# To run everything on the main job, make the last assignment below
#     PROGRAM = RESUMABLE = MAIN_JOB
# (or, without editing, set LEAP_LAUNCH_TESTS_PROGRAM=main).
# --------------------------------------------------------------------------------------
class TinyWorker:
    """tests/workers/train_tiny.py"""
    resume_args = ""  # the worker has no --resume; leap.sbatch must not add one

    def __init__(self, program, steps=20):
        self.program, self.steps = list(program), steps

    def argv(self, out, steps):
        return self.program + ["--steps", str(steps), "--out", str(Path(out) / "result")]

    def result(self, out):
        d = json.loads((Path(out) / "result.rank0.json").read_text())
        return {"world": d["world"], "values": {"loss": d["losses"][-1], "density": d["densities"][-1]},
                "thresholds": d["thresholds"]}


class TrainCLI:
    """`python -m leap_ds.train` and tests/launch_helpers/resumable_tiny.py.

    save: flags that make the program checkpoint every few steps into
    <output-dir>/checkpoints (DeepSpeed's `latest` file names the newest tag, "step<N>").
    save_never: flags for a checkpoint interval no run reaches, so that a checkpoint can
    only come from a stop request (leap_ds/apps/preemption.py).
    slow: flags that stretch a run so that it can be killed or requeued mid-run (the main
    job needs none: its steps take long enough).
    steps: optimizer steps of the compared runs; long_steps: of the requeued run.
    Compared with one process: every number among VALUE_KEYS in metrics.json and the
    thresholds ("thresholds", or "threshold" of each entry of "groups"). The main job's
    training loss (final_train_loss) is not compared: MiniLM trains with dropout, whose
    random masks differ between 1 process and 2 ranks (the dropout-free tiny worker in
    tests/test_distributed.py shows equal losses).
    """
    VALUE_KEYS = ("final_loss", "loss", "accuracy", "f1", "density", "achieved_density", "global_density")
    resume_args = "--resume auto"
    resume_log = re.compile(r"resumed from \S+ at step (\d+)")  # printed by a resumed rank 0

    def __init__(self, program, save=(), save_never=(), slow=(), steps=20, long_steps=60):
        self.program, self.save, self.save_never = list(program), list(save), list(save_never)
        self.slow, self.steps, self.long_steps = list(slow), steps, long_steps

    def argv(self, out, steps, save=False, slow=False):
        """save: True (every few steps), False (the program's default) or "never"."""
        saving = self.save_never if save == "never" else self.save if save else []
        return (self.program + ["--output-dir", str(out), "--max-steps", str(steps)]
                + saving + (self.slow if slow else []))

    def metrics(self, out):
        return json.loads((Path(out) / "metrics.json").read_text())

    def result(self, out):
        d = self.metrics(out)
        values = {k: d[k] for k in self.VALUE_KEYS if isinstance(d.get(k), (int, float))}
        thresholds = d.get("thresholds") or [g["threshold"] for g in d.get("groups", []) if "threshold" in g]
        assert values and thresholds, f"nothing to compare in {sorted(d)}"
        return {"world": d.get("world", d.get("world_size")), "values": values, "thresholds": thresholds}

    def final_step(self, out):
        d = self.metrics(out)
        return d.get("global_steps", d.get("steps"))

    def latest_step(self, out):
        """Step of the newest checkpoint (digits at the end of checkpoints/latest), or None."""
        try:
            m = re.search(r"(\d+)\s*$", (Path(out) / "checkpoints" / "latest").read_text())
        except OSError:
            return None
        return int(m.group(1)) if m else None

    def steps_done(self, out, rank_logs=()):
        """Every optimizer step rank 0 finished, in order, over all attempts: the lines of
        progress.rank0 (resumable_tiny.py), else the "LEAP step N/M" lines of its logs."""
        progress = Path(out) / "progress.rank0"
        if progress.exists():
            return [int(x) for x in progress.read_text().split()]
        return [int(m) for f in rank_logs if Path(f).exists()
                for m in re.findall(r"LEAP step (\d+)/\d+ ", Path(f).read_text())]


TINY = TinyWorker(["tests/workers/train_tiny.py"])
TINY_RESUMABLE = TrainCLI([str(HELPERS.relative_to(REPO) / "resumable_tiny.py")],
                          save=["--save-steps", "3"], save_never=["--save-steps", "1000000"],
                          slow=["--step-sleep", "0.3"])
# The main job on the embedded MiniLM and data, kept small (~1.7 s a step on one core).
MAIN_JOB = TrainCLI(["-m", "leap_ds.train", "--no-distill", "--max-train-samples", "64",
                     "--max-eval-samples", "32", "--max-seq-length", "32", "--eval-interval", "0",
                     "--log-interval", "1", "--allow-missed-target"],   # 6-16 steps: launchers, not pruning
                    save=["--checkpoint-interval", "2"], save_never=["--checkpoint-interval", "1000000"],
                    steps=6, long_steps=16)
# The comparisons run the real main job; the kill and requeue tests, which need long,
# slow runs, use its CLI mirror on a tiny model to keep the suite short.
PROGRAM, RESUMABLE = MAIN_JOB, TINY_RESUMABLE
if os.environ.get("LEAP_LAUNCH_TESTS_PROGRAM") == "main":
    PROGRAM = RESUMABLE = MAIN_JOB
elif os.environ.get("LEAP_LAUNCH_TESTS_PROGRAM") == "tiny":
    PROGRAM = TINY

KILL_STEPS = 2000        # "forever" (10 min and more): runs that get a rank killed
KILL_DEADLINE_S = 120    # every process must be gone this long after the SIGKILL
RUN_TIMEOUT_S = 600      # one launcher run (generous: the 2 cores are shared)
REL_TOL = 1e-4

EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/leap_ds_torch_ext")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def launch_env(**extra):
    """Environment for a launch script: this venv's python, CPU, short collective timeout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(PYTHON=sys.executable, TORCH_EXTENSIONS_DIR=EXT_DIR, OMP_NUM_THREADS="1",
               DEEPSPEED_TIMEOUT="1", LEAP_DEVICE="cpu", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env=None, timeout=RUN_TIMEOUT_S, check=True):
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env or launch_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    p.seconds = time.time() - t0
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-6000:]}")
    return p


def assert_same(got, want, what):
    assert got["world"] in (None, 2), f"{what}: world {got['world']}, expected 2"
    assert set(got["values"]) == set(want["values"]), (got["values"], want["values"])
    for key, v in want["values"].items():
        assert got["values"][key] == pytest.approx(v, rel=REL_TOL), f"{what}: {key} {got['values'][key]} != {v}"
    assert len(got["thresholds"]) == len(want["thresholds"])
    assert got["thresholds"] == pytest.approx(want["thresholds"], rel=REL_TOL), f"{what}: thresholds"


def need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces / Slurm daemons)")


def need_cmd(*names):
    for n in names:
        if shutil.which(n) is None:
            pytest.skip(f"`{n}` not found (Debian: {dict(ip='iproute2', mpirun='openmpi-bin').get(n, n)})")


def sh(*cmd, check=True):
    p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: {p.stdout.strip()}")
    return p.stdout


def rank_pids(marker, rank=None):
    """PIDs of the Python rank processes whose command line contains `marker`.

    A rank is told apart from launchers and from launch/rank_exec.sh by argv[0] being a
    python and no `deepspeed.launcher` in its command line; its rank comes from RANK,
    OMPI_COMM_WORLD_RANK or SLURM_PROCID in its environment.
    """
    found = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if not any(marker in a for a in argv) or not Path(argv[0]).name.startswith("python"):
                continue
            if any("deepspeed.launcher" in a for a in argv):
                continue
            env = Path(f"/proc/{p}/environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        env = dict(e.split("=", 1) for e in env if "=" in e)
        r = env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("SLURM_PROCID")))
        if r is not None and (rank is None or int(r) == rank):
            found[int(p)] = int(r)
    return found


def wait_for(pred, timeout, what, interval=0.5, procs=(), outputs=()):
    """Poll pred() until it is truthy; fail on timeout or when one of procs exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"waiting for {what}: a launcher exited first "
                        f"({[p.returncode for p in procs]}):\n" + "\n".join(o()[-4000:] for o in outputs))
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n" + "\n".join(o()[-4000:] for o in outputs))


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """PROGRAM in one plain process (also warms the C++ extension cache)."""
    out = tmp_path_factory.mktemp("one_process")
    env = launch_env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    p = run([sys.executable, *PROGRAM.argv(out, PROGRAM.steps)], env=env, timeout=900)
    print(f"one process: {p.seconds:.1f} s")
    r = PROGRAM.result(out)
    r["world"] = 2  # the runs compared with it have 2 ranks
    return r


def _netns_setup():
    need_root()
    need_cmd("ip")
    if not Path("/var/run/netns").exists() and not Path("/run").exists():
        pytest.skip("no /run for network namespaces")


def _netns_cleanup(names):
    for ns in names:
        # Rank processes left in a namespace (a failed test) are ended by their pid.
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            if pid.isdigit():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def two_hosts():
    """Two network namespaces joined by a veth pair: 10.231.0.1/24 and 10.231.0.2/24."""
    _netns_setup()
    tag = os.getpid() % 100000
    hosts = [{"ns": f"leapA{tag}", "if": f"lpva{tag}", "addr": "10.231.0.1"},
             {"ns": f"leapB{tag}", "if": f"lpvb{tag}", "addr": "10.231.0.2"}]
    made = []
    try:
        for h in hosts:
            sh("ip", "netns", "add", h["ns"])
            made.append(h["ns"])
        sh("ip", "link", "add", hosts[0]["if"], "type", "veth", "peer", "name", hosts[1]["if"])
        for h in hosts:
            sh("ip", "link", "set", h["if"], "netns", h["ns"])
            sh("ip", "-n", h["ns"], "addr", "add", f"{h['addr']}/24", "dev", h["if"])
            sh("ip", "-n", h["ns"], "link", "set", h["if"], "up")
            sh("ip", "-n", h["ns"], "link", "set", "lo", "up")
    except RuntimeError as e:
        _netns_cleanup(made)
        pytest.skip(f"cannot build two network namespaces with a veth pair here: {e}")
    try:
        yield hosts
    finally:
        _netns_cleanup(made)


@pytest.fixture(scope="module")
def private_host():
    """One network namespace of our own (lo + a veth address 10.231.1.1 for `hostname -I`).

    mpi4py discovery always uses port 29500, which other jobs on this machine may hold;
    inside a namespace of its own the port is free.
    """
    _netns_setup()
    tag = os.getpid() % 100000
    ns, a, b = f"leapM{tag}", f"lpma{tag}", f"lpmb{tag}"
    try:
        sh("ip", "netns", "add", ns)
    except RuntimeError as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    try:
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for i in (a, b):
            sh("ip", "link", "set", i, "netns", ns)
            sh("ip", "-n", ns, "link", "set", i, "up")
        sh("ip", "-n", ns, "addr", "add", "10.231.1.1/24", "dev", a)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    except RuntimeError as e:
        _netns_cleanup([ns])
        pytest.skip(f"cannot set up a veth pair in a network namespace here: {e}")
    try:
        yield ns
    finally:
        _netns_cleanup([ns])


def need_mpi():
    need_cmd("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not importable (pip install mpi4py; Debian libopenmpi-dev)")


class Slurm:
    def __init__(self, root):
        self.root = root
        self.env = launch_env(SLURM_CONF=root / "slurm.conf")

    def cmd(self, *args, check=True):
        p = subprocess.run([str(a) for a in args], env=self.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))}: {p.stdout}")
        return p.stdout

    def sbatch(self, out_file, argv, tasks=2, **env):
        e = dict(self.env, LEAP_WORKDIR=REPO, **{k: str(v) for k, v in env.items()})
        p = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--ntasks-per-node={tasks}",
                            "-o", str(out_file), str(LAUNCH / "slurm" / "leap.sbatch"), *map(str, argv)],
                           cwd=REPO, env={k: str(v) for k, v in e.items()},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        assert p.returncode == 0, p.stdout
        return p.stdout.strip().split(";")[0]

    def job(self, jobid):
        text = self.cmd("scontrol", "show", "job", "-o", jobid)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_state(self, jobid, states, timeout):
        def check():
            j = self.job(jobid)
            return j if j.get("JobState") in states else None
        return wait_for(check, timeout, f"job {jobid} to reach {states}")

    def start_now(self, jobid):
        """Start a requeued (PENDING) job without Slurm's requeue delay (BeginTime = requeue time
        + the credential lifetime + 1 s, about 2 min), but never in the second of the requeue.

        The requeue sends slurmd a kill request that revokes the job's credentials, stamped with
        slurmctld's time in whole seconds, and slurmd refuses any batch launch whose credential is
        not strictly newer ("Job N already killed, do not launch batch job"; slurmctld: "Killing
        non-startable batch JobId=N: Job credential revoked"): the job ends FAILED with RunTime 0
        and its batch script never runs. Slurm's requeue delay exists to prevent exactly that
        (slurmctld's batch_requeue_fini), so only a start forced by hand is exposed. The job is
        seen PENDING here, after the requeue and its revoke, so from the next whole second on the
        launch is safe."""
        job = self.job(jobid)
        assert job.get("JobState") == "PENDING", job
        time.sleep(math.floor(time.time()) + 1.05 - time.time())
        self.cmd("scontrol", "update", f"JobId={jobid}", "StartTime=now")

    def log_tail(self, jobid, lines=40):
        """slurmctld's and slurmd's log lines about job `jobid` (the last `lines` of each)."""
        pat = re.compile(rf"(JobId={jobid}\b|[Jj]ob {jobid}\b|\[{jobid}\.)")
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            f = self.root / "log" / name
            hits = [ln for ln in (f.read_text(errors="replace").splitlines() if f.exists() else [])
                    if pat.search(ln)]
            out.append(f"----- {name} (job {jobid}) -----\n" + "\n".join(hits[-lines:]))
        return "\n".join(out)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on loopback (NodeName=localhost CPUs=2), root daemons."""
    need_root()
    setup = HELPERS / "setup_slurm.sh"
    p = subprocess.run([setup, "install"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=900)
    if p.returncode != 0:
        pytest.skip(f"Slurm not available and not installable: {p.stdout.strip()[-500:]}")
    root = tmp_path_factory.mktemp("slurm")
    p = subprocess.run([setup, "start", root, "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=120)
    if p.returncode != 0:
        subprocess.run([setup, "stop", root])
        pytest.fail(f"could not start the local Slurm cluster:\n{p.stdout[-4000:]}")
    s = Slurm(root)
    try:
        yield s
    finally:
        s.cmd("scancel", "--user=root", check=False)
        time.sleep(1)
        subprocess.run([setup, "stop", root], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


# --------------------------------------------------------------------------------------
# 0. usage, bad flags, assembled commands (no training)
# --------------------------------------------------------------------------------------
SCRIPTS = ["local.sh", "multinode.sh", "mpirun.sh", "rank_exec.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_and_bad_flag(script):
    for f in [LAUNCH / s for s in SCRIPTS] + [LAUNCH / "slurm" / "leap.sbatch"]:
        assert os.access(f, os.X_OK), f"{f} is not executable"
    p = run([LAUNCH / script, "-h"], timeout=60)
    assert "Usage" in p.stdout
    if script != "rank_exec.sh":
        p = run([LAUNCH / script, "--no-such-flag"], timeout=60, check=False)
        assert p.returncode == 2 and "unknown option '--no-such-flag'" in p.stdout and "Usage" in p.stdout
    p = run([LAUNCH / "slurm" / "leap.sbatch", "-h"], timeout=60)
    assert "scontrol requeue" in p.stdout and "#SBATCH" not in p.stdout


def test_dry_run_commands():
    py = sys.executable
    p = run([LAUNCH / "local.sh", "--dry-run", "-n", 3, "-p", 12345], timeout=60)
    assert (f"-m deepspeed.launcher.runner --master_port 12345 --num_gpus 3 --no_python "
            f"{LAUNCH}/rank_exec.sh {py} -u -m leap_ds.train") in p.stdout
    p = run([LAUNCH / "multinode.sh", "--dry-run", "-H", LAUNCH / "hostfile.example", "--",
             "--deepspeed_config", "x.json"], timeout=60)
    assert f"--hostfile {LAUNCH}/hostfile.example --launcher pdsh --no_python" in p.stdout
    assert p.stdout.rstrip().endswith("-m leap_ds.train --deepspeed_config x.json")
    p = run([LAUNCH / "multinode.sh", "--dry-run", "--no-ssh", "--nnodes", 3, "--node-rank", 2,
             "--master-addr", "10.0.0.1", "-n", 2, "--", "tests/workers/train_tiny.py", "--steps", 1], timeout=60)
    assert "--num_nodes 3 --no_ssh --node_rank 2 --master_addr 10.0.0.1 --num_gpus 2" in p.stdout
    assert p.stdout.rstrip().endswith("-u tests/workers/train_tiny.py --steps 1")
    p = run([LAUNCH / "multinode.sh", "--no-ssh", "--nnodes", 2, "--master-addr", "a"], timeout=60, check=False)
    assert p.returncode == 2 and "--node-rank" in p.stdout
    if shutil.which("mpirun"):
        p = run([LAUNCH / "mpirun.sh", "--dry-run", "-n", 4, "--rank-env", "--master-port", 23456, "--",
                 "-m", "leap_ds.train"], timeout=60)
        assert "\nmpirun -np 4 --bind-to none" in p.stdout
        assert "-x MASTER_PORT" in p.stdout and "-x LEAP_RANK_ENV" in p.stdout


def test_rank_exec_names_failed_rank(tmp_path):
    """rank_exec.sh moves --local_rank after the script and names a rank killed by a signal."""
    script = tmp_path / "prog.py"
    script.write_text("import os, sys\nprint(sys.argv[1:])\n"
                      "if os.environ.get('DIE'): os.kill(os.getpid(), 9)\n")
    p = run([LAUNCH / "rank_exec.sh", "--local_rank=1", sys.executable, "-u", script, "a"], timeout=60)
    assert "['--local_rank=1', 'a']" in p.stdout
    p = run([LAUNCH / "rank_exec.sh", sys.executable, script], timeout=60, check=False,
            env=launch_env(DIE=1, RANK=5, LOCAL_RANK=1))
    assert p.returncode == 137
    assert named(p.stdout, 5), p.stdout


def test_rank_exec_gpu_device_is_local_rank(tmp_path):
    """GPU: DeepSpeed uses device LOCAL_RANK among CUDA_VISIBLE_DEVICES. A task shown one GPU
    (srun --gpus-per-task=1) gets LOCAL_RANK=0; one shown all the node's GPUs keeps its own."""
    script = tmp_path / "prog.py"
    script.write_text("import os\nprint('LOCAL_RANK', os.environ['LOCAL_RANK'], os.environ.get('LEAP_NODE_LOCAL_RANK'))\n")

    def local_rank(**env):
        p = run([LAUNCH / "rank_exec.sh", sys.executable, script], timeout=60, check=False,
                env=launch_env(LEAP_RANK_ENV="slurm", SLURM_PROCID=3, SLURM_NTASKS=4, **env))
        return p.returncode, p.stdout
    assert local_rank(LEAP_DEVICE="gpu", SLURM_LOCALID=1, CUDA_VISIBLE_DEVICES="5") == (0, "LOCAL_RANK 0 1\n")
    assert local_rank(LEAP_DEVICE="gpu", SLURM_LOCALID=1, CUDA_VISIBLE_DEVICES="0,1") == (0, "LOCAL_RANK 1 None\n")
    rc, text = local_rank(LEAP_DEVICE="gpu", SLURM_LOCALID=2, CUDA_VISIBLE_DEVICES="0,1")
    assert rc == 2 and "local rank 2 but this task sees only 2 GPUs" in text and "--gpus-per-task=1" in text
    assert local_rank(LEAP_DEVICE="cpu", SLURM_LOCALID=1, CUDA_VISIBLE_DEVICES="") == (0, "LOCAL_RANK 1 None\n")


def test_stop_on_signal_in_one_process():
    """leap_ds/apps/preemption.py without a process group: the flag, the restored handlers,
    a late signal raised again, and the status the shell scripts read."""
    from leap_ds.apps import preemption
    caught = []

    def handler(*_):
        caught.append("USR1")
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with preemption.StopOnSignal() as stop:
            assert not stop.requested()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.requested() and stop.received == signal.SIGUSR1
            assert caught == []  # recorded, not delivered to the previous handler
            with pytest.raises(SystemExit) as e:
                stop.exit("step 7", checkpoint_saved=True, log=caught.append)
            assert e.value.code == preemption.EXIT_STATUS == 75
            assert caught == ["stop requested (SIGUSR1) at step 7: checkpoint saved; exiting with status 75"]
            # Leaving: a launcher's SIGTERM to the other ranks must not kill a clean stop.
            assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        # Left normally with a request nobody acted on: the previous handler gets the signal.
        assert signal.getsignal(signal.SIGUSR1) is handler and caught[-1] == "USR1"
        caught.clear()
        with preemption.StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert caught == ["USR1"]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    p = run([sys.executable, REPO / "leap_ds" / "apps" / "preemption.py", "--exit-status"], timeout=60)
    assert p.stdout.strip() == str(preemption.EXIT_STATUS)


def ephemeral_ports():
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except OSError:
        lo, hi = 32768, 60999
    return lo, hi


def test_sbatch_dry_run_settings(slurm, tmp_path):
    """leap.sbatch with LEAP_DRY_RUN=1 in a job's environment: srun gets --cpus-per-task,
    MASTER_PORT stays out of the ephemeral range, LEAP_IFNAME reaches NCCL and gloo."""
    lo, hi = ephemeral_ports()

    def dry(jobid, **env):
        e = dict(slurm.env, SLURM_JOB_ID=jobid, SLURM_JOB_NODELIST="localhost", SLURM_NTASKS=2,
                 SLURM_CPUS_PER_TASK=3, LEAP_WORKDIR=REPO, LEAP_DRY_RUN=1, LEAP_DEVICE="auto",
                 LEAP_LOG_DIR=tmp_path / "logs")
        e.update(env)
        p = subprocess.run([str(LAUNCH / "slurm" / "leap.sbatch"), "-m", "leap_ds.train", "--max-steps", "1"],
                           cwd=REPO, env={k: str(v) for k, v in e.items()}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        settings = dict(re.findall(r"(\w+)=(\S*)", p.stdout.split("\n")[0]))
        return p.returncode, settings, p.stdout
    old_formula_hits = 0
    for jobid in (1, 7, 12999, 15000, 40321):
        rc, settings, text = dry(jobid)
        assert rc == 0, text
        port = int(settings["MASTER_PORT"])
        assert 1024 <= port and not lo <= port <= hi, (jobid, port, (lo, hi))
        old_formula_hits += lo <= 20000 + jobid % 20000 <= hi
        assert settings["LEAP_DEVICE"] == "cpu" and settings["OMP_NUM_THREADS"] == "3"
        srun = text.split("\n")[1]
        assert srun.startswith("srun --kill-on-bad-exit=1 --cpus-per-task=3 "), srun
        assert srun.rstrip().endswith("-u -m leap_ds.train --max-steps 1 --resume auto"), srun
        assert settings["NCCL_SOCKET_IFNAME"] == settings["GLOO_SOCKET_IFNAME"] == ""
    assert old_formula_hits > 0  # the ids above do hit the range with 20000 + id % 20000
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing
    rc, settings, text = dry(15000, MASTER_PORT=23456, LEAP_IFNAME="lo", SLURM_CPUS_PER_TASK="")
    assert rc == 0 and settings["MASTER_PORT"] == "23456", text
    assert settings["NCCL_SOCKET_IFNAME"] == settings["GLOO_SOCKET_IFNAME"] == "lo"
    assert " --cpus-per-task=1 " in text.split("\n")[1]
    rc, _, text = dry(15000, LEAP_IFNAME="nosuchif0")
    assert rc == 2 and "LEAP_IFNAME=nosuchif0: no such network interface" in text, text


# --------------------------------------------------------------------------------------
# 1. one machine
# --------------------------------------------------------------------------------------
def test_local_two_ranks_match_one_process(baseline, tmp_path):
    logs = tmp_path / "logs"
    p = run([LAUNCH / "local.sh", "-n", 2, "--log-dir", logs, "--", *PROGRAM.argv(tmp_path, PROGRAM.steps)])
    print(f"local.sh 2 ranks: {p.seconds:.1f} s")
    assert_same(PROGRAM.result(tmp_path), baseline, "local.sh")
    assert len(list(logs.glob("*_rank*.log"))) == 2, "expected one log per rank"


def test_mpirun_two_ranks_match_one_process(baseline, private_host, tmp_path):
    need_mpi()
    # Ranks find each other through mpi4py (deepspeed.init_distributed auto_mpi_discovery),
    # inside a namespace of our own so that the fixed port 29500 is free.
    p = run(["ip", "netns", "exec", private_host, LAUNCH / "mpirun.sh", "-n", 2, "--",
             *PROGRAM.argv(tmp_path, PROGRAM.steps)])
    print(f"mpirun.sh 2 ranks: {p.seconds:.1f} s")
    assert "mpi4py discovery" in p.stdout
    assert_same(PROGRAM.result(tmp_path), baseline, "mpirun.sh")


# --------------------------------------------------------------------------------------
# 2. two hosts (network namespaces), multinode.sh --no-ssh
# --------------------------------------------------------------------------------------
def start_two_hosts(hosts, argv, port, log_dir):
    """multinode.sh --no-ssh once in each namespace; gloo bound to the veth (--ifname)."""
    procs = []
    for i, h in enumerate(hosts):
        cmd = ["ip", "netns", "exec", h["ns"], LAUNCH / "multinode.sh", "--no-ssh", "--nnodes", 2,
               "--node-rank", i, "--master-addr", hosts[0]["addr"], "--master-port", port,
               "--ifname", h["if"], "--", *argv]
        log = open(log_dir / f"node{i}.log", "w+")
        procs.append(subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=launch_env(),
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
        procs[-1].log = log
    return procs


def node_output(p):
    p.log.flush()
    p.log.seek(0)
    return p.log.read()


def test_two_hosts_no_ssh_match_one_process(baseline, two_hosts, tmp_path):
    t0 = time.time()
    procs = start_two_hosts(two_hosts, PROGRAM.argv(tmp_path, PROGRAM.steps), free_port(), tmp_path)
    try:
        for p in procs:
            p.wait(timeout=RUN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [node_output(p) for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"node {i} exited {p.returncode}:\n{outs[i][-6000:]}"
    print(f"multinode.sh --no-ssh, 2 namespaces: {time.time() - t0:.1f} s")
    assert "node 1 of 2 (no ssh), master 10.231.0.1" in outs[1]
    assert_same(PROGRAM.result(tmp_path), baseline, "two hosts")


# --------------------------------------------------------------------------------------
# 3. Slurm
# --------------------------------------------------------------------------------------
def test_slurm_tiny_job(baseline, slurm, tmp_path):
    t0 = time.time()
    logs = tmp_path / "logs"
    jobid = slurm.sbatch(tmp_path / "batch.out", PROGRAM.argv(tmp_path, PROGRAM.steps),
                         LEAP_RESUME_ARGS=PROGRAM.resume_args, LEAP_LOG_DIR=logs)
    job = slurm.wait_state(jobid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                           RUN_TIMEOUT_S)
    batch = (tmp_path / "batch.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{batch}"
    print(f"sbatch 1 node x 2 tasks: {time.time() - t0:.1f} s")
    assert "2 rank(s) (cpu), master localhost:" in batch and "finished OK" in batch, batch
    rank_logs = sorted((logs / "attempt-0").glob("rank-*.log"))
    assert [f.name for f in rank_logs] == ["rank-0.log", "rank-1.log"]
    assert all(f.stat().st_size > 0 for f in rank_logs)
    assert_same(PROGRAM.result(tmp_path), baseline, "slurm")


def test_slurm_stop_checkpoints_current_step_then_requeues(slurm, tmp_path):
    """A stop request makes every rank checkpoint at its CURRENT step before the job is
    requeued, and the next attempt resumes exactly there: no step is lost or trained twice.

    The program's checkpoint interval is never reached, so only the stop protocol
    (leap_ds/apps/preemption.py) can explain a checkpoint. SIGUSR1 goes to the batch script
    (what --signal=B:USR1@120 sends before the time limit, and preemption with a grace time):
    it forwards SIGUSR1 to the ranks, which agree on the step through their all-reduce, save it
    and exit with status 75, and the script requeues only once they have exited.
    """
    t0 = time.time()
    out, logs = tmp_path / "run", tmp_path / "logs"
    jobid = slurm.sbatch(tmp_path / "batch.out", RESUMABLE.argv(out, RESUMABLE.long_steps, save="never", slow=True),
                         LEAP_LOG_DIR=logs)
    rank0_logs = [logs / f"attempt-{a}" / "rank-0.log" for a in range(2)]
    # Signal only inside the training loop, a few steps in.
    wait_for(lambda: len(RESUMABLE.steps_done(out, rank0_logs)) >= 4, RUN_TIMEOUT_S, "step 4 (attempt 0)")
    assert slurm.job(jobid)["JobState"] == "RUNNING"
    slurm.cmd("scancel", "--batch", "--signal=USR1", jobid)
    job = slurm.wait_state(jobid, {"PENDING"}, 120)
    assert int(job["Restarts"]) == 1, job
    done = RESUMABLE.steps_done(out, rank0_logs)
    saved = RESUMABLE.latest_step(out)
    # The checkpoint is at the last step trained, and only the stop request made it.
    assert saved == done[-1] and saved >= 4, f"checkpoint {saved}, steps {done[-3:]}"
    slurm.start_now(jobid)
    job = slurm.wait_state(jobid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                           RUN_TIMEOUT_S)
    batch = (tmp_path / "batch.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", f"{job}\n{batch}\n{slurm.log_tail(jobid)}"
    print(f"sbatch with one requeue: {time.time() - t0:.1f} s; checkpoint at step {saved}")

    # Every step trained exactly once over the two attempts, and attempt 1 resumed at the checkpoint.
    assert RESUMABLE.steps_done(out, rank0_logs) == list(range(1, RESUMABLE.long_steps + 1))
    assert RESUMABLE.final_step(out) == RESUMABLE.long_steps
    m = RESUMABLE.resume_log.search(rank0_logs[1].read_text())
    assert m and int(m.group(1)) == saved, rank0_logs[1].read_text()[-3000:]
    # The batch script forwarded the signal and requeued after the ranks exited, and the
    # checkpoint was written before that.
    text = (logs / "attempt-0" / "rank-0.log").read_text()
    assert "stop requested (SIGUSR1)" in text, text[-3000:]
    m = re.search(r"SIGUSR1 \(job state RUNNING\) at \S+: asking the ranks to checkpoint.*?\n"
                  r"(?:.*\n)*?\[leap.sbatch\] the ranks checkpointed at their current step and exited \(status 75\)\n"
                  r"\[leap.sbatch\] attempt 0 ends at (\S+): scontrol requeue", batch)
    assert m, batch
    requeue_time = datetime.datetime.fromisoformat(m.group(1)).timestamp()
    ckpt = out / "checkpoints" / f"step{saved}"
    assert max(f.stat().st_mtime for f in ckpt.rglob("*")) <= requeue_time + 1, "checkpoint written after the requeue"


def test_slurm_term_requeues_but_scancel_cancels(slurm, tmp_path):
    """SIGTERM to a RUNNING job (as preemption with a grace time sends) requeues it; a
    user's plain `scancel` must end it for good, not requeue it."""
    out = tmp_path / "run"
    batch_out = tmp_path / "batch.out"
    jobid = slurm.sbatch(batch_out, RESUMABLE.argv(out, KILL_STEPS, save=True, slow=True),
                         LEAP_LOG_DIR=tmp_path / "logs")

    def ranks_running(attempt):
        text = batch_out.read_text() if batch_out.exists() else ""
        return f"attempt {attempt} on" in text and len(rank_pids(str(out))) == 2
    wait_for(lambda: ranks_running(0), RUN_TIMEOUT_S, "attempt 0's ranks")
    slurm.cmd("scancel", "--batch", "--signal=TERM", jobid)
    job = slurm.wait_state(jobid, {"PENDING"}, 120)
    assert job["Restarts"] == "1", job
    slurm.start_now(jobid)
    wait_for(lambda: ranks_running(1), RUN_TIMEOUT_S, "attempt 1's ranks",
             outputs=(lambda: slurm.log_tail(jobid),))
    slurm.cmd("scancel", jobid)
    slurm.wait_state(jobid, {"CANCELLED"}, 120)
    wait_for(lambda: not rank_pids(str(out)), 120, "the ranks to exit")
    time.sleep(3)
    job = slurm.job(jobid)
    text = batch_out.read_text()
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "1", f"{job}\n{text}"
    assert "SIGTERM (job state RUNNING)" in text and "not requeueing" in text, text


# --------------------------------------------------------------------------------------
# 4. a rank dies
# --------------------------------------------------------------------------------------
def kill_rank_and_wait(launchers, out, rank, t_start, outputs):
    """Wait for training (a checkpoint), SIGKILL rank `rank`, and time how long until every
    launcher and every rank of this run has exited."""
    wait_for(lambda: RESUMABLE.latest_step(out), RUN_TIMEOUT_S, "the first checkpoint", procs=launchers,
             outputs=outputs)
    marker = str(out)
    pids = wait_for(lambda: rank_pids(marker, rank), 60, f"the pid of rank {rank}")
    assert len(rank_pids(marker)) == 2, rank_pids(marker)
    victim = next(iter(pids))
    os.kill(victim, signal.SIGKILL)
    t_kill = time.time()
    try:
        for p in launchers:
            p.wait(timeout=max(1, KILL_DEADLINE_S - (time.time() - t_kill)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"launchers still running {KILL_DEADLINE_S} s after SIGKILL of rank {rank}:\n"
                    + "\n".join(o()[-3000:] for o in outputs))
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    wait_for(lambda: not rank_pids(marker), max(1, KILL_DEADLINE_S - (time.time() - t_kill)),
             "the other ranks to exit")
    elapsed = time.time() - t_kill
    print(f"all exited {elapsed:.1f} s after SIGKILL of rank {rank} (run started {t_kill - t_start:.0f} s before)")
    assert elapsed < KILL_DEADLINE_S
    return [o() for o in outputs]


def named(text, rank):
    return re.search(rf"rank {rank} \(local rank \d+ on \S+, pid \d+\) FAILED: killed by signal 9", text)


@pytest.mark.parametrize("launcher", ["local", "mpirun"])
def test_killed_rank_stops_job(launcher, tmp_path):
    if launcher == "mpirun":
        need_mpi()
        # --rank-env: ranks from OMPI_COMM_WORLD_*, rendezvous on a free port (no netns needed)
        cmd = [LAUNCH / "mpirun.sh", "-n", 2, "--rank-env"]
        rank = 1
    else:
        cmd = [LAUNCH / "local.sh", "-n", 2]
        rank = 0  # rank 0 hosts the rendezvous store: the harder case
    out = tmp_path / "run"
    log = open(tmp_path / "launcher.log", "w+")
    t0 = time.time()
    p = subprocess.Popen([str(c) for c in cmd + ["--", *RESUMABLE.argv(out, KILL_STEPS, save=True, slow=True)]],
                         cwd=REPO, env=launch_env(), stdout=log, stderr=subprocess.STDOUT, text=True)

    def output():
        log.flush()
        log.seek(0)
        return log.read()
    text, = kill_rank_and_wait([p], out, rank, t0, [output])
    assert p.returncode != 0, text[-4000:]
    assert named(text, rank), f"no line naming rank {rank}:\n{text[-4000:]}"
    if launcher == "mpirun":
        assert "mpirun detected that one or more processes exited with non-zero status" in text


def test_killed_rank_stops_two_hosts(two_hosts, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    procs = start_two_hosts(two_hosts, RESUMABLE.argv(out, KILL_STEPS, save=True, slow=True),
                            free_port(), tmp_path)
    texts = kill_rank_and_wait(procs, out, 1, t0, [lambda p=p: node_output(p) for p in procs])
    for i, p in enumerate(procs):
        assert p.returncode != 0, f"node {i} exited 0:\n{texts[i][-4000:]}"
    assert named(texts[1], 1), texts[1][-4000:]
    # Node 0 learns it from gloo: its rank fails on the closed connection.
    assert re.search(r"rank 0 .* FAILED", texts[0]), texts[0][-4000:]


def test_killed_rank_fails_slurm_job(slurm, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    t0 = time.time()
    jobid = slurm.sbatch(tmp_path / "batch.out", RESUMABLE.argv(out, KILL_STEPS, save=True, slow=True),
                         LEAP_LOG_DIR=logs)
    wait_for(lambda: RESUMABLE.latest_step(out), RUN_TIMEOUT_S, "the first checkpoint")
    pids = wait_for(lambda: rank_pids(str(out), 1), 60, "the pid of rank 1")
    os.kill(next(iter(pids)), signal.SIGKILL)
    t_kill = time.time()
    job = slurm.wait_state(jobid, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"},
                           KILL_DEADLINE_S)
    wait_for(lambda: not rank_pids(str(out)), max(1, KILL_DEADLINE_S - (time.time() - t_kill)),
             "the other rank to exit")
    print(f"slurm job ended {time.time() - t_kill:.1f} s after SIGKILL of rank 1 "
          f"(run started {t_kill - t0:.0f} s before)")
    batch = (tmp_path / "batch.out").read_text()
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0", f"{job}\n{batch}"
    assert "job FAILED" in batch, batch
    assert named(batch, 1), batch  # the failing rank's log tail is copied into the batch output
    assert named((logs / "attempt-0" / "rank-1.log").read_text(), 1)
