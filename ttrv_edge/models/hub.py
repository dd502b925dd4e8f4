"""Hub ids without a network: load from the local cache, or fail at once saying how to get the model.

Without this, a hub id on a machine with no network made transformers retry for about 50 s, printing each warning
twice, before a long error. ``resolve_hub_id`` decides in about a second instead: when the hub is reachable the id is
passed on (transformers downloads or uses its cache); when it is not (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``
set, or no connection to the hub's host within ``CONNECT_SECONDS``), the model's cached snapshot folder is used,
and a model that is not cached is a one-line error naming the two ways to get it onto this machine.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

__all__ = ["CONNECT_SECONDS", "cached_snapshot", "hub_endpoint", "hub_offline", "hub_reachable", "resolve_hub_id"]

CONNECT_SECONDS = 1.5
"""How long the connection attempt to the hub's host may take (name lookup included) before the hub counts as
unreachable."""
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """Whether offline mode is asked for: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to 1/true/yes/on."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    """The hub's URL (``HF_ENDPOINT``, default https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def hub_reachable(timeout: float = CONNECT_SECONDS) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds (the name lookup, which has no
    timeout of its own, runs in a daemon thread that is abandoned when it takes longer)."""
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, name="ttrv-edge-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def cached_snapshot(repo_id: str, cache_dir: str | None = None) -> str | None:
    """The folder of ``repo_id``'s cached snapshot when it holds a config.json (no network), else None."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - not cached, a broken cache entry, or no huggingface_hub: all mean "not here"
        return None
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def offline_message(repo_id: str, asked: bool) -> str:
    why = "offline mode is set (HF_HUB_OFFLINE)" if asked else f"{hub_endpoint()} cannot be reached (no network?)"
    return (
        f"--model: {repo_id} is not in the local Hugging Face cache and {why}. Point --model at a local model "
        f"folder (with config.json), or download it on a connected machine with "
        f"`huggingface-cli download {repo_id} --local-dir DIR` (in Python: "
        f"huggingface_hub.snapshot_download({repo_id!r}, local_dir='DIR')), copy DIR here and pass --model DIR"
    )


def resolve_hub_id(repo_id: str) -> str:
    """``repo_id`` when the hub is reachable; without a network its cached snapshot folder; else a ValueError that
    says how to point ``--model`` at a local folder and how to download the model on a connected machine."""
    asked = hub_offline()
    if not asked and hub_reachable():
        return repo_id
    cached = cached_snapshot(repo_id)
    if cached is not None:
        return cached
    raise ValueError(offline_message(repo_id, asked))
