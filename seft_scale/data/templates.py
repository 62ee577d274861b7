"""Prompt templates of instruction data: the prompt has no loss, the response that follows has.

- alpaca: Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca train.py), with a newline after
  "### Response:" as alpaca-lora and litgpt write it: prompt and response are tokenised apart, and
  with a byte-level BPE Stanford's form would glue the response onto the colon.
- commonsense: the prompt of LLM-Adapters' commonsense_evaluate.py, whitespace included (its lines
  are indented by 16 spaces, an artefact of an indented f-string), so a model repaired on
  commonsense_170k is evaluated by that script under exactly the prompt it was trained on. The
  rows are {instruction, input (empty), output: "the correct answer is X", answer: X}; the
  response is `output`.
- plain: the instruction, then the input if any, each on its own line (pyreft's commonsense
  setting, for base models that never saw a chat or Alpaca format).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """Two prompts, chosen by whether the example has a non-empty input."""

    with_input: str
    without_input: str

    def prompt(self, instruction: str, input: str) -> str:
        template = self.with_input if input else self.without_input
        return template.format(instruction=instruction, input=input)


_ALPACA_HEAD = "Below is an instruction that describes a task"
_INDENT = " " * 16

TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        with_input=f"{_ALPACA_HEAD}, paired with an input that provides further context. Write a "
                   "response that appropriately completes the request.\n\n### Instruction:\n"
                   "{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        without_input=f"{_ALPACA_HEAD}. Write a response that appropriately completes the "
                      "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    "commonsense": PromptTemplate(
        with_input=f"{_ALPACA_HEAD}, paired with an input that provides further context. Write a "
                   f"response that appropriately completes the request.\n\n{_INDENT}### "
                   f"Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Input:\n{_INDENT}"
                   f"{{input}}\n\n{_INDENT}### Response:\n{_INDENT}",
        without_input=f"{_ALPACA_HEAD}. Write a response that appropriately completes the request."
                      f" \n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### "
                      f"Response:\n{_INDENT}"),
    "plain": PromptTemplate(with_input="{instruction}\n{input}\n", without_input="{instruction}\n"),
}
