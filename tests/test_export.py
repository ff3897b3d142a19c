"""train.export: lostjax -> Hugging Face LlamaForCausalLM and back. Oracles: `transformers` (PyTorch, float32)
logits of the written folder, and a float64 numpy SVD / channel-norm transcription of the LOST split."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lostjax.models import Llama, preset
from train import export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _model(kind, act="identity", **kw):
  cfg = preset("tiny", attn_kind=kind, mlp_kind=kind, attn_rank=8, mlp_rank=8, sparsity=0.1, gamma=0.3,
               lowrank_act=act, max_seq_len=32, **kw)
  model = Llama(cfg, rngs=nnx.Rngs(1))
  # Larger norm scales than the all-ones init, so that a transposed or swapped weight cannot go unnoticed.
  for block in model.layers:
    for norm in (block.attn_norm, block.mlp_norm):
      norm.scale[...] = jax.random.uniform(jax.random.key(7), norm.scale.shape, minval=0.5, maxval=3.0)
  return model


def _hf_logits(folder, tokens):
  hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
  hf.eval()
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _assert_close(got, want):
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


TOKENS = np.random.RandomState(0).randint(0, 257, (2, 24))


@pytest.mark.parametrize("kind", ["dense", pytest.param("lost", marks=pytest.mark.slow),
                                  pytest.param("lowrank", marks=pytest.mark.slow)])
def test_export_matches_transformers(kind, tmp_path):
  model = _model(kind)
  out = str(tmp_path / "hf")
  info = export.write_hf(model, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  mode = lambda name: os.stat(os.path.join(out, name)).st_mode & 0o777
  assert mode("model.safetensors") == mode("config.json")   # not owner-only
  assert info["params"] == sum(v.size for v in export.hf_state_dict(model).values())
  want = np.asarray(jax.jit(lambda t: model(t))(jnp.asarray(TOKENS)))
  _assert_close(_hf_logits(out, TOKENS), want)


def test_merged_lost_weight_numpy_oracle():
  model = _model("lost")
  layer = model.layers[0].mlp.down
  a, b = np.asarray(layer.a[...], np.float64), np.asarray(layer.b[...], np.float64)
  w = 0.3 * a @ b
  for row, i in enumerate(np.asarray(layer.idx[...])):
    w[i] += 0.7 * np.asarray(layer.w_sparse[...], np.float64)[row]
  np.testing.assert_allclose(export.dense_weight(layer), w, rtol=1e-6, atol=1e-7)
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, layer.d_in)))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), x @ w, rtol=1e-4, atol=1e-5)


def test_silu_lowrank_refuses_with_reason(tmp_path):
  model = _model("lowrank", act="silu")
  out = tmp_path / "hf"
  with pytest.raises(ValueError, match=r"layers\.0\.attn\.q .*activation 'silu'.*cannot be written"):
    export.write_hf(model, str(out))
  assert not out.exists()
  with pytest.raises(ValueError, match="activation 'silu'"):
    export.write_hf(_model("lost", act="silu"), str(out))


def _workdir(tmp_path, model, tokenizer="byte", tokenizer_path=""):
  """A run directory as train.main writes it (config.json + orbax checkpoint)."""
  import dataclasses

  from train.checkpoint import Checkpointer
  from train.configs.base import base_config

  workdir = str(tmp_path / "run")
  cfg = base_config()
  cfg.model.update({k: v for k, v in dataclasses.asdict(model.cfg).items()})
  cfg.data.tokenizer, cfg.data.tokenizer_path = tokenizer, tokenizer_path
  cfg.train.seq_len = model.cfg.max_seq_len
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  ckpt = Checkpointer(workdir)
  ckpt.save(3, {"params": params}, rest, {})
  ckpt.close()
  return workdir


@pytest.mark.slow  # kept out of the default run for time; `pytest -m slow tests` runs it
def test_cli_export_overwrite_and_import_round_trip(tmp_path, capsys):
  model = _model("dense")
  workdir = _workdir(tmp_path, model)
  out = str(tmp_path / "hf")
  assert export.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 0
  assert "no tokenizer files written" in capsys.readouterr().out
  assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] == 256
  assert export.main(["export", f"--workdir={workdir}", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert "not empty" in err and "--overwrite" in err and err.count("\n") == 1
  assert export.main(["export", f"--workdir={workdir}", f"--out={out}", "--overwrite"]) == 0
  # HF -> lostjax: load_model rebuilds exactly the exported function.
  new = str(tmp_path / "imported")
  assert export.main(["export", f"--from_hf={out}", f"--workdir={new}"]) == 0
  from train.checkpoint import load_model
  loaded, cfg = load_model(new)
  assert cfg.model.attn_kind == "dense" and cfg.model.d_model == 64
  want = np.asarray(jax.jit(lambda t: model(t))(jnp.asarray(TOKENS)))
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: loaded(t))(jnp.asarray(TOKENS))), want)


def _hf_folder(tmp_path, **kw):
  cfg = dict(vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32, rms_norm_eps=1e-6, initializer_range=0.1,
             tie_word_embeddings=False)
  cfg.update(kw)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 2.0)
  folder = str(tmp_path / "hf_src")
  hf.save_pretrained(folder, safe_serialization=True)
  return folder


@pytest.mark.slow  # kept out of the default run for time; `pytest -m slow tests` runs it
def test_import_from_transformers_dense_equals_hf_logits(tmp_path):
  folder = _hf_folder(tmp_path)
  tokens = np.random.RandomState(1).randint(0, 120, (2, 20))
  want = _hf_logits(folder, tokens)
  info = export.import_hf(folder, str(tmp_path / "run"))
  assert info["method"] == "dense"
  from train.checkpoint import load_model
  model, _ = load_model(str(tmp_path / "run"))
  _assert_close(np.asarray(jax.jit(lambda t: model(t))(jnp.asarray(tokens))), want)


@pytest.mark.slow
def test_import_lost_decomposition_numpy_oracle(tmp_path):
  folder = _hf_folder(tmp_path)
  export.import_hf(folder, str(tmp_path / "run"), method="lost", rank=6, sparsity=0.25, gamma=0.4)
  from safetensors.numpy import load_file

  from train.checkpoint import load_model
  model, cfg = load_model(str(tmp_path / "run"))
  assert (cfg.model.attn_kind, cfg.model.attn_rank, cfg.model.sparsity, cfg.model.gamma) == ("lost", 6, 0.25, 0.4)
  w = load_file(os.path.join(folder, "model.safetensors"))["model.layers.1.mlp.up_proj.weight"].T.astype(np.float64)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  layer = model.layers[1].mlp.up
  ab = np.asarray(layer.a[...], np.float64) @ np.asarray(layer.b[...], np.float64)
  np.testing.assert_allclose(ab, (u[:, :6] * s[:6]) @ vt[:6], atol=1e-5)
  residual = (u[:, 6:] * s[6:]) @ vt[6:]
  k = int(0.25 * 48)
  want_idx = np.sort(np.argsort(-np.linalg.norm(residual, axis=1))[:k])
  np.testing.assert_array_equal(np.asarray(layer.idx[...]), want_idx)
  np.testing.assert_allclose(np.asarray(layer.w_sparse[...]), w[want_idx], atol=1e-6)


def test_rope_theta_and_gamma_survive_export_and_import(tmp_path, monkeypatch):
  """A non-default RoPE base is written to config.json and read back on import; import keeps the --gamma given
  (the defaults 10000 and 0.5 would otherwise pass unnoticed). The run config import_hf builds is captured where
  it is handed to create_train_state (the weights' round trip is the slow tests' job)."""
  model = Llama(preset("tiny", attn_kind="dense", mlp_kind="dense", rope_theta=500000.0, max_seq_len=32, n_layers=1),
                rngs=nnx.Rngs(0))
  out = str(tmp_path / "hf")
  export.write_hf(model, out)
  hf = json.load(open(os.path.join(out, "config.json")))
  assert hf["rope_theta"] == 500000.0 and hf["rope_parameters"]["rope_theta"] == 500000.0

  class Built(Exception):
    pass

  def capture(cfg, **kw):
    raise Built(cfg.model.to_dict())

  from train import state as state_lib
  monkeypatch.setattr(state_lib, "create_train_state", capture)
  with pytest.raises(Built) as got:
    export.import_hf(out, str(tmp_path / "run"), method="lost", rank=8, sparsity=0.25, gamma=0.3)
  m = got.value.args[0]
  assert (m["rope_theta"], m["gamma"], m["attn_rank"], m["sparsity"], m["n_layers"]) == (500000.0, 0.3, 8, 0.25, 1)


def test_import_errors(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    export.import_hf(str(tmp_path), str(tmp_path / "run"))
  gqa = _hf_folder(tmp_path, num_key_value_heads=2)
  cfg_path = os.path.join(gqa, "config.json")
  json.dump({**json.load(open(cfg_path)), "attention_bias": True}, open(cfg_path, "w"))
  with pytest.raises(ValueError, match="attention_bias=true"):
    export.import_hf(gqa, str(tmp_path / "run"))
  os.makedirs(tmp_path / "busy")
  (tmp_path / "busy" / "x").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    export.import_hf(gqa, str(tmp_path / "busy"))
  # the export side: a non-empty --out is refused unless --overwrite, a file in its place always
  with pytest.raises(ValueError, match="refusing to overwrite it"):
    export._check_out(str(tmp_path / "busy"), overwrite=False)
  export._check_out(str(tmp_path / "busy"), overwrite=True)
  export._check_out(str(tmp_path / "new"), overwrite=False)
  with pytest.raises(ValueError, match="not a directory"):
    export._check_out(str(tmp_path / "busy" / "x"), overwrite=True)
  with pytest.raises(ValueError, match="refusing to overwrite it"):   # write_hf and export do not overwrite by
    export.write_hf(None, str(tmp_path / "busy"))                   # default (the folder is checked before the
  with pytest.raises(ValueError, match="refusing to overwrite it"):   # model is read)
    export.export(str(tmp_path / "no_run"), str(tmp_path / "busy"))
  assert os.listdir(tmp_path / "busy") == ["x"]


def test_sentencepiece_tokenizer_files(tmp_path):
  import ml_collections

  from train.data import train_tokenizer
  from train.data.tokenizers import make_tokenizer
  lines = [f"def f{i}(x):  return x * {i} + y" for i in range(300)] + ["hello world, print(value)"] * 50
  sp = str(tmp_path / "sp.model")
  train_tokenizer.train_sentencepiece(lines, sp, vocab_size=300, num_threads=1)
  out = tmp_path / "tok"
  out.mkdir()
  data = ml_collections.ConfigDict(dict(tokenizer="sentencepiece", tokenizer_path=sp))
  assert "tokenizer.model" in export.write_tokenizer(data, str(out), 64)
  tok_cfg = json.load(open(out / "tokenizer_config.json"))     # the special pieces: unk 0, bos 1, eos 2, no pad
  assert (tok_cfg["unk_token"], tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (
      "<unk>", "<s>", "</s>", None)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  ours = make_tokenizer("sentencepiece", sp)
  for text in ["hello world", "def f3(x): return y"]:
    ids = [int(i) for i in ours.encode(text)]
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == text


def test_cli_export_needs_a_workdir(tmp_path, capsys):
  assert export.main(["export", f"--out={tmp_path / 'out'}"]) == 2
  assert capsys.readouterr().err.strip() == "error: --workdir is required"
  assert export.main(["export", f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}"]) == 2
  assert "no config.json in workdir" in capsys.readouterr().err
