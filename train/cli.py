"""Command-line parsing shared by the commands (`train.main`, `train.study`, `train.export`, `train.sample`,
`train.analyze`): every flag or config mistake ends in one `error: ...` line on stderr and exit status 2.

absl and `ml_collections.config_flags` report a misspelt override (`--config.train.stpes=10`) as a traceback, and a
config file's own ValueError (an unknown preset in `llama.py:60m,lots`) as a block with the traceback inside. When
parsing fails, `config_error` finds the mistake itself: it loads the config file again (only on this error path)
and walks every `--config.a.b` override through it, naming the first part that does not exist and the closest
existing name (`difflib.get_close_matches`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import sys
import traceback


class ConfigError(ValueError):
  """A config or flag mistake; its message is the one line printed after `error:`."""


def did_you_mean(word: str, choices, prefix: str = "") -> str:
  """'; did you mean 'x'?' for the closest of `choices` (difflib), or '' when none is close."""
  match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
  return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def one_line(message: str) -> str:
  return " ".join(str(message).split())


# ------------------------------------------------------------------------------------------- config files


def config_spec(argv, name: str = "config") -> str | None:
  """The value of `--<name>=...` (or `--<name> ...`) in argv; the last one wins, as in absl."""
  spec = None
  for i, a in enumerate(argv):
    if re.fullmatch(rf"--?{re.escape(name)}", a):
      spec = argv[i + 1] if i + 1 < len(argv) else None
    elif re.match(rf"--?{re.escape(name)}=", a):
      spec = a.split("=", 1)[1]
  return spec


def override_paths(argv, name: str = "config") -> list[str]:
  """Dotted paths of the `--<name>.a.b=value` / `--no<name>.a.b` overrides in argv, in order."""
  out = []
  for a in argv:
    m = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", a)
    if m:
      out.append(m.group(1))
  return out


def load_config(spec: str):
  """`get_config(arg)` of the file in 'path.py[:arg]', as ml_collections calls it; ConfigError for a bad file/arg."""
  path, colon, arg = spec.partition(":")
  if not path:
    raise ConfigError("--config needs a config file, e.g. --config=train/configs/quickstart.py")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found (relative paths start at {os.getcwd()})")
  module_spec = importlib.util.spec_from_file_location("_lostjax_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ConfigError(f"config file {path!r} defines no get_config()")
    return module.get_config(arg) if colon else module.get_config()
  except ConfigError:
    raise
  except ValueError as e:          # the config file's own message names the bad preset/method/grid
    raise ConfigError(one_line(e)) from e
  except Exception as e:           # a bug in the config file: say where
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
    where = f" ({path}:{frames[-1].lineno})" if frames else f" ({path})"
    raise ConfigError(one_line(f"{type(e).__name__}: {e}{where}")) from e


def _leaf_paths(node, prefix=""):
  for k in node.keys():
    v = node[k]
    p = f"{prefix}{k}"
    yield p
    if hasattr(v, "keys") and not isinstance(v, type):
      yield from _leaf_paths(v, p + ".")


def check_override(cfg, path: str) -> str | None:
  """The message for an override path that does not exist in cfg (unknown section/field), else None."""
  if "[" in path:      # indexing syntax (a.b[0]): left to ml_collections
    return None
  keys = path.split(".")
  node = cfg
  for i, key in enumerate(keys):
    where = ".".join(keys[:i])
    if not hasattr(node, "keys"):
      return f"config field '{where}' holds a value ({type(node).__name__}), not a section: cannot set '{path}'"
    if key not in node.keys():
      full = ".".join(keys[:i + 1])
      kind = "section" if i < len(keys) - 1 else "field"
      hint = did_you_mean(key, node.keys(), prefix=f"{where}." if where else "")
      if not hint:   # the same name elsewhere (e.g. optim.rho -> optim.frugal.rho)
        same = [p for p in _leaf_paths(node, f"{where}." if where else "") if p.rsplit(".", 1)[-1] == key]
        hint = f"; did you mean '{same[0]}'?" if len(same) == 1 else ""
      if not hint:
        names = ", ".join(sorted(node.keys()))
        hint = f" (sections: {names})" if i == 0 else f" (fields of {where}: {names})"
      return f"unknown config {kind} '{full}'{hint}"
    node = node[key]
  return None


def config_error(exc: BaseException, argv, name: str = "config") -> str:
  """One line describing why parsing argv failed with `exc` (the config's own mistake first)."""
  spec = config_spec(argv, name)
  if spec is not None:
    try:
      cfg = load_config(spec)
    except ConfigError as e:
      return str(e)
    if cfg is not None:
      for path in override_paths(argv, name):
        msg = check_override(cfg, path)
        if msg:
          return msg
  lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
  if not lines:
    return type(exc).__name__
  msg = lines[0]
  if msg.startswith("flag --") and msg.endswith(":") and len(lines) > 1:
    msg = f"{msg} {lines[-1]}"
  return one_line(msg)


# ------------------------------------------------------------------------------------------- absl flags


def parse_flags(flag_values, argv, name: str = "config"):
  """Parses argv into flag_values (absl); returns the remaining args, or raises ConfigError with one line."""
  spec = config_spec(argv, name) if name in flag_values else None
  if spec is not None:
    path = spec.partition(":")[0]
    if not os.path.isfile(path):   # ml_collections would defer this to the first access of the config
      raise ConfigError(f"config file {path!r} not found (relative paths start at {os.getcwd()})")
  try:
    return flag_values(argv)
  except Exception as e:  # absl's flags.Error, and the KeyError/AttributeError ml_collections raises on a typo
    raise ConfigError(config_error(e, argv, name) if name in flag_values else config_error(e, [], name)) from e


def absl_flags_parser(argv):
  """`app.run(main, flags_parser=absl_flags_parser)`: absl's global FLAGS, one error line and exit status 2."""
  from absl import flags
  try:
    return parse_flags(flags.FLAGS, argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse(flag_values, argv, doc) -> int | None:
  """Parses argv into a command's own FlagValues; returns an exit status (help: 0, mistake: 2) or None to go on."""
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    print(doc + "\n" + flag_values.get_help())
    return 0
  flag_values.unparse_flags()  # back to the defaults (main may run several times in one process)
  try:
    parse_flags(flag_values, argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return None


# ------------------------------------------------------------------------------------------- argparse


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one `error:` line (exit status 2) and a did-you-mean for unknown options."""

  def error(self, message):
    m = re.match(r"unrecognized arguments: (\S+)", message)
    if m:
      opt = m.group(1).split("=", 1)[0]
      message += did_you_mean(opt, [s for a in self._actions for s in a.option_strings])
    print(f"error: {self.prog}: {one_line(message)}", file=sys.stderr)
    sys.exit(2)
