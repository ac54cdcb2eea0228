"""The ranges of a run's settings, as data: what each Config field accepts, the check that
refuses anything else in one line, and the command line's flags made from the fields.

model.Config lists the fields (default, help, the values accepted, the group of its flag in -h);
this file holds the machinery, so that Config reads as a list of settings and a reader of the
method reaches Eq. (1) without passing through it.
"""
import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch


# ---------------------------------------------------------------- the values a setting accepts

@dataclass(frozen=True)
class Interval:
    """The numbers from low to high; `ends` says which ends belong ("[)": low does, high not)."""
    low: float
    high: float = math.inf
    ends: str = "[)"

    def __contains__(self, value):
        if isinstance(value, str) or not np.isfinite(value):
            return False
        above = value >= self.low if self.ends[0] == "[" else value > self.low
        return above and (value < self.high if self.ends[1] == ")" else value <= self.high)

    def __str__(self):
        low, high = (f"{int(v)}" if float(v).is_integer() else f"{v}"
                     for v in (self.low, self.high))
        if self.high == math.inf:
            return f"{'>=' if self.ends[0] == '[' else '>'} {low}"
        return f"in {self.ends[0]}{low}, {high}{self.ends[1]}"


@dataclass(frozen=True)
class OneOf:
    """One of a few words; N in a word stands for any whole number ("cuda:N")."""
    words: tuple

    def __contains__(self, value):
        return any(re.fullmatch(word.replace("N", r"\d+"), str(value)) for word in self.words)

    def __str__(self):
        return "one of " + ", ".join(f'"{word}"' for word in self.words)


@dataclass(frozen=True)
class Each:
    """A tuple of numbers, each in `numbers`."""
    numbers: Interval

    def __contains__(self, values):
        return all(value in self.numbers for value in values)

    def __str__(self):
        return f"each {self.numbers}"


@dataclass(frozen=True)
class OrAuto:
    """The word "auto" or a number in `numbers`."""
    numbers: Interval

    def __contains__(self, value):
        return value == "auto" or value in self.numbers

    def __str__(self):
        return f'{self.numbers} or "auto"'


def setting(default, help, accepts=None, group="model"):
    """A Config field: its default, the help of its flag, the values check accepts (None:
    a switch) and its group in -h ("data", "model" or "run")."""
    return field(default=default, metadata={"help": help, "accepts": accepts, "group": group})


POSITIVE, COUNT, WEIGHT, SHARE = Interval(0, ends="()"), Interval(1), Interval(0), Interval(0, 1)


# ---------------------------------------------------------------- checking a Config

def helps(config_class):
    """Field of a config dataclass -> the help of its flag, ending with the values it accepts."""
    return {f.name: f.metadata["help"] + (f" ({f.metadata['accepts']})"
                                          if f.metadata["accepts"] is not None else "")
            for f in dataclasses.fields(config_class)}


def check(config):
    """Raise a one-line ValueError for a setting outside the values its field accepts (a beta_c
    of 1.5 would leave phase 2 idle) or a CUDA device this machine does not have."""
    for f in dataclasses.fields(config):
        value, accepts = getattr(config, f.name), f.metadata["accepts"]
        if accepts is not None and value not in accepts:
            raise ValueError(f"--{f.name.replace('_', '-')} must be {accepts}, got {value}")
    gpus = torch.cuda.device_count()
    device = torch.device(config.device)
    if device.type == "cuda" and (device.index or 0) >= gpus:
        where = f"this machine has {gpus} CUDA devices" if gpus else "CUDA is not available here"
        raise ValueError(f"--device {config.device}: {where}")


# ---------------------------------------------------------------- the command line's flags

def add_flags(groups, config_class):
    """One flag per field of config_class (--beta-c for beta_c) in the argparse group its field
    names (groups: {"data" | "model" | "run": group}), with its help, range and default."""
    explained = helps(config_class)
    for f in dataclasses.fields(config_class):
        groups[f.metadata["group"]].add_argument(
            "--" + f.name.replace("_", "-"), default=f.default,
            help=f"{explained[f.name]}; default {f.default}", **_flag_kind(f))


def _flag_kind(f):
    """How argparse reads the flag of field f: a switch (--x / --no-x), several whole numbers, a
    threshold ("auto" or a number), or one value of the default's type."""
    if isinstance(f.default, bool):
        return dict(action=argparse.BooleanOptionalAction)
    if isinstance(f.default, tuple):
        return dict(type=int, nargs="+")
    if isinstance(f.metadata["accepts"], OrAuto):
        return dict(type=_auto_or_number)
    return dict(type=type(f.default))


def _auto_or_number(text):
    """A threshold flag: "auto" or a number."""
    return text if text == "auto" else float(text)
