"""Each bad input to train.data gives one clear ValueError naming the bad value."""
import builtins
import sys

import pytest

from train.data import default_data_config, make_data


def cfg(tmp_path, **kw):
  (tmp_path / "a.txt").write_text("line one\nline two\n" * 200)
  c = default_data_config()
  c.update(source="files", paths=str(tmp_path / "a.txt"), cache_dir="")
  c.update(kw)
  return c


def test_valid_config_builds(tmp_path):
  b = make_data(cfg(tmp_path), seq_len=16, global_batch=4, seed=0)
  assert b.train.num_sequences >= 4


@pytest.mark.parametrize("kw,match", [
    ({"paths": "/nonexistent/dir/*.txt"}, r"'/nonexistent/dir/\*\.txt' matches no file"),
    ({"paths": ""}, r"paths=''"),
    ({"source": "hf"}, r"source='hf'"),
    ({"tokenizer": "bpe"}, r"tokenizer='bpe'"),
    ({"tokenizer": "sentencepiece"}, r"tokenizer_path"),
    ({"tokenizer": "sentencepiece", "tokenizer_path": "/no/such.model"}, r"'/no/such.model' does not exist"),
    ({"val_fraction": 1.5}, r"val_fraction=1.5"),
    ({"val_fraction": -0.1}, r"val_fraction=-0.1"),
    ({"max_bytes": -1}, r"max_bytes=-1"),
    ({"eval_max_tokens": -5}, r"eval_max_tokens=-5"),
])
def test_bad_config_values(tmp_path, kw, match):
  with pytest.raises(ValueError, match=match):
    make_data(cfg(tmp_path, **kw), seq_len=16, global_batch=4, seed=0)


def test_bad_tokenizer_file(tmp_path):
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    make_data(cfg(tmp_path, tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "bad.model")),
              seq_len=16, global_batch=4, seed=0)


def test_unknown_field(tmp_path):
  c = cfg(tmp_path).to_dict()
  c["pathz"] = "x"
  with pytest.raises(ValueError, match="pathz"):
    make_data(c, seq_len=16, global_batch=4, seed=0)


@pytest.mark.parametrize("seq_len,global_batch,match", [
    (0, 4, "seq_len=0"), (-3, 4, "seq_len=-3"), (16, 0, "global_batch=0"), (16, -1, "global_batch=-1"),
    (16.0, 4, "seq_len=16.0"), (16, True, "global_batch=True")])
def test_bad_shapes(tmp_path, seq_len, global_batch, match):
  with pytest.raises(ValueError, match=match):
    make_data(cfg(tmp_path), seq_len=seq_len, global_batch=global_batch, seed=0)


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  c = cfg(tmp_path, paths=str(tmp_path / "empty.txt"))
  with pytest.raises(ValueError, match="empty corpus"):
    make_data(c, seq_len=16, global_batch=4, seed=0)


def test_corpus_too_small(tmp_path):
  with pytest.raises(ValueError, match=r"corpus too small.*global_batch=1000"):
    make_data(cfg(tmp_path), seq_len=16, global_batch=1000, seed=0)
  with pytest.raises(ValueError, match=r"corpus too small.*seq_len\+1=100001"):
    make_data(cfg(tmp_path), seq_len=100000, global_batch=1, seed=0)


def test_empty_validation_split(tmp_path):
  (tmp_path / "one.txt").write_text("x" * 5000)  # No newline after the mark: all training.
  with pytest.raises(ValueError, match="empty validation split"):
    make_data(cfg(tmp_path, paths=str(tmp_path / "one.txt")), seq_len=16, global_batch=4, seed=0)
  b = make_data(cfg(tmp_path, paths=str(tmp_path / "one.txt"), val_fraction=0.0), seq_len=16, global_batch=4,
                seed=0)
  assert b.eval_num_tokens == 0 and b.eval_num_bytes == 0 and list(b.eval_batches()) == []


def test_tfds_not_installed(tmp_path, monkeypatch):
  real_import = builtins.__import__

  def no_tfds(name, *args, **kwargs):
    if name == "tensorflow_datasets":
      raise ImportError("No module named 'tensorflow_datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.delitem(sys.modules, "tensorflow_datasets", raising=False)
  monkeypatch.setattr(builtins, "__import__", no_tfds)
  with pytest.raises(ValueError, match=r"pip install -e \.\[tfds\]"):
    make_data(cfg(tmp_path, source="tfds"), seq_len=16, global_batch=4, seed=0)
  with pytest.raises(ValueError, match="tfds_name"):
    make_data(cfg(tmp_path, source="tfds", tfds_name=""), seq_len=16, global_batch=4, seed=0)
