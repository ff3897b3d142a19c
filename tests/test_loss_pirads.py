"""PI-RADS dual-path losses vs float64 numpy transcriptions (soft Dice with smooth = 1, co-training MSE, SDM MSE,
the stage-1/stage-2 combination) and their gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses as L
from losses import pirads as P
from oracle_utils import fd_check, raises_while_tracing

RNG = np.random.default_rng(0)
SHAPE = (2, 3, 4, 4, 5)                    # [B, z, y, x, C]
LOGITS_A, LOGITS_B = RNG.normal(size=SHAPE), RNG.normal(size=SHAPE)
LABELS = RNG.integers(0, 5, SHAPE[:-1])
ONEHOT = np.eye(5)[LABELS]
SDM_A, SDM_B = RNG.uniform(-1, 1, SHAPE[:-1] + (2,)), RNG.uniform(-1, 1, SHAPE[:-1] + (2,))
PRED_A, PRED_B = np.tanh(RNG.normal(size=SDM_A.shape)), np.tanh(RNG.normal(size=SDM_B.shape))
OWN_A, OWN_B = (0, 1, 4), (2, 3, 4)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_dice(p, y, smooth=1.0):
  out = []
  for c in range(p.shape[-1]):
    pc, yc = p[..., c].ravel(), y[..., c].ravel()
    out.append((2 * sum(a * b for a, b in zip(pc, yc)) + smooth) / (yc.sum() + pc.sum() + smooth))
  return np.array(out)


def np_total(la, lb, y, sa, sb, pa_sdm, pb_sdm, lambda_mt=1.0, lambda_co=0.0):
  pa, pb = np_softmax(la), np_softmax(lb)
  da, db = np_dice(pa, y), np_dice(pb, y)
  loss = -sum(da[c] for c in OWN_A) - sum(db[c] for c in OWN_B)
  loss += lambda_mt * (np.mean((pa_sdm - sa) ** 2) + np.mean((pb_sdm - sb) ** 2))
  return loss + lambda_co * np.mean((pa - pb) ** 2)


def test_soft_dice_and_dice_loss_vs_numpy():
  p = np_softmax(LOGITS_A)

  @jax.jit  # one compilation for the four calls
  def run(p, y):
    return (L.pirads_soft_dice(p, y), L.pirads_soft_dice(p, y, smooth=0.0), L.pirads_dice_loss(p, y),
            L.pirads_dice_loss(p, y, classes=(1, 3)))

  with jax.enable_x64(True):
    dice, dice0, loss, loss13 = run(p, ONEHOT)
    np.testing.assert_allclose(dice, np_dice(p, ONEHOT), rtol=1e-12)
    np.testing.assert_allclose(dice0, np_dice(p, ONEHOT, 0.0), rtol=1e-12)
    assert float(loss) == pytest.approx(-np_dice(p, ONEHOT).sum(), rel=1e-12)
    assert float(loss13) == pytest.approx(-np_dice(p, ONEHOT)[[1, 3]].sum(), rel=1e-12)
  # a perfect prediction of an absent class scores 1 thanks to smooth = 1 (default)
  perfect = np.eye(5)[np.zeros((4, 4), int)]
  np.testing.assert_allclose(L.pirads_soft_dice(perfect.astype(np.float32), perfect), np.ones(5), rtol=1e-6)


def test_consistency_and_sdm_vs_numpy():
  pa, pb = np_softmax(LOGITS_A), np_softmax(LOGITS_B)
  w = RNG.random(SDM_A.shape) < 0.5

  @jax.jit  # one compilation for every value and gradient below
  def run(pa, pb, pred, sdm, w):
    return (L.pirads_consistency_loss(pa, pb), L.pirads_consistency_loss(pa, pa), L.pirads_sdm_loss(pred, sdm),
            L.pirads_sdm_loss(pred, sdm, where=w), jax.grad(L.pirads_consistency_loss, argnums=(0, 1))(pa, pb),
            jax.grad(lambda b: P.pirads_consistency_loss(pa, b, stop_gradient=True))(pb))

  with jax.enable_x64(True):
    co, co_same, sdm, sdm_w, (ga, gb), gb_sg = run(pa, pb, PRED_A, SDM_A, w)
    assert float(co) == pytest.approx(np.mean((pa - pb) ** 2), rel=1e-12)
    assert float(co_same) == 0.0
    assert float(sdm) == pytest.approx(np.mean((PRED_A - SDM_A) ** 2), rel=1e-12)
    assert float(sdm_w) == pytest.approx(np.mean((PRED_A - SDM_A)[w] ** 2), rel=1e-12)
    # symmetric by default: both paths get gradients; stop_gradient=True leaves path B fixed
    np.testing.assert_allclose(ga, -gb, rtol=1e-12)
    np.testing.assert_allclose(ga, 2 * (pa - pb) / pa.size, rtol=1e-12)
    assert float(jnp.abs(gb_sg).max()) == 0.0


@pytest.mark.parametrize("lambda_co", [0.0, 1.0])
def test_dual_path_loss_stages_vs_numpy(lambda_co):
  out = {"logits_a": LOGITS_A, "logits_b": LOGITS_B, "sdm_a": PRED_A, "sdm_b": PRED_B}
  fn = jax.jit(L.pirads_dual_path_loss, static_argnames=("own_a", "own_b", "lambda_mt", "lambda_co", "smooth",
                                                           "stop_gradient"))
  with jax.enable_x64(True):
    loss, parts = fn(out, ONEHOT, own_a=OWN_A, own_b=OWN_B, sdm_a=SDM_A, sdm_b=SDM_B, lambda_co=lambda_co)
    ref = np_total(LOGITS_A, LOGITS_B, ONEHOT, SDM_A, SDM_B, PRED_A, PRED_B, lambda_co=lambda_co)
    assert float(loss) == pytest.approx(ref, rel=1e-12)
    pa, pb = np_softmax(LOGITS_A), np_softmax(LOGITS_B)
    assert float(parts["co"]) == pytest.approx(np.mean((pa - pb) ** 2), rel=1e-12)
    assert float(parts["dice_a"]) == pytest.approx(-np_dice(pa, ONEHOT)[list(OWN_A)].sum(), rel=1e-12)

    def f(la, lb):
      return P.pirads_dual_path_loss({"logits_a": la, "logits_b": lb, "sdm_a": PRED_A, "sdm_b": PRED_B}, ONEHOT,
                                     own_a=OWN_A, own_b=OWN_B, sdm_a=SDM_A, sdm_b=SDM_B, lambda_co=lambda_co)[0]
    fd_check(f, (LOGITS_A, LOGITS_B))


def test_default_weights_pinned():
  out = {"logits_a": LOGITS_A, "logits_b": LOGITS_B, "sdm_a": PRED_A, "sdm_b": PRED_B}

  @jax.jit  # one compilation for both calls
  def run(out, y, sa, sb):
    # default weights; without SDM heads only the Dice terms (and the co term when weighted) remain
    return (L.pirads_dual_path_loss(out, y, own_a=OWN_A, own_b=OWN_B, sdm_a=sa, sdm_b=sb),
            L.pirads_dual_path_loss({"logits_a": out["logits_a"], "logits_b": out["logits_b"]}, y, own_a=OWN_A,
                                    own_b=OWN_B, lambda_co=2.0))

  with jax.enable_x64(True):
    (loss, parts), (loss2, parts2) = run(out, ONEHOT, SDM_A, SDM_B)
    assert float(loss) == pytest.approx(float(parts["dice_a"] + parts["dice_b"] + 1.0 * parts["sdm"]), rel=1e-12)
    assert float(loss2) == pytest.approx(float(parts2["dice_a"] + parts2["dice_b"] + 2.0 * parts2["co"]), rel=1e-12)


def test_bad_input():
  p = np_softmax(LOGITS_A).astype(np.float32)
  raises_while_tracing("onehot must have shape", lambda: L.pirads_soft_dice(p, ONEHOT[..., :4]))
  raises_while_tracing("classes", lambda: L.pirads_dice_loss(p, ONEHOT, classes=(0, 5)))
  raises_while_tracing("probs_b", lambda: L.pirads_consistency_loss(p, p[..., :4]))
  raises_while_tracing("logits_b", lambda: L.pirads_dual_path_loss({"logits_a": p}, ONEHOT, own_a=OWN_A,
                                                                   own_b=OWN_B))
  raises_while_tracing("sdm_a and sdm_b", lambda: L.pirads_dual_path_loss(
      {"logits_a": p, "logits_b": p, "sdm_a": PRED_A, "sdm_b": PRED_B}, ONEHOT, own_a=OWN_A, own_b=OWN_B))
  raises_while_tracing("lambda", lambda: L.pirads_dual_path_loss({"logits_a": p, "logits_b": p}, ONEHOT,
                                                                 own_a=OWN_A, own_b=OWN_B, lambda_co=-1.0))
