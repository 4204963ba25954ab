"""What a job asks, apart from how it is sent.

A journal holds answers to what was asked: the prompt and the request as sent (model, messages,
parameters, response format). A resume with another question is refused (or, with `--redo`,
accepted for the rows chosen). How the question travels (the endpoint's URL, the key, timeouts,
limits, retries, the budget, whether the system prompt is marked for caching) changes no answer: a resume with new values of those goes on, and
says once what changed.

`base_url` is left out of what is asked, but what it decides is kept: whether the body carries
OpenRouter's own routing fields (`provider.require_parameters` for labels or a schema).
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import JobConfig

# Request keys that shape no answer (or, `openrouter`, only through `openrouter_fields`).
TRANSPORT = (
    "base_url",
    "openrouter",
    "referer",
    "title",
    "key_file",
    "timeout",
    "connect_timeout",
    "cache",
    "mode",
    "batch_retry",
)
SIMULATOR = "(simulator)"  # the base_url of a --simulate run: its port changes every run


def asked(config: JobConfig) -> dict[str, Any]:
    """The fingerprint of what the job asks, as JSON holds it (lists, not tuples), so a stored
    one compares equal."""
    request = {k: v for k, v in asdict(config.request).items() if k not in TRANSPORT}
    request["openrouter_fields"] = _openrouter_fields(
        config.request.labels, config.request.response_schema, config.request.is_openrouter
    )
    # Marking the system prompt for caching changes what an answer costs, not the answer.
    prompt = {k: v for k, v in asdict(config.prompt).items() if k != "cache_prefix"}
    return json.loads(json.dumps({"prompt": prompt, "request": request}))  # type: ignore[no-any-return]


def transport(config: JobConfig) -> dict[str, Any]:
    """How the job is sent, by key ("limits.concurrency": 16): what may change on a resume."""
    request = config.request
    found: dict[str, Any] = {
        f"request.{k}": getattr(request, k) for k in TRANSPORT if k != "base_url"
    }
    found["request.base_url"] = SIMULATOR if request.simulate else request.base_url
    found["prompt.cache_prefix"] = config.prompt.cache_prefix
    for section in ("limits", "retry", "cost", "batch", "cluster"):
        found.update({f"{section}.{k}": v for k, v in asdict(getattr(config, section)).items()})
    return json.loads(json.dumps(found))  # type: ignore[no-any-return]


def settings_hash(fingerprint: dict[str, Any]) -> str:
    """A short name for the settings that produced an answer (`asked`'s fingerprint)."""
    canonical = json.dumps(fingerprint, sort_keys=True, default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def upgraded(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored fingerprint in today's form: journals before this one kept `base_url` (and a
    set `openrouter`) among what was asked."""
    request = dict(stored.get("request", {}))
    if "openrouter_fields" not in request:
        host = urllib.parse.urlsplit(str(request.get("base_url", ""))).hostname or ""
        openrouter = request.get("openrouter")
        if openrouter is None:
            openrouter = (
                request.get("simulate") or request.get("base_url") == SIMULATOR
                or host == "openrouter.ai" or host.endswith(".openrouter.ai")
            )  # fmt: skip
        request["openrouter_fields"] = _openrouter_fields(
            request.get("labels"), request.get("response_schema"), bool(openrouter)
        )
    for key in TRANSPORT:
        request.pop(key, None)
    return {**stored, "request": request}


def simulated(fingerprint: dict[str, Any]) -> bool:
    """Whether the answers made under this fingerprint came from the simulator (`--simulate`)."""
    request = fingerprint.get("request", {})
    return bool(request.get("simulate")) or request.get("base_url") == SIMULATOR


def changed_transport(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """Settings the stored ones name whose value is now another: {key: [old, new]}."""
    return {
        key: [old, current.get(key)]
        for key, old in stored.items()
        if key in current and current[key] != old
    }


def describe_transport(changed: dict[str, list[Any]]) -> str:
    shown = ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in changed.items())
    return f"resuming with settings that change no answer: {shown}"


def different_job(
    path: object, input_changes: list[str], asked_changes: list[str], *, simulated: bool
) -> str:
    """Why a journal cannot be resumed, and the ways on."""
    redo = (
        ", send chosen rows again under the new settings with --redo SELECTOR (see --help)"
        if asked_changes and not input_changes
        else ""
    )
    again = (
        "rows already done are simulated again, which costs nothing"
        if simulated
        else "rows already done will be sent and paid for again"
    )
    return (
        f"journal {path} belongs to a different job: {'; '.join(input_changes + asked_changes)}. "
        f"Restore the original to resume{redo}, or re-run with --restart to start over ({again})."
    )


def mixing_refused(path: object) -> str:
    return (
        f"journal {path} holds real answers: a --simulate run would mix simulated answers with "
        "them. Try the simulator with another --output (its journal goes beside it), or re-run "
        "with --restart to discard the real answers and start over"
    )


def redo_accepted(asked_changes: list[str]) -> str:
    return (
        f"--redo: the rows chosen and any not done yet are sent under the new settings "
        f"({'; '.join(asked_changes)}), the job's from now on; every other row keeps its answer"
    )


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)


def _openrouter_fields(labels: Any, schema: Any, openrouter: bool) -> bool:
    """Whether each body carries OpenRouter's routing fields (see `prompts.request_params`)."""
    return bool(labels or schema is not None) and openrouter


def describe_changes(
    stored: dict[str, Any],
    current: dict[str, Any],
    *,
    compare_input: bool = True,
    compare_config: bool = True,
) -> list[str]:
    """Human-readable differences between two job fingerprints (the stored one upgraded)."""
    changes = []
    # Files are compared by content, in order: the same bytes under another path are the same input.
    old_files, new_files = (
        (stored.get("input", []), current.get("input", [])) if compare_input else ([], [])
    )
    if len(old_files) != len(new_files):
        changes.append(f"the input was {len(old_files)} file(s) and is now {len(new_files)}")
    for old, new in zip(old_files, new_files, strict=False):
        if _content(old) != _content(new):
            changes.append(f"input file {new['file']} changed")
    old_config = upgraded(stored.get("config", {})) if compare_config else {}
    new_config = current.get("config", {}) if compare_config else {}
    for section in ("prompt", "request"):
        old_section, new_section = old_config.get(section, {}), new_config.get(section, {})
        for key in sorted(old_section.keys() | new_section.keys()):
            if old_section.get(key) != new_section.get(key):
                changes.append(f"{section}.{key} changed")
    return changes


def _content(entry: dict[str, Any]) -> Any:
    """What an input file holds: a local file's hash, or an object's version (its ETag)."""
    return entry.get("sha256") or ("object version", entry.get("version"))
