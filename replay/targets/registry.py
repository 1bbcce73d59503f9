"""Named targets: `targets/<name>.toml` -> a Target; an http(s) URL -> an OpenAI HTTP target.

Why files: a target is several settings that belong together (model, dtype, server flags,
timeouts) and should be reviewed and versioned, not retyped on a command line. Every key is
checked against the config dataclass of its kind, so a typo is an error naming the file, line
and key, never a silent default.

Search order for a name: a path to a .toml file, then ./targets/<name>.toml, then the targets/
folder of the replay checkout. `model = "builtin:tiny-llama"` means the embedded tiny model,
built on first use (replay.targets.tiny_model).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from replay.core import extras
from replay.core.errors import ReplayError
from replay.core.target import Target

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
BUILTIN_TINY = "builtin:tiny-llama"
KINDS = ("vllm", "openai", "transformers")
_META_KEYS = {"kind", "description"}


def search_dirs() -> list[Path]:
    dirs = [Path.cwd() / "targets", REPO_ROOT / "targets"]
    out: list[Path] = []
    for d in dirs:
        if d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def known_names() -> list[str]:
    return sorted({p.stem for d in search_dirs() if d.is_dir() for p in d.glob("*.toml")})


def find_target_file(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml":
        if p.is_file():
            return p
        raise ReplayError(f"target file {name}: not found")
    if re.fullmatch(r"[A-Za-z0-9._-]+", name):
        for d in search_dirs():
            f = d / f"{name}.toml"
            if f.is_file():
                return f
    names = known_names()
    raise ReplayError(
        f"unknown target {name!r}: known names are {', '.join(names) or '(none)'}, "
        "or give an http(s):// URL or a .toml file"
    )


def _line_of(text: str, key: str) -> int | None:
    m = re.search(rf"^[ \t]*{re.escape(key)}[ \t]*=", text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line else str(path)


def _accepts(value: Any, hint: Any) -> bool:
    """TOML values against a dataclass field's type hint (str, int, float, bool, tuples, mappings, unions)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (tuple, list) or getattr(base, "__name__", "") in ("Sequence",):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, list) and all(_accepts(v, args[0]) for v in value) if args else True
    if base in (dict,) or getattr(base, "__name__", "") in ("Mapping",):
        return isinstance(value, dict)
    return True  # a type we do not check here; the target's own validation still runs


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def build_config(cls: type, values: Mapping[str, Any], path: Path, text: str) -> Any:
    """cls(**values) with every key and value type checked; errors name file:line and key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ReplayError(
                f"{_where(path, text, key)}: {key}: unknown key; known keys: {', '.join(sorted(fields))}"
            )
        hint = hints[key]
        if not _accepts(value, hint):
            raise ReplayError(f"{_where(path, text, key)}: {key}: expected {_type_name(hint)}, got {value!r}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise ReplayError(f"{path}: {missing[0]}: required key is missing")
    return cls(**kwargs)


def _resolve_model(value: str) -> str:
    if value == BUILTIN_TINY:
        extras.require("local", "building the built-in tiny model", *extras.LOCAL)
        from replay.targets import tiny_model

        return str(tiny_model.build())
    return value


def _apply_overrides(kind: str, values: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Command-line settings (None = not given). `model` is the model name on the server (the CLI's
    --model): the name requested for openai, the name vLLM serves under for vllm."""
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "also_models":  # a --classes mix's model names: the HTTP client checks them at start
            if kind == "transformers":
                raise ReplayError("--classes: a class's model needs a server target; the in-process "
                                  "transformers target serves one model")  # fmt: skip
            if kind == "vllm":
                values["http"] = {**dict(values.get("http") or {}), "also_models": tuple(value)}
            else:
                values["also_models"] = tuple(value)
        elif key == "model_dir":  # the CLI's --model-dir: what a started server or in-process target loads
            if kind == "openai":
                raise ReplayError("--model-dir: an openai target serves whatever its server loaded")
            values["model" if kind == "vllm" else "model_dir"] = value
        elif kind == "vllm" and key == "model":
            values["served_model_name"] = value
        elif kind == "transformers" and key == "model":
            raise ReplayError(
                "--model: the transformers target has no server model name; set model_dir in its file"
            )
        elif kind == "transformers" and key == "endpoint":
            if value != "completions":
                raise ReplayError(f"endpoint: the transformers target serves completions only, not {value!r}")
        else:
            values[key] = value


def load_target(name_or_url: str, run_dir: Path, overrides: Mapping[str, Any] | None = None) -> Target:
    """A ready-to-start Target (nothing is launched or loaded until its start())."""
    overrides = dict(overrides or {})
    if re.match(r"https?://", name_or_url):
        from replay.targets.openai_http import HTTPTargetConfig, OpenAIHTTPTarget

        values: dict[str, Any] = {"base_url": _with_v1(name_or_url)}
        _apply_overrides("openai", values, overrides)
        return OpenAIHTTPTarget(HTTPTargetConfig.from_dict(values, source=name_or_url))

    path = find_target_file(name_or_url)
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ReplayError(f"{path}: invalid TOML: {e}") from None
    kind = data.get("kind")
    if kind not in KINDS:
        where = _where(path, text, "kind")
        raise ReplayError(f"{where}: kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    values = {k: v for k, v in data.items() if k not in _META_KEYS}
    _apply_overrides(kind, values, overrides)
    if kind == "vllm":
        from replay.targets.vllm_server import VLLMServerConfig, VLLMServerTarget

        cfg = build_config(VLLMServerConfig, values, path, text)
        cfg = dataclasses.replace(cfg, model=_resolve_model(cfg.model))
        return VLLMServerTarget(cfg, Path(run_dir))
    if kind == "openai":
        from replay.targets.openai_http import HTTPTargetConfig, OpenAIHTTPTarget

        cfg = build_config(HTTPTargetConfig, values, path, text)
        return OpenAIHTTPTarget(cfg)
    extras.require("local", f"{path}: the in-process transformers target", *extras.LOCAL)
    from replay.targets import transformers_local as tl

    cfg = build_config(tl.TransformersTargetConfig, values, path, text)
    cfg = dataclasses.replace(cfg, model_dir=_resolve_model(cfg.model_dir))
    cls = getattr(tl, "TransformersLocalTarget", None) or tl.TransformersTarget
    return cls(cfg, log_path=Path(run_dir) / "model.log")  # the model process's stdout/stderr


def _with_v1(url: str) -> str:
    """A bare server URL (http://host:port) means its OpenAI API under /v1."""
    m = re.match(r"(https?://[^/]+)/?$", url)
    return m.group(1) + "/v1" if m else url.rstrip("/")
