"""Real one-node SLURM cluster tests (Debian's slurm-wlm 22.05 + munge, started by tests/slurm/setup_cluster.sh).

The module-scoped fixture ``slurm_cluster`` installs (if needed) and starts the cluster, and skips every test
here when it cannot be set up (no root, no apt, no package mirror: the skip reason says which). It stops the
daemons afterwards only if it started them (``DMAE_SLURM_KEEP=1`` keeps them running for the next session).

Reusable helpers (other test modules: ``from test_slurm import slurm_cluster, submit_job, ...``):

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

What the stand-ins below prove (to be replaced by the real ``train.py`` via scripts/slurm/train.sbatch):

- scripts/slurm/{train,certify}.sbatch parse and start 2 tasks that get the Hydra overrides;
- a 2-task job on the 2-CPU node is seen by Lightning as SLURM with global ranks {0, 1} and world size 2,
  and ``SLURM_NTASKS_PER_NODE`` is set (2), so ``trainer.devices=$SLURM_NTASKS_PER_NODE`` works;
- ``scancel --signal=USR1`` reaches every srun task, ``scontrol requeue`` from inside the job requeues it, the
  job goes RUNNING -> COMPLETING (KillWait=5 s: the tasks ignore SIGTERM, as Lightning does) -> PENDING
  (Reason=BeginTime, Restarts=1, ~11 s = cred_expire + 1) -> RUNNING with the same job ID and
  ``SLURM_RESTART_COUNT=1``, appending to the same output file: ~16 s from SIGUSR1 to the restarted tasks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tests" / "slurm" / "setup_cluster.sh"
STOP = REPO / "tests" / "slurm" / "stop_cluster.sh"
STATE_DIR = Path(os.environ.get("DMAE_SLURM_DIR", "/tmp/dmae-slurm"))
TEMPLATES = REPO / "scripts" / "slurm"
# sbatch options that make the GPU templates run on this CPU-only 2-CPU test node (they override #SBATCH).
CPU_SBATCH_ARGS = ("--gres=none", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=5")

# Terminal states that end a wait early when they are not among the awaited ones.
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
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
DETECT_PY = r"""
import os
from pytorch_lightning.plugins.environments import SLURMEnvironment
env = SLURMEnvironment()
env.validate_settings(num_devices=2, num_nodes=1)  # raises if SLURM_NTASKS_PER_NODE disagrees
print(f"detect={SLURMEnvironment.detect()} global_rank={env.global_rank()} local_rank={env.local_rank()} "
      f"world_size={env.world_size()} node_rank={env.node_rank()} "
      f"ntasks_per_node={os.environ.get('SLURM_NTASKS_PER_NODE')} main={env.main_address}:{env.main_port}",
      flush=True)
"""


@pytest.mark.slow  # 15-28 s: two processes import torch + Lightning on 2 CPUs
def test_two_task_job_is_detected_by_lightning(slurm_cluster, tmp_path):
    # --ntasks-per-node, not --ntasks: with `--nodes=1 --ntasks=2` Slurm 22.05 leaves SLURM_NTASKS_PER_NODE
    # unset and Lightning's SLURMEnvironment() raises "You set `--ntasks=2` ... Use `--ntasks-per-node=2`".
    # The job name must not be "bash" or "interactive" (Lightning then assumes an interactive session).
    (tmp_path / "detect.py").write_text(DETECT_PY)
    script = f"""#!/bin/bash
#SBATCH --job-name=detect
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=5
#SBATCH --output={tmp_path}/%x-%j.out
echo "batch NNODES=$SLURM_NNODES NTASKS=$SLURM_NTASKS NTASKS_PER_NODE=${{SLURM_NTASKS_PER_NODE:-unset}}"
srun python {tmp_path}/detect.py
"""
    env = slurm_cluster.env
    job = submit_job(script, env, cwd=tmp_path)
    try:
        info = wait_for_state(job, "COMPLETED", env, timeout=180)
    except (AssertionError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{job_output(tmp_path / f'detect-{job}.out')}\n{slurm_cluster.logs()}") from err
    finally:
        cancel_job(job, env)
    out = job_output(tmp_path / f"detect-{job}.out")
    assert info["ExitCode"] == "0:0", out
    assert "batch NNODES=1 NTASKS=2 NTASKS_PER_NODE=2" in out, out
    ranks = re.findall(r"detect=(\w+) global_rank=(\d) local_rank=(\d) world_size=(\d) node_rank=(\d) "
                       r"ntasks_per_node=(\S+) main=(\S+)", out)
    assert len(ranks) == 2, out
    assert {r[0] for r in ranks} == {"True"}
    assert sorted(r[1] for r in ranks) == ["0", "1"]
    assert sorted(r[2] for r in ranks) == ["0", "1"]
    assert {r[3] for r in ranks} == {"2"}
    assert {r[4] for r in ranks} == {"0"}
    assert {r[5] for r in ranks} == {"2"}
    assert len({r[6] for r in ranks}) == 1  # both ranks agree on MASTER_ADDR:MASTER_PORT


STAND_IN_ENTRY_PY = r"""
import os, sys
print(f"entry {os.path.basename(sys.argv[0])} rank={os.environ['SLURM_PROCID']} args={' '.join(sys.argv[1:])}",
      flush=True)
"""


@pytest.mark.parametrize("name", ["train", "certify"])
def test_sbatch_template_runs_one_task_per_device(slurm_cluster, tmp_path, name):
    """scripts/slurm/<name>.sbatch with a stand-in <name>.py: #SBATCH lines parse, overrides reach Hydra."""
    (tmp_path / f"{name}.py").write_text(STAND_IN_ENTRY_PY)
    (tmp_path / "logs").mkdir()  # Slurm does not create --output's directory (the job would FAIL, 0:53)
    env = slurm_cluster.env
    job = submit_job(TEMPLATES / f"{name}.sbatch", env, sbatch_args=CPU_SBATCH_ARGS,
                     script_args=("experiment=smoke", "data.root=/nonexistent"), cwd=tmp_path)
    out_path = tmp_path / "logs" / f"dmae-{name}-{job}.out"
    try:
        info = wait_for_state(job, "COMPLETED", env, timeout=120)
    except (AssertionError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{job_output(out_path)}\n{slurm_cluster.logs()}") from err
    finally:
        cancel_job(job, env)
    out = job_output(out_path)
    assert info["Requeue"] == "1" and info["TimeLimit"] == "00:05:00", info
    assert f"job {job} restart 0 on " in out and "1 node(s) x 2 task(s)" in out, out
    args = "hardware=slurm trainer.num_nodes=1 trainer.devices=2 experiment=smoke data.root=/nonexistent"
    for rank in (0, 1):
        assert f"entry {name}.py rank={rank} args={args}" in out, out


# Mimics Lightning's auto-requeue (pytorch_lightning/trainer/connectors/signal_connector.py): on SIGUSR1
# every rank "saves the hpc checkpoint", rank 0 runs `scontrol requeue $SLURM_JOB_ID`; SIGTERM is then
# ignored ("Bypassing SIGTERM"), so Slurm SIGKILLs the tasks after KillWait. The restarted job resumes.
REQUEUE_PY = r"""
import os, signal, subprocess, sys, time
from pathlib import Path
rank = int(os.environ["SLURM_PROCID"])
restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
ckpt = Path(sys.argv[1]) / f"hpc_ckpt_rank{rank}.txt"
def on_usr1(signum, frame):
    ckpt.write_text(f"step=42 time={time.time():.3f}")
    print(f"rank {rank} SIGUSR1 saved {ckpt.name}", flush=True)
    if rank == 0:
        rc = subprocess.call(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]])
        print(f"rank {rank} requeue rc={rc}", flush=True)
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, lambda s, f: print(f"rank {rank} bypassing SIGTERM", flush=True))
print(f"rank {rank} start restart={restarts} time={time.time():.3f}", flush=True)
if restarts > 0:
    print(f"rank {rank} resumed from {ckpt.read_text()}", flush=True)
    sys.exit(0)
print(f"rank {rank} ready", flush=True)
deadline = time.time() + 120
while time.time() < deadline:
    time.sleep(0.1)
print(f"rank {rank} was never requeued", flush=True)
sys.exit(3)
"""


@pytest.mark.slow  # ~17 s: 5 s KillWait (SIGTERM is ignored, as Lightning does) + 11 s BeginTime hold
def test_sigusr1_requeues_and_restarts_job(slurm_cluster, tmp_path):
    (tmp_path / "requeue.py").write_text(REQUEUE_PY)
    script = f"""#!/bin/bash
#SBATCH --job-name=requeue
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=5
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/%x-%j.out
echo "batch restart=${{SLURM_RESTART_COUNT:-0}}"
srun python {tmp_path}/requeue.py {tmp_path}
"""
    env = slurm_cluster.env
    job = submit_job(script, env, cwd=tmp_path)
    out_path = tmp_path / f"requeue-{job}.out"
    history: list[tuple[float, str, str]] = []
    try:
        wait_for_output(out_path, "ready", count=2, timeout=120, job_id=job, env=env)
        t_signal = time.monotonic()
        signal_job(job, "USR1", env)
        wait_for_output(out_path, "start restart=1", count=2, timeout=120, job_id=job, env=env, history=history)
        t_restart = time.monotonic()
        info = wait_for_state(job, "COMPLETED", env, timeout=60, history=history)
    except (AssertionError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{job_output(out_path)}\n{slurm_cluster.logs()}") from err
    finally:
        cancel_job(job, env)
    out = job_output(out_path)
    states = [f"{t - t_signal:+.1f}s {state} {reason}" for t, state, reason in history]
    print(f"SIGUSR1 -> restarted tasks: {t_restart - t_signal:.1f} s; states: {states}")
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert out.count("SIGUSR1 saved") == 2, out  # the signal reached both srun tasks
    assert "rank 0 requeue rc=0" in out, out
    assert "batch restart=0" in out and "batch restart=1" in out, out  # appended, same job ID and file
    assert out.count("resumed from step=42") == 2, out
    assert "never requeued" not in out, out
    assert t_restart - t_signal < 60
