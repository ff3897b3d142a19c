"""tpu_scripts/tpu.sh --dry_run prints exactly the gcloud commands of each life-cycle step (no gcloud needed), and
the SLURM example is valid bash that runs train.main --distributed under srun."""

from __future__ import annotations

import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tpu_scripts" / "tpu.sh"
BASE = ["--name", "my-tpu", "--zone", "us-west4-a"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-west4-a"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry(*args) -> list[list[str]]:
  r = subprocess.run(["bash", str(SCRIPT), *args, "--dry_run"], capture_output=True, text=True, timeout=30,
                     env={"PATH": "/usr/bin:/bin"})  # no gcloud on PATH: a dry run must not call it
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


def test_create():
  assert _dry("create", *BASE, "--accelerator", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a",
       "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"]]
  spot = _dry("create", *BASE, "--accelerator", "v4-8", "--version", "tpu-ubuntu2204-base", "--project", "p1",
              "--spot")
  assert spot == [["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a", "--project=p1",
                   "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]]


def test_sync():
  tar, scp, ssh = _dry("sync", *BASE)
  assert tar[:3] == ["tar", "-czf", "/tmp/lostjax-src-my-tpu.tar.gz"]
  assert "--exclude=.git" in tar and tar[-3:] == ["-C", str(ROOT), "."]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/lostjax-src-my-tpu.tar.gz",
                 "my-tpu:/tmp/lostjax-src.tar.gz", "--zone=us-west4-a", "--worker=all"]
  assert ssh == SSH + ["--worker=all",
                       "--command=mkdir -p ~/lostjax && tar -xzf /tmp/lostjax-src.tar.gz -C ~/lostjax"]


def test_setup():
  (cmd,) = _dry("setup", *BASE, "--repo_dir", "~/code")
  assert cmd[:-1] == SSH + ["--worker=all"]
  assert cmd[-1] == ("--command=cd ~/code && python3 -m pip install -U pip && "
                     "python3 -m pip install -e '.[tfds,hf]' 'jax[tpu]'")


def test_launch_detached_on_all_workers():
  (cmd,) = _dry("launch", *BASE, "--config", "train/configs/llama.py:350m,lost", "--workdir", "gs://b/runs/x",
                "--extra", "--config.mesh.fsdp=8 --config.train.steps=10")
  assert cmd[:-1] == SSH + ["--worker=all"]
  assert cmd[-1] == ("--command=cd ~/lostjax && nohup python3 -m train.main --distributed "
                     "--config=train/configs/llama.py:350m,lost --workdir=gs://b/runs/x "
                     "--config.mesh.fsdp=8 --config.train.steps=10 > ~/lostjax_train.log 2>&1 < /dev/null & "
                     "echo $! > ~/lostjax_train.pid")


def test_logs_stop_delete():
  assert _dry("logs", *BASE) == [SSH + ["--worker=0", "--command=tail -n 100 ~/lostjax_train.log"]]
  assert _dry("logs", *BASE, "--worker", "3", "--follow", "--lines", "20") == [
      SSH + ["--worker=3", "--command=tail -n 20 -f ~/lostjax_train.log"]]
  (stop,) = _dry("stop", *BASE)
  assert stop[:-1] == SSH + ["--worker=all"]
  assert "kill -TERM $(cat ~/lostjax_train.pid)" in stop[-1]
  assert _dry("delete", *BASE, "--project", "p1") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-west4-a", "--project=p1", "--quiet"]]


@pytest.mark.parametrize("args,msg", [
    (["launch", *BASE], "--config"),
    (["create", *BASE, "--accelerator", "v4-8"], "--version"),
    (["create", "--zone", "z", "--accelerator", "v4-8", "--version", "v"], "--name"),
    (["restart", *BASE], "unknown subcommand 'restart'"),
    (["logs", *BASE, "--bogus"], "unknown option '--bogus'"),
])
def test_bad_arguments(args, msg):
  r = subprocess.run(["bash", str(SCRIPT), *args, "--dry_run"], capture_output=True, text=True, timeout=30)
  assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_slurm_example():
  path = ROOT / "slurm" / "train_gpu.sbatch"
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True, timeout=30).returncode == 0
  text = path.read_text()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
  assert 'srun --kill-on-bad-exit=1 python3 -m train.main --distributed --config="$CONFIG" --workdir="$WORKDIR"' in text
