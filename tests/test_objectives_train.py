"""Objectives through `train.trainer.train`: SAF store across resume + device change, MESA + reweighting."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import trainer
from train.configs.base import base_config, model_config
from train.data.pipeline import epoch_permutation

SEQ, BATCH, NSEQ = 32, 16, 48  # 48 packed sequences: 3 optimizer steps per epoch


def _cfg(tmp_path, steps, **train):
  text = tmp_path / "corpus.txt"
  if not text.exists():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    body = " ".join(rng.choice(words, 2000))
    text.write_text(body[:NSEQ * SEQ + 1])
  c = base_config()
  c.model = model_config("tiny", "dense")
  c.data.update(dict(source="files", paths=str(text), val_fraction=0.0, cache_dir=str(tmp_path / "cache")))
  c.mesh.num_devices = 1
  c.train.update(dict(steps=steps, global_batch=BATCH, seq_len=SEQ, log_every=1, eval_every=0, ckpt_every=3,
                      progress=False, plot=False))
  c.train.update(train)
  return c


def _rows(path):
  return {r["step"]: r for r in map(json.loads, open(path / "metrics.jsonl")) if "train_loss" in r}


def _eight(cfg):
  cfg.mesh.update(dict(num_devices=8, data=2, fsdp=4))
  return cfg


@pytest.mark.slow   # three end-to-end runs; the SAF store's numpy oracle and 8-device MESA run stay in the default set
def test_saf_store_survives_resume_on_another_device_count(tmp_path, capfd):
  def cfg(**kw):
    c = _cfg(tmp_path, steps=6, grad_accum=2, **kw)
    c.objectives.saf.enabled = True
    c.objectives.saf.update(dict(epochs_back=1, topk=4, store_dtype="float32"))
    return c

  full = trainer.train(cfg(), str(tmp_path / "full"))
  trainer.train(cfg(stop_at=3), str(tmp_path / "split"))
  capfd.readouterr()
  split = trainer.train(_eight(cfg()), str(tmp_path / "split"))
  assert split["final_step"] == 6
  # data 2 × fsdp 4 with accumulation (one row per device per microbatch): no resharding by full replication
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  a, b = _rows(tmp_path / "full"), _rows(tmp_path / "split")
  # epoch 0 (steps 1-3) has no targets; epoch 1 reads every example's output from epoch 0 — after the resume,
  # on 8 devices, from a store that was written on one device
  assert [b[s]["saf_hit_frac"] for s in range(1, 7)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
  for s in range(4, 7):
    assert b[s]["saf_kl"] > 0 and b[s]["train_loss"] > b[s]["train_ce"]
    np.testing.assert_allclose(b[s]["train_loss"], a[s]["train_loss"], rtol=2e-5)
    # the KL of two nearly equal distributions (~1e-5) is a difference of nearly equal float32 numbers: another
    # device count reorders the reductions, so allow ~1e-8 absolute on top of the relative tolerance
    np.testing.assert_allclose(b[s]["saf_kl"], a[s]["saf_kl"], rtol=1e-3, atol=5e-8)
  store_full, store_split = full["state"]["obj"]["store"], split["state"]["obj"]["store"]
  assert store_split["logp"].sharding.spec[0] == ("data", "fsdp")
  # every microbatch is written (grad_accum=2): each example was visited once per epoch
  visits = np.zeros(NSEQ, int)
  for e in range(2):
    visits[epoch_permutation(0, e, NSEQ)[:3 * BATCH]] += 1
  np.testing.assert_array_equal(np.asarray(store_split["count"])[:NSEQ], visits)
  np.testing.assert_array_equal(np.asarray(store_full["count"]), np.asarray(store_split["count"]))
  np.testing.assert_allclose(np.asarray(store_full["logp"]), np.asarray(store_split["logp"]), atol=2e-3)


def _mesa_rw_cfg(tmp_path):
  c = _cfg(tmp_path, steps=2)
  c.objectives.mesa.enabled = True
  c.objectives.mesa.start_step = 0
  c.objectives.reweight.update(dict(enabled=True, strategy="linupper", r=0.4, warmup_steps=0))
  return c


def test_mesa_and_reweighting_on_eight_devices(tmp_path):
  eight = trainer.train(_eight(_mesa_rw_cfg(tmp_path)), str(tmp_path / "eight"))
  b = _rows(tmp_path / "eight")
  for s in (1, 2):
    assert b[s]["rw_w_min"] < 1 / BATCH < b[s]["rw_w_max"] and b[s]["rw_entropy"] < math.log(BATCH)
    assert b[s]["mesa_active"] == 1.0 and np.isfinite(b[s]["train_loss"])
  assert b[1]["mesa_kl"] == pytest.approx(0.0, abs=1e-6)  # the teacher starts as a copy of the student
  assert b[2]["mesa_kl"] > 0
  ema, params = eight["state"]["obj"]["ema"], eight["state"]["params"]
  for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params)):
    assert e.sharding == p.sharding and e.dtype == jnp.float32
    assert not np.array_equal(np.asarray(e), np.asarray(p)) or np.asarray(p).std() == 0


@pytest.mark.slow
def test_mesa_and_reweighting_eight_devices_match_one(tmp_path):
  trainer.train(_mesa_rw_cfg(tmp_path), str(tmp_path / "one"))
  trainer.train(_eight(_mesa_rw_cfg(tmp_path)), str(tmp_path / "eight"))
  a, b = _rows(tmp_path / "one"), _rows(tmp_path / "eight")
  for s in (1, 2):
    for key in ("train_loss", "mesa_kl", "rw_entropy", "rw_w_min", "rw_w_max"):
      np.testing.assert_allclose(b[s][key], a[s][key], rtol=2e-4, atol=1e-7)
