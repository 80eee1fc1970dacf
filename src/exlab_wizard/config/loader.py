"""Load ``config.yaml`` into a :class:`Config`, with errors that name the key."""

from __future__ import annotations

import difflib
import errno
import os
import stat
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from exlab_wizard.config.models import Config

__all__ = ["ConfigError", "load_config", "parse_config", "format_loc"]

_TRANSPORT_TAGS = {"mount", "rsync_ssh", "rclone"}
_NO_EQUIPMENT = "list at least one instrument under equipment (see docs/config.md)"
#: What to do about a problem, when the key it names is not the whole story.
FIX_KEY = "fix the key it names (see docs/config.md)"
FIX_TABS = "indent with spaces, not tabs"
FIX_YAML = "fix the YAML syntax at the line it names"


class ConfigError(ValueError):
    """The config file cannot be used.

    ``problems`` holds one ``"<key path>: <reason>"`` string per problem; the
    message joins them with ``"; "`` on one line, so it always starts by naming a
    key. ``hint``: what to do about it, in a few words (``FIX_KEY`` unless the
    file is not valid YAML).
    """

    def __init__(self, problems: list[str], source: Path | None = None, *, hint: str = FIX_KEY):
        self.problems = list(problems)
        self.source = source
        self.hint = hint
        prefix = f"{source}: " if source is not None else ""
        super().__init__(prefix + "; ".join(self.problems))


def format_loc(loc: tuple[Any, ...]) -> str:
    """``('equipment', 1, 'transport', 'rsync_ssh', 'ssh_target')`` -> ``equipment[1].transport.ssh_target``."""
    out = ""
    previous = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif previous == "transport" and part in _TRANSPORT_TAGS:
            pass  # pydantic's discriminated-union branch name, not a key
        elif isinstance(part, str) and part.startswith(("function-", "tagged-union[")):
            pass
        else:
            out += ("." if out else "") + str(part)
        previous = part
    return out or "<top level>"


def _password_problems(data: Any, trail: str) -> list[str]:
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{trail}.{key}"
            if str(key).lower() == "password":
                found.append(
                    f"{here}: secrets are not allowed in the config file; "
                    "use key authentication (ssh_key_path) or an rclone config file"
                )
            else:
                found.extend(_password_problems(value, here))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found.extend(_password_problems(value, f"{trail}[{index}]"))
    return found


def _plain(data: Any) -> Any:
    """ruamel's CommentedMap/Seq -> dict/list, keys as strings."""
    if isinstance(data, dict):
        return {str(k) if not isinstance(k, str) else k: _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    return data


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation holds (``tuple[X, ...]``, ``X | Y``, ``Annotated[...]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = get_args(annotation)
    if get_origin(annotation) is Annotated:
        args = args[:1]
    return [model for arg in args for model in _model_classes(arg)]


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the config accepts in the mapping at pydantic's ``loc`` (empty when it cannot tell)."""
    models: list[type[BaseModel]] = [Config]
    for part in loc:
        if isinstance(part, int) or str(part).startswith(("function-", "tagged-union[")):
            continue
        holding = [model for model in models if part in model.model_fields]
        if holding:
            models = [found for model in holding for found in _model_classes(model.model_fields[part].annotation)]
        else:  # a discriminated union's branch (a transport ``type``)
            models = [
                m for m in models if "type" in m.model_fields and part in get_args(m.model_fields["type"].annotation)
            ]
        if not models:
            return []
    keys = {name for model in models for name in model.model_fields}
    keys |= {f.alias for model in models for f in model.model_fields.values() if f.alias}
    return sorted(keys)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """`` (did you mean 'completeness_signal'?)`` for an unknown key close to a known one, else ``""``."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    close = difflib.get_close_matches(loc[-1], _keys_at(loc[:-1]), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _transport_type_problem(loc: str, error: Any) -> tuple[str, str]:
    """A transport ``type`` that is missing or unknown, named by its own key."""
    tags = ", ".join(sorted(_TRANSPORT_TAGS))
    if error["type"] == "union_tag_not_found":
        return f"{loc}.type", f"missing; say which transport: one of {tags}"
    tag = (error.get("ctx") or {}).get("tag", "")
    return f"{loc}.type", f"{tag!r} is not a transport type; use one of {tags}"


def parse_config(data: Any, source: Path | None = None) -> Config:
    """Validate already-parsed YAML data; raise :class:`ConfigError`.

    A config must define at least one equipment: an empty file (``None``), an
    empty mapping or an empty ``equipment`` list syncs nothing and is
    refused, naming ``equipment``.
    """
    if data is None:
        raise ConfigError([f"equipment: the file is empty, so it defines no equipment; {_NO_EQUIPMENT}"], source)
    if not isinstance(data, dict):
        raise ConfigError([f"<top level>: expected a mapping of settings, got {type(data).__name__}"], source)
    secrets: list[str] = []
    equipment = data.get("equipment")
    if isinstance(equipment, list):
        for index, item in enumerate(equipment):
            if isinstance(item, dict) and isinstance(item.get("transport"), dict):
                secrets.extend(_password_problems(item["transport"], f"equipment[{index}].transport"))
    if secrets:
        raise ConfigError(secrets, source)
    problems: list[str] = []
    if equipment in (None, []):
        problems.append(f"equipment: the file defines no equipment; {_NO_EQUIPMENT}")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            loc = format_loc(tuple(error["loc"]))
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc, message = _transport_type_problem(loc, error)
            elif error["type"] == "extra_forbidden":
                message += _did_you_mean(tuple(error["loc"]))
            if loc == "<top level>" and ": " in message and message.split(": ", 1)[0].startswith("equipment"):
                problems.append(message)
            else:
                problems.append(f"{loc}: {message}")
    if problems:
        raise ConfigError(problems, source)
    return config


CONFIG_MAX_BYTES = 16 << 20


def _read_config_text(path: Path) -> str:
    """The text of a regular config file (a symlink to one is fine); never blocks on a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > CONFIG_MAX_BYTES:
            raise OSError(errno.EFBIG, f"larger than {CONFIG_MAX_BYTES >> 20} MiB")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(CONFIG_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > CONFIG_MAX_BYTES:
        raise OSError(errno.EFBIG, f"larger than {CONFIG_MAX_BYTES >> 20} MiB")
    return data.decode("utf-8")


def load_config(path: Path | str) -> Config:
    """Read and validate a YAML config file.

    Raises :class:`ConfigError` for an unreadable file, invalid YAML or any
    invalid value; the message names the key path of every problem.
    """
    path = Path(path).expanduser()
    try:
        text = _read_config_text(path)
    except FileNotFoundError:
        raise ConfigError([f"<file>: config file not found: {path}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"<file>: cannot read {path}: {exc}"]) from None
    yaml = YAML(typ="safe", pure=True)
    try:
        data = yaml.load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "\t" in problem or "'\\t'" in problem:  # YAML indentation never takes a tab
            raise ConfigError([f"{where}: invalid YAML: {problem}: {FIX_TABS}"], path, hint=FIX_TABS) from None
        raise ConfigError([f"{where}: invalid YAML: {problem}"], path, hint=FIX_YAML) from None
    except RecursionError:
        raise ConfigError(["<yaml>: invalid YAML: nested too deeply"], path, hint=FIX_YAML) from None
    except ValueError as exc:  # a value YAML parses but Python refuses (an integer of 5000 digits)
        raise ConfigError([f"<yaml>: invalid YAML: {exc}"], path, hint=FIX_YAML) from None
    try:
        plain = _plain(data)
    except RecursionError:
        raise ConfigError(["<yaml>: invalid YAML: nested too deeply"], path, hint=FIX_YAML) from None
    return parse_config(plain, path)
