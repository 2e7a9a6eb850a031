"""The `:SPEC` argument of a config file (`--config=configs/cas.py:resnet18,trades`): words
separated by commas, each a field with its allowed values, as big_vision's
`configs/common.py` parses its config arguments. One parser for every config file, so each
file states its fields and every file refuses a bad argument the same way."""
from __future__ import annotations

import dataclasses
from typing import Collection


@dataclasses.dataclass(frozen=True)
class Field:
  """One word of the argument: its NAME in the usage line, its allowed values, and its
  default when the argument leaves it out (None: it must be given)."""
  name: str
  allowed: Collection[str]
  default: str | None = None


def parse(spec: str, config_file: str, *fields: Field) -> tuple[str, ...]:
  """The words of `spec`, a missing trailing word taking its field's default. ValueError
  (one line: the usage, the allowed values, the argument) for too many words, a missing
  required word, or a word outside its field's values."""
  words = spec.split(",")
  required = sum(f.default is None for f in fields)
  if (len(words) > len(fields) or len(words) < required
      or any(w not in f.allowed for w, f in zip(words, fields))):
    allowed = [f"{f.name} in {', '.join(f.allowed)}" for f in fields]
    raise ValueError(f"{config_file} takes {usage(fields)} with "
                     + " and ".join([", ".join(allowed[:-1]), allowed[-1]] if allowed[:-1]
                                    else allowed) + f"; got {spec!r}")
  return tuple(words + [f.default for f in fields[len(words):]])


def usage(fields: tuple[Field, ...]) -> str:
  """e.g. "ARCH,OBJECTIVE" or "RECIPE,ARCH[,DATASET]" (optional words in brackets)."""
  text = ""
  for i, f in enumerate(fields):
    word = ("," if i else "") + f.name
    text += word if f.default is None else f"[{word}"
  return text + "]" * sum(f.default is not None for f in fields)
