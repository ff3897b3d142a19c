"""The config stored in a run directory: `--config=train/configs/workdir.py:<workdir>`.

Loads `<workdir>/config.json` (written by `train.main` or `python -m train.export --from_hf`), so a run whose
model matches no preset (e.g. one imported from Hugging Face) can be continued with
`python -m train.main --config=train/configs/workdir.py:runs/imported --workdir=runs/imported`
(fields outside the fingerprint, such as `--config.train.steps=...`, may still be overridden).
"""

import json
import os

import ml_collections


def get_config(workdir=None):
  if not workdir:
    raise ValueError("train/configs/workdir.py needs the run directory: --config=train/configs/workdir.py:<workdir>")
  path = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"no config.json in {workdir!r}: not a lostjax run directory")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
