"""scripts/gpu_check.sh: on a machine without a CUDA GPU it says so, exits cleanly and writes nothing; it
refuses a call without its output folder."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run_check(*args: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this is the no-GPU path on every machine
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_without_a_gpu_it_says_so_and_exits_cleanly_writing_nothing(tmp_path):
    out = run_check(str(tmp_path / "check"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu_check: no CUDA GPU here (torch.cuda.is_available() is false); nothing checked"
    assert not (tmp_path / "check").exists()


def test_it_needs_an_output_folder():
    out = run_check()
    assert out.returncode == 2 and "usage: scripts/gpu_check.sh OUT_DIR" in out.stderr


def test_a_python_without_the_project_is_refused(tmp_path):
    env = {**os.environ, "PYTHON": "/bin/false", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "check")], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "cannot import sift_cli and torch" in out.stderr
    assert not (tmp_path / "check").exists()
