"""Evaluate a (pruned, repaired) HF model folder: perplexity, lm-eval tasks, exact sparsity.

    seft-eval --model out/tiny/export --ppl-data heldout.txt --seqlen 512
    seft-eval --model DIR --tasks ppl,boolq,piqa --ppl-data wikitext_test.jsonl
    seft-eval --model DIR --tasks my_task --include-path my_tasks/ --limit 100

`ppl` in --tasks stands for the perplexity of --ppl-data (a .txt file, or .json/.jsonl records
with a "text" field; Wanda/SparseGPT protocol, see seft_scale/evaluate.py). The other names are
lm-eval tasks (its registry, or YAMLs in --include-path). Prints a table and writes the JSON to
--out (default <model>/evaluation.json). HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from seft_scale.cli import report_errors
from seft_scale.config import ModelConfig, parse_pattern
from seft_scale.errors import ConfigError
from seft_scale.evaluate import (evaluate_model, folder_matrices, format_results, load_tasks,
                                 parse_ppl_data, read_ppl_texts)
from seft_scale.model import check_weights, load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder (config.json, safetensors, tokenizer)")
    ap.add_argument("--ppl-data", help="text for perplexity: .txt, or .json/.jsonl with a 'text' field; "
                                       "several as name=path,name=path (each its own perplexity)")
    ap.add_argument("--seqlen", type=int, help="perplexity window (default: context length, at most 2048)")
    ap.add_argument("--max-windows", type=int, help="perplexity on the first N windows only")
    ap.add_argument("--tasks", default="", help="comma-separated: ppl and/or lm-eval task names")
    ap.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    ap.add_argument("--limit", type=int, help="lm-eval: at most N examples per task")
    ap.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples (task default if unset)")
    ap.add_argument("--batch-size", type=int, default=1, help="windows / lm-eval requests per forward")
    ap.add_argument("--targets", default=",".join(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"]),
                    help="comma-separated matrices of the sparsity report (last name component)")
    ap.add_argument("--pattern", default="unstructured", help="N:M (e.g. 2:4) to check in the report")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--trust-remote-code", action="store_true", help="run model code shipped in --model")
    ap.add_argument("--out", help="JSON results (default <model>/evaluation.json)")
    args = ap.parse_args(argv)
    return report_errors(lambda: run(args))


def run(args) -> dict:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model: {args.model} is not a Hugging Face model folder (no config.json)")
    check_weights(model_dir, "--model")
    tasks = [t for t in args.tasks.split(",") if t]
    want_ppl = "ppl" in tasks or args.ppl_data is not None
    tasks = [t for t in tasks if t != "ppl"]
    if want_ppl and args.ppl_data is None:
        raise ConfigError("--tasks ppl needs --ppl-data PATH")
    for flag, v in (("--seqlen", args.seqlen), ("--max-windows", args.max_windows),
                    ("--limit", args.limit), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {v}")

    try:
        nm = parse_pattern(args.pattern)
    except ValueError as e:
        raise ConfigError(f"--pattern: {e}") from None
    texts = ({name: read_ppl_texts(path) for name, path in parse_ppl_data(args.ppl_data).items()}
             if want_ppl else None)
    matrices = folder_matrices(model_dir, [t for t in args.targets.split(",") if t])
    tasks = load_tasks(tasks, args.include_path)  # before the model: a bad task fails fast
    out = Path(args.out) if args.out else model_dir / "evaluation.json"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = load_model(ModelConfig(path=str(model_dir), dtype=args.dtype,
                                        trust_remote_code=args.trust_remote_code), device)
    result = evaluate_model(model, tok, texts, args.seqlen, tasks, args.include_path, args.limit,
                            args.batch_size, args.max_windows, args.num_fewshot, nm=nm, matrices=matrices)
    result = {"model": str(model_dir.resolve()), "ppl_data": args.ppl_data, **result}
    print(format_results(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(main())
