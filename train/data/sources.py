"""Text sources: documents as UTF-8 `bytes`, in a deterministic order, plus the train/validation cut.

Sources
* 'files': comma-separated globs (`~` expanded, `**` recursive); every glob must match at least one file. Each
  glob's matches are sorted; globs keep their order; duplicates are dropped. By suffix:
  `.jsonl` / `.jsonl.gz` -> one document per line (the JSON object's `text_field`); `.gz` -> one gzip text file =
  one document; anything else -> one plain text file = one document.
* 'stdlib': the `.py` files of the Python standard library under `sysconfig.get_paths()['stdlib']`, sorted by
  relative path, skipping `site-packages`/`dist-packages` (third-party code, differs per machine), the test
  suites (`test`, `tests`, `idle_test` dirs: distributions such as Debian strip them, so skipping keeps the
  corpus the same across installs), `__pycache__`, and the machine-generated `_sysconfigdata*.py`.
  About 12 MB of text on CPython 3.11; one file = one document.
* 'tfds': TensorFlow Datasets by name (optional extra `pip install -e .[tfds]`); one example = one document.

Text that is not valid UTF-8 is decoded with replacement characters and re-encoded, so every document is valid
UTF-8 and all tokenizers see the same text. `max_bytes` (> 0) caps the total bytes read, cutting the last
document at the cap (on a character boundary).

Validation cut (the convention of shared/corpus/README.md, applied to every document): with n bytes and
mark = floor(n * (1 - val_fraction)), the cut is just after the first '\\n' at or after the mark; the
training part is bytes[:cut] (it keeps that newline) and the validation part bytes[cut:]. A document with no
newline at or after the mark stays entirely in training. '\\n' never occurs inside a multi-byte UTF-8
character, so both parts stay valid UTF-8.
"""
import glob
import gzip
import json
import math
import os
import sysconfig

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def split_document(data, val_fraction):
  """(train_part, val_part) of one document's bytes, per the corpus README convention."""
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
    raise ValueError("source='files' needs data.paths (comma-separated globs of .txt/.gz/.jsonl/.jsonl.gz "
                     "files); got paths=''")
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


def _read_file_docs(path, text_field):
  opener = gzip.open if path.endswith(".gz") else open
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
