"""Modern LLaMA-family checkpoints through train.export: grouped-query attention, tied embeddings, Llama-3 RoPE
scaling and Mixtral MoE. Oracle: Hugging Face transformers (PyTorch, float32, eager attention) on folders built
here with random weights and the config keys of SmolLM (GQA + tied), TinyLlama (GQA) and Llama-3.2 (GQA + tied +
rope_type llama3), scaled down. Each must import (--from_hf) with transformers' logits, export back to a folder
transformers reads with lostjax's logits, and decode greedily token for token like transformers' generate."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lostjax
from train import export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=257, max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=0.2,
            num_hidden_layers=2, hidden_act="silu", attention_bias=False, mlp_bias=False)
# Scaled-down shapes with the originals' head ratios and config keys (head_dim 8 throughout).
FAMILIES = {
    # SmolLM-135M: 9 heads over 3 KV heads, tied embeddings, plain RoPE
    "smollm": dict(hidden_size=48, intermediate_size=128, num_attention_heads=6, num_key_value_heads=2,
                   tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # TinyLlama-1.1B: 32 heads over 4 KV heads (8:1), untied
    "tinyllama": dict(hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=1,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Llama-3.2-1B: 32 heads over 8 KV heads (4:1), tied, rope_type llama3 (original context scaled down so that
    # every band of the scaling, unchanged / smoothed / divided, holds a frequency)
    "llama32": dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2,
                    tie_word_embeddings=True,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 512}),
}
TOKENS = np.random.RandomState(3).randint(0, 257, (2, 40))


def hf_folder(path, family: str, seed: int = 0, layers: int = 2) -> str:
  """A transformers LlamaForCausalLM with random weights (norm scales in [0.5, 2]) saved to `path`."""
  torch.manual_seed(seed)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "num_hidden_layers": layers},
                                                              **FAMILIES[family]))
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 2.0)
  hf.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def hf_model(folder, cls=None):
  cls = cls or transformers.AutoModelForCausalLM
  model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
  return model.eval()


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.double().numpy()


def hf_greedy(model, prompt, n):
  with torch.no_grad():
    out = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
  return out[:, prompt.shape[1]:].numpy()


def close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.abs(want).max() > 1.0   # logits of order one: the relative bound means something
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def lj_logits(model, tokens):
  return np.asarray(jax.jit(lambda t: model(t))(jnp.asarray(tokens)))


def check_family(family, model, theirs, tmp_path):
  """Logits equal transformers' (import), the exported folder's logits equal lostjax's (export)."""
  spec = FAMILIES[family]
  assert model.cfg.kv_heads == spec["num_key_value_heads"]
  assert model.cfg.tie_embeddings == spec["tie_word_embeddings"]
  assert hasattr(model, "lm_head") != spec["tie_word_embeddings"]
  assert model.cfg.rope_scaling.rope_type == spec["rope_parameters"]["rope_type"]
  ours = lj_logits(model, TOKENS)
  close(ours, hf_logits(theirs, TOKENS))             # --from_hf: transformers' function
  out = str(tmp_path / "out")
  export.write_hf(model, out, overwrite=True)
  written = json.load(open(os.path.join(out, "config.json")))
  assert written["num_key_value_heads"] == spec["num_key_value_heads"]
  assert written["tie_word_embeddings"] == spec["tie_word_embeddings"]
  close(hf_logits(hf_model(out, transformers.LlamaForCausalLM), TOKENS), ours)   # export: lostjax's function
  return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_import_export(family, tmp_path):
  folder = hf_folder(tmp_path / "src", family, layers=1)   # one layer keeps compiles short (2: the slow test)
  theirs = hf_model(folder)
  model, _ = export.load_hf(folder)
  check_family(family, model, theirs, tmp_path)


@pytest.mark.slow   # the generate compile is ~10 s on a busy CPU; the GQA cache math is in tests/test_llama_modern.py
def test_llama32_greedy_generate_in_process(tmp_path):
  folder = hf_folder(tmp_path / "src", "llama32")
  theirs = hf_model(folder)
  model, _ = export.load_hf(folder)
  prompt = TOKENS[:, :8]   # every option at once: greedy decoding through the GQA KV cache, 32 new tokens
  np.testing.assert_array_equal(np.asarray(lostjax.generate(model, prompt, 32, temperature=0.0)),
                                hf_greedy(theirs, prompt, 32))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_cli_round_trip_and_sample(family, tmp_path, capsys):
  """The commands: --from_hf (dense and LOST), train.sample greedy = transformers' greedy generate, export."""
  from train import sample
  from train.checkpoint import load_model
  from train.data.tokenizers import make_tokenizer
  folder = hf_folder(tmp_path / "src", family)
  theirs = hf_model(folder)
  run = str(tmp_path / "run")
  assert export.main(["export", f"--from_hf={folder}", f"--workdir={run}"]) == 0
  model, cfg = load_model(run)
  out = check_family(family, model, theirs, tmp_path)
  # train.sample (byte tokenizer of the run: ids 0..255 and EOS 256 = the vocabulary) vs transformers
  prompt = "The cat"
  tok = make_tokenizer(cfg.data.tokenizer, cfg.data.get("tokenizer_path", ""))
  ids = np.asarray(tok.encode(prompt))[None]
  texts = sample.sample_texts(run, prompt, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                              num_samples=1)
  want = hf_greedy(theirs, ids, 32)[0]
  stop = np.flatnonzero(want == tok.eos_id)
  assert texts == [tok.decode(want[:stop[0]] if stop.size else want)]
  # export CLI of the imported run reproduces the in-memory export
  assert export.main(["export", f"--workdir={run}", f"--out={tmp_path / 'cli_out'}"]) == 0
  from safetensors.numpy import load_file
  a, b = load_file(os.path.join(out, "model.safetensors")), load_file(str(tmp_path / "cli_out/model.safetensors"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  # LOST decomposition of a GQA model: K/V are kv_heads * head_dim wide, the default rank fits under them
  lost = str(tmp_path / "lost")
  assert export.main(["export", f"--from_hf={folder}", f"--workdir={lost}", "--method=lost"]) == 0
  lmodel, lcfg = load_model(lost)
  assert lcfg.model.attn_kind == "lost" and lmodel.layers[0].attn.k.d_out == lmodel.cfg.kv_dim
  assert lcfg.model.attn_rank < lmodel.cfg.kv_dim
  assert np.isfinite(lj_logits(lmodel, TOKENS)).all()
  assert export.main(["export", f"--workdir={lost}", f"--out={tmp_path / 'lost_out'}"]) == 0
  close(hf_logits(hf_model(str(tmp_path / "lost_out")), TOKENS), lj_logits(lmodel, TOKENS))
  capsys.readouterr()


def test_refusals_name_the_key(tmp_path):
  folder = hf_folder(tmp_path / "src", "smollm")
  path = os.path.join(folder, "config.json")
  original = json.load(open(path))
  cases = {"attention_bias": (True, "attention_bias=true"), "mlp_bias": (True, "mlp_bias=true"),
           "sliding_window": (16, "sliding_window=16"), "head_dim": (16, "head_dim=16"),
           "rope_parameters": ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type='yarn'"),
           "num_key_value_heads": (4, "num_key_value_heads=4"), "model_type": ("qwen2", "model_type='qwen2'"),
           "hidden_act": ("gelu", "hidden_act='gelu'"), "router_jitter_noise": (0.1, "router_jitter_noise=0.1"),
           "router_aux_loss_coef": (-1.0, "router_aux_loss_coef=-1.0")}
  rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
  cases.update({"partial_rotary_factor": ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
                                          "partial_rotary_factor=0.5"),
                "llama3_incomplete": (rope, "rope_type='llama3' without low_freq_factor")})
  for key, (value, words) in cases.items():
    json.dump({**original, ("rope_parameters" if isinstance(value, dict) else key): value}, open(path, "w"))
    with pytest.raises(ValueError, match=words.replace("[", r"\[")) as e:
      export.import_hf(folder, str(tmp_path / f"run_{key}"))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / f"run_{key}")


MOE = dict(vocab_size=257, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=64,
           norm_eps=1e-5, rope_theta=1e6, moe_experts=4, moe_top_k=2)


def random_moe(seed=0, **kw):
  """A lostjax MoE model with random O(1) weights (a router peaked enough that the top-k choice matters)."""
  from flax import nnx

  from lostjax.models import Llama, LlamaConfig
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(LlamaConfig(**{**MOE, **kw}), rngs=nnx.Rngs(0))))
  flat = []
  for path, var in nnx.to_flat_state(state):
    shape = tuple(var.shape)
    value = (1.0 + 0.2 * rng.normal(size=shape) if path[-1] == "scale" else
             rng.normal(size=shape) * (3.0 if "router" in path else 1.0) / np.sqrt(shape[-2] if len(shape) > 1 and
                                                                                   path[-1] != "embedding" else 1))
    flat.append((path, var.replace(jnp.asarray(value, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.mark.slow   # the dropless MoE compiles one branch per capacity bucket: minutes on a busy CPU
def test_moe_exports_to_mixtral_and_imports_back(tmp_path):
  model = random_moe()
  ours = lj_logits(model, TOKENS[:, :24])
  out = str(tmp_path / "mixtral")
  export.write_hf(model, out)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 4
  theirs = hf_model(out)
  assert type(theirs).__name__ == "MixtralForCausalLM"
  close(hf_logits(theirs, TOKENS[:, :24]), ours)
  # routing is the same function: softmax over all experts, top-k, renormalised over the chosen
  routing = model.route(jnp.asarray(TOKENS[:, :24]))
  assert float(jnp.min(jnp.max(routing.probs, -1))) < 0.9 and float(jnp.max(routing.gates[..., 1])) > 0.1
  # the load-balancing terms through the whole model: transformers' (at the written coefficient) equals lostjax's
  # up to the documented covariance over the layers
  _, aux = model(jnp.asarray(TOKENS[:, :24]), return_aux=True)
  with torch.no_grad():
    their_aux = float(theirs(torch.tensor(TOKENS[:, :24]), output_router_logits=True).aux_loss)
  probs = np.asarray(routing.probs, np.float64).reshape(model.cfg.n_layers, -1, 4)
  want_ours, want_theirs, cov = _aux_oracle(probs, np.asarray(routing.ids).reshape(model.cfg.n_layers, -1, 2),
                                            model.cfg.moe_aux_weight)
  np.testing.assert_allclose([float(aux["moe_aux_loss"]), cfg["router_aux_loss_coef"] * their_aux],
                             [want_ours, want_theirs], rtol=1e-4)
  np.testing.assert_allclose(want_ours - want_theirs, cov, rtol=1e-4, atol=1e-9)
  # Mixtral -> lostjax (transformers' own saved layout) reproduces transformers' function
  saved = str(tmp_path / "saved")
  theirs.save_pretrained(saved, safe_serialization=True)
  back, back_cfg = export.load_hf(saved)
  assert back.cfg.moe_experts == 4 and back.cfg.moe_top_k == 2 and back.cfg.moe_capacity_factor == 0.0
  assert back.cfg.moe_aux_weight == pytest.approx(model.cfg.moe_aux_weight)   # the weight survives the round trip
  close(lj_logits(back, TOKENS[:, :24]), hf_logits(theirs, TOKENS[:, :24]))


def test_capacity_moe_refuses_mixtral_export(tmp_path):
  model = random_moe(moe_capacity_factor=1.25)
  with pytest.raises(ValueError, match="moe_capacity_factor=1.25.*no equivalent") as e:
    export.write_hf(model, str(tmp_path / "out"))
  assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "out")
  with pytest.raises(ValueError, match="moe_capacity_factor=0.5"):   # a factor below 1 drops assignments too
    export.write_hf(random_moe(moe_capacity_factor=0.5), str(tmp_path / "out"))


def _aux_oracle(probs, ids, weight):
  """(lostjax's term, transformers' term at coef = weight / k) in float64 from per-layer probs [L, T, E], ids
  [L, T, k], written from the two definitions (export module docstring)."""
  n_layers, t, e = probs.shape
  k = ids.shape[-1]
  f = np.stack([np.bincount(ids[l].reshape(-1), minlength=e) / (t * k) for l in range(n_layers)])   # [L, E]
  p = probs.mean(axis=1)                                                                             # [L, E]
  ours = weight * np.mean([e * np.sum(f[l] * p[l]) for l in range(n_layers)])
  theirs = weight / k * k * e * np.sum(f.mean(0) * p.mean(0))
  return ours, theirs, weight * e * np.sum((f * p).mean(0) - f.mean(0) * p.mean(0))


def test_mixtral_load_balancing_weight_maps_with_top_k():
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

  from lostjax.models import LlamaConfig, moe
  rng = np.random.default_rng(0)
  E, k, T, w = 4, 2, 96, 0.06
  mcfg = LlamaConfig(**{**MOE, "moe_aux_weight": w})
  written = export.hf_config(mcfg)
  assert written["router_aux_loss_coef"] == pytest.approx(w / k)
  assert written["output_router_logits"] is False     # as in the released checkpoints (docs/export.md)
  for n_layers in (1, 3):
    logits = rng.normal(size=(n_layers, T, E)) * 1.5 + rng.normal(size=(n_layers, 1, E))  # layers favour experts
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    ids = np.asarray(jax.lax.top_k(jnp.asarray(probs), k)[1])
    per_layer = [{"aux_loss": moe.load_balancing_loss(jnp.asarray(probs[l]), jnp.asarray(ids[l])),
                  "dropped_frac": jnp.float32(0)} for l in range(n_layers)]
    ours = float(moe.reduce_aux(mcfg, per_layer)["moe_aux_loss"])
    theirs = written["router_aux_loss_coef"] * float(load_balancing_loss_func(
        tuple(torch.tensor(logits[l], dtype=torch.float32) for l in range(n_layers)), E, k))
    want_ours, want_theirs, cov = _aux_oracle(probs.astype(np.float64), ids, w)
    np.testing.assert_allclose([ours, theirs], [want_ours, want_theirs], rtol=1e-5)
    if n_layers == 1:
      np.testing.assert_allclose(ours, theirs, rtol=1e-5)       # one layer: the same term
    else:
      assert abs(cov) > 1e-3 * ours                               # several layers: they differ, by the covariance
      np.testing.assert_allclose(ours - theirs, cov, rtol=1e-4)
  # import: moe_aux_weight = k · router_aux_loss_coef (transformers' default 0.001 when the key is absent)
  for coef, want in ((w / k, w), (0.02, 0.04), (None, 0.002)):
    hf = {**written, "router_aux_loss_coef": coef}
    if coef is None:
      del hf["router_aux_loss_coef"]
    cfg, _ = export.hf_run_config(hf)
    assert cfg.model.moe_top_k == k and cfg.model.moe_aux_weight == pytest.approx(want)
  for bad in (-0.1, float("nan"), float("inf"), "0.01"):
    with pytest.raises(ValueError, match=rf"^router_aux_loss_coef={bad!r} must be a finite non-negative number$"):
      export.hf_run_config({**written, "router_aux_loss_coef": bad})


def test_mixtral_tensor_layouts_read_alike():
  """A Mixtral layer in the per-expert layout of the released checkpoints (w1/w2/w3 [out, in]) and in transformers'
  fused one (gate_up_proj [E, 2·ff, d], down_proj [E, d, ff]) gives the same router and expert kernels [in, out]."""
  rng = np.random.default_rng(0)
  E, d, ff = 3, 5, 4                         # d > E: the expert count must come from the router's first axis
  router = rng.normal(size=(E, d))
  w1, w3, w2 = rng.normal(size=(E, ff, d)), rng.normal(size=(E, ff, d)), rng.normal(size=(E, d, ff))
  per_expert = {"model.layers.0.block_sparse_moe.gate.weight": router}
  for e in range(E):
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
      per_expert[f"model.layers.0.block_sparse_moe.experts.{e}.{name}.weight"] = w[e]
  fused = {"model.layers.0.mlp.gate.weight": router, "model.layers.0.mlp.experts.down_proj": w2,
           "model.layers.0.mlp.experts.gate_up_proj": np.concatenate([w1, w3], axis=1)}
  for tensors in (per_expert, fused):
    r, experts = export._mixtral_layer(tensors, "model.layers.0.")
    np.testing.assert_array_equal(r, router.T)
    for ours, w in (("gate", w1), ("up", w3), ("down", w2)):
      np.testing.assert_array_equal(experts[ours], np.swapaxes(w, 1, 2), err_msg=ours)


def test_hf_config_defaults_follow_transformers_and_the_lost_rank():
  """Keys a config.json may omit take transformers' LlamaConfig defaults (rms_norm_eps 1e-6). A LOST import's rank
  defaults to min(d_model // 4, narrowest // 2), narrowest = min(hidden, intermediate, K/V width), and must lie in
  (0, narrowest); 0 means that default in load_hf, import_hf and the --rank flag alike."""
  import inspect
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "max_position_embeddings": 64}
  cfg, rank = export.hf_run_config(hf)
  assert cfg.model.norm_eps == 1e-6          # transformers.LlamaConfig().rms_norm_eps
  assert cfg.model.attn_kind == "dense"
  cfg, rank = export.hf_run_config(hf, method="lost")
  assert rank == cfg.model.attn_rank == cfg.model.mlp_rank == 8 and cfg.model.attn_kind == "lost"
  gqa = {**hf, "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 1}     # K/V 8 wide
  assert export.hf_run_config(gqa, method="lost")[1] == 4
  with pytest.raises(ValueError, match=r"--rank=8 must be in \(0, 8\)"):
    export.hf_run_config(gqa, method="lost", rank=8)
  assert (inspect.signature(export.load_hf).parameters["rank"].default
          == inspect.signature(export.import_hf).parameters["rank"].default == export._flags()["rank"].default == 0)

