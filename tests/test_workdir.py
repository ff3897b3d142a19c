"""train/workdir.py: configs of older releases resume, fingerprints, and nothing is written before validation.

The fixtures in tests/fixtures/legacy_runs were written by the release before the optimizer sub-configs and the
objective registry (flat `optim.rho`/`optim.rank`/..., `objectives.trajectory`): 2 of 4 steps of a tiny run
(FRUGAL svd + MESA on a LOST model; GaLore on a dense model), with `final_params_step4.npz` = the parameters that
release reached after all 4 steps uninterrupted.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from train import trainer
from train import workdir as wd
from train.configs.base import base_config, model_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "legacy_runs")


def legacy_equivalent(name):
  """The fixture's run in the current config layout, written out by hand (not through upgrade_config)."""
  optim_name = {"frugal_mesa": "frugal", "galore": "galore"}[name]
  c = base_config()
  c.model = model_config("tiny", "lost" if optim_name == "frugal" else "dense")
  c.model.update(dict(d_model=32, d_ff=64, n_heads=2, n_layers=1, attn_rank=4, mlp_rank=4, sparsity=0.25,
                      max_seq_len=16))
  c.data.update(dict(source="synthetic", eval_max_tokens=64, cache_dir="none"))
  c.mesh.num_devices = 1
  c.optim.name = optim_name
  c.optim.lr = 3e-3
  c.optim.frugal.update(dict(rho=0.5, update_gap=2, proj_type="svd"))
  c.optim.galore.update_gap = 2
  if optim_name == "galore":
    c.optim.galore.rank = 4
  c.objectives.mesa.update(dict(enabled=name == "frugal_mesa", start_step=1))
  c.train.update(dict(steps=4, global_batch=4, seq_len=16, log_every=1, eval_every=0, ckpt_every=2,
                      progress=False, plot=False))
  return c


@pytest.mark.parametrize("name", ["frugal_mesa", "galore"])
def test_run_of_the_previous_release_resumes_and_matches_its_uninterrupted_run(tmp_path, name):
  run = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), run)
  before = (run / "config.json").read_text()
  out = trainer.train(legacy_equivalent(name), str(run))
  assert out["final_step"] == 4
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train_loss" in r] == [3, 4]   # resumed from the legacy checkpoint at step 2
  assert (run / "config.json").read_text() == before   # the stored config is kept as written
  ref = np.load(os.path.join(FIXTURES, name, "final_params_step4.npz"))
  got = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): np.asarray(v)
         for p, v in jax.tree_util.tree_flatten_with_path(out["state"]["params"])[0]}
  assert sorted(got) == sorted(ref.files)
  # Tolerance: each of the two resumed steps moves a weight by up to about lr = 3e-3 (Adam's normalised step,
  # FRUGAL's sign step), so a resume error (a batch skipped or repeated, moments or projector not restored) moves
  # weights by a large fraction of 1e-3. The reference was computed on another machine: float32 reductions summed
  # in another order (other SIMD widths, thread counts) differ in the last bits, which four steps of Adam amplify
  # to a few 1e-7 (6e-7 seen on a fresh machine of the same kind). 1e-5 is 300 times below one step and well
  # above that noise.
  for k in ref.files:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_legacy_run_with_another_optimizer_setting_is_refused(tmp_path):
  run = tmp_path / "run"
  shutil.copytree(os.path.join(FIXTURES, "galore"), run)
  cfg = legacy_equivalent("galore")
  cfg.optim.galore.scale = 0.5
  with pytest.raises(ValueError, match=r"optim.galore.scale: 0.25 -> 0.5"):
    trainer.train(cfg, str(run))


def test_upgrade_maps_flat_optimizer_fields_and_trajectory():
  old = json.load(open(os.path.join(FIXTURES, "frugal_mesa", "config.json")))
  assert old["optim"]["rho"] == 0.5 and old["objectives"]["trajectory"] == "mesa"
  new = wd.upgrade_config(old)
  assert new["optim"]["frugal"]["rho"] == 0.5 and new["optim"]["frugal"]["update_gap"] == 2
  assert new["optim"]["galore"]["update_gap"] == 2 and new["optim"]["galore"]["eps"] == 1e-6
  assert new["optim"]["trp"]["energy"] == 0.9 and new["optim"]["lift"]["update_gap"] == 400
  assert not any(k in new["optim"] for k in wd.LEGACY_OPTIM)
  assert new["objectives"]["mesa"]["enabled"] is True and new["objectives"]["saf"]["enabled"] is False
  assert new["objectives"]["reweight"]["enabled"] is False and "trajectory" not in new["objectives"]
  fresh = base_config().to_dict()
  assert set(new["optim"]) == set(fresh["optim"]) and set(new["objectives"]) == set(fresh["objectives"])
  no_fuse = json.loads(json.dumps(old))
  del no_fuse["model"]["fuse_projections"]
  assert wd.upgrade_config(no_fuse)["model"]["fuse_projections"] is False   # ADDED_FIELDS: the legacy value
  assert wd.upgrade_config(wd.upgrade_config(old)) == wd.upgrade_config(old)


def test_upgrade_maps_shared_legacy_fields_to_both_projected_optimizers():
  """'proj_side' and 'update_gap' were one field for FRUGAL and GaLore: a non-default value reaches both."""
  old = json.load(open(os.path.join(FIXTURES, "galore", "config.json")))
  old["optim"].update(proj_side="reverse_std", update_gap=7)
  new = wd.upgrade_config(old)["optim"]
  assert new["frugal"]["proj_side"] == new["galore"]["proj_side"] == "reverse_std"
  assert new["frugal"]["update_gap"] == new["galore"]["update_gap"] == 7


def test_fingerprint_ignores_unused_subconfigs():
  a, b = base_config(), base_config()
  b.optim.galore.rank = 7            # adamw run: GaLore's settings do not matter
  b.objectives.saf.topk = 3          # SAF is off
  b.train.steps = 5                  # extending a run is allowed
  assert wd.diff(wd.fingerprint(a), wd.fingerprint(b)) == []
  b.optim.name = "galore"
  assert "optim.name: 'adamw' -> 'galore'" in wd.diff(wd.fingerprint(a), wd.fingerprint(b))
  a.objectives.saf.enabled = b.objectives.saf.enabled = True     # an objective in use: its settings matter
  assert f"objectives.saf.topk: {a.objectives.saf.topk} -> 3" in wd.diff(wd.fingerprint(a), wd.fingerprint(b))


def test_bad_config_writes_nothing_and_a_workdir_without_checkpoint_is_reusable(tmp_path):
  from test_train import _cfg
  cfg = _cfg(tmp_path, steps=2)
  cfg.optim.name = "adamx"
  with pytest.raises(ValueError, match="optim.name='adamx'"):
    trainer.train(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  cfg.optim.name = "galore"
  cfg.optim.galore.rank = 10_000          # shape-dependent: found when the optimizer state is built
  with pytest.raises(ValueError, match="rank"):
    trainer.train(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # a workdir whose run wrote config.json but no checkpoint holds nothing to protect: a corrected config runs
  os.makedirs(tmp_path / "run2")
  (tmp_path / "run2" / "config.json").write_text(json.dumps({"optim": {"name": "adamx"}}))
  cfg.optim.name = "adamw"
  assert trainer.train(cfg, str(tmp_path / "run2"))["final_step"] == 2
  assert json.loads((tmp_path / "run2" / "config.json").read_text())["optim"]["name"] == "adamw"


def test_read_config_errors(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    wd.read_config(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    wd.read_config(str(tmp_path))


def test_fingerprint_compares_what_names_select():
  a, b = base_config(), base_config()
  a.model.sparse_impl, b.model.sparse_impl = "xla", "gather_xla"     # legacy name and registry name
  assert wd.diff(wd.fingerprint(a), wd.fingerprint(b)) == []
  b.model.sparse_impl = "fused_concat"
  assert wd.diff(wd.fingerprint(a), wd.fingerprint(b)) == ["model.sparse_impl: 'gather_xla' -> 'fused_concat'"]
  a.data.pipeline, b.model.sparse_impl = "cached", "gather_xla"        # stdlib: 'auto' selects the cache
  assert wd.diff(wd.fingerprint(a), wd.fingerprint(b)) == []
  # a TFDS run of an older release read through the cache; 'auto' would now stream it
  old = base_config().to_dict()
  old["data"]["source"] = "tfds"
  del old["data"]["pipeline"]
  new = base_config()
  new.data.source = "tfds"
  assert wd.diff(wd.fingerprint(wd.upgrade_config(old)), wd.fingerprint(new)) == [
      "data.pipeline: 'cached' -> 'stream'"]


def test_fingerprint_and_defaults_of_partial_configs():
  """Sections or fields missing from a stored config (hand-written, or from an older release) are compared as
  absent, and filling defaults keeps every stored value, also where its type differs from the default's."""
  assert wd.fingerprint({}) == {key: None for key in wd.FINGERPRINT}
  fp = wd.fingerprint({"model": {"d_model": 8}, "data": {"source": "stdlib"}})
  assert fp["model"] == {"d_model": 8} and fp["data"] == {"source": "stdlib"}
  merged = wd._merge_defaults({"a": 1, "b": {"x": 1}}, {"a": {"y": 2}, "b": 3, "c": {"z": 1}})
  assert merged == {"a": 1, "b": {"x": 1}, "c": {"z": 1}}


def test_prepare_workdir_writes_rewrites_and_protects(tmp_path):
  """An existing folder without a checkpoint takes (and retakes) config.json; with a checkpoint, the same config
  resumes and another one is refused, leaving config.json as it was."""
  a, b = base_config(), base_config()
  b.optim.name = "galore"
  run = tmp_path / "run"
  run.mkdir()                                                   # e.g. made by a job script
  assert wd.prepare_workdir(a, str(run), has_checkpoint=False) is False
  assert wd.prepare_workdir(b, str(run), has_checkpoint=False) is False    # nothing to protect: replaced
  assert wd.read_config(str(run)).optim.name == "galore"
  assert wd.prepare_workdir(b, str(run), has_checkpoint=True) is True
  before = (run / "config.json").read_text()
  with pytest.raises(ValueError, match="optim.name: 'galore' -> 'adamw'"):
    wd.prepare_workdir(a, str(run), has_checkpoint=True)
  assert (run / "config.json").read_text() == before
