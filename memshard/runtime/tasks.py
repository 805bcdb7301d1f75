"""One way to run a plain function as a Ray task with the driver's S3 access.

Workers do not inherit the driver's environment (a local cluster's workers were forked
before a run's credentials were known; a cluster's run on other machines), and the runtime
env is not a place for secrets (see :mod:`memshard.io.storage`). So every task that may touch
storage is started through :func:`remote_call`, which ships the driver's current
:class:`~memshard.io.storage.S3Access` as an argument and installs it in the worker first.
The algorithm functions themselves stay free of Ray and of credentials.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from memshard.io.storage import S3Access, install_access


@ray.remote
def _call(access: S3Access | None, fn: Callable[..., Any], *args: Any) -> Any:
    install_access(access)
    return fn(*args)


def remote_call(
    fn: Callable[..., Any], *args: Any, num_cpus: float = 1, options: dict[str, Any] | None = None
) -> ray.ObjectRef:
    """``fn(*args)`` as a Ray task holding ``num_cpus`` (or Ray ``options``), with this process's S3 access.

    Top-level ``ObjectRef`` arguments are resolved as for any task; refs nested in a list are not.
    """
    access = S3Access.resolve()
    return _call.options(**{"num_cpus": num_cpus, **(options or {})}).remote(access or None, fn, *args)
