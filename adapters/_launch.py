r"""What the training launchers (``nvae_train``, ``oodd_train``, ``biva_train``) share: running a
clone's script with the clone first on ``sys.path``, attributes replaced for the run only, and
a command line split at ``--`` into the launcher's options and the script's own."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def replace_attr(stack: contextlib.ExitStack, owner: Any, name: str, value: Any) -> None:
    r"""Sets ``owner.name = value`` until ``stack`` closes (then the old value, or none)."""

    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, value)

    def restore() -> None:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)

    stack.callback(restore)


@contextlib.contextmanager
def clone_on_path(root: str, ours: Callable[[str], bool]) -> Iterator[None]:
    r"""The clone ``root`` first on ``sys.path`` (as for ``python script.py`` run inside it),
    with the modules ``ours(name)`` selects free to import from it; all put back afterwards."""

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
    sys.path.insert(0, root)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(root)
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def split_argv(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    r"""``(launcher options, script options)``: ``argv`` (default ``sys.argv[1:]``) cut at the
    first ``--``; without one, everything is the launcher's."""

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]
