"""Model sources: answer at once when the Hugging Face hub cannot be reached, and turn the
errors of loading a model, its processor or any file into one line that names the cause and
the fix.

Without network, huggingface_hub retries each file it looks up with exponential backoff
(1, 2, 4, 8, 8 s): measured here, 26 s for one ``AutoConfig.from_pretrained`` of a hub id with
the hub's port refused, and a train run looks up several files. :func:`prepare` probes the
hub's host once (a TCP connection, ``PROBE_TIMEOUT_S``, name resolution included) before
anything loads; when it cannot be reached, the process switches to huggingface_hub's offline
mode, so a model in the local cache loads as usual and one that is not fails in about a second.
``HF_HUB_OFFLINE=1`` skips the probe (the library honours it itself); with a proxy configured
(``HTTPS_PROXY``/``ALL_PROXY``) the probe would test the wrong host, so none is made.

:func:`explain` maps an exception (and its causes) to that one line, or None when it is not
an error a user can fix (a bug: the CLI lets its traceback through).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_hub_id(name: str) -> bool:
    """'org/name' that is not a folder here: what from_pretrained looks up on the hub."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and not Path(name).expanduser().exists())


def _offline() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a TCP connection to the endpoint's host fails within ``timeout`` s, else None."""
    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    result: list[str] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append("")
        except OSError as exc:
            result.append(exc.strerror or str(exc) or type(exc).__name__)

    t = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
    t.start()
    t.join(timeout)
    if not result:
        return f"no answer within {timeout:g} s"
    return result[0] or None


def prepare(name: str) -> str | None:
    """Before loading ``name``: when it is a hub id and the hub cannot be reached, switch this
    process to offline mode (the cache only) and return a note saying so; else None."""
    if not is_hub_id(name) or _offline():
        return None
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    why = unreachable(endpoint)
    if why is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at its import: set it for this process too
    global OFFLINE_BECAUSE
    OFFLINE_BECAUSE = f"{urlsplit(endpoint).hostname} cannot be reached ({why})"
    if not isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
        return None  # loading fails at once; explain() gives the one line
    return f"vlmft: {OFFLINE_BECAUSE}; using the cached copy of '{name}' (offline mode)"


OFFLINE_BECAUSE = ""  # why prepare() switched this process to offline mode, for explain()


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (``raise ... from None`` ends the chain)."""
    out = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ if exc.__suppress_context__ else (exc.__cause__ or exc.__context__)
    return out


def _hub_error(chain: list[BaseException], name: str) -> str | None:
    if "huggingface_hub" not in sys.modules:
        return None
    from huggingface_hub import errors as he

    key = f"model.name_or_path: '{name}'"
    for e in chain:
        if isinstance(e, he.GatedRepoError):
            return (f"{key} is gated on the hub: accept its terms at "
                    f"{DEFAULT_ENDPOINT}/{name} and log in with `hf auth login`")
        if isinstance(e, he.RepositoryNotFoundError):
            return (f"{key} is not a model on the hub (or a private one: log in with "
                    "`hf auth login`); check the id, or give a local model folder")
        if isinstance(e, he.RevisionNotFoundError):
            return f"{key}: the revision asked for does not exist on the hub"
        if isinstance(e, (he.LocalEntryNotFoundError, he.OfflineModeIsEnabled)):
            why = OFFLINE_BECAUSE or "HF_HUB_OFFLINE is set"
            return (f"{key} is not in the local Hugging Face cache and {why}: download it where "
                    f"there is network (`hf download {name} --local-dir DIR`) and set "
                    "model.name_or_path=DIR, or fix the connection (HTTPS_PROXY)")
        if isinstance(e, he.HfHubHTTPError):
            return f"{key}: the hub answered {str(e).splitlines()[0]}"
    return None


def _missing_processor(name: str) -> str | None:
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return None
    have = {p.name for p in folder.iterdir()}
    if have.isdisjoint(PROCESSOR_FILES) or have.isdisjoint(TOKENIZER_FILES):
        return (f"model.name_or_path: '{name}' has no processor files ({PROCESSOR_FILES[0]} "
                "and tokenizer files): a config-only folder serves `vlmft lr-table`, but `train` "
                "and `pack-stats` need the model's processor; point model.name_or_path at the "
                "full model (a hub id or a downloaded folder)")
    return None


def _os_error(e: OSError) -> str | None:
    where = f"{e.filename}: " if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"{where}no space left on the device; free space or choose another output_dir"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{where}{e.strerror}; choose a folder you can write (output_dir) or read, or "
                "fix its permissions")
    if e.errno == errno.ENOENT:
        return f"{where}not found; check the path"
    if e.errno is not None and e.strerror:
        return f"{where}{e.strerror}"
    return None


def explain(exc: BaseException, name: str = "") -> str | None:
    """One line for an error a user can fix (hub, network, missing files, permissions, disk
    space) while loading model ``name`` or reading and writing files; None otherwise."""
    chain = _chain(exc)
    msg = _hub_error(chain, name) if name else None
    if msg:
        return msg
    for e in chain:
        text = str(e)
        if name and isinstance(e, OSError) and text.startswith("Can't load"):
            return _missing_processor(name) or f"model.name_or_path: {text.splitlines()[0]}"
        if name and type(e).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout",
                                         "TimeoutException", "RemoteProtocolError"):
            return (f"model.name_or_path: '{name}': the hub could not be reached ({text}); "
                    "check the connection (HTTPS_PROXY), or download the model and give its folder")
    for e in chain:
        if isinstance(e, OSError):
            msg = _os_error(e)
            if msg:
                return msg
    if name and isinstance(exc, OSError) and str(exc).strip():  # transformers' own OSErrors
        return f"model.name_or_path: '{name}': {str(exc).strip().splitlines()[0]}"
    return None
