"""--summary_only for people and scripts: where the device memory comes from (--device table, system.device_memory_gib,
the device's memory_stats(), its device kind), why it is unknown, the table `format_summary` prints and the stable
keys `--json` prints."""

from __future__ import annotations

import types

import pytest

from train import flops, summary
from train.configs.base import base_config, model_config

GIB = 2.0 ** 30


def _cfg(batch=8, devices=1):
  c = base_config()
  c.model = model_config("tiny", "lost")
  c.model.vocab_size = 257
  c.mesh.num_devices = devices
  c.train.global_batch = batch
  c.train.seq_len = 128
  return c


def _fake_devices(monkeypatch, stats, kind):
  dev = types.SimpleNamespace(platform="gpu", id=0, device_kind=kind, memory_stats=lambda: stats)
  monkeypatch.setattr(summary.jax, "devices", lambda: [dev])


def test_device_flag_picks_from_the_table():
  assert summary.device_memory(_cfg(), "h100") == (80 * GIB, "--device=h100: NVIDIA H100 SXM/PCIe, 80 GB HBM3")
  assert summary.device_memory(_cfg(), "V5E")[0] == 16 * GIB
  for name, (gib, what) in flops.DEVICES.items():
    assert summary.device_memory(_cfg(), name) == (gib * GIB, f"--device={name}: {what}")
  assert {"v4", "v5e", "v5p", "v6e", "h100", "h200", "a100-40", "a100-80"} <= set(flops.DEVICES)
  with pytest.raises(ValueError, match=r"unknown --device='h10' .*did you mean 'h100'\?"):
    summary.device_memory(_cfg(), "h10")
  c = _cfg()
  c.system.device_memory_gib = 40.0
  assert summary.device_memory(c) == (40 * GIB, "system.device_memory_gib=40")
  with pytest.raises(ValueError, match="give one"):
    summary.device_memory(c, "h100")


def test_detected_then_device_kind_then_unknown(monkeypatch):
  _fake_devices(monkeypatch, {"bytes_limit": 79 * GIB}, "NVIDIA H100 80GB HBM3")
  assert summary.device_memory(_cfg()) == (79 * GIB, "detected by memory_stats() of gpu:0 (NVIDIA H100 80GB HBM3)")
  assert summary.device_memory(_cfg(), "v5e")[0] == 16 * GIB     # --device plans for another machine
  _fake_devices(monkeypatch, None, "TPU v4")
  assert summary.device_memory(_cfg()) == (
      32 * GIB, "table entry for device kind 'TPU v4' (train/flops.py DEVICE_MEMORY)")
  _fake_devices(monkeypatch, {}, "Some GPU")
  limit, why = summary.device_memory(_cfg())
  assert limit is None and why.startswith("unknown: the gpu device (Some GPU) reports no memory limit; pass --device=")
  assert "--config.system.device_memory_gib=" in why


def test_json_keys_are_stable():
  s = summary.summarize(_cfg(), device="h100")
  assert list(s) == ["model", "params", "optimizer", "memory_estimate_per_device_bytes",
                     "memory_estimate_per_device_gib", "memory_fit", "flops_per_token", "devices", "batch"]
  assert list(s["memory_fit"]) == ["device_memory_bytes", "fits", "suggestions", "device_memory_source"]
  assert s["memory_fit"]["device_memory_bytes"] == 80 * 2**30 and s["memory_fit"]["fits"] is True
  assert list(s["memory_estimate_per_device_bytes"]) == [
      "params", "grads", "optimizer", "activations", "update", "total"]


def _rows(text):
  return {line[:15].strip(): line[15:] for line in text.splitlines() if line[:15].strip()}


def test_table_fits_and_unknown():
  s = summary.summarize(_cfg(), device="h100")
  text = summary.format_summary(s)
  rows = _rows(text)
  assert rows["model"] == "tiny LLaMA, lost: d_model 64, 2 layers, vocab 257", text
  assert rows["device memory"] == "80.00 GiB (--device=h100: NVIDIA H100 SXM/PCIe, 80 GB HBM3)"
  total = s["memory_estimate_per_device_bytes"]["total"] / GIB
  assert rows["fits"] == f"yes: {total:.2f} GiB ≤ 72.00 GiB (90% of the device)"
  assert f"{s['batch']['tokens_per_step']:,} tokens per step" in rows["batch"]
  text = summary.format_summary(summary.summarize(_cfg()))   # CPU: no limit
  rows = _rows(text)
  assert rows["device memory"].startswith("unknown: the cpu device") and rows["fits"].startswith("unknown")


def test_table_does_not_fit_gives_flags_to_paste():
  c = _cfg(batch=64, devices=8)
  total = summary.summarize(c)["memory_estimate_per_device_bytes"]["total"]
  c.system.device_memory_gib = 0.6 * total / GIB
  s = summary.summarize(c)
  text = summary.format_summary(s)
  assert _rows(text)["fits"].startswith(f"no: {total / GIB:.2f} GiB > ")
  lines = text.splitlines()
  first = lines.index(next(ln for ln in lines if ln.startswith("would fit")))
  sugg = s["memory_fit"]["suggestions"]
  assert sugg
  for line, want in zip(lines[first:], sugg):
    flags = " ".join(f"--config.{k}={v}" for k, v in want.items() if k != "total_gib")
    assert line[15:] == f"{flags}  ({want['total_gib']:.2f} GiB)", text
  c.system.device_memory_gib = 1e-6
  assert "no setting of mesh.fsdp, model.remat, train.grad_accum tried fits" in summary.format_summary(
      summary.summarize(c))
