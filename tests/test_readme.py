"""The README's CPU-runnable training and certification commands run as written (issue 14.4), with tiny settings
appended, in order, in one fresh directory: each stage finds the previous one's checkpoint where the README says.
Commands that need data folders, GPUs, a cluster or an account (``/data/...``, ``hardware=gpu``, ``sbatch``,
``logger=wandb``) are left to the tests of those parts; the quickstart is ``test_quickstart.py``.

Fast checks of the documentation as a whole (issue 17.4): the README stays short, every relative link of the
README and docs/*.md reaches a file (and heading), and every training / certification command there, the cluster
ones included, composes with Hydra."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONF, REPO
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dmae_lightning.jobs.compose import compose

NOT_ON_A_CPU = ("/data/", "hardware=", "hydra/launcher", "logger=wandb", "...", "<", "experiment=quickstart")
TINY = {
    "train.py": ["data.subset_first=64", "data.batch_size=32", "trainer.max_epochs=1"],
    "certify.py": ["max=3", "n0=10", "n=50", "batch_size=60"],
}


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 12_000
# Lines whose overrides are placeholders for the reader (``<team>``, ``...``) or shell variables (``sigma_$s``).
PLACEHOLDER = re.compile(r"<\w[^>]*>|\.\.\.|\$[A-Za-z_]")
SBATCH_SCRIPTS = {"train.sbatch": "train.py", "certify.sbatch": "certify.py"}


def bash_lines(path: Path) -> list[str]:
    """The lines of a Markdown file's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def readme_commands() -> list[list[str]]:
    """``python train.py ...`` / ``python certify.py ...`` lines of the README's bash blocks, comments dropped,
    skipping those in NOT_ON_A_CPU."""
    commands = []
    for line in bash_lines(REPO / "README.md"):
        argv = shlex.split(line, comments=True)
        if argv[:1] == ["python"] and argv[1:2] in (["train.py"], ["certify.py"]):
            if not any(marker in line for marker in NOT_ON_A_CPU):
                commands.append(argv)
    return commands


def documented_jobs() -> list[tuple[str, str, list[str]]]:
    """(file, script, overrides) of every training / certification command in the README and docs/*.md:
    ``python train.py|certify.py ...`` and ``sbatch ... scripts/slurm/{train,certify}.sbatch ...`` (whose
    template adds ``hardware=slurm``), skipping lines with a PLACEHOLDER."""
    jobs = []
    for path in DOCS:
        for line in bash_lines(path):
            argv = shlex.split(line, comments=True)
            if PLACEHOLDER.search(" ".join(argv)):
                continue
            if argv[:1] == ["python"] and argv[1:2] in (["train.py"], ["certify.py"]):
                jobs.append((path.name, argv[1], [a for a in argv[2:] if a != "-m"]))
            elif argv[:1] == ["sbatch"]:
                at = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
                jobs.append(
                    (path.name, SBATCH_SCRIPTS[Path(argv[at]).name], ["hardware=slurm", *argv[at + 1 :]])
                )
    return jobs


def test_readme_lists_the_cpu_commands():
    scripts = [argv[1] for argv in readme_commands()]
    assert scripts == [
        "train.py",
        "train.py",
        "train.py",
        "train.py",
        "certify.py",
        "certify.py",
        "train.py",
        "certify.py",
    ], scripts


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
        long = [
            line for line in output.splitlines() if len(line) > 400
        ]  # e.g. a list of two dozen checkpoint keys
        assert not long, f"{shlex.join(argv)}: {long}"
        # A progress line per epoch in a log without a terminal (issue 14.5).
        assert re.search(r"epoch 1/1 done \| step \d+/\d+ \| loss [\d.]+ \| [\d.]+ images/s", output), output


def test_readme_is_short():
    size = (REPO / "README.md").stat().st_size
    assert size < README_MAX_BYTES, (
        f"README.md has {size} bytes; move details to docs/ (limit {README_MAX_BYTES})"
    )


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_github_anchor():
    assert github_anchor("Sweeps on SLURM (submitit)") == "sweeps-on-slurm-submitit"
    assert github_anchor("Procedures (`procedure=`)") == "procedures-procedure"
    assert (
        github_anchor("One SLURM job: `scripts/slurm/train.sbatch`")
        == "one-slurm-job-scriptsslurmtrainsbatch"
    )


def test_relative_links_reach_files_and_headings():
    broken = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links only outside code blocks
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.is_file():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(
                    r"^#+ (.+)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S), re.M
                )
                if anchor not in {github_anchor(h) for h in headings}:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken


def test_documented_commands_compose(tmp_path):
    jobs = documented_jobs()
    assert len(jobs) >= 15, jobs  # the extraction still finds the README's and docs' commands
    parser = OverridesParser.create()
    for name, script, overrides in jobs:
        # A sweep (-m) composes at the first value of each swept key.
        first = [
            f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
            if o.is_sweep_override()
            else o.input_line
            for o in parser.parse_overrides(overrides)
        ]
        try:
            cfg = compose(CONF, script.removesuffix(".py"), first, output_dir=tmp_path)
            OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # report which documented command fails, and why
            pytest.fail(f"{name}: python {script} {shlex.join(overrides)}\n{type(err).__name__}: {err}")
