"""train/cli.py: every config or flag mistake is one `error:` line with a did-you-mean, exit status 2.

Parsed in-process with a command's own FlagValues and `ml_collections.config_flags` (as train.main/train.study
define them on absl's global FLAGS); the subprocess check of train.main is in tests/test_train.py."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from train import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=train/configs/quickstart.py"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
  monkeypatch.chdir(REPO)   # config paths are relative to the repository, as in the README's commands


def _parse(*args):
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  return cli.parse_flags(fv, argv), fv


def _error(*args) -> str:
  with pytest.raises(cli.ConfigError) as e:
    _parse(*args)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_valid_overrides_parse():
  _, fv = _parse(QUICK, "--config.train.steps=7", "--config.optim.frugal.rho=0.5", "--workdir=w")
  assert fv.config.train.steps == 7 and fv.config.optim.frugal.rho == 0.5 and fv.workdir == "w"


@pytest.mark.parametrize("args,expected", [
    # unknown field, closest name in its section
    ((QUICK, "--config.train.stpes=10"), "unknown config field 'train.stpes'; did you mean 'train.steps'?"),
    # unknown section
    ((QUICK, "--config.trian.steps=10"), "unknown config section 'trian'; did you mean 'train'?"),
    # a field of a sub-section named without it
    ((QUICK, "--config.optim.rho=0.1"), "unknown config field 'optim.rho'; did you mean 'optim.frugal.rho'?"),
    # a nested section misspelt
    ((QUICK, "--config.optim.frugl.rho=0.1"), "unknown config section 'optim.frugl'; did you mean 'optim.frugal'?"),
    # the boolean form --noconfig.x
    ((QUICK, "--noconfig.train.plott"), "unknown config field 'train.plott'; did you mean 'train.plot'?"),
    # preset size and method of llama.py
    (("--config=train/configs/llama.py:60n,lost",), "unknown preset size '60n' in llama.py:60n,lost "
     "(sizes: tiny, small, 20m, 60m, 130m, 350m, 1b, 7b); did you mean '60m'?"),
    (("--config=train/configs/llama.py:60m,lots",), "unknown method 'lots' in llama.py:60m,lots "
     "(methods: dense, lowrank, lost, *); did you mean 'lost'?"),
    (("--config=train/configs/llama.py:60m,lost,x",), "llama.py:60m,lost,x: expected <size>,<method>, got 3"),
    # study grids
    (("--config=train/configs/study.py:cpuu",), "unknown study grid 'cpuu' (grids: cpu, *paper:<size>); "
     "did you mean 'cpu'?"),
    (("--config=train/configs/study.py:paper:60n",), "did you mean 'paper:60m'?"),
    # a missing config file, a value of the wrong type, a field that is not a section
    (("--config=train/configs/quickstrat.py",), "config file 'train/configs/quickstrat.py' not found"),
    ((QUICK, "--config.train.steps=ten"), "flag --config.train.steps=ten: invalid literal for int()"),
    ((QUICK, "--config.train.steps.x=1"), "config field 'train.steps' holds a value (int), not a section"),
    # other flags keep absl's own suggestion
    ((QUICK, "--workdri=w"), "Unknown command line flag 'workdri'. Did you mean: workdir ?"),
])
def test_each_config_mistake_is_one_line(args, expected):
  msg = _error(*args)
  if expected.startswith("did you"):
    assert expected in msg, msg
  elif "*" in expected:   # lists that grow with the registered methods/grids
    head, tail = expected.split("*")
    assert msg.startswith(head) and msg.endswith(tail), msg
  else:
    assert msg.startswith(expected), msg


def test_no_suggestion_lists_the_names():
  msg = _error(QUICK, "--config.train.zzzzzz=1")
  assert msg.startswith("unknown config field 'train.zzzzzz' (fields of train: ") and "steps" in msg, msg
  assert "did you mean" not in msg


def test_a_bug_in_a_config_file_names_file_and_line(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config():\n  return undefined_name\n")
  msg = _error(f"--config={path}")
  assert msg == f"NameError: name 'undefined_name' is not defined ({path}:2)", msg


def test_did_you_mean():
  assert cli.did_you_mean("galor", ["adamw", "galore"]) == "; did you mean 'galore'?"
  assert cli.did_you_mean("xyz", ["adamw", "galore"]) == ""


def test_optimizer_name_and_study_filters_suggest():
  from train import study
  from train.configs import study as grids
  from train.optimizer import build_optimizer, default_optim_config
  c = default_optim_config()
  c.name = "galor"
  with pytest.raises(ValueError, match=r"did you mean 'galore'\?"):
    build_optimizer(c, 1e-3)
  cfg = grids.get_config("cpu")
  cfg.only = "dense,lots"
  with pytest.raises(ValueError, match=r"unknown run 'lots' .*did you mean 'lost'\?"):
    study.expand(cfg)
  cfg = grids.get_config("cpu")
  cfg.runs.lost.set = "optim.frugal.rhoo=0.1"
  with pytest.raises(ValueError, match=r"did you mean 'optim.frugal.rho'\?"):
    study.expand(cfg)


def _one_error_line(capsys, expected):
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_export_config_typo_in_process(tmp_path, capsys):
  from train import export
  rc = export.main(["export", f"--from_hf={tmp_path}", f"--workdir={tmp_path / 'run'}", QUICK,
                    "--config.train.stpes=3"])
  assert rc == 2
  _one_error_line(capsys, "unknown config field 'train.stpes'; did you mean 'train.steps'?")


def test_sample_flag_typo(capsys):
  from train import sample
  assert sample.main(["sample", "--workdir=x", "--promt=a"]) == 2
  _one_error_line(capsys, "Unknown command line flag 'promt'")


def test_analyze_argparse_one_line(capsys):
  from train import analyze
  with pytest.raises(SystemExit) as e:
    analyze.main(["scaling", "--runs=a", "--methd=huber"])
  assert e.value.code == 2
  _one_error_line(capsys, "unrecognized arguments: --methd=huber; did you mean '--method'?")
  with pytest.raises(SystemExit):
    analyze.main(["scaling", "--runs=a", "--method=hubr"])
  _one_error_line(capsys, "invalid choice: 'hubr'")


def test_export_config_overrides_apply_in_process():
  from train import export
  argv = ["export", "--from_hf=x", "--workdir=y", QUICK, "--config.train.steps=3"]
  fv = export._flags(argv)
  cli.parse_flags(fv, argv)
  assert fv.config.train.steps == 3
