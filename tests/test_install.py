"""The console entry points as a user runs them, from this checkout and from a fresh,
non-editable install: exit status 0 on success and 2 on a usage error, nothing but
messages on stderr (`leap-ds train` once exited 1 printing its metrics dict), and the
installed package finds its shipped configs without the source tree."""
import filecmp
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import ROOT, dist_env

# every way to start the main job from a checkout (the console script runs exactly this -c line)
CHECKOUT_ENTRY_POINTS = {
    "leap-ds train": [sys.executable, "-c", "import sys; from leap_ds.apps.cli import main; sys.exit(main())",
                      "train"],
    "python -m leap_ds train": [sys.executable, "-m", "leap_ds", "train"],
    "python -m leap_ds.train": [sys.executable, "-m", "leap_ds.train"],
}
DICT_ON_STDERR = re.compile(r"^\s*\{|\{'", re.M)     # what `sys.exit(metrics)` printed
PACKAGE_FILES = ["pyproject.toml", "README.md", "leap_ds", "ds_configs"]   # what `pip install .` reads


def dry_run_modules(stdout: str) -> list[str]:
    """The dry run's module lines (indented under their group)."""
    return [line.split()[0] for line in stdout.splitlines() if line.startswith("    ")]


@pytest.fixture(scope="module")
def expected_modules():
    """The default config's pruned modules, from the source tree, in this process."""
    from leap_ds.apps.train import run_job
    rep = run_job(["--dry-run"])
    return [m for g in rep["groups"] for m in g["modules"]]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` (not editable) of a copy of this checkout into a fresh virtualenv that
    reuses this interpreter's dependencies through a .pth line (nothing downloaded)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), src / name,
             **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "reused_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: never touch the leap_ds this interpreter has (an editable install)
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-build-isolation", "--ignore-installed", src], check=True, capture_output=True, cwd=tmp)
    shutil.rmtree(src)      # the installed copy must not need the source tree
    return venv, site


def clean_env():
    env = {k: v for k, v in dist_env().items() if k != "PYTHONPATH"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def test_every_entry_point_dry_runs_with_exit_0(installed, expected_modules, tmp_path):
    venv, site = installed
    runs = {name: ([*cmd, "--dry-run"], ROOT, dist_env()) for name, cmd in CHECKOUT_ENTRY_POINTS.items()}
    # the installed console script, run from outside any source tree, PYTHONPATH unset
    runs["installed leap-ds train"] = ([venv / "bin" / "leap-ds", "train", "--dry-run"], tmp_path, clean_env())
    procs = {name: subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE) for name, (cmd, cwd, env) in runs.items()}
    for name, proc in procs.items():      # started together: the cores share the imports
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{err[-3000:]}"
        assert not DICT_ON_STDERR.search(err), f"{name} printed a dict on stderr:\n{err[-3000:]}"
        assert dry_run_modules(out) == expected_modules, name
    # the install carries the repository's top-level ds_configs/ as they are
    shipped = os.path.join(site, "leap_ds", "ds_configs")
    names = sorted(n for n in os.listdir(os.path.join(ROOT, "ds_configs")) if n.endswith(".json"))
    assert sorted(os.listdir(shipped)) == names
    assert filecmp.cmpfiles(os.path.join(ROOT, "ds_configs"), shipped, names, shallow=False)[0] == names


def test_installed_config_names_and_usage_error(installed, tmp_path):
    venv, _ = installed
    proc = subprocess.run([venv / "bin" / "leap-ds", "train", "--dry-run", "--deepspeed_config", "no_such"],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "neither a file nor a shipped config" in proc.stderr and "head.json" in proc.stderr


def test_config_by_name_resolves_to_the_shipped_file(tmp_path, monkeypatch):
    from leap_ds.apps.train import UsageError, resolve_config_path, shipped_config_names
    monkeypatch.chdir(tmp_path)                   # no ./head or ./head.json here
    head = os.path.join(ROOT, "ds_configs", "head.json")
    assert os.path.samefile(resolve_config_path("head"), head)
    assert os.path.samefile(resolve_config_path("head.json"), head)
    (tmp_path / "head.json").write_text("{}")      # a real path wins over a shipped name
    assert os.path.samefile(resolve_config_path("head.json"), tmp_path / "head.json")
    assert shipped_config_names() == sorted(p for p in os.listdir(os.path.join(ROOT, "ds_configs"))
                                            if p.endswith(".json"))
    with pytest.raises(UsageError, match="zero3.json"):
        resolve_config_path("nothing_like_it")


def test_usage_error_exits_2_from_every_entry_point():
    procs = {name: subprocess.Popen([*cmd, "--max-steps", "0", "--dry-run"], cwd=ROOT, env=dist_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, cmd in CHECKOUT_ENTRY_POINTS.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and "--max-steps must be positive" in err, f"{name}: {err[-2000:]}"


@pytest.mark.parametrize("argv,message", [([], "usage: leap-ds train"), (["nonsense"], "unknown command"),
                                          (["train", "--no-such-flag"], "unrecognized arguments")])
def test_cli_usage_errors_return_2(argv, message, capsys):
    from leap_ds.apps.cli import main
    try:
        status = main(argv)
    except SystemExit as e:               # argparse exits by itself on an unknown flag
        status = e.code
    assert status == 2 and message in capsys.readouterr().err
