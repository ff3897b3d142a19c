"""HealthiVert-GAN on synthetic vertebra phantoms: train briefly on healthy spines, grade synthetic fractures by RHLV.

HealthiVert-GAN (arXiv:2503.05990) cuts the target vertebra out of a sagittal slice, synthesises a pseudo-healthy
one from the neighbours, and grades the fracture from the relative height loss (RHLV) between the synthesised and
the real vertebra. Here the CT is replaced by phantoms with known heights:

1. Phantom (`--size` px square, default 64, hole `--band` rows, default 10 = 40 px at 256 scaled by 1/4): five
   rounded rectangles (cortical rim 200, interior 150, grey levels of a uint8 CT window), discs (80) between them,
   soft tissue 30, noise; healthy heights grow smoothly down the spine (a start of 6.5-8.5 px plus 0.2-0.5 px per
   level, rounded), so a vertebra's healthy height follows from its neighbours; widths 26-32 px; `--slices`
   sagittal slices per volume whose widths shrink away from the mid-sagittal slice. The target is vertebra 1, 2
   or 3; the others are the neighbours the coarse stage segments.
2. Training (healthy spines only, as the method), on batches of `--batch` random slices, Adam with beta1 0.5:
   `--warmup` (500) steps of the generator alone on the L1, both Dice and the height terms (official weights),
   then `--steps - --warmup` (100) iterations of the reference's update order: one generator forward
   (spectral-norm vectors updated), one Adam step for each of the three PatchGAN discriminators, then one
   generator step through the updated discriminators with every loss term at its official weight
   (`losses.healthivert`). Learning rates 1e-3 (generator) and 2e-4 (discriminators), constant, then falling
   linearly to 0 over the last `--decay` (300) steps (the reference's schedule). Reduced widths for the CPU budget:
   generator `--cnum` 8 (248,656 parameters; 16 is the reference's 986,888) and discriminators `--ndf` 16
   (174,801 each; 64 is the reference's 2,763,585). The HGAM input is zero (no fracture classifier is trained
   here) and the local discriminator's window is scaled with the image.
3. Evaluation: `--n_grade` phantoms, a quarter healthy and a quarter each with a crush, wedge or biconcave fracture
   of requested height loss in [0.05, 0.6]; heights are whole pixels, so the grade is that of the drawn loss
   r = 1 - (smallest fractured column) / (healthy height) in the mid slice: Genant-like grade = digitize(r, [0.2,
   0.25, 0.4]). Every fourth group of four phantoms (one of each kind) is the SVM's validation set. The generator
   (eval mode) synthesises every slice, the synthesised mask (rows [u, b) of the SHRM composition) and the real one
   give pre / mid / post RHLV (`lostjax.metrics.healthivert.rhlv`), which the reference's SVM protocol grades
   (`svm_grading`, needs scikit-learn). The same is done with the known healthy mask in place of the synthesised one (the RHLV upper
   bound). Healthy validation phantoms give the generation metrics (PSNR, SSIM, IoU, Dice, RVD).

Writes `<outdir>/healthivert_phantom.png` (inputs, syntheses, RHLV against the true height loss),
`<outdir>/results.md` and `<outdir>/results.json`; prints the JSON.

Usage: python examples/healthivert_phantom.py --outdir=/tmp/healthivert
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losses.healthivert import discriminator_loss, healthivert_generator_loss  # noqa: E402
from lostjax.metrics.healthivert import generation_metrics, rhlv, svm_grading  # noqa: E402
from lostjax.vision.healthivert import (Generator, PatchDiscriminator, context_shift,  # noqa: E402
                                        healthivert_forward, shrm_compose)

GRADE_CUTS = (0.2, 0.25, 0.4)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--band", type=int, default=10)
  p.add_argument("--slices", type=int, default=10, help="sagittal slices per phantom volume")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the generator (2e-4 in the reference)")
  p.add_argument("--lr_d", type=float, default=2e-4, help="Adam learning rate of the discriminators")
  p.add_argument("--warmup", type=int, default=500,
                 help="first steps of the generator alone: no discriminators, no adversarial and no edge term")
  p.add_argument("--decay", type=int, default=300,
                 help="the last steps over which both learning rates fall linearly to 0 (the reference's schedule: "
                      "constant, then linear decay)")
  p.add_argument("--cnum", type=int, default=8, help="generator width (16 = the reference's 986,888 parameters)")
  p.add_argument("--ndf", type=int, default=16, help="discriminator width (64 = the reference's 2,763,585)")
  p.add_argument("--mask_mode", default="soft", choices=("soft", "hard"))
  p.add_argument("--n_grade", type=int, default=80, help="phantoms for the grading (a quarter healthy)")
  p.add_argument("--n_val", type=int, default=8, help="healthy phantoms for the generation metrics")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--outdir", default="healthivert_phantom_out")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ phantoms

def _vertebra(size, top, heights_by_col, c0, c1):
  """Mask of one vertebra: column c in [c0, c1) spans rows [bottom - h(c), bottom), rounded corners."""
  h = np.asarray(heights_by_col).astype(int)
  bottom = top + int(h.max())
  inset = np.zeros(c1 - c0, int)
  inset[[0, -1]] = 1  # rounded corners
  rows = np.arange(size)[:, None]
  m = np.zeros((size, size), bool)
  m[:, c0:c1] = (rows >= np.maximum(bottom - h + inset, 0)) & (rows < np.maximum(bottom - inset, 0))
  return m, bottom


def _erode(m):
  e = m.copy()
  e[1:] &= m[:-1]
  e[:-1] &= m[1:]
  e[:, 1:] &= m[:, :-1]
  e[:, :-1] &= m[:, 1:]
  return e


def make_phantom(rng, size=64, n_slices=10, target=2, fracture=None, loss=0.):
  """A spine volume [S, S, Z]: CT (uint8 scale), masks of the 5 vertebrae [5, S, S, Z] and the healthy target.

  fracture: None, "crush" (uniform), "wedge" (anterior = low columns lose `loss` of the height, posterior intact)
  or "biconcave" (middle columns lose `loss`). Heights are whole pixels, so the drawn loss differs from `loss`:
  `height_loss` is the realised one, 1 - (smallest fractured column height) / (healthy height), in the
  mid-sagittal slice. Returns dict(ct, masks, healthy_target, heights, height_loss).
  """
  scale = size / 64
  # heights change smoothly along the spine (a start height and a per-level increase, rounded), as in real spines,
  # so the healthy height of a vertebra can be inferred from its neighbours
  heights = np.round((rng.uniform(6.5, 8.5) + rng.uniform(0.2, 0.5) * np.arange(5)) * scale).astype(int)
  width = int(rng.integers(round(26 * scale), round(32 * scale) + 1))
  discs = rng.integers(max(round(3 * scale), 2), round(4 * scale) + 1, 4)
  top0 = int((size - heights.sum() - discs.sum()) // 2)
  z_mid = (n_slices - 1) / 2
  ct = np.zeros((size, size, n_slices))
  masks = np.zeros((5, size, size, n_slices), bool)
  healthy = np.zeros((size, size, n_slices), bool)
  realised = 0.
  for z in range(n_slices):
    w = max(int(width * np.sqrt(max(1 - ((z - z_mid) / (n_slices * 0.75)) ** 2, 0.2))), 6)
    c0 = size // 2 - w // 2
    img = np.full((size, size), 30.)
    top = top0
    for i in range(5):
      base = np.full(w, float(heights[i]))
      cols = np.linspace(0, 1, w)
      hb = base.copy()
      if i == target and fracture is not None:
        if fracture == "crush":
          hb = base * (1 - loss)
        elif fracture == "wedge":
          hb = base * (1 - loss * (1 - cols))
        elif fracture == "biconcave":
          hb = base * (1 - loss * np.clip(1 - np.abs(cols - 0.5) * 3, 0, 1))
        hb = np.maximum(np.round(hb), 2)
      if i == target and z == n_slices // 2:
        realised = 1. - hb.min() / base.max()
      if i == target:
        healthy[:, :, z], _ = _vertebra(size, top, base, c0, c0 + w)
      m, bottom = _vertebra(size, top + int(base.max() - hb.max()), hb, c0, c0 + w)
      masks[i, :, :, z] = m
      img[m] = 150.
      img[m & ~_erode(m)] = 200.
      if i < 4:
        img[bottom:bottom + discs[i], c0:c0 + w] = 80.
        top = bottom + discs[i]
    ct[:, :, z] = np.clip(img + rng.normal(0, 5, img.shape), 0, 255)
  return {"ct": ct, "masks": masks, "healthy_target": healthy, "heights": heights, "height_loss": float(realised)}


def slice_sample(ph, z, target):
  """The unshifted slice z: CT normalised as the reference, neighbour and target masks ([S, S, 1]), positions."""
  tm = ph["masks"][target, :, :, z]
  rows = np.where(tm.any(axis=1))[0]
  x1, x2 = int(rows.min()), int(rows.max())
  neighbours = ph["masks"][[i for i in range(5) if i != target], :, :, z].any(axis=0)
  n_slices = ph["ct"].shape[2]
  return {"real": (ph["ct"][:, :, z] / 127.5 - 1.)[:, :, None].astype(np.float32),
          "neighbours": neighbours[:, :, None].astype(np.float32), "real_mask": tm[:, :, None].astype(np.float32),
          "slice_ratio": np.float32(abs(z - (n_slices - 1) / 2) / n_slices * 2),
          "height": np.int32(x2 - x1), "x1": np.int32(x1), "x2": np.int32(x2)}


_context_shift = jax.jit(context_shift, static_argnames="band")


def stack(samples, band):
  """A batch of slice samples with the generator's inputs: CT and neighbour masks shifted around the hole
  (`context_shift`), the hole mask, a zero HGAM map."""
  b = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
  shifted, hole, _ = _context_shift(np.concatenate([b["real"], b.pop("neighbours")], -1), b["x1"], b["x2"],
                                    band=band)
  shifted, hole = np.asarray(shifted), np.asarray(hole)
  b.update(masked=shifted[..., :1], normal_vert=shifted[..., 1:], mask=hole, cam=np.zeros_like(hole))
  return b


def training_batch(rng, args):
  samples = []
  for _ in range(args.batch):
    target = int(rng.integers(1, 4))
    ph = make_phantom(rng, args.size, args.slices, target)
    z = int(rng.integers(1, args.slices - 1))
    samples.append(slice_sample(ph, z, target))
  return stack(samples, args.band)


# ------------------------------------------------------------------------------------------------ training

def lr_schedule(lr, steps, decay, offset=0):
  """The reference's schedule: lr until step `steps - decay`, then linearly down to 0 at `steps`; the optimizer's
  step t is the training step t + offset (the discriminators start after the warm-up)."""
  return (lambda t: lr * jnp.clip((steps - t - offset) / decay, 0., 1.)) if decay else lr


def build(args, key):
  """Graph definitions, initial states and optimizers of G and D1..D3 (created under jit: one compilation)."""
  make_g = lambda k: Generator(args.cnum, rngs=nnx.Rngs(k))
  make_d = lambda k: PatchDiscriminator(ndf=args.ndf, rngs=nnx.Rngs(k))
  g_def = nnx.split(nnx.eval_shape(lambda: make_g(0)), nnx.Param, ...)[0]
  d_def = nnx.split(nnx.eval_shape(lambda: make_d(0)), nnx.Param, ...)[0]
  kg, *kd = jax.random.split(key, 4)
  g = jax.jit(lambda k: nnx.split(make_g(k), nnx.Param, ...)[1:])(kg)
  ds = [jax.jit(lambda k: nnx.split(make_d(k), nnx.Param, ...)[1:])(k) for k in kd]
  tx_g = optax.adam(lr_schedule(args.lr, args.steps, args.decay), b1=0.5, b2=0.999)
  tx_d = optax.adam(lr_schedule(args.lr_d, args.steps, args.decay, offset=args.warmup), b1=0.5, b2=0.999)
  state = {"g": g, "d": ds, "opt_g": tx_g.init(g[0]), "opt_d": [tx_d.init(d[0]) for d in ds]}
  return g_def, d_def, (tx_g, tx_d), state


def _local_half_width(args):
  return max(1, round(35 * args.size / 256))


def make_train_step(g_def, d_def, txs, args):
  tx_g, tx_d = txs
  half = _local_half_width(args)
  d_inputs = (("real", "fake"), ("real_mask", "fake_mask"), ("real_local", "fake_local"))

  def apply_d(d, x):
    params, rest = d
    m = nnx.merge(d_def, params, rest)
    return m(x), nnx.state(m, nnx.BatchStat)

  def step(state, batch):
    g_params, g_rest = state["g"]

    # NNX state written during a differentiated call (spectral-norm vectors, BatchNorm statistics) enters it as
    # a differentiated argument (its cotangent is dropped), so the write happens at the trace that created it.
    def gen(params, rest):
      g = nnx.merge(g_def, params, rest)
      out = healthivert_forward(g, batch, band=args.band, mask_mode=args.mask_mode, local_half_width=half)
      return out, nnx.state(g, nnx.BatchStat)

    out, pullback, g_rest = jax.vjp(gen, g_params, g_rest, has_aux=True)
    reals = dict(batch, real_local=out["real_local"])
    new_d, new_opt_d, d_losses = [], [], []
    for d, opt, (rk, fk) in zip(state["d"], state["opt_d"], d_inputs):
      def d_obj(params, rest):
        real_logits, rest = apply_d((params, rest), reals[rk])
        fake_logits, rest = apply_d((params, rest), jax.lax.stop_gradient(out[fk]))
        return discriminator_loss(real_logits, fake_logits), rest
      (ld, rest), (grads, _) = jax.value_and_grad(d_obj, argnums=(0, 1), has_aux=True)(*d)
      upd, opt = tx_d.update(grads, opt, d[0])
      new_d.append((optax.apply_updates(d[0], upd), rest))
      new_opt_d.append(opt)
      d_losses.append(ld)

    def g_obj(o, d_rests):
      logits, rests = [], []
      for d, r, (_, fk) in zip(new_d, d_rests, d_inputs):
        z, r = apply_d((d[0], r), o[fk])
        logits.append(z)
        rests.append(r)
      total, terms = healthivert_generator_loss(o, batch, logits, band=args.band)
      return total, (terms, rests)

    (total, (terms, d_rests)), (g_out, _) = jax.value_and_grad(g_obj, argnums=(0, 1), has_aux=True)(
        out, [d[1] for d in new_d])
    g_grads, _ = pullback(g_out)
    upd, opt_g = tx_g.update(g_grads, state["opt_g"], g_params)
    new_state = {"g": (optax.apply_updates(g_params, upd), g_rest),
                 "d": [(d[0], r) for d, r in zip(new_d, d_rests)], "opt_g": opt_g, "opt_d": new_opt_d}
    metrics = dict(terms, total=total, d1=d_losses[0], d2=d_losses[1], d3=d_losses[2])
    return new_state, metrics

  return jax.jit(step, donate_argnums=0)


def make_reconstruction_step(g_def, tx, args, *, weights=None):
  """Generator-only step of the warm-up: the L1, both Dice and the height terms at their official weights; no
  discriminator, no adversarial term, and no edge term.

  The edge loss compares Sobel magnitudes, which are blind to the mask's polarity: from the uninformative start
  (fine_seg near 0.5 everywhere) it drew the fine segmentation towards the inverse of the vertebra (the hole rows
  outside the vertebra's columns) in a run with it, so it joins with the adversarial terms after the warm-up.
  weights: optional keyword overrides of `healthivert_generator_loss` (diagnostics)."""
  weights = {"edge_weight": 0., **(weights or {})}
  dummy = [jnp.zeros((1, 1, 1, 1))] * 3  # logits of the absent discriminators; their term has weight 0

  def step(state, batch):
    g_params, g_rest = state["g"]

    def obj(params, rest):
      g = nnx.merge(g_def, params, rest)
      out = healthivert_forward(g, batch, band=args.band, mask_mode=args.mask_mode,
                                local_half_width=_local_half_width(args))
      total, terms = healthivert_generator_loss(out, batch, dummy, band=args.band, gan_scale=0., **weights)
      return total, (terms, nnx.state(g, nnx.BatchStat))

    # the spectral-norm vectors written in the call enter as a differentiated argument (see make_train_step)
    (total, (terms, g_rest)), (grads, _) = jax.value_and_grad(obj, argnums=(0, 1), has_aux=True)(g_params, g_rest)
    upd, opt_g = tx.update(grads, state["opt_g"], g_params)
    new_state = dict(state, g=(optax.apply_updates(g_params, upd), g_rest), opt_g=opt_g)
    return new_state, dict(terms, total=total)

  return jax.jit(step, donate_argnums=0)


def make_synthesise(g_def, g_state, args):
  """The generator in eval mode (spectral-norm vectors frozen), jitted: batch -> outputs + synthesised mask."""
  g = nnx.merge(g_def, *g_state)
  g.eval()
  e_def, e_state = nnx.split(g)

  @jax.jit
  def run(batch):
    m = nnx.merge(e_def, e_state)
    out = healthivert_forward(m, batch, band=args.band, mask_mode="hard")
    hard = (out["fine_seg"] > 0.5).astype(jnp.float32)
    out["synth_mask"] = shrm_compose(jnp.zeros_like(hard), hard, out["p2"], batch["height"], batch["x1"],
                                     batch["x2"], band=args.band)
    return out

  return run


def train(state, phases, next_batch, *, log_every=1):
  """Run the training phases in order; phases: (name, jitted step, number of steps) tuples.

  Returns the state, a history of the logged steps' metrics (every `log_every`-th step, the last step, and the
  first step of each phase) and per-phase timing after the phase's first (compiling) step."""
  total = sum(n for _, _, n in phases)
  history, timing, i = [], {}, 0
  for name, step, n in phases:
    for j in range(n):
      state, m = step(state, next_batch())
      if i % max(1, log_every) == 0 or i == total - 1 or j == 0:
        history.append({k: round(float(v), 4) for k, v in m.items()} | {"step": i, "phase": name})
      if j == 0:  # after the phase's compilation
        jax.block_until_ready(state)
        start = (time.time(), time.process_time())
      i += 1
    if n:
      jax.block_until_ready(state)
      timing[name] = {"steps": n, "step_seconds": round((time.time() - start[0]) / max(n - 1, 1), 3),
                      "step_cpu_seconds": round((time.process_time() - start[1]) / max(n - 1, 1), 3)}
  return state, history, timing


# ------------------------------------------------------------------------------------------------ evaluation

def synthesise_volume(run, ph, target, args):
  zs = [z for z in range(args.slices) if ph["masks"][target, :, :, z].any()]
  out = run(stack([slice_sample(ph, z, target) for z in zs], args.band))
  synth = np.zeros(ph["ct"].shape, bool)
  fake_ct = np.array(ph["ct"])
  for i, z in enumerate(zs):
    synth[:, :, z] = np.asarray(out["synth_mask"][i, :, :, 0]) > 0.5
    fake_ct[:, :, z] = (np.asarray(out["fake"][i, :, :, 0]) + 1) * 127.5
  return synth, fake_ct, out


def grade_of(loss):
  return int(np.digitize(loss, GRADE_CUTS))


def evaluate(run, args, rng):
  rhlv_j = jax.jit(rhlv)
  rows, examples = [], []
  for i in range(args.n_grade):
    target = 2
    kind = ("none", "crush", "wedge", "biconcave")[i % 4]
    loss = 0. if kind == "none" else float(rng.uniform(0.05, 0.6))
    ph = make_phantom(rng, args.size, args.slices, target, None if kind == "none" else kind, loss)
    synth, fake_ct, _ = synthesise_volume(run, ph, target, args)
    label = ph["masks"][target]
    r = {k: float(v) for k, v in rhlv_j(synth, label).items()}
    ideal = {k: float(v) for k, v in rhlv_j(ph["healthy_target"], label).items()}
    # the grade of the drawn (whole-pixel) height loss, not of the requested one
    rows.append({"kind": kind, "loss": ph["height_loss"], "grade": grade_of(ph["height_loss"]), "rhlv": r,
                 "ideal": ideal})
    if len(examples) < 4 and kind != "none":
      examples.append((ph, synth, fake_ct, kind, loss))
  gen = []
  for _ in range(args.n_val):
    ph = make_phantom(rng, args.size, args.slices, 2)
    synth, fake_ct, _ = synthesise_volume(run, ph, 2, args)
    gen.append(generation_metrics(ph["ct"], fake_ct, ph["masks"][2], synth, min_pixels=100 * (args.size // 64) ** 2))
  return rows, examples, gen


def validation_split(n):
  """[n] bool: every fourth group of four consecutive phantoms (one of each fracture kind) is held out."""
  return (np.arange(n) // 4) % 4 == 3


def grading_scores(rows, key):
  # RHLV = (H_fake - H_label) / (H_fake + 1e-6) is about -1e6 H_label when no synthesised column of a region passes
  # the height threshold; clipped to [-1, 1] (a real height loss lies in [0, 1)) so one such case does not set
  # the SVM's feature scaling
  feats = np.clip([[r[key]["pre"], r[key]["mid"], r[key]["post"]] for r in rows], -1., 1.)
  grades = np.array([r["grade"] for r in rows])
  is_val = validation_split(len(rows))
  try:
    out = svm_grading(feats, grades, is_val, n_splits=min(5, max(2, int(np.bincount(grades[~is_val]).min()))))
  except (ImportError, ValueError) as e:
    return {"error": str(e).splitlines()[0]}
  return {k: round(out[k], 4) for k in ("f1", "precision", "recall", "accuracy")}


def figure(path, examples, rows, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(examples)
  fig, ax = plt.subplots(2, max(n, 1) + 1, figsize=(3 * (n + 1), 6))
  ax = np.atleast_2d(ax)
  for j, (ph, synth, fake_ct, kind, loss) in enumerate(examples):
    z = args.slices // 2
    ax[0, j].imshow(ph["ct"][:, :, z], cmap="gray", vmin=0, vmax=255)
    ax[0, j].contour(ph["masks"][2, :, :, z], levels=[0.5], colors="r", linewidths=0.8)
    ax[0, j].set_title(f"{kind}, loss {loss:.2f}")
    ax[1, j].imshow(fake_ct[:, :, z], cmap="gray", vmin=0, vmax=255)
    ax[1, j].contour(synth[:, :, z], levels=[0.5], colors="c", linewidths=0.8)
    ax[1, j].set_title("pseudo-healthy synthesis")
  for a in ax[:, :n].ravel():
    a.axis("off")
  loss = np.array([r["loss"] for r in rows])
  for key, mk, lab in (("rhlv", "o", "synthesised"), ("ideal", "x", "true healthy mask")):
    ax[0, n].scatter(loss, np.clip([r[key]["mid"] for r in rows], -1, 1), marker=mk, s=12, label=lab)
  ax[0, n].plot([0, 0.6], [0, 0.6], "k:", lw=0.8)
  ax[0, n].set_xlabel("true height loss")
  ax[0, n].set_ylabel("mid RHLV (clipped to [-1, 1])")
  ax[0, n].legend(fontsize=7)
  ax[1, n].axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  if args.size % 8 or args.band >= args.size // 2:
    raise SystemExit(f"--size must be a multiple of 8 and --band smaller than half of it, got {args.size}, "
                     f"{args.band}")
  if not 0 <= args.warmup <= args.steps:
    raise SystemExit(f"--warmup must lie in [0, --steps={args.steps}], got {args.warmup}")
  if not 0 <= args.decay <= args.steps:
    raise SystemExit(f"--decay must lie in [0, --steps={args.steps}], got {args.decay}")
  if args.cnum < 2 or args.cnum % 2:
    raise SystemExit(f"--cnum must be an even number >= 2, got {args.cnum}")
  os.makedirs(args.outdir, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  t0, c0 = time.time(), time.process_time()
  g_def, d_def, txs, state = build(args, jax.random.key(args.seed))
  phases = (("warmup", make_reconstruction_step(g_def, txs[0], args), args.warmup),
            ("adversarial", make_train_step(g_def, d_def, txs, args), args.steps - args.warmup))
  state, history, timing = train(state, phases, lambda: training_batch(rng, args), log_every=args.steps // 10)
  t_train, c_train = time.time() - t0, time.process_time() - c0
  finite = all(np.isfinite(v) for h in history for k, v in h.items() if k != "phase")
  run = make_synthesise(g_def, state["g"], args)
  rows, examples, gen = evaluate(run, args, rng)
  from scipy.stats import spearmanr
  loss = np.array([r["loss"] for r in rows])
  mid, ideal_mid = np.array([r["rhlv"]["mid"] for r in rows]), np.array([r["ideal"]["mid"] for r in rows])
  result = {
      "steps": args.steps, "warmup": args.warmup, "batch": args.batch, "size": args.size, "cnum": args.cnum,
      "ndf": args.ndf, "lr": args.lr, "lr_d": args.lr_d, "decay": args.decay, "train_seconds": round(t_train, 1),
      "train_cpu_seconds": round(c_train, 1), "timing": timing,
      "losses_finite": bool(finite), "first": history[0], "last": history[-1],
      "grade_counts": np.bincount([r["grade"] for r in rows], minlength=len(GRADE_CUTS) + 1).tolist(),
      "grading_synthesised": grading_scores(rows, "rhlv"), "grading_true_healthy": grading_scores(rows, "ideal"),
      "mid_rhlv_spearman": round(float(spearmanr(loss, mid).statistic), 4) if np.std(mid) > 0 else 0.,
      "mid_rhlv_median_abs_error_vs_ideal": round(float(np.median(np.abs(mid - ideal_mid))), 4),
      "n_without_synthesised_columns": int(sum(min(r["rhlv"][k] for k in ("pre", "mid", "post")) < -1.
                                               for r in rows)),
      "generation": {k: round(float(np.mean([g[k] for g in gen])), 4) for k in gen[0]},
      "total_seconds": round(time.time() - t0, 1), "total_cpu_seconds": round(time.process_time() - c0, 1)}
  figure(os.path.join(args.outdir, "healthivert_phantom.png"), examples, rows, args)
  with open(os.path.join(args.outdir, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.outdir, "results.md"), "w") as f:
    f.write(f"Graded phantoms per grade 0-3: {result['grade_counts']}.\n\n")
    f.write("| features | macro F1 | precision | recall | accuracy |\n|---|---|---|---|---|\n")
    for key, name in (("grading_synthesised", "RHLV, synthesised healthy mask"),
                      ("grading_true_healthy", "RHLV, true healthy mask (upper bound)")):
      g = result[key]
      f.write(f"| {name} | " + " | ".join(str(g.get(k, "-")) for k in ("f1", "precision", "recall", "accuracy"))
              + " |\n")
    f.write("\n| generation | " + " | ".join(result["generation"]) + " |\n|---|"
            + "---|" * len(result["generation"]) + "\n| healthy validation phantoms | "
            + " | ".join(str(v) for v in result["generation"].values()) + " |\n")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
