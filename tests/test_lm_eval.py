"""The EleutherAI evaluation harness (`lm_eval`, the `eval` extra) on an exported lostjax model, offline: a task
defined from a local YAML + JSON-lines file. Oracle: lostjax's own log-likelihood of the same continuations,
Σ_t log softmax(logits_{t-1})[x_t] over the continuation tokens, with the harness's pair convention (the
continuation's tokens are those of encode(context + continuation) after the len(encode(context)) first ones)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

DOCS = [{"context": "the cat sat", "continuation": " on the mat"},
        {"context": "the dog ran", "continuation": " 3 and the cat"},
        {"context": "on the", "continuation": " mat"}]
TASK = """task: lostjax_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


@pytest.mark.slow
def test_harness_loglikelihoods_equal_lostjax(tmp_path, monkeypatch):
  import ml_collections
  from flax import nnx

  from lostjax.models import Llama, LlamaConfig
  from train import export
  from train.data import train_tokenizer
  from train.data.tokenizers import make_tokenizer
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  import lm_eval
  from lm_eval.tasks import TaskManager

  sp = str(tmp_path / "sp.model")
  lines = [f"the cat {i} sat on the mat and the dog ran {i % 7}" for i in range(300)]
  train_tokenizer.train_sentencepiece(lines, sp, vocab_size=300, num_threads=1)
  cfg = LlamaConfig(vocab_size=300, d_model=32, d_ff=48, n_heads=4, n_kv_heads=2, n_layers=2, max_seq_len=64,
                    tie_embeddings=True, init_std=0.3)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  out = str(tmp_path / "hf")
  export.write_hf(model, out, ml_collections.ConfigDict(dict(tokenizer="sentencepiece", tokenizer_path=sp)))

  data = tmp_path / "data.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "lostjax_local.yaml").write_text(TASK.format(data=data))
  res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32,device=cpu",
                                tasks=["lostjax_local"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                batch_size=1, log_samples=True, bootstrap_iters=0)
  harness = {s["doc"]["context"]: s["resps"][0][0] for s in res["samples"]["lostjax_local"]}

  tok = make_tokenizer("sentencepiece", sp)
  for doc in DOCS:
    whole = [int(i) for i in tok.encode(doc["context"] + doc["continuation"])]
    n_ctx = len(tok.encode(doc["context"]))
    logp = jax.nn.log_softmax(model(jnp.asarray([whole]))[0], axis=-1)
    cont = np.arange(n_ctx, len(whole))
    ours = float(jnp.sum(logp[cont - 1, jnp.asarray(whole)[cont]]))
    greedy = bool(jnp.all(jnp.argmax(logp[cont - 1], -1) == jnp.asarray(whole)[cont]))
    ll, is_greedy = harness[doc["context"]]
    assert abs(ll - ours) <= 1e-4 * max(1.0, abs(ours)), (doc, ll, ours)
    assert is_greedy == greedy
