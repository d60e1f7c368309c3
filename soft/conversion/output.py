"""Write a conversion result into `<out>.tmp` and rename it into place only when complete, so a
failed conversion never leaves a folder that looks valid."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from soft.config.errors import ConfigError


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    out_dir = out_dir.absolute()
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
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
