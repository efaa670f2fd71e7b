"""Types and ranges declared once, on the constructor that reads them, checked before training.

Every plugin (task, model, estimator, inner and outer optimiser, logger: anything a config
names with ``_target_``) states what its arguments accept in its signature::

    def __init__(self, K: PositiveInt = 20, update: Literal["sign", "gradient"] = "sign",
                 clamp: Positive | None = None) -> None: ...

:func:`check_arguments` validates a config node against that signature with pydantic in strict
mode (no float where an integer goes, no string for a number, no NaN or infinity for a float,
no bare string for a list) and turns the first failure into one :class:`ConfigError` line,
``<key>=<value> <what is allowed>``, the allowed values read off the same annotation. A user's
plugin with type hints gets the same checks without writing any; an argument without a hint is
not checked. Relations between keys (a window no longer than the horizon) stay with the code
that knows both.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from omegaconf import Container, OmegaConf
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from metahpo.core import ConfigError

# -- the vocabulary plugins declare their arguments with ---------------------------------------
#: An integer >= 1 (sizes, counts that cannot be zero).
PositiveInt = Annotated[int, at.Ge(1)]
#: An integer >= 0 (seeds, counts).
NonNegativeInt = Annotated[int, at.Ge(0)]
#: A finite number > 0.
Positive = Annotated[float, at.Gt(0)]
#: A finite number >= 0.
NonNegative = Annotated[float, at.Ge(0)]
#: A number strictly between 0 and 1 (a share of a data set).
Fraction = Annotated[float, at.Gt(0), at.Lt(1)]
#: A number in [0, 1) (a moving-average coefficient: Adam's betas).
Decay = Annotated[float, at.Ge(0), at.Lt(1)]
#: Which steps are kept (``outer.accept``, and online estimators' ``accept``): ``finite``, all
#: whose training did not diverge; ``meta_loss``, also none whose (window-end) validation loss
#: rises above ``1 + tolerance`` times the best so far.
Accept = Literal["finite", "meta_loss"]
#: The rise ``accept=meta_loss`` allows over the best loss so far, as a fraction of it.
Tolerance = Annotated[float, at.Ge(0)]


def rise_limit(best: float, tolerance: float) -> float:
    """The highest loss ``accept=meta_loss`` keeps: ``best + tolerance |best|``."""
    return best + tolerance * abs(best)


#: Arguments some plugins of a kind take and others do not: what to say when one is given to a
#: plugin that does not take it.
ELSEWHERE = {
    "estimator.window": "estimator.window is taken by forward, exact_reverse, "
    "checkpointed_reverse, reversible and auto; pes is unbiased for that objective itself",
    "estimator.accept": "estimator.accept is taken by the online estimators greedy, pes and "
    "evograd; the outer loop's is outer.accept",
}


@dataclass(frozen=True)
class Allowed:
    """``Annotated[..., Allowed("auto, cpu, cuda, cuda:N")]``: the text a message shows as what
    is allowed, instead of the one read off the type."""

    text: str


CONFIG = ConfigDict(strict=True, arbitrary_types_allowed=True, allow_inf_nan=False)
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


# -- describing an annotation in words -----------------------------------------------------------
def _split(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` -> ``(T, [m1, m2])`` (FieldInfo metadata flattened)."""
    meta: list[Any] = []
    while typing.get_origin(annotation) is Annotated:
        args = typing.get_args(annotation)
        annotation = args[0]
        for m in args[1:]:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return annotation, meta


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _bounds(meta: list[Any], integer: bool) -> str:
    parts = []
    for m in meta:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None and isinstance(m, at.BaseMetadata | at.Interval):
                parts.append(f"{op} {v:g}" if isinstance(v, float) else f"{op} {v}")
        if isinstance(m, at.MinLen) and m.min_length:
            parts.append("non-empty" if m.min_length == 1 else f"of {m.min_length}+ items")
    if integer and parts == [">= 1"]:
        return ">= 1"
    return " and ".join(parts)


def describe(annotation: Any) -> str:
    """What ``annotation`` accepts, in words: ``"an integer >= 1 or null"``."""
    annotation, meta = _split(annotation)
    for m in meta:
        if isinstance(m, Allowed):
            return m.text
    members = _members(annotation)
    if len(members) > 1:
        words = [describe(m) for m in members if m is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in members else "")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is bool:
        return "true or false"
    if annotation is int:
        bound = _bounds(meta, True)
        return f"an integer {bound}".rstrip()
    if annotation is float:
        bound = _bounds(meta, False)
        return f"a number {bound}".rstrip()
    if annotation is str:
        return "a string"
    if annotation is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        inner = {describe(a) for a in args}
        if len(inner) == 1:
            return f"a list of {len(args)} {_plural(inner.pop())}"
        return f"a list of {len(args)} values: " + ", ".join(map(describe, args))
    if origin in (list, tuple, Sequence) or (
        isinstance(origin, type) and issubclass(origin, Sequence)
    ):
        bound = _bounds(meta, False)
        what = f"a {bound + ' ' if bound else ''}list"
        return f"{what} of {_plural(describe(args[0]))}" if args else what
    if origin in (dict, Mapping) or (isinstance(origin, type) and issubclass(origin, Mapping)):
        return f"a mapping {{name: {describe(args[1])}}}" if len(args) == 2 else "a mapping"
    if origin is not None and callable(annotation) or annotation is Callable:
        return "a callable"
    name = getattr(annotation, "__qualname__", None) or str(annotation)
    return f"a {name}"


def _plural(words: str) -> str:
    """``"an integer >= 1"`` -> ``"integers >= 1"``; other descriptions: ``"values, each ..."``."""
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if words.startswith(one) and " or " not in words:
            return many + words[len(one) :]
    return f"values, each {words}"


def _message(key: str, value: Any, annotation: Any) -> str:
    plain, meta = _split(annotation)
    members = [m for m in _members(plain) if m is not type(None)]
    literal = len(members) == 1 and typing.get_origin(members[0]) is Literal
    if literal and not any(isinstance(m, Allowed) for m in meta):
        allowed = ", ".join(str(a) for a in typing.get_args(members[0]))
        none = " (or null)" if type(None) in _members(plain) else ""
        return f"{key}={value!r} is unknown; allowed: {allowed}{none}"
    allowed = describe(annotation)
    if isinstance(value, float) and not math.isfinite(value):
        allowed = allowed.replace("a number", "a finite number")
    return f"{key}={_shown(value)} must be {allowed}"


def _shown(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


# -- the signature of a plugin -------------------------------------------------------------------
def _hints(target: Callable[..., Any]) -> dict[str, Any]:
    """The resolved type hints of ``target``'s arguments (its ``__init__`` for a class); an
    annotation that cannot be resolved is left out (not checked)."""
    func = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception:  # a hint naming something only imported for type checkers
        pass
    module = sys.modules.get(getattr(func, "__module__", ""), None)
    scope = dict(vars(module)) if module else {}
    out = {}
    for name, ann in getattr(func, "__annotations__", {}).items():
        try:
            out[name] = eval(ann, scope) if isinstance(ann, str) else ann  # noqa: S307
        except Exception:
            continue
    return out


@functools.lru_cache(maxsize=256)
def _signature(target: Callable[..., Any]) -> tuple[dict[str, Any], bool, list[str]]:
    """``({argument: TypeAdapter or None}, takes **kwargs, argument names)`` of ``target``."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}, True, []
    hints = _hints(target)
    adapters: dict[str, Any] = {}
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = hints.get(name)
        try:
            adapters[name] = None if ann is None else (ann, TypeAdapter(ann, config=CONFIG))
        except Exception:  # a type pydantic cannot check: left to the constructor
            adapters[name] = None
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return adapters, var_kw, list(adapters)


def _locate(key: str, target: str) -> Any:
    """The object a dotted path names (the longest importable module, then attributes)."""
    parts = target.split(".")
    error: Exception | None = None
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception as e:
            error = error if isinstance(error, ModuleNotFoundError) else e
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError as e:
            # a missing submodule (estimators.nope.X) says so; a missing class, its own error
            package = hasattr(importlib.import_module(".".join(parts[:i])), "__path__")
            deeper = package and isinstance(error, ModuleNotFoundError)
            error = error if deeper and error.name == ".".join(parts[: i + 1]) else e
            break
    detail = f"{type(error).__name__}: {error}" if error else "an empty path"
    raise ConfigError(
        f"{key}._target_={target!r} could not be imported ({detail.splitlines()[0]})"
    ) from None


def check_arguments(key: str, target: Any, arguments: Mapping[str, Any]) -> None:
    """Check a plugin's arguments against the type hints of ``target`` (a class or function,
    or its ``_target_`` path); raise ConfigError naming ``<key>.<argument>`` at the first bad
    one. Nested ``_target_`` nodes are checked as plugins of their own."""
    if isinstance(target, str):
        target = _locate(key, target)
    adapters, var_kw, names = _signature(target)
    for name, value in arguments.items():
        if name in HYDRA_KEYS:
            continue
        full = f"{key}.{name}"
        if isinstance(value, Mapping) and "_target_" in value:
            check_node(full, value)
            continue
        if name not in adapters:
            if var_kw:
                continue
            what = getattr(target, "__qualname__", str(target))
            hint = f" ({ELSEWHERE[full]})" if full in ELSEWHERE else ""
            raise ConfigError(
                f"{full} is not an argument of {what}; arguments: {', '.join(names) or 'none'}"
                f"{hint}"
            )
        checker = adapters[name]
        if checker is None:
            continue
        annotation, adapter = checker
        _validate(full, value, annotation, adapter)


def _validate(key: str, value: Any, annotation: Any, adapter: TypeAdapter[Any]) -> None:
    candidate = value
    for _ in range(8):  # a YAML list where a tuple goes is a tuple
        try:
            adapter.validate_python(candidate)
            return
        except ValidationError as e:
            errors = e.errors()
            fixed = _tuples(candidate, errors)
            if fixed is None:
                break
            candidate = fixed
    raise ConfigError(_explain(key, value, annotation, errors[0]["loc"])) from None


def _tuples(value: Any, errors: list[Any]) -> Any:
    """``value`` with the lists a ``tuple_type`` error points at made tuples (None: none)."""
    changed = False

    def at_loc(v: Any, loc: tuple[Any, ...]) -> Any:
        nonlocal changed
        if not loc:
            if isinstance(v, list):
                changed = True
                return tuple(v)
            return v
        head, rest = loc[0], loc[1:]
        if isinstance(v, Mapping) and head in v:
            return {**v, head: at_loc(v[head], rest)}
        if isinstance(v, list | tuple) and isinstance(head, int) and 0 <= head < len(v):
            items = list(v)
            items[head] = at_loc(v[head], rest)
            return type(v)(items)
        return at_loc(v, rest)  # a union member's tag

    for err in errors:
        if err["type"] == "tuple_type":
            value = at_loc(value, tuple(err["loc"]))
    return value if changed else None


def _explain(key: str, value: Any, annotation: Any, loc: tuple[Any, ...]) -> str:
    """The message for an error at ``loc`` inside ``value``: descend into mappings (their
    entries are keys of their own), report a list as a whole."""
    for item in loc:
        plain, _ = _split(annotation)
        maps = [
            m
            for m in _members(plain)
            if typing.get_origin(m) in (dict, Mapping)
            or (
                isinstance(typing.get_origin(m), type) and issubclass(typing.get_origin(m), Mapping)
            )
        ]
        if isinstance(value, Mapping) and item in value and maps:
            args = typing.get_args(maps[0])
            key, value = f"{key}.{item}", value[item]
            annotation = args[1] if len(args) == 2 else Any
        elif isinstance(value, Mapping) and item in value:
            key, value = f"{key}.{item}", value[item]
            annotation = Any
        else:
            continue
    return _message(key, value, annotation)


def checked(key: str) -> Callable[[type], type]:
    """Class decorator: every construction checks its arguments against the constructor's hints,
    so a direct Python call (``TruncatedReverse(K=0)``) fails with the same one-line
    ``<key>.<argument>=<value> must be ...`` as a config does. Defaults are not re-checked."""

    def decorate(cls: type) -> type:
        init = cls.__init__  # type: ignore[misc]
        params = inspect.signature(init).parameters
        plain = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            given = dict(zip(plain[1:], args, strict=False))
            given.update(kwargs)
            plain_values = {  # Hydra hands lists and mappings over as OmegaConf containers
                k: OmegaConf.to_container(v, resolve=True) if isinstance(v, Container) else v
                for k, v in given.items()
            }
            check_arguments(key, cls, plain_values)
            init(self, *args, **kwargs)

        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return decorate


def check_node(key: str, node: Mapping[str, Any]) -> None:
    """Check a config node that names its class (``{_target_: ..., arg: value}``)."""
    check_arguments(key, node["_target_"], node)


class Node(BaseModel):
    """A config node of fixed keys: strict types (no string for a number, no float for an
    integer), no NaN or infinity, no unknown key (checked by :func:`check_model`)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def check_model(key: str, model: Any, data: Mapping[str, Any]) -> None:
    """Check ``data`` against a pydantic model of fixed keys (the core config's nodes)."""
    try:
        model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            where = ".".join(str(x) for x in (key, *loc) if x)
            node = ".".join(str(x) for x in (key, *loc[:-1]) if x)
            sub = model
            for part in loc[:-1]:
                sub = sub.model_fields[part].annotation
            known = ", ".join(sorted(sub.model_fields))
            under = f" under {node}" if node else ""
            raise ConfigError(f"{where} is not a key metahpo reads; keys{under}: {known}") from None
        sub, value, path = model, data, [key] if key else []
        for i, part in enumerate(loc):
            field = sub.model_fields.get(part) if hasattr(sub, "model_fields") else None
            if field is None:
                break
            path.append(str(part))
            value = value.get(part) if isinstance(value, Mapping) else None
            annotation = field.rebuild_annotation()
            if hasattr(field.annotation, "model_fields") and i + 1 < len(loc):
                sub = field.annotation
                continue
            desc = f" ({field.description})" if field.description else ""
            message = _explain(".".join(path), value, annotation, loc[i + 1 :])
            raise ConfigError(message + desc) from None
        raise ConfigError(f"{'.'.join(path)}: {err['msg']}") from None
