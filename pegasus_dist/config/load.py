"""YAML files and ``section.key=value`` overrides into one validated :class:`Config`; pydantic's
error becomes one :class:`ConfigError` line: the key, the file that set it, a "did you mean"."""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pegasus_dist.config.sections import Config, Section
from pegasus_dist.errors import ConfigError

S = TypeVar("S", bound=Section)
Origins = dict[tuple[str, ...], Path]  # (section,) and (section, key) -> the file that set it


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (over the chain of ``base`` files it builds on), apply overrides, validate."""
    raw, origins = _read_yaml_chain(Path(path)) if path else ({}, {})
    for item in overrides or []:
        _apply_override(raw, origins, item)
    return validated(Config, raw, origins)


def validated(cls: type[S], raw: Any, origins: Origins | None = None) -> S:
    """``raw`` validated into ``cls``: a value that does not fit is one :class:`ConfigError` line."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, cls, origins)) from None


def _one_line(err: ValidationError, root: type[Section], origins: Origins | None) -> str:
    """The first of pydantic's errors (an unknown key before the others) as one line."""
    error = min(err.errors(), key=lambda e: e["type"] not in ("extra_forbidden", "invalid_key"))
    loc = error["loc"]
    origin = (origins or {}).get(tuple(map(str, loc[:2])))  # (section,) for a section itself
    where = f"{origin}: " if origin else ""
    if error["type"] in ("extra_forbidden", "invalid_key"):
        names = list(_section_at(root, loc).model_fields)
        near = difflib.get_close_matches(str(loc[-1]), names, n=1)
        known = f"did you mean {root.key((*loc[:-1], near[0]))}?" if near else f"known: {', '.join(names)}"
        return f"{where}unknown config key {root.key(loc)}; {known}"
    return f"{where}{root.key(loc) or 'config'} {problem(error, root)}, got {error['input']!r}"


def _section_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The model that holds the key at ``loc``: ModelConfig for ("model", "latent_dim")."""
    for part in loc[:-1]:
        root = root.model_fields[str(part)].annotation
    return root


TYPES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str",
         "list_type": "a list", "model_type": "a mapping of keys", "dict_type": "a mapping of keys",
         "finite_number": "a finite number"}
BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
          "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than"),
          "multiple_of": ("multiple_of", "a multiple of")}
PLAIN = {("at least", 0): "0 or more", ("more than", 0): "positive"}


def problem(error: dict[str, Any], root: type[BaseModel]) -> str:
    """What is wrong with the value, as the rest of a line that starts with its key: "must be int"."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in TYPES:
        return f"must be {TYPES[kind]}"
    if kind in BOUNDS:
        name, words = BOUNDS[kind]
        return f"must be {PLAIN.get((words, ctx[name]), f'{words} {ctx[name]:g}')}"
    if kind == "literal_error":
        field = _section_at(root, error["loc"]).model_fields[str(error["loc"][-1])]
        return "must be one of " + ", ".join(typing.get_args(field.annotation))
    if kind == "value_error":
        return str(ctx["error"])
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    return error["msg"].lower()


def field_problem(path: Path, err: ValidationError, root: type[BaseModel]) -> str:
    """The first of pydantic's errors in the JSON file ``path`` (validated into ``root``) as one
    line naming the file and the field: "x.json: field shards[0].bytes must be 0 or more, got -1"."""
    error = err.errors()[0]
    loc, got = error["loc"], json.dumps(error["input"], default=repr)  # as the file spells it: null
    got = got if len(got) <= 60 else got[:57] + "..."
    if not loc:  # the whole file: a list, a number, a string
        return f"{path} holds {got}, not an object of fields"
    if error["type"] == "missing":
        return f"{path} has no field {Section.key(loc)}"
    reason = "is not a known field" if error["type"] == "extra_forbidden" else problem(error, root)
    return f"{path}: field {Section.key(loc)} {reason}, got {got}"


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    """``path`` over the chain of files it builds on (each names one ``base`` at most); each key's file."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"`base` files include each other in a cycle: {chain}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base must name one file (a config builds on a single parent), "
                          f"got {base!r}")
    merged, origins = ({}, {}) if base is None else _read_yaml_chain(path.parent / base, (*seen, path))
    # Two levels, section then key: a section in this file updates the parent's key by key.
    for section, values in data.items():
        parent = merged.get(section)
        both = isinstance(values, dict) and isinstance(parent, dict)
        merged[section] = {**parent, **values} if both else values
        origins[(str(section),)] = path
        origins.update({(str(section), str(key)): path for key in values} if isinstance(values, dict) else {})
    return merged, origins


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the last,
    so a second ``train:`` section would silently drop every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):  # SafeLoader's own error names it
                break
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} is given twice, on lines "
                                  f"{seen[key]} and {line}; keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():  # a folder (`--config configs/`) is no file either, but it exists
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {path} {what}; pass a YAML file (e.g. configs/pretrain.yaml)")
    try:
        loader = _UniqueKeyLoader(path.read_text())
        loader.name = str(path)  # what its marks and errors call the text
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except (yaml.YAMLError, UnicodeDecodeError) as err:  # a damaged file: bytes of no text
        raise ConfigError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    except OSError as err:  # no read permission for this user, an I/O error
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}); make it readable "
                          "or pass another --config") from None
    if data is None or data == {}:  # a file emptied or cut short would train every default, unnoticed
        raise ConfigError(f"{path} holds no settings (empty, comments only, null or {{}}); give it its "
                          "sections, e.g. `base: ../pretrain.yaml` and the keys that differ")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], origins: Origins, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.epochs=5)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        # A list or mapping with bytes the locale could not decode (LC_ALL=C): YAML refuses
        # them, and the text alone would be refused as "must be a list", misleadingly.
        if text[:1] in "[{" and text != text.encode(errors="replace").decode():
            raise ConfigError(f"override {key}: its value holds bytes that the locale cannot decode; "
                              "run under a UTF-8 locale (e.g. LC_ALL=C.UTF-8)") from None
        value = text
    *sections, leaf = key.split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {section} is not a section")
    node[leaf] = value
    origins.pop(tuple(key.split("."))[:2], None)  # the command line's now, not a file's
