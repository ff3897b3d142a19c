"""train.trainer signal handling: the stop flag agreed across processes, and a second SIGTERM/SIGINT that ends a
process whose main thread is stuck in a computation that never finishes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags,want", [((0, 0, 0), False), ((0, 1, 0), True), ((1, 1, 1), True), ((1,), True),
                                        ((0,), False)])
def test_stop_flag_is_agreed_when_any_process_received_a_signal(flags, want):
  """Every process must stop when one of them got the signal (an `all` would keep the others waiting at the
  next collective while the signalled one saves and exits)."""
  seen = []

  def allgather(local):
    seen.append(np.asarray(local).copy())
    return np.asarray(flags, np.int32)[:, None]   # [processes, 1], as multihost_utils.process_allgather

  assert trainer._any_process(bool(flags[0]), allgather=allgather) is want
  np.testing.assert_array_equal(seen[0], [flags[0]])
  assert trainer._any_process(True) is True and trainer._any_process(False) is False   # one process: no collective


# A main thread blocked in C++ (BlockUntilReady on a computation whose host callback waits forever), as in a step
# that never finishes. Python signal handlers cannot run there; the watcher thread must.
HUNG = r"""
import threading, numpy as np, jax
from train import trainer
never = threading.Event()
def wait_forever(x):
  never.wait()
  return x
step = jax.jit(lambda x: jax.pure_callback(wait_forever, jax.ShapeDtypeStruct((), np.float32), x))
with trainer._Signals() as s:
  print("ready", flush=True)
  jax.block_until_ready(step(np.float32(1.0)))
print("unreachable", flush=True)
"""


def test_second_signal_exits_at_once_while_a_step_hangs():
  """SIGINT (Ctrl-C) asks for a clean stop; a SIGTERM after it (e.g. `timeout`, a scheduler) ends the process."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", HUNG], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)                           # the main thread is now inside block_until_ready
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None, "the first signal must only ask for a checkpoint and a clean stop"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  err = proc.stderr.read()
  assert rc == 128 + signal.SIGTERM, (rc, err)
  assert "received SIGINT: saving a checkpoint" in err and "received SIGTERM again: exiting now" in err, err
  assert "unreachable" not in proc.stdout.read()


def test_signals_restores_handlers_and_wakeup_fd():
  before = {s: signal.getsignal(s) for s in trainer._Signals.SIGNALS}
  with trainer._Signals() as s:
    assert all(signal.getsignal(sig) == s._handle for sig in trainer._Signals.SIGNALS)
    os.kill(os.getpid(), signal.SIGTERM)      # handled: the flag is set, the process goes on
    deadline = time.time() + 10
    while s.received is None and time.time() < deadline:
      time.sleep(0.01)
    assert s.received == "SIGTERM"
  assert {sig: signal.getsignal(sig) for sig in trainer._Signals.SIGNALS} == before
  assert signal.set_wakeup_fd(-1) == -1       # nothing left installed
