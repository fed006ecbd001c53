"""The job kit: how a Ray job declares its settings, gets its command line and resolves its config.

A job's settings are one dataclass deriving from :class:`JobConfig`; each field says what it is with
:func:`option`, and :func:`build_parser` generates the job's argparse command line from the fields
(``--help`` shows every default). Every job resolves its settings in the same order, later layers winning:

1. the dataclass defaults;
2. the job's base (:meth:`JobConfig.base`): a preset for a job that builds a model, the bundle's recipe
   for a job that extends one, the saved config of a run being resumed;
3. a ``--config`` YAML/JSON file: any field (a nested config as a mapping), recipe fields also flat;
4. the flags given on the command line.

``--print-config`` prints the result and exits; every job saves it as its run's ``config.json``.
:func:`run_cli` is the command-line tail every job shares. Add a job: docs/architecture.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, TypeVar

from diffae_core import storage
from diffae_core.config import TrainConfig, from_dict, merge

J = TypeVar("J", bound="JobConfig")

# The recipe (TrainConfig) fields that get flags, with their help; --max-samples is total_samples.
RECIPE_FLAGS: dict[str, tuple[str, str]] = {
    "batch_size": ("--batch-size", "global batch size (split over the workers, remainder included)"),
    "lr": ("--lr", "learning rate"),
    "weight_decay": ("--weight-decay", "weight decay"),
    "optimizer": ("--optimizer", "optimiser: adam or adamw"),
    "grad_clip": ("--grad-clip", "gradient-norm clip (0 = none)"),
    "warmup_steps": ("--warmup-steps", "linear learning-rate warm-up steps (official: 0)"),
    "ema_decay": ("--ema-decay", "EMA decay of the weights that are exported"),
    "ema_warmup_steps": ("--ema-warmup-steps", "ramp the EMA decay over this many steps (short runs)"),
    "total_samples": ("--max-samples", "training samples in all (steps = ceil(samples / batch size))"),
    "seed": ("--seed", "random seed"),
}


def option(default: Any = MISSING, *, help: str, default_factory: Any = MISSING, flag: str | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None, positional: bool = False,
           cli: bool = True, path: bool | Callable[[str], str] = False) -> Any:
    """A :class:`JobConfig` field with what its command line needs.

    help: one line for ``--help``; flag: the flag's name (default ``--field-name``); positional: a
    positional argument instead; cli: False keeps it out of the command line (config file and code only);
    path: a local path or URI that is made absolute on the driver (Ray workers have their own cwd); a
    function instead of True does the converting (data sources: built-in names stay as they are).
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "positional": positional,
                "cli": cli, "path": path}
    return field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True)
class Flag:
    """A flag that sets something other than a top-level field: a nested config value (``dest`` is a dotted
    path such as ``model.unet.image_size``) or a key that :meth:`JobConfig.base` reads (e.g. ``preset``)."""

    flag: str
    dest: str
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[Any] | None = None
    action: str | None = None
    metavar: str | None = None


@dataclass(kw_only=True)
class JobConfig:
    """Base of every job's settings. Subclasses are ``@dataclass(kw_only=True)`` with :func:`option` fields."""

    job_name: ClassVar[str] = "job"
    recipe_path: ClassVar[str | None] = None  # dotted path of the job's TrainConfig ("train", "model.train")
    recipe_flags: ClassVar[tuple[str, ...]] = tuple(RECIPE_FLAGS)
    extra_flags: ClassVar[tuple[Flag, ...]] = ()
    base_keys: ClassVar[tuple[str, ...]] = ()  # config keys that only base() reads (not fields)

    s3_endpoint: str | None = option(None, help="S3-compatible endpoint URL (MinIO, moto); default: AWS variables")

    @classmethod
    def base(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Layer 2: settings this job starts from, knowing what the file and flags give (``given``)."""
        return {}

    def validate(self) -> None:
        """Raise ValueError naming the setting that is wrong (called after resolution)."""

    def prepared(self: J) -> J:
        """A copy for running on a cluster: the S3 endpoint resolved here on the driver (workers do not see its
        environment) and every path field made absolute; validated."""
        changes = {f.name: _absolute(f.metadata["path"], getattr(self, f.name)) for f in dataclasses.fields(self)
                   if f.metadata.get("path") and getattr(self, f.name) is not None}
        job = dataclasses.replace(self, s3_endpoint=storage.s3_endpoint(self.s3_endpoint), **changes)
        job.validate()
        return job

    def to_dict(self) -> dict[str, Any]:
        return storage.json_safe(self)

    def save_config(self, run_dir: str) -> str:
        """Write ``run_dir/config.json``: the job, its command line and these settings. Returns its URI."""
        uri = storage.join(run_dir, "config.json")
        storage.write_json(uri, {"job": self.job_name, "argv": sys.argv, "config": self.to_dict(),
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, self.s3_endpoint)
        return uri


@dataclass(kw_only=True)
class RunDir(JobConfig):
    """Settings of a job that keeps a run directory ``storage/name`` (config, checkpoints, summary)."""

    storage: str = option("runs", path=True, help="runs root: local folder or s3://bucket/prefix")
    name: str = option("", help="run name (default: JOB-<timestamp>); reusing one continues that run")

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)

    def named(self: J, default_prefix: str) -> J:
        """This job with a run name (``default_prefix-<timestamp>`` when none was given)."""
        return self if self.name else dataclasses.replace(self, name=default_run_name(default_prefix))


def default_run_name(job: str) -> str:
    """``job-YYYYmmdd-HHMMSS``: the run name when none is given."""
    return f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def _absolute(converter: bool | Callable[[str], str], value: str) -> str:
    return storage.absolute(value) if converter is True else converter(value)


# ---- the command line -------------------------------------------------------------------------
def _cli_fields(cls: type[JobConfig]) -> list[dataclasses.Field]:
    """The fields on the command line, the job's own first and the shared ones (from base classes) after."""
    def declared_by(f: dataclasses.Field) -> int:
        return next(i for i, c in enumerate(cls.__mro__) if f.name in vars(c).get("__annotations__", {}))

    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]
    return sorted(fields, key=declared_by)


def _value_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is a sequence) of a field annotation such as ``int | None`` or ``tuple[int, ...]``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return args[0], True
    if origin in (typing.Union, types.UnionType):
        return (args[0] if len(args) == 1 else str), False
    return annotation, False


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        return "" if f.default is None else f" (default: {f.default})"
    return " (required)" if f.default_factory is MISSING else ""


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hints: dict[str, Any]) -> None:
    meta = f.metadata
    kind, many = _value_type(hints[f.name])
    kwargs: dict[str, Any] = {"help": meta["help"] + _default_text(f), "default": argparse.SUPPRESS}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs.update(type=kind, choices=meta["choices"], metavar=meta["metavar"])
        if many:
            kwargs["nargs"] = "+"
    if meta["positional"]:
        kwargs.pop("default")
        parser.add_argument(f.name, **kwargs)
    else:
        parser.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), dest=f.name, **kwargs)


def build_parser(cls: type[JobConfig], prog: str | None = None, description: str | None = None
                 ) -> argparse.ArgumentParser:
    """The job's command line, generated from its fields, recipe flags and extra flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").split("\n\n")[0])
    hints = typing.get_type_hints(cls)
    for f in _cli_fields(cls):
        _add_field(parser, f, hints)
    if cls.recipe_path:
        group = parser.add_argument_group("training recipe (default: the job's recipe; --print-config shows it)")
        recipe_types = typing.get_type_hints(TrainConfig)
        for name in cls.recipe_flags:
            flag, text = RECIPE_FLAGS[name]
            group.add_argument(flag, dest=f"{cls.recipe_path}.{name}", type=recipe_types[name], help=text,
                               default=argparse.SUPPRESS, metavar=flag.lstrip("-").replace("-", "_").upper())
    for extra in cls.extra_flags:
        kwargs = {"action": extra.action} if extra.action else {"type": extra.type, "choices": extra.choices}
        if not extra.action and not extra.choices:
            kwargs["metavar"] = extra.metavar or extra.flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(extra.flag, dest=extra.dest, help=extra.help, default=argparse.SUPPRESS, **kwargs)
    parser.add_argument("--config", dest="_config_file", metavar="FILE", default=None,
                        help="YAML/JSON file of settings (field names with underscores; flags win over it)")
    parser.add_argument("--print-config", dest="_print_config", action="store_true",
                        help="print the resolved settings as JSON and exit")
    return parser


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "c": 2} -> {"a": {"b": 1}, "c": 2}."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def file_layer(cls: type[JobConfig], data: Any, source: str) -> dict[str, Any]:
    """A config file's mapping as a layer: known keys only, flat recipe fields moved under the recipe."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    recipe = {f.name for f in dataclasses.fields(TrainConfig)} if cls.recipe_path else set()
    unknown = sorted(set(data) - fields - recipe - set(cls.base_keys))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(fields | recipe | set(cls.base_keys))}")
    top = {k: v for k, v in data.items() if k in fields or k in cls.base_keys}
    flat_recipe = {f"{cls.recipe_path}.{k}": v for k, v in data.items() if k not in top}
    return merge(top, _nest(flat_recipe))


def read_config_file(cls: type[JobConfig], path: str | None, endpoint: str | None = None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml  # YAML is a superset of JSON: one parser reads both

    return file_layer(cls, yaml.safe_load(storage.read_bytes(path, endpoint)), path)


def from_layers(cls: type[J], *layers: Mapping[str, Any]) -> J:
    """The job built from merged layers (later wins); nested dataclass fields are built from mappings."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, dict(layer))
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in merged:
            if f.default is MISSING and f.default_factory is MISSING:
                flag = "" if f.metadata.get("positional") else f" (--{f.name.replace('_', '-')})"
                raise ValueError(f"{f.name}{flag} is required")
            continue
        value = merged[f.name]
        kind = _value_type(hints[f.name])[0]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            default = f.default_factory() if f.default_factory is not MISSING else None
            value = from_dict(kind, merge(dataclasses.asdict(default), value) if default is not None else value)
        elif isinstance(value, list):
            value = tuple(value) if typing.get_origin(hints[f.name]) is tuple else value
        values[f.name] = value
    return cls(**values)


def resolve(cls: type[J], args: argparse.Namespace) -> J:
    """Layers 1-4 for parsed arguments (see the module docstring)."""
    flags = _nest({k: v for k, v in vars(args).items() if not k.startswith("_")})
    endpoint = storage.s3_endpoint(flags.get("s3_endpoint"))
    given = merge(read_config_file(cls, args._config_file, endpoint), flags)
    base = cls.base(given)
    job = from_layers(cls, base, {k: v for k, v in given.items() if k not in cls.base_keys})
    job.validate()
    return job


def run_cli(cls: type[J], argv: Sequence[str] | None, prog: str | None, run: Callable[[J], Any],
            description: str | None = None, needs_ray: bool = True) -> int:
    """The command-line tail of every job: parse, resolve, (print the config,) connect to Ray, run, and
    print ``run``'s summary as the last line of output, in JSON. A setting that is wrong is a usage error
    (exit 2) naming it; a failure while running raises with its cause."""
    parser = build_parser(cls, prog, description)
    args = parser.parse_args(argv)
    try:
        job = resolve(cls, args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        parser.error(str(exc).strip("'\""))
    if args._print_config:
        print(json.dumps(job.to_dict(), indent=2))
        return 0
    if needs_ray:
        from .cluster import connect

        connect()
    summary = run(job)
    print(json.dumps(storage.json_safe(summary)))
    return 0
