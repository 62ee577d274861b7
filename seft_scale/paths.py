"""Where a configured path points: local files made absolute, `asset:<name>` references to the
cached offline assets, and the format of a data source told from its extension. Nothing here
reads the data or the model; it only resolves names, so the config can check them up front."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from seft_scale.errors import ConfigError

DATA_EXTENSIONS = {".txt": "txt", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                   ".csv": "csv"}


def resolve_path(path: str, base_dir: Optional[Path], key: str) -> str:
    """Relative paths are tried against the working directory, then the config file's folder;
    `asset:<name>` is a cached offline asset (seft_scale/assets.py), built on first use."""
    if path.startswith("asset:"):
        from seft_scale.assets import AssetError, resolve_asset  # builds on first use: only here
        try:
            return str(resolve_asset(path[len("asset:"):]))
        except AssetError as e:
            raise ConfigError(f"{key}: {e}") from None
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    return str(p.resolve())


def data_extension(p: Path) -> str:
    """.jsonl for x.jsonl and for x.jsonl.gz."""
    return Path(p.stem).suffix.lower() if p.suffix.lower() == ".gz" else p.suffix.lower()


def resolve_source(source: str, fmt: str, base_dir: Optional[Path], key: str) -> str:
    """A data source: a local path made absolute (it must exist and have a readable format), or a
    hub dataset name left as it is (checked when it is loaded)."""
    if fmt == "hub":
        return source
    p = Path(source).expanduser()
    in_base = base_dir is not None and not p.is_absolute() and (base_dir / p).exists()
    local = (source.startswith("asset:") or p.exists() or in_base or fmt != "auto"
             or p.is_absolute() or source.startswith((".", "~")) or data_extension(p) in DATA_EXTENSIONS)
    if not local:
        return source
    path = resolve_path(source, base_dir, key)
    data_format(path, fmt, key)
    return path


def data_format(location: str, fmt: str, key: str) -> str:
    """txt / json / parquet / csv for a local path, hub for anything else (format auto)."""
    p = Path(location)
    if fmt == "hub" or (fmt == "auto" and not p.exists()):
        return "hub"
    if not p.exists():
        raise ConfigError(f"{key}: {location} does not exist")
    if p.is_dir():
        if fmt not in ("auto", "txt"):
            raise ConfigError(f"{key}: {location} is a folder; only folders of .txt files are "
                              f"read (data.format: auto or txt, not {fmt})")
        return "txt"
    if fmt != "auto":
        return fmt
    if data_extension(p) not in DATA_EXTENSIONS:
        raise ConfigError(f"{key}: cannot tell the format of {location} from its extension "
                          f"{data_extension(p)!r} (known: {', '.join(DATA_EXTENSIONS)}, optionally "
                          ".gz); set data.format to one of txt, json, parquet, csv")
    return DATA_EXTENSIONS[data_extension(p)]
