"""PI-RADS models: parameter counts from the layer listing, output shapes, the zone partition, path combination,
identical paths give a zero co-training term, signed distance maps vs brute force, the phantom, and (slow) Adam
steps on one phantom lower the two-stage loss."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import losses as L
from lostjax.vision import pirads as P
from lostjax.vision.prostate_phantom import phantom_batch, prostate_phantom


def _conv(cin, cout):          # 3x3x3 conv + bias, BatchNorm scale + bias
  return 27 * cin * cout + cout + 2 * cout


def unet_params(s, classes, cin=1):
  enc = sum(_conv(a * s if a else cin, b * s) for a, b in ((0, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 16),
                                                             (16, 16)))
  dec = sum(8 * c * s * c * s + c * s for c in (16, 8, 4))
  dec += sum(_conv(a * s, b * s) for a, b in ((24, 8), (8, 8), (12, 4), (4, 4), (6, 2), (2, 2)))
  return enc, dec, 2 * s * classes + classes


def rngs(seed=0):           # 'rbg' keys: threefry initialisers of 3-D kernels are slow to compile on CPU
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def n_params(model):
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_parameter_counts():
  enc, dec, head = unet_params(16, 5)
  assert n_params(nnx.eval_shape(lambda: P.UNet3D(5, filters=16, rngs=rngs()))) == enc + dec + head
  cfg = P.PiradsConfig()
  sdm = 2 * (32 * 2 + 2)
  assert n_params(nnx.eval_shape(lambda: P.DualPathUNet(cfg, rngs=rngs()))) == 2 * (enc + dec + head) + sdm
  shared = nnx.eval_shape(lambda: P.DualPathUNet(P.PiradsConfig(share_encoder=True, sdm_head=False), rngs=rngs()))
  assert n_params(shared) == enc + 2 * (dec + head)


def test_config_partition():
  cfg = P.PiradsConfig()
  assert cfg.num_classes == 5 and cfg.background == 4
  assert cfg.owned(0) == (0, 1, 4) and cfg.owned(1) == (2, 3, 4) and cfg.owner == (0, 0, 1, 1)
  alt = P.PiradsConfig(partition=(("PZ",), ("TZ", "DPU", "AFS")))
  assert alt.owned(1) == (1, 2, 3, 4) and alt.owner == (0, 1, 1, 1)
  two = P.PiradsConfig(zones=("PZ", "TZ"), partition=(("PZ",), ("TZ",)))
  assert two.num_classes == 3 and two.owned(1) == (1, 2)
  for bad, match in ((dict(partition=(("PZ", "TZ"), ("DPU",))), "exactly one"),
                     (dict(partition=(("PZ", "TZ", "DPU", "AFS"), ())), "non-empty"),
                     (dict(partition=(("PZ", "TZ"), ("DPU", "AFS", "PZ"))), "exactly one"),
                     (dict(zones=("PZ", "PZ")), "distinct"), (dict(filters=0), "filters"),
                     (dict(dropout=1.0), "dropout")):
    with pytest.raises(ValueError, match=match):
      P.PiradsConfig(**bad)


def test_combine_paths():
  cfg = P.PiradsConfig()
  rng = np.random.default_rng(0)
  pa, pb = rng.dirichlet(np.ones(5), (3, 4)), rng.dirichlet(np.ones(5), (3, 4))
  got = np.asarray(P.combine_paths(pa, pb, cfg))
  np.testing.assert_allclose(got[..., [0, 1]], pa[..., [0, 1]], rtol=1e-6)
  np.testing.assert_allclose(got[..., [2, 3]], pb[..., [2, 3]], rtol=1e-6)
  np.testing.assert_allclose(got[..., 4], (pa[..., 4] + pb[..., 4]) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="probs_a and probs_b"):
    P.combine_paths(pa[..., :4], pb[..., :4], cfg)


@functools.partial(nnx.jit, static_argnames="train")
def _forward(model, x, train=False):     # one compilation per model structure, shared by the tests below
  return model(x, train=train)


def _volumes():
  return jnp.asarray(phantom_batch(2, shape=(4, 8, 8))[0])


def test_forward_shapes():                 # traced only (jax.eval_shape): nothing is compiled
  cfg = P.PiradsConfig(filters=1)
  x = jax.ShapeDtypeStruct((2, 4, 8, 8, 1), jnp.float32)
  for train in (False, True):
    out = jax.eval_shape(lambda x: P.DualPathUNet(cfg, rngs=rngs())(x, train=train, key=jax.random.key(0)), x)
    assert {k: v.shape for k, v in out.items()} == {"logits_a": (2, 4, 8, 8, 5), "logits_b": (2, 4, 8, 8, 5),
                                                     "sdm_a": (2, 4, 8, 8, 2), "sdm_b": (2, 4, 8, 8, 2)}
  out = jax.eval_shape(lambda x: P.UNet3D(5, filters=1, rngs=rngs())(x), x)
  assert out.shape == (2, 4, 8, 8, 5)


@pytest.mark.slow  # default set: test_forward_shapes, test_recompute_batch_stats_... (a compiled U-Net forward)
def test_forward_values_and_identical_paths():     # and the co-training term in tests/test_loss_pirads.py
  model = P.DualPathUNet(P.PiradsConfig(filters=1), rngs=rngs())
  x = _volumes()
  out = _forward(model, x)
  assert float(jnp.abs(out["sdm_a"]).max()) <= 1.0
  assert float(L.pirads_consistency_loss(jax.nn.softmax(out["logits_a"]), jax.nn.softmax(out["logits_b"]))) > 0
  # path B a copy of path A: the two predictions coincide and the co-training term vanishes
  model.encoder_b = nnx.clone(model.encoder_a)
  model.decoder_b = nnx.clone(model.decoder_a)
  model.head_b = nnx.clone(model.head_a)
  out = _forward(model, x)
  np.testing.assert_array_equal(out["logits_a"], out["logits_b"])
  assert float(L.pirads_consistency_loss(jax.nn.softmax(out["logits_a"]), jax.nn.softmax(out["logits_b"]))) == 0.0
  # re-estimated BatchNorm statistics of the dual-path model (key check passes with dropout switched off)
  stats = nnx.jit(P.recompute_batch_stats)(model, x)
  nnx.update(model, stats)
  twin = P.DualPathUNet(P.PiradsConfig(filters=1, dropout=0.0), rngs=rngs())
  nnx.update(twin, nnx.state(model, nnx.Param))
  fresh, want = _forward(model, x), _forward(twin, x, train=True)
  np.testing.assert_allclose(fresh["logits_b"], want["logits_b"], rtol=2e-4, atol=2e-4)


def test_recompute_batch_stats_makes_eval_mode_match_training_normalisation():
  # a U-Net with dropout 0.5 and its initial running statistics: after re-estimation on x, evaluation mode equals
  # the training-mode (batch-statistics) forward of the same weights without dropout, and the model is unchanged
  x = _volumes()
  model = P.UNet3D(5, filters=1, rngs=rngs())
  twin = P.UNet3D(5, filters=1, dropout=0.0, rngs=rngs())     # same weights, no dropout
  before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  stats = nnx.jit(P.recompute_batch_stats)(model, x)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)
  stale = _forward(model, x)
  nnx.update(model, stats)
  fresh, want = _forward(model, x), _forward(twin, x, train=True)
  np.testing.assert_allclose(fresh, want, rtol=2e-4, atol=2e-4)
  assert float(jnp.abs(stale - want).max()) > 1e-2              # the initial statistics do not match
  h = np.asarray(jax.nn.relu(twin.encoder.d1a.conv(x)))         # first BatchNorm input: mean and biased variance
  np.testing.assert_allclose(stats["encoder"]["d1a"]["bn"]["mean"][...], h.mean((0, 1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(stats["encoder"]["d1a"]["bn"]["var"][...], h.var((0, 1, 2, 3)), rtol=1e-4)


def test_bad_volumes():
  model = nnx.eval_shape(lambda: P.UNet3D(5, filters=1, rngs=rngs()))
  with pytest.raises(ValueError, match="divisible"):
    model(jnp.zeros((1, 8, 30, 32, 1)))
  with pytest.raises(ValueError, match="input must be"):
    model(jnp.zeros((1, 8, 32, 32, 2)))
  with pytest.raises(ValueError, match="no key"):
    model(jnp.zeros((1, 8, 32, 32, 1)), train=True)


def _bf_sdm(mask, spacing):
  pts = np.argwhere(np.ones_like(mask)) * spacing
  fg, bg = pts[mask.ravel()], pts[~mask.ravel()]
  d_out = np.array([np.sqrt(((fg - p) ** 2).sum(1)).min() if not m else 0.0 for p, m in zip(pts, mask.ravel())])
  d_in = np.array([np.sqrt(((bg - p) ** 2).sum(1)).min() if m else 0.0 for p, m in zip(pts, mask.ravel())])
  return (d_out / d_out.max() - d_in / d_in.max()).reshape(mask.shape)


def test_signed_distance_maps_vs_brute_force():
  _, lab = prostate_phantom(0, shape=(6, 12, 12), jitter=0.1)
  spacing = np.array([3.0, 0.5, 0.5])
  got = P.signed_distance_maps(lab[None], [0, 1, 2], spacing)
  assert got.shape == (1, 6, 12, 12, 3) and got.dtype == np.float32
  for j, zid in enumerate((0, 1)):
    np.testing.assert_allclose(got[0, ..., j], _bf_sdm(lab == zid, spacing), atol=1e-6)
    assert got[0, ..., j][lab == zid].max() < 0 and got[0, ..., j][lab != zid].min() > 0
  assert got.min() >= -1 and got.max() <= 1
  empty = P.signed_distance_maps(lab, [7])
  assert np.all(empty == 1.0)
  with pytest.raises(ValueError, match="labels"):
    P.signed_distance_maps(lab.astype(float), [0])


def test_phantom_zones():
  img, lab = prostate_phantom(0)
  assert img.shape == lab.shape == (16, 64, 64) and img.dtype == np.float32
  counts = np.bincount(lab.ravel(), minlength=5)
  assert np.all(counts > 0)
  z_dpu = np.unique(np.nonzero(lab == 2)[0])
  assert z_dpu.min() == 4 and z_dpu.max() == 11            # not every slice has the urethra
  assert abs(img[lab == 0].mean() - 0.8) < 0.01 and abs(img[lab == 3].mean() - 0.2) < 0.01
  _, lab2 = prostate_phantom(0, num_zones=2)
  assert set(np.unique(lab2)) == {0, 1, 2}
  with pytest.raises(ValueError, match="num_zones"):
    prostate_phantom(0, num_zones=3)


def test_phantom_dpu_radius():
  """The DPU tube: default radius 1.5 reference voxels (a 3 x 3 disk per slice at the reference grid); a larger
  `dpu_radius` widens it (in reference voxels, scaled with the grid)."""
  per_slice = lambda lab: np.bincount(np.nonzero(lab == 2)[0])[4:12]
  _, lab = prostate_phantom(0)
  np.testing.assert_array_equal(per_slice(lab), 9)                        # |dy|, |dx| <= 1: r^2 <= 2.25
  _, wide = prostate_phantom(0, dpu_radius=4.0)
  np.testing.assert_array_equal(per_slice(wide), 49)                      # lattice points with dy^2 + dx^2 <= 16
  _, half = prostate_phantom(0, shape=(8, 32, 32), dpu_radius=4.0)        # radius 2 voxels at half the grid
  assert np.bincount(np.nonzero(half == 2)[0])[2:6].tolist() == [13] * 4
  with pytest.raises(ValueError, match="dpu_radius"):
    prostate_phantom(0, dpu_radius=0.0)


@pytest.mark.slow
def test_adam_steps_lower_two_stage_loss():
  cfg = P.PiradsConfig(filters=4)
  model = P.DualPathUNet(cfg, rngs=rngs())
  x, y = phantom_batch(1, shape=(8, 32, 32))
  sa = P.signed_distance_maps(y, [cfg.zones.index(z) for z in cfg.partition[0]], (3.0, 1.0, 1.0))
  sb = P.signed_distance_maps(y, [cfg.zones.index(z) for z in cfg.partition[1]], (3.0, 1.0, 1.0))
  onehot = jax.nn.one_hot(y, cfg.num_classes)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(1e-3)

  def loss_fn(p, rest, key, lambda_co):
    m = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, rest))
    out = m(x, train=True, key=key)
    loss, _ = L.pirads_dual_path_loss(out, onehot, own_a=cfg.owned(0), own_b=cfg.owned(1), sdm_a=sa, sdm_b=sb,
                                      lambda_co=lambda_co)
    return loss, nnx.split(m, nnx.Param, ...)[2]

  @jax.jit
  def step(p, rest, opt, key, lambda_co):
    (loss, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(p, rest, key, lambda_co)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), rest, opt, loss

  opt = tx.init(params)
  losses_seen = []
  for i in range(30):
    params, rest, opt, loss = step(params, rest, opt, jax.random.key(i), 1.0 if i >= 20 else 0.0)
    losses_seen.append(float(loss))
  assert np.mean(losses_seen[15:20]) < losses_seen[0] - 0.2
  assert np.all(np.isfinite(losses_seen))


@pytest.mark.slow  # the example end to end with tiny settings; `pytest -m slow tests`
def test_phantom_example_tiny(tmp_path):
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pirads_phantom.py")
  spec = importlib.util.spec_from_file_location("pirads_phantom_example", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = mod.main([f"--out={tmp_path}", "--steps1=3", "--steps2=2", "--n_train=2", "--n_test=1", "--filters=2"])
  assert set(out["models"]) == {"baseline", "dual_path"}
  for m in out["models"].values():
    assert set(m["argmax"]) == {"PZ", "TZ", "DPU", "AFS"} and 0 <= m["argmax"]["PZ"]["dice"]["mean"] <= 1
  assert np.isfinite(out["loss"]["dual_stage2_first_last"]).all()
  assert set(out["test_dice_by_bn_stats"]["dual_path"]) == {"running", "precise"}
  for f in ("results.json", "results.md", "pirads_phantom.png"):
    assert os.path.getsize(tmp_path / f) > 0
  with pytest.raises(SystemExit, match="already holds"):
    mod.main([f"--out={tmp_path}"])
