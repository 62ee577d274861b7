"""Where data comes from: local files through `datasets`' packaged builders, or a hub dataset.

A .txt file is one document (`sample_by="document"`), so LM text keeps its line breaks; a folder
is its .txt files, sorted by relative path, one document each. json covers .json (a list of
records) and .jsonl; csv columns are read as strings, so "007" stays "007" and "NA" stays "NA".
Files may be gzipped (x.jsonl.gz, as C4's shards are): datasets decompresses them.
"""
from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from seft_scale.config import DataConfig
from seft_scale.errors import ConfigError
from seft_scale.paths import data_format

_BUILDERS = {"txt": ("text", {"sample_by": "document"}), "json": ("json", {}),
             "parquet": ("parquet", {}), "csv": ("csv", {"na_filter": False})}
_LOCAL_HINT = "pass a local .txt, .json, .jsonl, .parquet or .csv file, or a folder of .txt files"


def first_non_utf8(files: list[Path]) -> Optional[tuple[Path, int, str]]:
    """(file, byte offset, reason) of the first bytes of `files` (gzipped or not) that are not
    UTF-8, or None. Read in 1 MiB chunks, only after a load failed."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    return path, max(offset + e.start, 0), e.reason
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                return path, offset, e.reason
    return None


@dataclass
class Source:
    """One data source of a run: `train` or `validation`."""

    location: str
    """Absolute local path or hub dataset name."""
    format: str
    """txt, json, parquet, csv or hub."""
    split: str
    subset: Optional[str]
    key: str
    """Config key named in errors."""
    _dataset: object = field(default=None, repr=False)

    @classmethod
    def of(cls, cfg: DataConfig, which: str) -> "Source":
        location = cfg.train if which == "train" else cfg.validation
        key = f"data.{which}"
        fmt = data_format(location, cfg.format, key)
        split = cfg.split if which == "train" else cfg.validation_split
        if fmt != "hub":
            location = str(Path(location).resolve())
        return cls(location, fmt, split, cfg.subset, key)

    def files(self) -> list[Path]:
        p = Path(self.location)
        if not p.is_dir():
            return [p]
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise ConfigError(f"{self.key}: the folder {p} holds no .txt files")
        return files

    def fingerprint(self) -> str:
        """Changes whenever the data does: file contents (local), datasets' fingerprint (hub)."""
        if self.format == "hub":
            return f"hub:{self.location}:{self.subset}:{self.split}:{self.load()._fingerprint}"
        h = hashlib.blake2b(digest_size=16)
        root = Path(self.location)
        for f in self.files():
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}\0".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            h.update(b"\0")
        return f"{self.format}:{h.hexdigest()}"

    def load(self, hf_cache_dir: Optional[Path] = None):
        """The rows as a `datasets.Dataset`; local builders keep their arrow files in
        hf_cache_dir, hub datasets stay in the datasets cache where downloads already are."""
        if self._dataset is None:
            if self.format != "hub" and all(f.stat().st_size == 0 for f in self.files()):
                raise ConfigError(f"{self.key}: {self.location} is empty")
            self._dataset = (self._load_hub() if self.format == "hub"
                             else self._load_local(hf_cache_dir))
            if len(self._dataset) == 0:
                raise ConfigError(f"{self.key}: {self.location} holds no rows")
        return self._dataset

    def _load_local(self, hf_cache_dir):
        import datasets

        builder, kwargs = _BUILDERS[self.format]
        try:
            if self.format == "csv":  # every column a string: pandas would make "007" the int 7
                opener = gzip.open if self.location.endswith(".gz") else open
                with opener(self.location, "rt", newline="", encoding="utf-8") as f:
                    header = next(csv.reader(f))
                string = datasets.Value("string")
                kwargs = {**kwargs, "features": datasets.Features({c: string for c in header})}
            return datasets.load_dataset(
                builder, data_files=[str(f) for f in self.files()], split="train",
                cache_dir=hf_cache_dir and str(hf_cache_dir), **kwargs)
        except Exception as e:  # the builders raise many types; the cause stays chained
            bad = first_non_utf8(self.files()) if self.format != "parquet" else None
            if bad is not None:  # datasets says only "An error occurred while generating the dataset"
                path, offset, reason = bad
                raise ConfigError(f"{self.key}: {path} is not UTF-8 text ({reason} at byte {offset}); "
                                  "re-encode it, e.g. iconv -f latin1 -t utf-8") from e
            raise ConfigError(f"{self.key}: cannot read {self.location} as {self.format}: "
                              f"{type(e).__name__}: {' '.join(str(e).split())}") from e

    def _load_hub(self):
        import datasets

        try:
            return datasets.load_dataset(self.location, self.subset, split=self.split)
        except ConnectionError as e:
            raise ConfigError(
                f"{self.key}: {self.location!r} is not a local path, and the Hugging Face dataset "
                f"is not in the local datasets cache while the hub cannot be reached ({e}; offline "
                "mode is HF_DATASETS_OFFLINE / HF_HUB_OFFLINE). Download it once where the hub is "
                f"reachable, or {_LOCAL_HINT}") from None
        except FileNotFoundError as e:
            raise ConfigError(f"{self.key}: no dataset {self.location!r} on the hub or in the "
                              f"local cache ({e}); {_LOCAL_HINT}") from None
        except ValueError as e:  # unknown split or subset
            which = "data.split" if self.key == "data.train" else "data.validation_split"
            raise ConfigError(f"{which}/data.subset: {self.location!r}: {e}") from None
