"""Torch's C++ extensions, built on first use (`torch.utils.cpp_extension.load`: DeepSpeed's ops, an optimizer's
kernels) into TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, one folder each. A build holds `<folder>/lock`
(torch's `FileBaton`); every other process that loads the extension, even one built long ago, waits while that file
is there: silently, and for ever where a killed build left it.

No torch imported here until a wait is watched.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from launcher.errors import RunFailed, say

BUILD_NOTICE_AFTER_S = 2.0  # a lock another process releases at once (it loaded a built op) is not worth a line


@contextlib.contextmanager
def build_lock_watch(timeout_s: float) -> Iterator[None]:
    """While torch builds or loads a C++ extension (DeepSpeed's ops), a wait on another process's build lock
    (`FileBaton`, `<build folder>/lock`) says within seconds which file it waits on and that a stale one can be
    removed, and gives up after `timeout_s` with one line (RunFailed), where torch would wait in silence for ever."""
    from torch.utils.file_baton import FileBaton

    original = FileBaton.wait

    def wait(baton: FileBaton) -> None:
        lock = Path(baton.lock_file_path)
        started, said = time.monotonic(), False
        while lock.exists():
            waited = time.monotonic() - started
            if waited >= timeout_s:
                raise RunFailed(
                    f"error: {lock} was still there after {timeout_s:g} s (strategy.timeout_s): no build of the C++ "
                    f"extension {lock.parent.name} finished; if no process is building it, a killed build left the "
                    f"lock: remove it and start again"
                )
            if not said and waited >= BUILD_NOTICE_AFTER_S:
                say(
                    f"warning: waiting for {lock}: another process holds it while it builds the C++ extension "
                    f"{lock.parent.name} (a minute or more); if none does, a killed build left it: remove it "
                    f"(giving up after {timeout_s:g} s, strategy.timeout_s)"
                )
                said = True
            time.sleep(baton.wait_seconds)

    FileBaton.wait = wait  # type: ignore[method-assign]
    try:
        yield
    finally:
        FileBaton.wait = original  # type: ignore[method-assign]
