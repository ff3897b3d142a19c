"""Text sources: documents as UTF-8 `bytes`, in a deterministic order, plus the train/validation cut.

Sources
* 'files': comma-separated globs (`~` expanded, `**` recursive); every glob must match at least one file. Each
  glob's matches are sorted; globs keep their order; duplicates are dropped. By suffix:
  `.jsonl` / `.jsonl.gz` -> one document per line (the JSON object's `text_field`); `.parquet` / `.parquet.gz` ->
  one document per row (column `text_field`, read one row group at a time with pyarrow); `.gz` -> one gzip
  text file = one document; anything else -> one plain text file = one document.
* 'stdlib': the `.py` files of the Python standard library under `sysconfig.get_paths()['stdlib']`, sorted by
  relative path, skipping `site-packages`/`dist-packages` (third-party code, differs per machine), the test
  suites (`test`, `tests`, `idle_test` dirs: distributions such as Debian strip them, so skipping keeps the
  corpus the same across installs), `__pycache__`, and the machine-generated `_sysconfigdata*.py`.
  About 12 MB of text on CPython 3.11; one file = one document.
* 'hf': a Hugging Face `datasets` dataset: a Hub name read with `streaming=True` (e.g. `allenai/c4`, config
  `en`), a local folder written by `Dataset.save_to_disk` (`load_from_disk`), or any other local path that
  `load_dataset(path, streaming=True)` understands (a folder of jsonl/parquet/text files).
* 'tfds': TensorFlow Datasets by name (optional extra `pip install -e .[tfds]`); one example = one document.

Sharded reading for the streaming pipeline (`stream.py`): `open_shard(...)` gives the documents of shard `index`
of `count` (documents i with i % count == index for files; `split_dataset_by_node` for HF streaming, which assigns
whole files when their number is a multiple of `count`; contiguous `Dataset.shard` for saved HF datasets;
`tfds.even_splits` for TFDS), readable from any document index.

Text that is not valid UTF-8 is decoded with replacement characters and re-encoded, so every document is valid
UTF-8 and all tokenizers see the same text. `max_bytes` (> 0) caps the total bytes read, cutting the last
document at the cap (on a character boundary).

Validation cut (the corpus split convention of docs/data.md, applied to every document): with n bytes and
mark = floor(n * (1 - val_fraction)), the cut is just after the first '\\n' at or after the mark; the
training part is bytes[:cut] (it keeps that newline) and the validation part bytes[cut:]. A document with no
newline at or after the mark stays entirely in training. '\\n' never occurs inside a multi-byte UTF-8
character, so both parts stay valid UTF-8.
"""
import glob
import gzip
import itertools
import json
import math
import os
import sysconfig

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def split_document(data, val_fraction):
  """(train_part, val_part) of one document's bytes, per the docs/data.md convention."""
  if val_fraction <= 0:
    return data, b""
  n = len(data)
  mark = int(math.floor(n * (1.0 - val_fraction)))
  j = data.find(b"\n", mark)
  if j < 0:
    return data, b""
  return data[:j + 1], data[j + 1:]


def _clean(data):
  """Valid UTF-8 bytes (invalid sequences become U+FFFD)."""
  try:
    data.decode("utf-8")
    return data
  except UnicodeDecodeError:
    return data.decode("utf-8", errors="replace").encode("utf-8")


clean = _clean


def _truncate_utf8(data, n):
  """First <= n bytes of valid UTF-8 `data`, not splitting a character."""
  return data[:n].decode("utf-8", errors="ignore").encode("utf-8")


def stdlib_root():
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root=None):
  """Sorted absolute paths of the standard-library `.py` files (see module docstring for what is skipped)."""
  root = root or stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
    for f in filenames:
      if f.endswith(".py") and not f.startswith("_sysconfigdata"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  out.sort(key=lambda p: p.replace(os.sep, "/"))
  if not out:
    raise ValueError(f"source='stdlib': no .py files found under the standard library directory {root!r}")
  return [os.path.join(root, p) for p in out]


def expand_paths(paths):
  """Files matched by comma-separated globs (a str) or a list of globs; ValueError for a glob with no file."""
  if isinstance(paths, str):
    globs = [p.strip() for p in paths.split(",") if p.strip()]
  else:
    globs = [str(p).strip() for p in paths if str(p).strip()]
  if not globs:
    raise ValueError("source='files' needs data.paths (comma-separated globs of .txt/.gz/.jsonl/.jsonl.gz/"
                     ".parquet files); got paths=''")
  out, seen = [], set()
  for g in globs:
    pattern = os.path.expanduser(g)
    matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
    if not matches:
      raise ValueError(f"data path {g!r} matches no file")
    for m in matches:
      key = os.path.abspath(m)
      if key not in seen:
        seen.add(key)
        out.append(key)
  return out


def files_fingerprint(files):
  """(path, size, mtime_ns) for each file: part of the token-cache key."""
  out = []
  for f in files:
    st = os.stat(f)
    out.append([f, int(st.st_size), int(st.st_mtime_ns)])
  return out


def _is_jsonl(path):
  return path.endswith(".jsonl") or path.endswith(".jsonl.gz")


def _is_parquet(path):
  return path.endswith(".parquet") or path.endswith(".parquet.gz")


def single_document_files(files):
  """True when every file is one document (no jsonl/parquet), so documents can be sharded by file."""
  return not any(_is_jsonl(f) or _is_parquet(f) for f in files)


def _read_parquet_docs(path, text_field):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel  (comes with `datasets`)

  f = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
  with f:
    try:
      pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid for a file that is not parquet.
      raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
      raise ValueError(f"{path}: parquet file has no column text_field={text_field!r} "
                       f"(columns: {pf.schema_arrow.names})")
    for g in range(pf.num_row_groups):
      for row, text in enumerate(pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()):
        if not isinstance(text, str):
          raise ValueError(f"{path}: row group {g} row {row}: column {text_field!r} is not a string")
        yield text.encode("utf-8", errors="replace")


def _read_file_docs(path, text_field):
  opener = gzip.open if path.endswith(".gz") else open
  if _is_parquet(path):
    yield from _read_parquet_docs(path, text_field)
    return
  if not _is_jsonl(path):
    with opener(path, "rb") as f:
      yield f.read()
    return
  with opener(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None
      if not isinstance(obj, dict) or text_field not in obj:
        raise ValueError(f"{path}:{lineno}: JSON object has no text_field={text_field!r}")
      text = obj[text_field]
      if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: field {text_field!r} is not a string")
      yield text.encode("utf-8", errors="replace")


def capped(docs, max_bytes):
  """Cleaned documents, stopping after `max_bytes` total bytes (0 = unlimited)."""
  total = 0
  for d in docs:
    d = _clean(bytes(d))
    if max_bytes > 0 and total + len(d) >= max_bytes:
      d = _truncate_utf8(d, max_bytes - total)
      if d:
        yield d
      return
    total += len(d)
    yield d


def file_documents(files, text_field="text"):
  for path in files:
    yield from _read_file_docs(path, text_field)


def import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("source='tfds' needs tensorflow-datasets, which is not installed: "
                     "run `pip install -e .[tfds]`") from None
  return tfds


def tfds_documents(name, split, data_dir="", text_field="text"):
  """Documents of one TFDS split in the dataset's stored order (no file shuffling)."""
  tfds = import_tfds()
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
  except Exception as e:  # tfds raises DatasetNotFoundError etc.; surface one clear message.
    raise ValueError(f"tfds_name={name!r} (split {split!r}) could not be loaded: {e}") from None
  for ex in tfds.as_numpy(ds):
    if text_field not in ex:
      raise ValueError(f"tfds_name={name!r}: examples have no text_field={text_field!r} "
                       f"(fields: {sorted(ex)})")
    text = ex[text_field]
    yield text if isinstance(text, bytes) else str(text).encode("utf-8")


def hf_dataset(name, config="", split="train", text_field="text", split_required=False):
  """A Hugging Face dataset split: `Dataset` for a `save_to_disk` folder, else a streaming `IterableDataset`.

  A folder holding one saved `Dataset` (no splits) is the training split; `split_required` (the eval split) makes
  it an error instead of silently evaluating on the training documents."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ValueError("source='hf' needs the `datasets` package: run `pip install -e .[hf]`") from None
  if not name:
    raise ValueError("source='hf' needs data.hf_name (e.g. 'allenai/c4' or a local dataset folder); got ''")
  local = os.path.expanduser(name)
  saved = os.path.isdir(local) and (os.path.isfile(os.path.join(local, "dataset_dict.json"))
                                    or os.path.isfile(os.path.join(local, "state.json")))
  try:
    if saved:
      ds = datasets.load_from_disk(local)
      if not isinstance(ds, datasets.DatasetDict) and split_required:
        raise ValueError(f"hf_name={name!r} is one saved dataset without splits, so it has no split {split!r}: set "
                         "data.hf_eval_split='' (validation is then cut from each document, val_fraction)")
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise ValueError(f"hf_name={name!r} has no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    else:
      ds = datasets.load_dataset(local if os.path.exists(local) else name, config or None, split=split,
                                 streaming=True)
  except ValueError:
    raise
  except Exception as e:  # datasets raises DatasetNotFoundError, FileNotFoundError, ConnectionError, ...
    raise ValueError(f"hf_name={name!r} (config {config!r}, split {split!r}) could not be loaded: {e}") from None
  names = getattr(ds, "column_names", None)
  if names is not None and text_field not in names:
    raise ValueError(f"hf_name={name!r}: examples have no text_field={text_field!r} (columns: {names})")
  return ds


def _text_of(example, text_field, where):
  if text_field not in example:
    raise ValueError(f"{where}: examples have no text_field={text_field!r} (fields: {sorted(example)})")
  text = example[text_field]
  if isinstance(text, bytes):
    return text
  if not isinstance(text, str):
    raise ValueError(f"{where}: field {text_field!r} is not a string")
  return text.encode("utf-8", errors="replace")


class FileShard:
  """Documents i % count == index of local files (by whole files when every file is one document)."""

  def __init__(self, files, text_field, index, count):
    self.files, self.text_field, self.index, self.count = list(files), text_field, int(index), int(count)
    self.by_file = single_document_files(self.files)

  def open(self, start, resume=None):
    del resume  # The document index is enough.
    if self.by_file:
      for path in self.files[self.index::self.count][start:]:
        yield from ((d, None) for d in _read_file_docs(path, self.text_field))
      return
    mine = itertools.islice(file_documents(self.files, self.text_field), self.index, None, self.count)
    for d in itertools.islice(mine, start, None):
      yield d, None


class HFShard:
  """One shard of a Hugging Face dataset; streaming datasets resume from their `state_dict()`."""

  def __init__(self, make_dataset, text_field, index, count, where):
    self.make_dataset, self.text_field, self.index, self.count = make_dataset, text_field, int(index), int(count)
    self.where = where

  def open(self, start, resume=None):
    import datasets  # pylint: disable=import-outside-toplevel
    from datasets.distributed import split_dataset_by_node  # pylint: disable=import-outside-toplevel

    ds = self.make_dataset()
    if isinstance(ds, datasets.Dataset):  # Random access: contiguous shard, start anywhere.
      ds = ds.shard(num_shards=self.count, index=self.index, contiguous=True)
      for lo in range(start, len(ds), 256):
        for text in ds[lo:lo + 256][self.text_field]:
          yield _text_of({self.text_field: text}, self.text_field, self.where), None
      return
    if self.count > 1:
      ds = split_dataset_by_node(ds, rank=self.index, world_size=self.count)
    stateful = hasattr(ds, "state_dict")
    if resume is not None and stateful:
      ds.load_state_dict(resume)
    elif start:
      ds = ds.skip(start)  # No saved position: read past the first `start` documents.
    before = ds.state_dict() if stateful else None
    for ex in ds:
      yield _text_of(ex, self.text_field, self.where), before
      before = ds.state_dict() if stateful else None


def tfds_split_names(split, count):
  """Split strings of `count` even parts of `split` (TFDS slicing API)."""
  if count == 1:
    return [split]
  tfds = import_tfds()
  return list(tfds.even_splits(split, n=count))


class TFDSShard:
  """One of `count` even parts of a TFDS split: random access through `tfds.data_source` (ArrayRecord), else
  `tfds.load` read in stored order."""

  def __init__(self, name, split, data_dir, text_field, index, count):
    self.name, self.split, self.data_dir, self.text_field = name, split, data_dir, text_field
    self.index, self.count = int(index), int(count)

  def open(self, start, resume=None):
    del resume
    tfds = import_tfds()
    part = tfds_split_names(self.split, self.count)[self.index]
    where = f"tfds_name={self.name!r}"
    source = None
    if hasattr(tfds, "data_source"):
      try:
        source = tfds.data_source(self.name, split=part, data_dir=self.data_dir or None)
      except Exception:  # Not prepared as ArrayRecord (or an older tfds): read sequentially instead.
        source = None
    if source is not None:
      for i in range(start, len(source)):
        yield _text_of(source[i], self.text_field, where), None
      return
    docs = tfds_documents(self.name, part, self.data_dir, self.text_field)
    for d in itertools.islice(docs, start, None):
      yield d, None
