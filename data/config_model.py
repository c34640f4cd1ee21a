"""Strict pydantic models for configuration, and their errors as one line a person can act on.

`ConfigModel` is the base of every config section (`data.config.DataConfig` and the sections of
`trainer.config`): unknown keys are refused, and a failed validation becomes one `ValueError` naming the
key path (`train.zero_stage`), the value given and what is allowed (the expected type, range or choices,
and a did-you-mean for an unknown key) -- never a pydantic traceback. What is allowed is read from the
field declarations themselves (`IntAtLeast(1)`, `NumberIn(gt=0.0)`, `Literal[...]`), so a new field gets a
good message without writing one. It lives in data/ (the lowest layer holding configuration) so that
both data/ and trainer/config/ build on it without an import circle.
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

# ----------------------------------------------------------------------------------------------
#                                          Field types
# ----------------------------------------------------------------------------------------------


def _not_a(*kinds: type):
    """A before-validator refusing inputs that pydantic's lax mode would convert: True is no integer,
    2.0 is no step count (a YAML `"1e-4"` string still becomes a number, as YAML 1.1 reads it as text)."""
    def refuse(value: Any) -> Any:
        if isinstance(value, kinds):
            raise PydanticCustomError("wrong_type", "wrong type")
        return value
    return refuse


Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]


def IntAtLeast(minimum: int) -> Any:  # noqa: N802 (a type, named like one)
    return Annotated[int, BeforeValidator(_not_a(bool, float)), Field(ge=minimum)]


def NumberIn(*, gt: float | None = None, ge: float | None = None,  # noqa: N802
             lt: float | None = None, le: float | None = None) -> Any:
    return Annotated[float, BeforeValidator(_not_a(bool)), Field(gt=gt, ge=ge, lt=lt, le=le)]


def invalid(value: Any, allowed: str, hint: str = "") -> PydanticCustomError:
    """The error of a rule that is not a type or range: `<key>=<value> is not valid<hint>: <allowed>`."""
    return PydanticCustomError("invalid", "{allowed}", {"allowed": allowed, "value": value, "hint": hint})


def IntChoice(choices: tuple[int, ...]) -> Any:  # noqa: N802
    """An integer out of a few (ZeRO stages): named "choose one of [...]" like the other choices."""
    def check(value: int) -> int:
        if value not in choices:
            raise invalid(value, f"choose one of {list(choices)}")
        return value
    return Annotated[int, BeforeValidator(_not_a(bool, float)), AfterValidator(check)]


class _OneLineErrors(type(BaseModel)):
    """`Section(key=value)` raises the one-line error. On the metaclass, not in `__init__`: pydantic calls
    an overridden `__init__` for every nested section too, which would translate each part on its own."""

    def __call__(cls, *args: Any, **kwargs: Any):
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise config_error(err, cls, cls.section) from None


class ConfigModel(BaseModel, metaclass=_OneLineErrors):
    """A config section: strict keys, plain attribute access, equality by content, `replace()`."""

    model_config = ConfigDict(extra="forbid")
    # the key path prefix of this section's fields when it is built on its own ("data" -> data.format)
    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: Any):
        """Validate a mapping (e.g. parsed YAML), raising the one-line `ValueError` on a bad key or value."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise config_error(err, cls, cls.section) from None

    def replace(self, **changes: Any):
        """A copy with `changes`, validated like a new config (a bad value is refused here too)."""
        return type(self)(**{**{name: getattr(self, name) for name in type(self).model_fields}, **changes})


# ----------------------------------------------------------------------------------------------
#                                  pydantic errors -> one line
# ----------------------------------------------------------------------------------------------

_MAPPING_ERRORS = ("model_type", "model_attributes_type", "dict_type")
_WHOLE_SEQUENCE_ERRORS = ("missing", "too_short", "too_long")


def config_error(err: ValidationError, root: type[BaseModel], prefix: str = "") -> ValueError:
    """The first problem of `err` (raised validating `root`) as the project's one-line ValueError."""
    errors = err.errors(include_url=False)
    more = len(errors) - 1  # one line still: the first problem in full, the others counted
    return ValueError(_explain(errors[0], root, prefix) + (f" ({more} more problem{'s' * (more > 1)} after this one)"
                                                          if more else ""))


def unknown_key_message(key: str, where: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    full = f"{where}.{key}" if where else key
    return f"unknown key {full!r}{hint}; valid keys{' of ' + where if where else ''}: {', '.join(valid)}"


def _explain(error: dict, root: type[BaseModel], prefix: str) -> str:
    kind, loc, given = error["type"], tuple(error["loc"]), error.get("input")
    ctx = error.get("ctx") or {}
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])  # a cross-field rule: its message is written out in full
    if kind == "extra_forbidden":
        where, section = _walk(root, loc[:-1], prefix)[:2]
        return unknown_key_message(str(loc[-1]), where, list(section.model_fields))
    if kind in _WHOLE_SEQUENCE_ERRORS and loc and isinstance(loc[-1], int):
        loc = loc[:-1]  # a list of the wrong length: name the list, not its missing item
    key, annotation, metadata = _walk(root, loc, prefix)
    note = _description(root, loc)
    if kind in _MAPPING_ERRORS:
        return f"{key} must be a mapping of keys to values, got {given!r}"
    if kind == "invalid":
        return f"{key}={ctx['value']!r} is not valid{ctx['hint']}: {ctx['allowed']}"
    if _base_type(annotation) is float and isinstance(given, int) and not isinstance(given, bool):
        given = float(given)  # shown as the number the field holds (0 -> 0.0)
    return f"{key}={given!r} is not valid: expected {describe(annotation, metadata)}{note}"


def _description(root: type[BaseModel], loc: tuple) -> str:
    """ " (what the value means)" of the field at `loc` when it declares a description, else ""."""
    model, field = root, None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields):
            return ""
        field = model.model_fields[part]
        model = _unwrap(field.annotation)[0]
    return f" ({field.description})" if field is not None and field.description else ""


def _walk(root: type[BaseModel], loc: tuple, prefix: str) -> tuple[str, Any, tuple]:
    """(dotted key, declared type, constraints) of an error location (a section's type is its model)."""
    key, annotation, metadata = prefix, root, ()
    whole_union, ended_on_tag = None, False  # the union a trailing tag chose a branch of
    for part in loc:
        ended_on_tag = False
        if isinstance(part, int):
            annotation, metadata = _unwrap(annotation, metadata)
            args = typing.get_args(annotation)
            annotation, metadata = (args[part] if part < len(args) else Any), ()
            key = f"{key}[{part}]"
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
            field = annotation.model_fields[part]
            annotation, metadata = field.annotation, tuple(field.metadata)
            key = f"{key}.{part}" if key else str(part)
        else:  # a tag of a discriminated union (e.g. num_workers: "count" or "range"): take that branch
            whole_union, ended_on_tag = (annotation, metadata), True
            annotation, metadata = _union_branch(annotation, metadata, str(part))
    if ended_on_tag:
        annotation, metadata = whole_union  # the value itself is wrong: say every shape the key takes
    return key, annotation, metadata


def _unwrap(annotation: Any, metadata: tuple = ()) -> tuple[Any, tuple]:
    """Annotated[T, *m] -> (T, constraints), with pydantic's FieldInfo opened into its constraints."""
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata = (*metadata, *extra)
    flat: list = []
    for item in metadata:
        flat.extend(item.metadata if isinstance(item, FieldInfo) else [item])
    return annotation, tuple(flat)


def _union_branch(annotation: Any, metadata: tuple, tag: str) -> tuple[Any, tuple]:
    annotation, metadata = _unwrap(annotation, metadata)
    for branch in typing.get_args(annotation):
        if any(getattr(m, "tag", None) == tag for m in typing.get_args(branch)[1:]):
            return _unwrap(branch)
    return annotation, metadata


def _base_type(annotation: Any) -> Any:
    return _unwrap(annotation)[0]


def describe(annotation: Any, metadata: tuple = ()) -> str:
    """What a field accepts, in words: "an integer >= 1", "a number in (0.0, 1.0]", "one of [...]"."""
    annotation, metadata = _unwrap(annotation, metadata)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return f"one of {list(typing.get_args(annotation))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is tuple:
        items = typing.get_args(annotation)
        noun = "integers" if all(_base_type(a) is int for a in items) else "numbers"
        return f"a list of {len(items)} {noun}"
    if annotation is type(None):
        return "null"
    if annotation in (int, float):
        return _describe_number(annotation, metadata)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping of keys to values"
    return {bool: "true or false", str: "a string"}.get(annotation, str(annotation))


def _describe_number(kind: type, metadata: tuple) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for m in metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, hi_open = m.lt, True
    if kind is int:
        if lo is not None and hi is None:
            return f"an integer {'>' if lo_open else '>='} {lo}"
        return "an integer" if lo is None and hi is None else f"an integer in [{lo}, {hi}]"
    if lo is None and hi is None:
        return "a number"
    lo_s = "(" if lo_open or lo is None else "["
    hi_s = ")" if hi_open or hi is None else "]"
    return f"a number in {lo_s}{float(-math.inf if lo is None else lo)}, {float(math.inf if hi is None else hi)}{hi_s}"
