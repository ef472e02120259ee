"""Whether a Hugging Face Hub name can be loaded here, asked once and quickly: without the Hub, the libraries retry
for a minute or two, printing a line per retry, before they give up.

The Hub is asked once per process (a HEAD request to `huggingface_hub`'s endpoint, `HF_ENDPOINT`, through the
machine's proxy settings, 3 seconds at most). With `HF_HUB_OFFLINE` set nothing is asked: the name must be in the
Hugging Face cache, where the libraries then load it from.
"""

from __future__ import annotations

import functools
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path

from launcher.components import ArgumentProblem

TIMEOUT_S = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline() -> bool:
    """Whether the user asked the Hugging Face libraries not to use the network."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def endpoint() -> str:
    """The Hub's address as the Hugging Face libraries use it (`HF_ENDPOINT`, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


@functools.cache
def unreachable(url: str) -> str | None:
    """Why `url` cannot be reached (None: it answered, whatever it answered)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # an answer, even a refusal, means the Hub is there
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return None  # something answered; the libraries have their own certificates to try
        return str(e.reason)
    except (OSError, ValueError) as e:  # a timeout, a reset connection, an address that is not a URL
        return str(e) or type(e).__name__
    return None


def cached(name: str, what: str) -> bool:
    """Whether the Hugging Face cache holds something of the Hub name `name` (a `what`), as downloaded before."""
    from huggingface_hub import constants

    kind = "datasets" if what == "dataset" else "models"
    folders = [Path(constants.HF_HUB_CACHE) / f"{kind}--{name.replace('/', '--')}"]
    if what == "dataset":  # the datasets library's own cache of what it prepared
        from datasets import config

        folders.append(Path(config.HF_DATASETS_CACHE) / name.replace("/", "___"))
    return any(folder.is_dir() for folder in folders)


def require(name: str, arg: str, what: str) -> None:
    """Refuse, in one line under the argument `arg`, the Hub name `name` (a `what`: model, tokenizer, dataset)
    where the Hub cannot be reached or, with `HF_HUB_OFFLINE` set, where the cache has no copy of it."""
    if offline():
        if not cached(name, what):
            raise ArgumentProblem(
                arg,
                f"{name!r} is not a local directory, so it is a Hub {what} name, and HF_HUB_OFFLINE is set but the "
                "Hugging Face cache has no copy of it: give a local directory, or unset HF_HUB_OFFLINE where the "
                "machine reaches the Hub",
            )
        return
    url = endpoint()
    why = unreachable(url)
    if why is not None:
        raise ArgumentProblem(
            arg,
            f"{name!r} is not a local directory, so it is a Hub {what} name, and the Hub ({url}) cannot be reached "
            f"from here ({why}): give a local directory, or set HF_HUB_OFFLINE=1 to use the copy in the "
            "Hugging Face cache",
        )
