"""Adapter checkpoints and the base model they adapt.

An adapter run's checkpoint holds what trains (the adapters, the final norm when it trains)
and its optimizer state, plus a reference to the base checkpoint in its manifest:

    "peft_base": {"path": "/abs/.../iter_0000000", "manifest_sha256": "..."}

The base's manifest lists the checksum of every base file, so the checksum of the manifest
names the base's weights exactly: a base that was replaced, retrained or edited since is
refused with both paths named, never silently merged with adapters trained on other weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from soft.checkpointing.directory import MANIFEST, CheckpointError
from soft.checkpointing.manifest import read_manifest

BASE_KEY = "peft_base"


def base_reference(base_ckpt: Path) -> dict[str, str]:
    """The reference an adapter checkpoint records to `base_ckpt` (an iter_* folder)."""
    manifest = base_ckpt / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"checkpoint '{base_ckpt}' has no {MANIFEST}: an adapter run must name its base "
            "by checksum. Re-save the base with this version (an HF import writes one)"
        )
    return {"path": str(base_ckpt.resolve()), "manifest_sha256": _sha256(manifest)}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stored_reference(ckpt: Path) -> dict[str, str] | None:
    """The base an adapter checkpoint adapts (None: a checkpoint of full weights)."""
    manifest = read_manifest(ckpt) or {}
    return manifest.get(BASE_KEY)


def resolve_base(ckpt: Path, reference: dict[str, str] | None = None) -> Path:
    """The base checkpoint of adapter checkpoint `ckpt`, checked against its checksum."""
    reference = reference or stored_reference(ckpt)
    if reference is None:
        raise CheckpointError(f"checkpoint '{ckpt}' is not an adapter checkpoint (no {BASE_KEY})")
    base = Path(reference["path"])
    if not (base / MANIFEST).is_file():
        raise CheckpointError(
            f"adapter checkpoint '{ckpt}' adapts the base checkpoint '{base}', which is gone "
            f"(no {MANIFEST} there); restore it at that path"
        )
    found = _sha256(base / MANIFEST)
    if found != reference["manifest_sha256"]:
        raise CheckpointError(
            f"adapter checkpoint '{ckpt}' was trained on the base checkpoint '{base}' with "
            f"manifest sha256 {reference['manifest_sha256'][:12]}, but that folder now holds "
            f"{found[:12]}: other weights. Restore the original base"
        )
    return base


def trained_keys(chunks: Iterable[torch.nn.Module]) -> set[str]:
    """State-dict keys of the parameters that train (what an adapter checkpoint holds)."""
    return {name for chunk in chunks for name, p in chunk.named_parameters() if p.requires_grad}


def check_only_missing(missing: Iterable[str], allowed: set[str], what: str) -> None:
    """A partial load left out exactly what the other checkpoint supplies."""
    unexpected = sorted(set(missing) - allowed)
    if unexpected:
        raise CheckpointError(f"{what}: no values for {unexpected[:5]}")


def reference_of(manifest_extra: dict[str, Any] | None) -> dict[str, str] | None:
    return (manifest_extra or {}).get(BASE_KEY)
