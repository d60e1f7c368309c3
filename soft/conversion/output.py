"""Write a conversion result into `<out>.tmp` and rename it into place only when complete, so a
failed conversion never leaves a folder that looks valid."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from soft.config.errors import ConfigError


def _overlaps(out_dir: Path, source: Path) -> bool:
    """out_dir is source, contains it, or lies inside it."""
    out_dir, source = out_dir.resolve(), source.resolve()
    return out_dir == source or out_dir in source.parents or source in out_dir.parents


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: Path, overwrite: bool = False, inputs: Sequence[Path] = ()
) -> Iterator[Path]:
    """`inputs`: what the conversion reads. An output that is, contains or lies inside one of
    them is refused, --overwrite or not: replacing it would delete the tool's own input."""
    out_dir = out_dir.absolute()
    for source in inputs:
        if _overlaps(out_dir, Path(source)):
            raise ConfigError(
                f"--out-dir '{out_dir}' overlaps the input '{source}' (it is, contains or lies "
                "inside it); writing there could delete the input: choose another --out-dir"
            )
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"--out-dir '{out_dir}' already exists; remove it or pass --overwrite")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed earlier attempt
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable_as_umask_allows(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _readable_as_umask_allows(folder: Path) -> None:
    """safetensors writes its files 0600; an exported model is shared like any HF download,
    so every file gets the mode a plain `cp` would give it (0666 / 0777 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
