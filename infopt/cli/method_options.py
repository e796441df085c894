"""`infopt quantize`'s method flags, made from the registry's config classes (one flag per option field).

Every flag defaults to "not given"; the chosen method's config takes the given ones, and a flag the method has no
field for is refused, naming the method's own options, instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer

from infopt.errors import InfoptError
from infopt.quant.methods import MethodConfig, option_type
from infopt.quant.registry import METHODS, get_method


@dataclass(frozen=True)
class Flag:
    flag: str  # as the config field declares it: "--x", or "--on/--off" for a switch
    kind: type  # int, float, bool or str
    help: str

    @property
    def decl(self) -> str:
        """The typer declaration: switches declared as one flag get their "--no-" form."""
        if self.kind is bool and "/" not in self.flag:
            return f"{self.flag}/--no-{self.flag.removeprefix('--')}"
        return self.flag

    def shown(self, value: Any) -> str:
        if isinstance(value, bool):
            on, off = self.decl.split("/")
            return on if value else off
        return f"{self.flag} {'none' if value is None else value}"


def _base_type(hint: Any) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def _flags() -> dict[str, Flag]:
    """Parameter name -> flag, over all methods; a flag shared by methods means the same option in each."""
    found: dict[str, tuple[dataclasses.Field, type, dict[str, Any]]] = {}
    for method in METHODS.values():
        for f in dataclasses.fields(method.config):
            entry = found.setdefault(f.metadata["flag"], (f, method.config, {}))
            entry[2][method.name] = f.default
    flags = {}
    for declared, (f, config, defaults) in found.items():
        flag = Flag(declared, _base_type(option_type(config, f.name)), f.metadata["help"])
        shown = {m: flag.shown(v).removeprefix(declared + " ") for m, v in defaults.items()}
        default = (next(iter(shown.values())) if len(set(shown.values())) == 1
                   else ", ".join(f"{v} for {m}" for m, v in shown.items()))
        name = "opt_" + declared.split("/")[0].removeprefix("--").replace("-", "_")
        flags[name] = Flag(declared, flag.kind, f"{flag.help} ({', '.join(defaults)}; default {default})")
    return flags


FLAGS = _flags()


def with_method_options(func: Callable) -> Callable:
    """`func` (which takes **method_options) with one keyword parameter per method flag, as typer needs it."""
    signature = inspect.signature(func)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[flag.kind],
                               default=typer.Option(None, flag.decl, help=flag.help, show_default=False,
                                                            rich_help_panel="Method options"))
             for name, flag in FLAGS.items()]

    def command(**kwargs):
        options = {name: kwargs.pop(name) for name in FLAGS}
        return func(**kwargs, **options)

    command.__signature__ = signature.replace(parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        and p.name != "model" else p for p in fixed] + extra)
    hints = typing.get_type_hints(func)
    command.__annotations__ = {**{p.name: hints.get(p.name, Any) for p in fixed}, **{p.name: p.annotation for p in extra}}
    command.__doc__, command.__name__ = func.__doc__, "quantize"
    return command


def method_config(method: str, given: dict[str, Any]) -> MethodConfig:
    """The method's config from the flags given (None: not given); a flag the method lacks is an error."""
    entry = get_method(method)
    fields = {f.metadata["flag"]: f.name for f in dataclasses.fields(entry.config)}
    values = {}
    for name, value in given.items():
        if value is None:
            continue
        flag = FLAGS[name]
        if flag.flag not in fields:
            mine = ", ".join(f.split("/")[0] for f in fields) or "none"
            raise InfoptError(f"{flag.shown(value)} does not apply to --method {method} (its options: {mine})")
        values[fields[flag.flag]] = value
    return entry.make_config(values)
