"""The method registry: one entry per editing method says everything the rest of corsa needs to know about it.

`corsa edit/update --method`, `corsa bench ... --methods` and the store derive their choices, flags, benchmark
names and special handling from these entries, so adding a method is writing one module under corsa/methods/
that ends with `register(MethodSpec(...))` (corsa/methods/__init__.py imports every module of the package).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from corsa.methods.base import Editor


@dataclass(frozen=True)
class Option:
    """A command-line flag that only some methods take. Several methods may declare the same flag for the same
    config field (--lambda); the CLI adds it once and refuses it for a method that does not declare it."""

    flag: str  # "--memit-weight"
    field: str  # the config field it sets
    help: str
    type: Callable[[str], Any] | None = None  # None: a switch, which sets `value` (and `also`) when given
    value: Any = None
    also: Mapping[str, Any] = field(default_factory=dict)  # a switch's other fields (--no-dpo also drops PCGrad)
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def one_of(*choices: str) -> Callable[[str], str]:
    """A sweep's parser for a named setting: the value itself, or ValueError (an unknown method) for any other."""
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(value)
        return value
    return parse


@dataclass(frozen=True)
class Sweep:
    """A benchmark setting: `<method>-<key><value>` in `--methods` sets `field` to parse(value)."""

    key: str  # "lambda" -> corsa-lambda0.5
    field: str  # "lam"
    parse: Callable[[str], Any] = float
    form: str = "<value>"  # how the value is written, for messages


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: Callable[..., Any]  # keyword overrides -> the method's frozen config (its defaults cite their source)
    editor: Callable[[Any], Editor]  # config -> editor
    help: str  # one line for `--method`'s help
    options: tuple[Option, ...] = ()
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # named benchmark variants
    sweeps: tuple[Sweep, ...] = ()
    # The result is an adapter that a later update keeps training (a store; the multi-update benchmarks). Methods
    # that do not continue one get the previous update folded into the weights before the next.
    continues: bool = False
    # What an edit writes: a PEFT adapter, or (in-context methods) the context, written and read by the two
    # functions below.
    output: Literal["adapter", "context"] = "adapter"
    save_context: Callable[[Any], dict[str, Any]] | None = None  # the result's formatter -> a JSON record
    load_context: Callable[[Any, str, dict[str, Any]], Any] | None = None  # (tokenizer, style, record) -> formatter
    data_field: str | None = None  # a config field a benchmark fills with its data folder (MEMIT's statistics)
    diagnostics: tuple[str, ...] = ()  # manifest keys a benchmark copies into its record

    def __post_init__(self) -> None:
        if self.output == "context" and (self.save_context is None or self.load_context is None):
            raise ValueError(f"{self.name}: a method that writes a context needs save_context and load_context")


_REGISTRY: dict[str, MethodSpec] = {}
# Read-only view: entries change only through register/unregister, which check them.
REGISTRY: Mapping[str, MethodSpec] = MappingProxyType(_REGISTRY)


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"a method named {spec.name!r} is registered already")
    for option in spec.options:  # one flag, one meaning, whichever methods take it
        for other in _REGISTRY.values():
            for known in other.options:
                if known.flag == option.flag and (known.field, known.type, known.value) != (
                        option.field, option.type, option.value):
                    raise ValueError(f"{spec.name}: {option.flag} already sets {other.name}'s {known.field} "
                                     "differently")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> MethodSpec:
    from corsa.errors import InputError

    if name not in _REGISTRY:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}", field="--method")
    return _REGISTRY[name]


def make_editor(name: str, **overrides: Any) -> Editor:
    spec = get(name)
    config = spec.config(**overrides)
    check_numbers(config)
    return spec.editor(config)


def check_numbers(config: Any, where: str = "") -> None:
    """Every number in a config (nested configs included) must be finite: a NaN passes every range check written
    as a comparison (nan <= 0 is False) and then trains an adapter of NaNs. Seeds must fit the generators."""
    import dataclasses
    import math

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_numbers(value, f"{where}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}{f.name} must be a finite number, not {value}")
        elif f.name == "seed" and not 0 <= value < 2**32:
            raise ValueError(f"{where}seed must be a whole number from 0 to 2**32 - 1, not {value}")


def options() -> dict[str, tuple[Option, list[str]]]:
    """Every method flag once, with the methods that take it, in registration order."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for spec in _REGISTRY.values():
        for option in spec.options:
            out.setdefault(option.flag, (option, []))[1].append(spec.name)
    return out


def variant_names() -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Benchmark names: every method under its own name, and every named variant."""
    out: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for spec in _REGISTRY.values():
        out[spec.name] = (spec.name, {})
        out.update({name: (spec.name, over) for name, over in spec.variants.items()})
    return out
