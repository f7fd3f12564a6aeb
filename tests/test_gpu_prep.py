"""The wheels that benchmarks/gpu_prepare.sh puts in .whl/ for benchmarks/gpu_check.sh (issue 9).

The lent GPU machine runs CPython 3.12 on x86-64 with no package index. These tests check that
.whl/ holds one version of each package, that pip accepts every wheel for that interpreter and
platform (gpu_check.sh's own install command, as a dry run), and that every requirement of
leap_ds and of every carried wheel is met by a carried wheel or by a package the GPU image
already holds (GPU_IMAGE below). Skipped when .whl/ is absent: run `bash benchmarks/gpu_prepare.sh`.
"""
import email.parser
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(ROOT, ".whl")
# what the device tool may carry in all (tree included) is 64 MiB; the wheels keep well under
MAX_WHEELS_MIB = 16

# The GPU image ('cuda'), as the device tool's notes list it (read there on 2026-11-17): the
# packages it holds, and the versions a session saw. Python 3.12.3 on Ubuntu (glibc 2.39).
GPU_IMAGE_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
                      "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2"}
GPU_IMAGE = {canonicalize_name(n) for n in """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
    charset-normalizer click cloudpickle cmake contourpy cycler cython einops filelock fonttools
    frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver
    markupsafe matplotlib mpi4py mpmath msgpack multidict networkx ninja numpy nvidia-ml-py packaging
    pandas pillow pip pluggy propcache protobuf psutil pyarrow py-cpuinfo pygments pyparsing
    python-dateutil pyyaml regex requests rich safetensors scipy setuptools six sympy tokenizers torch
    tqdm transformers triton typing-extensions urllib3 xxhash yarl zipp
""".split()}
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
MARKERS = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "implementation_name": "cpython", "platform_python_implementation": "CPython",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "os_name": "posix", "extra": ""}

pytestmark = pytest.mark.skipif(not os.path.isdir(WHEELS) or not any(f.endswith(".whl") for f in os.listdir(WHEELS)),
                                reason=".whl/ is absent: run `bash benchmarks/gpu_prepare.sh` to fetch the wheels")


def wheel_files():
    return sorted(os.path.join(WHEELS, f) for f in os.listdir(WHEELS) if f.endswith(".whl"))


def carried():
    """{canonical name: (version, path)}."""
    out = {}
    for path in wheel_files():
        name, version, _, _ = parse_wheel_filename(os.path.basename(path))
        assert name not in out, f"two wheels of {name}: {out[name][1]} and {path} (pip would refuse both)"
        out[name] = (version, path)
    return out


def requirements(path):
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    reqs = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(MARKERS)]


def unmet(req: Requirement, have: dict) -> str | None:
    """Why req is not met on the GPU machine with the carried wheels, or None."""
    name = canonicalize_name(req.name)
    if name in have:
        version = have[name][0]
        return None if req.specifier.contains(version, prereleases=True) else f"carried {name} {version}"
    if name in GPU_IMAGE:
        version = GPU_IMAGE_VERSIONS.get(name)
        if version is None or req.specifier.contains(version, prereleases=True):
            return None
        return f"the GPU image's {name} {version}"
    return "neither carried nor on the GPU image"


def test_one_wheel_per_package_and_small_enough():
    have = carried()
    size = sum(os.path.getsize(p) for _, p in have.values()) / 2 ** 20
    assert size < MAX_WHEELS_MIB, f".whl/ holds {size:.1f} MiB; the device tool carries 64 MiB in all"
    # what the image lacks, without which gpu_check.sh cannot import leap_ds or run the main job
    for needed in ("deepspeed", "pydantic", "pydantic-core", "datasets", "hjson"):
        assert needed in have, f"{needed} is not in .whl/ and not on the GPU image"


def test_every_wheel_installs_on_cpython_312_x86_64():
    supported = set(cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=PLATFORMS)) | \
        set(compatible_tags((3, 12), "cp312", platforms=PLATFORMS))
    for name, (version, path) in carried().items():
        tags = parse_wheel_filename(os.path.basename(path))[3]
        assert tags & supported, f"{os.path.basename(path)} does not install on CPython 3.12 / x86-64 Linux"
    # gpu_check.sh's install command, for that interpreter and platform, as a dry run
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--no-index", "--no-deps", "--no-compile",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
           *[a for p in PLATFORMS for a in ("--platform", p)], "--target", os.path.join(ROOT, "build", "whl-check"),
           *wheel_files()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_every_requirement_is_carried_or_on_the_gpu_image():
    have = carried()
    problems = []
    for name, (_, path) in have.items():
        for req in requirements(path):
            why = unmet(req, have)
            if why:
                problems.append(f"{name} needs {req}: {why}")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        for spec in tomllib.load(f)["project"]["dependencies"]:
            req = Requirement(spec)
            why = unmet(req, have)
            if why:
                problems.append(f"leap_ds needs {req}: {why}")
    assert not problems, "\n".join(problems)
