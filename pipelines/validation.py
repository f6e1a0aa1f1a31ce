"""Validation of the pipeline's config dataclasses: types strict, unknown keys named with the valid ones,
NaN / infinity and out-of-range values refused, and every problem reported at once, one line each
(`ConfigError`), before anything runs.

The configs stay stdlib `@dataclass(kw_only=True)`s (style guide); each field declares its type and its
range in its annotation (`Annotated[float, Field(gt=0, le=1)]`, `Literal[...]`) and pydantic v2 enforces
them -- with `STRICT` (no coercion of "5" to 5 or of 1 to True, no extra keys, no NaN / inf):

- `build(cls, data)` validates a whole nested mapping (a YAML file, `to_dict()` output) into `cls`,
  collecting every problem of every section;
- `check_fields(obj, section)`, called first in each config's `__post_init__`, checks a config built
  directly in Python (recipes, `dataclasses.replace`) against the same annotations.

Cross-field rules stay in `__post_init__` and run once the fields themselves are valid.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

# A name that becomes one path component (a run folder, a step directory, an output folder): no "/",
# no "." / ".." and no NUL, by construction.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
PathComponent = Annotated[str, Field(pattern=SAFE_NAME, max_length=200)]
NonEmpty = Annotated[str, Field(min_length=1)]


class ConfigError(ValueError):
    """Every problem of a config, one line each (`problems`); its message is those lines."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(dict.fromkeys(problems))  # in order, each once
        super().__init__("\n".join(self.problems))

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems, each named under `prefix` (e.g. "train_overrides.")."""
        return ConfigError([f"{prefix}{p}" for p in self.problems])


def problems_of(error: ValueError) -> list[str]:
    """The problem lines of any ValueError (a ConfigError has several)."""
    return list(error.problems) if isinstance(error, ConfigError) else [str(error)]


def check_path_component(field_name: str, value: Any) -> None:
    """Refuse a name that would not be exactly one safe path component ("..", ".", "a/b", NUL, "")."""
    if not isinstance(value, str) or not re.fullmatch(SAFE_NAME, value) or len(value) > 200:
        raise ConfigError([f"{field_name}: must be a plain name (letters, digits, '.', '_', '-', starting with a "
                           f"letter or digit; it names a directory), got {value!r}"])


# ----- formatting ---------------------------------------------------------------------------------
def _valid_fields(cls: Any, loc: tuple) -> list[str]:
    """Field names of the dataclass at `loc` inside `cls` (for "unknown field" messages)."""
    for part in loc:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return []
        hint = typing.get_type_hints(cls).get(str(part))
        cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
    return sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


def _float_text(value: Any) -> bool:
    try:
        float(value)
        return isinstance(value, str)
    except (TypeError, ValueError):
        return False


_TYPE_LABELS = ("int", "float", "str", "bool", "none", "list", "dict")
_LABEL_PREFIXES = ("constrained-", "function-", "literal[", "is-instance[")


def _line(err: Mapping[str, Any], cls: Any, prefix: str) -> list[str]:
    loc = tuple(err["loc"])
    # Union members add their type to the location ("eval_limit.int"): keep the field path only.
    path = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_LABELS or p.startswith(_LABEL_PREFIXES)))]
    where = prefix + ".".join(path)
    if err["type"] == "value_error":  # a cross-field rule of a __post_init__: its message names its fields
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
        return [f"{prefix}{line}" for line in msg.splitlines()]
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        valid = _valid_fields(cls, loc[:-1])
        return [f"{where}: unknown field" + (f"; valid: {', '.join(valid)}" if valid else "")]
    if err["type"] == "missing_argument" or err["type"] == "missing":
        return [f"{where}: is required"]
    if err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == SAFE_NAME:
        return [f"{where}: must be a plain name (letters, digits, '.', '_', '-', starting with a letter or digit; "
                f"it names a directory), got {err.get('input')!r}"]
    msg = err["msg"].removeprefix("Input ").removeprefix("input ")
    got = err.get("input")
    hint = ""
    if err["type"] in ("float_type", "int_type") and _float_text(got):
        hint = " (YAML reads a number without a '.' before its exponent, like 1e-4, as text: write 1.0e-4)"
    return [f"{where}: {msg}, got {got!r}{hint}"]


def _config_error(e: ValidationError, cls: Any, prefix: str) -> ConfigError:
    return ConfigError([line for err in e.errors() for line in _line(err, cls, prefix)])


# ----- validation ---------------------------------------------------------------------------------
@cache
def _adapter(cls: Any) -> TypeAdapter:
    return TypeAdapter(cls)


def _to_json(obj: Any) -> str:
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, tuple | set | frozenset):
            return list(o)
        return str(o)  # a type the config cannot hold: refused as text, named

    return json.dumps(obj, default=default, allow_nan=True)


def build(cls: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
    """`cls` (a config dataclass) validated from the nested mapping `data`; ConfigError listing every
    problem (each named as `prefix` + its dotted path) otherwise."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"{prefix.rstrip('.') or 'the config'}: expected a mapping of fields, got {data!r}"])
    try:
        return _adapter(cls).validate_json(_to_json(dict(data)), strict=True)
    except ValidationError as e:
        raise _config_error(e, cls, prefix) from None


@cache
def _field_adapters(cls: Any) -> dict[str, TypeAdapter]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        bare = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
        if isinstance(bare, type) and dataclasses.is_dataclass(bare):
            continue  # a section: validated when it was built
        out[f.name] = TypeAdapter(hint, config=STRICT)
    return out


def check_fields(obj: Any, section: str = "") -> None:
    """Check every (non-section) field of the config dataclass `obj` against its annotation; ConfigError
    listing every problem, named `section.field`. Call it first in `__post_init__`."""
    prefix = f"{section}." if section else ""
    problems = []
    for name, adapter in _field_adapters(type(obj)).items():
        value = getattr(obj, name)
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as e:
            for err in e.errors():
                problems += _line({**err, "loc": (name, *err["loc"])}, type(obj), prefix)
    if problems:
        raise ConfigError(problems)


__all__ = ["ConfigError", "NonEmpty", "PathComponent", "SAFE_NAME", "STRICT", "build", "check_fields",
           "check_path_component", "problems_of"]
