"""The README's CPU-runnable training and certification commands run as written (issue 14.4), with tiny settings
appended, in order, in one fresh directory: each stage finds the previous one's checkpoint where the README says.
Commands that need data folders, GPUs, a cluster or an account (``/data/...``, ``hardware=gpu``, ``sbatch``,
``logger=wandb``) are left to the tests of those parts; the quickstart is ``test_quickstart.py``."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_ON_A_CPU = ("/data/", "hardware=", "hydra/launcher", "logger=wandb", "...", "<", "experiment=quickstart")
TINY = {
    "train.py": ["data.subset_first=64", "data.batch_size=32", "trainer.max_epochs=1"],
    "certify.py": ["max=3", "n0=10", "n=50", "batch=60"],
}


def readme_commands() -> list[list[str]]:
    """``python train.py ...`` / ``python certify.py ...`` lines of the README's bash blocks, continuation lines
    joined, comments dropped, skipping those in NOT_ON_A_CPU."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["python"] and argv[1:2] in (["train.py"], ["certify.py"]):
                if not any(marker in line for marker in NOT_ON_A_CPU):
                    commands.append(argv)
    return commands


def test_readme_lists_the_cpu_commands():
    scripts = [argv[1] for argv in readme_commands()]
    assert scripts == ["train.py", "train.py", "train.py", "certify.py", "train.py", "certify.py"], scripts


@pytest.mark.slow  # ~2-3 min on a loaded 2-core machine: 13 tiny training jobs and 4 certifications
def test_readme_cpu_commands_run_as_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(OMP_NUM_THREADS="1")
    for argv in readme_commands():
        script = argv[1]
        cmd = [sys.executable, str(REPO / script), *argv[2:], *TINY[script]]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        output = proc.stdout + proc.stderr
        if script != "train.py":
            continue
        # Quiet (issue 14.6): no Lightning chatter, no model table, no line that fills a screen.
        for noise in ("💡 Tip", "GPU available", "LeafSpec", "Total params", "srun"):
            assert noise not in output, f"{shlex.join(argv)}: {noise!r} in the output\n{output[-3000:]}"
        long = [line for line in output.splitlines() if len(line) > 400]  # e.g. a list of two dozen checkpoint keys
        assert not long, f"{shlex.join(argv)}: {long}"
        # A progress line per epoch in a log without a terminal (issue 14.5).
        assert re.search(r"epoch 1/1 done \| step \d+/\d+ \| loss [\d.]+ \| [\d.]+ images/s", output), output
