"""Real one-node SLURM cluster tests (Debian's slurm-wlm 22.05 + munge, started by tests/slurm/setup_cluster.sh).

The module-scoped fixture ``slurm_cluster`` installs (if needed) and starts the cluster, and skips every test
here when it cannot be set up (no root, no apt, no package mirror: the skip reason says which). It stops the
daemons afterwards only if it started them (``DMAE_SLURM_KEEP=1`` keeps them running for the next session).

Helpers of this module (test modules do not import each other: move one to ``tests/helpers/`` and the
fixture to ``tests/conftest.py`` when another module needs it):

- ``submit_job(script, env, sbatch_args=(), script_args=(), cwd=None) -> job_id``  (sbatch --parsable)
- ``job_info(job_id, env) -> dict``              (``scontrol show job -o``: JobState, Reason, Restarts, ...)
- ``wait_for_state(job_id, states, env, timeout) -> dict``   (fails fast on an unexpected terminal state)
- ``wait_for_output(path, text, count, timeout, job_id=None, env=None) -> str``
- ``job_output(path) -> str``,  ``signal_job(job_id, sig, env)``,  ``cancel_job(job_id, env)``
- ``TEMPLATES`` (scripts/slurm) and ``CPU_SBATCH_ARGS``: the sbatch options that run the GPU templates here,
  e.g. ``submit_job(TEMPLATES / "train.sbatch", env, CPU_SBATCH_ARGS, ("experiment=...",), cwd=run_dir)``
  (``cwd`` must contain ``logs/`` and the entry point ``train.py``: the template runs ``python train.py``).

There is no accounting database, so ``sacct`` does not work: job states come from ``scontrol show job``,
which keeps a finished job for MinJobAge=300 s.

What the tests prove:

- ``scripts/slurm/train.sbatch`` runs the real ``train.py`` as 2 srun tasks (``hardware=slurm`` with only
  ``trainer.accelerator=cpu`` changed; ``trainer.num_nodes``/``trainer.devices`` from ``SLURM_NNODES`` /
  ``SLURM_NTASKS_PER_NODE``): Lightning picks ``SLURMEnvironment`` on both ranks (ranks 0/1 of 2 from
  ``SLURM_PROCID``) and trains with DDP (gloo); one run directory ``logs/<run_name>/slurm-<job id>/...``, one
  ``.hydra``, one ``train.log`` written by rank 0 only;
- ``scancel --signal=USR1`` mid-epoch: Lightning's auto-requeue writes ``hpc_ckpt_1.ckpt`` and runs
  ``scontrol requeue``; the job goes RUNNING -> COMPLETING -> PENDING (Reason=BeginTime, Restarts=1,
  ~11 s = cred_expire + 1) -> RUNNING with the same job ID and ``SLURM_RESTART_COUNT=1``, appending to the
  same output file; both ranks restore the hpc checkpoint at the exact global step and the job ends at the
  configured step and epoch, with the first start's CSV metrics kept;
- ``scripts/slurm/certify.sbatch`` parses and hands the overrides to 2 tasks (stand-in ``certify.py``).

``tests/helpers/probes.py`` (a test-only callback loaded with ``+callbacks.probe._target_=helpers.probes.NoiseProbe``,
tests/ on ``PYTHONPATH``) reports each rank's cluster environment, steps and the noise it drew.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import CONF, REPO, TESTS

SETUP = TESTS / "slurm" / "setup_cluster.sh"
STOP = TESTS / "slurm" / "stop_cluster.sh"
STATE_DIR = Path(os.environ.get("DMAE_SLURM_DIR", "/tmp/dmae-slurm"))
TEMPLATES = REPO / "scripts" / "slurm"
# sbatch options that make the GPU templates run on this CPU-only 2-CPU test node (they override #SBATCH).
CPU_SBATCH_ARGS = ("--gres=none", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5")

# Terminal states that end a wait early when they are not among the awaited ones.
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


# --------------------------------------------------------------------------------------------- helpers
def _run(cmd: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def submit_job(
    script: str | Path,
    env: dict[str, str],
    sbatch_args: tuple[str, ...] | list[str] = (),
    script_args: tuple[str, ...] | list[str] = (),
    cwd: str | Path | None = None,
) -> str:
    """Submit a batch job and return its ID.

    ``script`` is a path (``Path``) to a batch script, or the script's text (``str``), which is written to a
    new file in ``cwd`` (default: the state dir). ``sbatch_args`` go before the script (they override its
    #SBATCH lines), ``script_args`` after it (e.g. Hydra overrides for scripts/slurm/train.sbatch). The job
    runs in ``cwd`` (``--chdir``) and inherits ``env`` (sbatch's default ``--export=ALL``).
    """
    cwd = Path(cwd) if cwd is not None else STATE_DIR
    if isinstance(script, str):
        path = cwd / f"job-{time.time_ns()}.sbatch"
        path.write_text(script)
        script = path
    cmd = ["sbatch", "--parsable", f"--chdir={cwd}", *sbatch_args, str(script), *script_args]
    res = _run(cmd, env)
    if res.returncode != 0:
        raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}\n  {' '.join(cmd)}")
    return res.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def job_info(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job -o <id>`` as a dict (JobState, Reason, Restarts, ExitCode, StdOut, ...); {} if gone."""
    res = _run(["scontrol", "show", "job", "-o", str(job_id)], env)
    if res.returncode != 0:
        return {}
    return dict(re.findall(r"(\S+?)=(\S*)", res.stdout))


def job_output(path: str | Path) -> str:
    """The job's output file so far ('' while it does not exist)."""
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _record(history: list[tuple[float, str, str]] | None, state: str, reason: str) -> None:
    if history is not None and (not history or history[-1][1:] != (state, reason)):
        history.append((time.monotonic(), state, reason))


def wait_for_state(
    job_id: str,
    states: str | set[str] | list[str] | tuple[str, ...],
    env: dict[str, str],
    timeout: float = 120,
    poll: float = 0.5,
    history: list[tuple[float, str, str]] | None = None,
) -> dict[str, str]:
    """Poll until the job's JobState is one of ``states``; return ``job_info``.

    Raises AssertionError at once if the job reaches another terminal state (FAILED, CANCELLED, ...) and
    TimeoutError after ``timeout`` s. ``history``, if given, receives (time, JobState, Reason) on each change.
    """
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while True:
        info = job_info(job_id, env)
        state = info.get("JobState", "")
        _record(history, state, info.get("Reason", ""))
        if state in wanted:
            return info
        if state in TERMINAL_STATES:
            raise AssertionError(f"job {job_id} ended {state} (waiting for {sorted(wanted)}): {info}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout} s: {info}")
        time.sleep(poll)


def wait_for_output(
    path: str | Path,
    text: str,
    count: int = 1,
    timeout: float = 120,
    job_id: str | None = None,
    env: dict[str, str] | None = None,
    history: list[tuple[float, str, str]] | None = None,
) -> str:
    """Poll until ``text`` occurs ``count`` times in the output file; return the output.

    With ``job_id`` and ``env``, fail as soon as the job has reached a terminal state without it (and record
    state changes in ``history`` as ``wait_for_state`` does).
    """
    deadline = time.monotonic() + timeout
    while True:
        out = job_output(path)
        if out.count(text) >= count:
            return out
        if job_id is not None and env is not None:
            info = job_info(job_id, env)
            state = info.get("JobState", "")
            _record(history, state, info.get("Reason", ""))
            if state in TERMINAL_STATES:
                out = job_output(path)
                if out.count(text) >= count:
                    return out
                raise AssertionError(f"job {job_id} ended {state} before printing {text!r} x{count}:\n{out}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} x{count} not in {path} after {timeout} s:\n{job_output(path)}")
        time.sleep(0.2)


def signal_job(job_id: str, sig: str, env: dict[str, str]) -> None:
    """Send ``sig`` (e.g. "USR1") to every task of the job's steps (not the batch shell), as --signal does."""
    res = _run(["scancel", f"--signal={sig}", str(job_id)], env)
    assert res.returncode == 0, res.stderr


def cancel_job(job_id: str, env: dict[str, str]) -> None:
    _run(["scancel", str(job_id)], env)


@dataclass
class SlurmCluster:
    env: dict[str, str]  # os.environ + SLURM_CONF, with this Python's bin dir first on PATH
    conf: Path
    state_dir: Path
    setup_seconds: float

    def logs(self, lines: int = 30) -> str:
        """The tails of slurmctld.log and slurmd.log, for failure messages."""
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            text = job_output(self.state_dir / "log" / name).splitlines()[-lines:]
            out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)


def _daemons_running() -> bool:
    for name in ("slurmctld.pid", "slurmd.pid"):
        try:
            os.kill(int((STATE_DIR / name).read_text().strip()), 0)
        except (OSError, ValueError):
            return False
    return True


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster: yields SlurmCluster (use ``.env`` for sbatch/srun/scontrol)."""
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("the SLURM test cluster needs Linux and bash")
    if os.environ.get("DMAE_SKIP_SLURM") == "1":
        pytest.skip("DMAE_SKIP_SLURM=1")
    started_here = not _daemons_running()
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    setup_seconds = time.monotonic() - t0
    if res.returncode == 2:
        reason = (res.stderr.strip().splitlines() or ["setup_cluster.sh exited 2"])[-1]
        pytest.skip(f"no SLURM test cluster: {reason}")
    if res.returncode != 0:
        pytest.fail(f"setup_cluster.sh exited {res.returncode}:\n{res.stderr}\n{res.stdout}")
    conf = res.stdout.strip().splitlines()[-1].split("=", 1)[1]
    env = dict(os.environ)
    env["SLURM_CONF"] = conf
    # Jobs inherit this env: `python` / `srun python ...` in batch scripts is the interpreter running pytest.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")])
    env["PYTHONUNBUFFERED"] = "1"
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        del env[var]  # a pytest run inside a SLURM job must not leak its own job's settings
    cluster = SlurmCluster(env=env, conf=Path(conf), state_dir=STATE_DIR, setup_seconds=setup_seconds)
    yield cluster
    if started_here and os.environ.get("DMAE_SLURM_KEEP") != "1":
        subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.slow  # ~20 s with the cluster's setup: sbatch, two srun tasks, a merge
def test_certify_sbatch_two_tasks_give_the_single_process_result(slurm_cluster, tmp_path):
    """scripts/slurm/certify.sbatch -> srun -> 2 x certify.py (Lightning DDP, gloo): each image certified once,
    certify.tsv in the job's run directory equals an in-process single-rank run in every result column."""
    from helpers.certify import make_classifier_checkpoint
    from helpers.certify import run as certify_in_process

    from dmae_lightning.certification import CertifyRecord
    from dmae_lightning.certification.records import read_records

    ckpt = make_classifier_checkpoint(tmp_path / "classifier.ckpt")
    settings = (
        "model=vit_micro_patch8",
        "split=test",
        "max=10",
        "n0=10",
        "n=60",
        "batch_size=60",
        "logger=none",
    )
    (REPO / "logs").mkdir(exist_ok=True)  # --output=logs/...: Slurm does not create it (the job would FAIL)
    env = slurm_cluster.env
    job = submit_job(
        TEMPLATES / "certify.sbatch",
        env,
        sbatch_args=CPU_SBATCH_ARGS,
        cwd=REPO,
        script_args=(
            f"weights={ckpt}",
            "data=digits",
            "trainer.accelerator=cpu",
            "precision=32-true",  # hardware=slurm's bf16-mixed is for GPUs (conf/hardware/slurm.yaml)
            f"paths.log_dir={tmp_path}",
            *settings,
        ),
    )
    out_path = REPO / "logs" / f"dmae-certify-{job}.out"
    try:
        info = wait_for_state(job, "COMPLETED", env, timeout=240)
    except (AssertionError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{job_output(out_path)}\n{slurm_cluster.logs()}") from err
    finally:
        cancel_job(job, env)
    out = job_output(out_path)
    out_path.unlink(missing_ok=True)
    assert info["Requeue"] == "1" and f"job {job} restart 0 on " in out and "1 node(s) x 2 task(s)" in out, (
        out
    )
    (tsv,) = tmp_path.glob(f"certify_digits_vit_micro_patch8_sigma0.25/slurm-{job}/*/certify.tsv")
    assert not list(tsv.parent.glob("certify.rank*.tsv"))  # shards merged and removed
    single = tmp_path / "single"
    certify_in_process(single, ckpt, *settings)

    def columns(path):
        return [
            (r.idx, r.label, r.predict, r.radius, r.correct, r.n_a, r.n)
            for r in read_records(path, CertifyRecord)
        ]

    assert [row[0] for row in columns(tsv)] == list(range(10))
    assert columns(tsv) == columns(single / "certify.tsv")


# The real thing: scripts/slurm/train.sbatch -> srun -> 2 x train.py -> Lightning DDP (gloo) on the CPU node,
# with hardware=slurm as on a GPU cluster and only trainer.accelerator=cpu changed. 128 images / 2 ranks /
# batch 16 = 4 steps per epoch, 10 epochs = 40 steps; tests/helpers/probes.py sleeps 0.2 s after each step so that
# SIGUSR1 surely arrives mid-training (the training itself takes ~1 s; the two imports take most of the time).
MAX_EPOCHS, STEPS_PER_EPOCH = 10, 4
TRAIN_OVERRIDES = (
    "experiment=pretrain_digits",
    "model=vit_micro_patch8",
    "trainer.accelerator=cpu",
    "data.subset_first=128",
    "data.batch_size=16",
    f"trainer.max_epochs={MAX_EPOCHS}",
    "+callbacks.probe._target_=helpers.probes.NoiseProbe",
)
SIGNAL_AFTER_STEP = 6  # mid-epoch (epoch 1, batch 2): the resume must land on the exact step, not an epoch


@pytest.mark.slow  # ~60-90 s: 2 x (2 parallel imports of torch + Lightning) + 16 s requeue (KillWait + BeginTime)
def test_train_sbatch_ddp_job_requeues_on_sigusr1_and_resumes_at_the_exact_step(slurm_cluster, tmp_path):
    import torch
    from helpers.probes import check_noise_per_rank, load_probes
    from helpers.rundirs import single_run_dir

    (tmp_path / "train.py").symlink_to(REPO / "train.py")  # the template runs `python train.py` in --chdir
    (tmp_path / "conf").symlink_to(CONF)
    (tmp_path / "logs").mkdir()
    probe_dir = tmp_path / "probe"
    env = dict(
        slurm_cluster.env, DMAE_PROBE_DIR=str(probe_dir), DMAE_PROBE_STEP_SLEEP="0.2", OMP_NUM_THREADS="1"
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    job = submit_job(TEMPLATES / "train.sbatch", env, CPU_SBATCH_ARGS, TRAIN_OVERRIDES, cwd=tmp_path)
    out_path = tmp_path / "logs" / f"dmae-train-{job}.out"
    history: list[tuple[float, str, str]] = []
    t0 = time.monotonic()
    try:
        wait_for_output(
            out_path, f"probe step global_step={SIGNAL_AFTER_STEP}\n", timeout=240, job_id=job, env=env
        )
        t_signal = time.monotonic()
        signal_job(job, "USR1", env)  # what --signal=SIGUSR1@90 sends 90 s before the time limit
        wait_for_output(out_path, "restart=1", timeout=180, job_id=job, env=env, history=history)
        t_restart = time.monotonic()
        info = wait_for_state(job, "COMPLETED", env, timeout=240, history=history)
    except (AssertionError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{job_output(out_path)}\n{slurm_cluster.logs()}") from err
    finally:
        cancel_job(job, env)
    out = job_output(out_path)
    states = [f"{t - t_signal:+.1f}s {state} {reason}" for t, state, reason in history]
    print(
        f"submit -> step {SIGNAL_AFTER_STEP}: {t_signal - t0:.1f} s; SIGUSR1 -> restarted tasks: "
        f"{t_restart - t_signal:.1f} s; total {time.monotonic() - t0:.1f} s; states: {states}"
    )
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert f"job {job} restart 0 on " in out and f"job {job} restart 1 on " in out, out  # one appended file

    # Lightning saw SLURM on both ranks of both starts: SLURMEnvironment, ranks 0/1 of 2, from SLURM_PROCID.
    starts = re.findall(
        r"probe setup global_rank=(\d) world_size=(\d) env=(\w+) slurm_procid=(\d) restart=(\d)", out
    )
    assert sorted(starts) == [(r, "2", "SLURMEnvironment", r, s) for r in "01" for s in "01"], starts
    assert out.count("SLURM auto-requeueing enabled. Setting signal handlers.") == 4, out
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out, out

    # One run directory, named from the job id, shared by both ranks and both starts.
    run_dir = single_run_dir(tmp_path / "logs", ignore=[out_path])
    assert f"slurm-{job}" in run_dir.relative_to(tmp_path / "logs").parts, run_dir
    assert sorted(p.name for p in (tmp_path / "logs").rglob("*.log")) == ["train.log"]
    log_text = (run_dir / "train.log").read_text()  # appended by rank 0 of each start, never by rank 1
    assert log_text.count("probe log global_rank=0") == 2 and "global_rank=1" not in log_text, log_text
    assert log_text.count("run directory:") == 2 and log_text.count("finished:") == 1, (
        log_text
    )  # each start, the end

    # Lightning's auto-requeue: hpc checkpoint on SIGUSR1, `scontrol requeue`, restore at the exact step.
    assert "Handling auto-requeue signal: 10" in out and f"Requeued SLURM job: {job}" in out, out
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"Restoring states from the checkpoint path at {hpc}" in out, out
    hpc_step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert SIGNAL_AFTER_STEP <= hpc_step < MAX_EPOCHS * STEPS_PER_EPOCH, hpc_step
    resumed = re.findall(r"probe start global_rank=(\d) global_step=(\d+) epoch=(\d+) restart=1", out)
    assert sorted(resumed) == [(r, str(hpc_step), str(hpc_step // STEPS_PER_EPOCH)) for r in "01"], resumed
    # last.ckpt was written at the last epoch's end, so it holds that epoch's index (Lightning's convention).
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (MAX_EPOCHS * STEPS_PER_EPOCH, MAX_EPOCHS - 1), (
        last["global_step"],
        last["epoch"],
    )

    probes = load_probes(probe_dir)  # written at the end of training: the restarted ranks
    assert sorted(probes) == [(0, 1), (1, 1)], sorted(probes)
    assert all(p["final_global_step"] == MAX_EPOCHS * STEPS_PER_EPOCH for p in probes.values())
    assert check_noise_per_rank(probes, restart=1) == MAX_EPOCHS * STEPS_PER_EPOCH - hpc_step
    # The CSV metrics of the first start survive the restart (Lightning's CSVLogger would delete them).
    with open(run_dir / "csv" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert min(steps) < hpc_step and max(steps) >= MAX_EPOCHS * STEPS_PER_EPOCH - 1, steps
    assert t_restart - t_signal < 90


@pytest.mark.slow  # ~60 s; opt-in (DMAE_TEST_SUBMITIT=1): the suite's time budget has no room for it by default
def test_submitit_sweep_point_requeues_through_lightning(slurm_cluster, tmp_path):
    """``python train.py -m hydra/launcher=slurm``: the point runs as a 2-task SLURM job via submitit; SIGUSR1
    (the signal conf/hydra/launcher/slurm.yaml asks Slurm for) is handled by Lightning, not submitit: hpc
    checkpoint, `scontrol requeue`, exact-step resume in the same run directory; the launcher returns 0."""
    if os.environ.get("DMAE_TEST_SUBMITIT") != "1":
        pytest.skip("opt-in: DMAE_TEST_SUBMITIT=1 (about 60 s)")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional extra [slurm]")
    import torch

    env = dict(
        slurm_cluster.env,
        DMAE_PROBE_DIR=str(tmp_path / "probe"),
        DMAE_PROBE_STEP_SLEEP="0.2",
        OMP_NUM_THREADS="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    args = [
        "-m",
        "hydra/launcher=slurm",
        "hardware=slurm",
        "trainer.devices=2",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=5",
        *TRAIN_OVERRIDES,
    ]
    launcher = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (outs := list(tmp_path.glob("logs/*/multirun/.submitit/*/*_0_log.out"))) or (
            f"probe step global_step={SIGNAL_AFTER_STEP}\n" not in job_output(outs[0])
        ):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()[-4000:]
            time.sleep(0.2)
        job = outs[0].parent.name
        sbatch = (outs[0].parent / f"{job}_submission.sh").read_text()
        assert "#SBATCH --signal=USR1@90" in sbatch and "#SBATCH --requeue" in sbatch, sbatch
        signal_job(job, "USR1", env)
        launcher_out, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, launcher_out[-4000:]
    info = wait_for_state(job, "COMPLETED", env, timeout=60)  # the result is in before the batch shell ends
    assert info["Restarts"] == "1", info
    errs = "".join(job_output(p) for p in outs[0].parent.glob("*_log.err"))
    assert "Handling auto-requeue signal: 10" in errs and f"Requeued SLURM job: {job}" in errs, errs
    assert "Job not requeued" not in errs and "Calling checkpoint method" not in errs  # submitit stayed out
    dirs = [p.parent for p in tmp_path.glob("logs/*/multirun/*/*/.hydra")]
    assert len(dirs) == 1 and dirs[0].parent.name == f"slurm-{job}", dirs
    assert f"Restoring states from the checkpoint path at {dirs[0] / 'hpc_ckpt_1.ckpt'}" in errs, errs
    last = torch.load(dirs[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (last["global_step"], last["epoch"]) == (MAX_EPOCHS * STEPS_PER_EPOCH, MAX_EPOCHS - 1)  # see above
