"""The megatron-core versions whose internals soft/compat patches were written against.

Every workaround in soft/compat repairs behaviour at named lines of megatron-core 0.16. On
another version those lines may have moved or been fixed, and a patch could silently change
the wrong code: `require_megatron()` makes that a clear error instead.
"""

from __future__ import annotations

import functools

SUPPORTED = ("0.16.",)


@functools.cache
def require_megatron() -> str:
    import megatron.core

    version = megatron.core.__version__
    if not version.startswith(SUPPORTED):
        raise RuntimeError(
            f"soft.compat was written for megatron-core {', '.join(v + 'x' for v in SUPPORTED)} "
            f"and this environment has {version}: its workarounds may patch code that changed. "
            "Install the pinned version (pyproject.toml) or re-check each patch in soft/compat "
            "against the new release."
        )
    return version
