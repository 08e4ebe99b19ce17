"""A config dataclass becomes flat CLI flags (`group_size` -> `--group-size`), and back.

Every field needs a default and a one-line `#` comment after it in the source (the comment becomes the flag's
help; a subclass inherits its base's fields and may declare one again with another default and help). Booleans
take `--flag` / `--no-flag`. Unknown flags, bad values and `__post_init__` failures become one clear line on stderr
and exit code 2, before anything runs.
"""

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys


class ConfigError(ValueError):
    """A bad option value or combination; the message names the option."""


def _help_texts(cls) -> dict[str, str]:
    """`field: type = default  # help` comments of the dataclass source, base classes first (a subclass that
    declares a field again, with another default, gives it its own help)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, re.MULTILINE):
            out[m.group(1)] = m.group(2).strip()
    return out


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2 (argparse's own prints the whole usage
    block first, which buries the line that matters)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(cls, description: str = "", parser_class=OneLineParser) -> argparse.ArgumentParser:
    parser = parser_class(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = _help_texts(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        # argparse expands %-formats in help texts: a literal % must be doubled
        help_text = f"{helps.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            kind = finite_float if isinstance(default, float) else type(default)
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text)
    return parser


def finite_float(text: str) -> float:
    """A float flag's value: any finite number; 'inf', 'nan' and the like are refused where they are typed (a learning
    rate of inf would make every weight inf while the loss still looked finite)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def _given(parser, argv) -> set[str]:
    words = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {a.dest for a in parser._actions if words & set(a.option_strings)}


def parse_config(cls, argv=None, description: str = ""):
    """(config, names of the flags given explicitly); exits with code 2 and one line on a bad value."""
    parser = build_parser(cls, description)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args)), _given(parser, argv)
    except ConfigError as exc:
        parser.error(str(exc))


def parse_flags(cls, argv: list[str]):
    """(config, names of the flags given explicitly) from a flag list, for checking another script's command line
    before launching it: every problem (unknown flag, bad value, bad combination) is a ConfigError, nothing exits."""
    parser = build_parser(cls, parser_class=_RaisingParser)
    args = parser.parse_args(list(argv))
    return cls(**vars(args)), _given(parser, argv)


def to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2) + "\n"


def from_dict(cls, data: dict, *, where: str):
    """A config from a saved config.json; unknown keys are an error (the run was made by another version)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; was it written by another version of this code?")
    return cls(**data)


def check_run_name(name: str, flag: str = "--name") -> None:
    """A run (or sweep) name is one plain folder name under the output folder: not empty, no path separator, no
    leading dot (so neither '.', '..', nor a hidden folder), no NUL, at most 255 bytes. Anything else could write
    outside the runs folder (`../../elsewhere`, an absolute path) or into it (an empty name)."""
    bad = (
        not name
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
        or len(name.encode("utf-8", "surrogatepass")) > 255
    )
    if bad:
        raise ConfigError(f"{flag} must be a plain folder name (no '/', no leading '.', not empty), got {name!r}")
