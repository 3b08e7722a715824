"""Exam task definitions: what a multiple-choice CSV looks like and how its prompt is written.

A task is data (a small JSON file): the prompt header, the CSV's column names, how options
are written and the answer cue. SFT (`data.from_config`), in-training evals and `medjax eval
--task` read questions and write prompts through it, so a new exam (law, pharmacy, an
English board exam) is a new JSON file, not new code. Shipped definitions live in
`medjax/assets/tasks/` (`cmexam`, the default; `medqa_usmle`; `cmmlu` and `ceval`, the
lm-evaluation-harness prompt convention); any other is a path to a .json file with the same
fields. `NAME:SUBJECT` fills a header's `{subject}` (`cmmlu:临床知识`).

The prompt is `header + question + "\\n" + options + "\\n" + answer_cue`, one option per line
written with `option_format`; the response is `target_delimiter + letters`, optionally
followed by `explanation_cue + explanation`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from medjax.assets import asset_path
from medjax.errors import ConfigError

TASKS_DIR = "tasks"  # under medjax/assets/


@dataclasses.dataclass(frozen=True)
class ExamTask:
  """A multiple-choice exam's CSV schema and prompt convention.

  Attributes:
    name: short name, also the metric prefix (`{name}_acc` in training logs).
    header: text before the question, with its own trailing newline(s); may hold
      `{subject}`, filled from `subject`.
    question: the column holding the stem.
    options: one column whose cell lists the options one per line ("A 原发病"), or a
      comma-separated list of columns, one per option in letter order ("A,B,C,D"); an empty
      cell in the last columns means the question has fewer options.
    answer: the column with the correct letters ("C", "ABD", "A,B").
    explanation: the column with an explanation ("" = the CSV has none).
    option_format: how one option is written in the prompt ({letter}, {text}).
    answer_cue: the prompt's last text, after the options.
    explanation_cue: between the letters and the explanation in SFT responses.
    target_delimiter: text before the letters in the scored continuation. "" is medjax's
      convention (the letters tokenised on their own, as SFT trains them); " " is
      lm-evaluation-harness's (the continuation " A", tokenised as the harness does: the
      prompt and prompt + " A" encoded, the difference scored).
    single_answer: only single-answer questions (rows with several letters are reported as
      unreadable), as in the harness's CMMLU/C-Eval tasks.
    subject: fills `{subject}` in the header.
    license: where the definition's convention comes from, for the record.
  """

  name: str
  header: str
  question: str = "Question"
  options: str = "Options"
  answer: str = "Answer"
  explanation: str = "Explanation"
  option_format: str = "{letter}. {text}"
  answer_cue: str = "答案："
  explanation_cue: str = "\n解析："
  target_delimiter: str = ""
  single_answer: bool = False
  subject: str = ""
  license: str = ""

  @property
  def option_columns(self) -> tuple[str, ...]:
    """The per-letter option columns, or () when one column holds every option."""
    cols = tuple(c.strip() for c in self.options.split(",") if c.strip())
    return cols if len(cols) > 1 else ()

  def columns(self) -> dict[str, str]:
    """Field name -> CSV column, for every column this task reads."""
    cols = {"question": self.question, "answer": self.answer}
    if self.option_columns:
      cols.update({f"options[{i}]": c for i, c in enumerate(self.option_columns)})
    else:
      cols["options"] = self.options.strip()
    if self.explanation:
      cols["explanation"] = self.explanation
    return cols

  def format_options(self, options: dict[str, str]) -> str:
    """The options as the prompt writes them, one per line."""
    return "\n".join(self.option_format.format(letter=k, text=v) for k, v in options.items())

  def prompt(self, question: str, options: dict[str, str]) -> str:
    """The model input for one question, ending with `answer_cue`."""
    head = self.header.replace("{subject}", self.subject)
    return f"{head}{question}\n{self.format_options(options)}\n{self.answer_cue}"


_FIELDS = {f.name: f.type for f in dataclasses.fields(ExamTask)}


def _read(path: Path) -> ExamTask:
  """Parses and checks one task .json file."""
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except OSError as e:
    raise ConfigError(f"task {path}: cannot read ({e.strerror})") from None
  except ValueError as e:
    raise ConfigError(f"task {path}: not JSON ({e})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"task {path}: expected a JSON object of task fields")
  for k, v in raw.items():
    if k not in _FIELDS:
      raise ConfigError(f"task {path}: unknown field {k!r} (fields: {', '.join(_FIELDS)})")
    want = bool if _FIELDS[k] == "bool" else str
    if not isinstance(v, want):
      raise ConfigError(f"task {path}: field {k!r} must be a {want.__name__}, got {v!r}")
  for k in ("name", "header"):
    if k not in raw:
      raise ConfigError(f"task {path}: missing field {k!r}")
  task = ExamTask(**raw)
  for k in ("name", "question", "options", "answer", "answer_cue"):
    if not getattr(task, k).strip():
      raise ConfigError(f"task {path}: field {k!r} must not be empty")
  return task


# The default task: CMExam's CSV columns and medjax's Chinese prompt.
CMEXAM = _read(asset_path(TASKS_DIR) / "cmexam.json")


def shipped() -> list[str]:
  """Names of the task definitions in the package."""
  return sorted(p.stem for p in asset_path(TASKS_DIR).glob("*.json"))


def load_task(spec: str | ExamTask | None) -> ExamTask:
  """A task from a shipped name, `NAME:SUBJECT`, a .json path, or an ExamTask.

  Args:
    spec: "" or None mean CMExam.

  Returns:
    The ExamTask.

  Raises:
    ConfigError: an unknown name, an unreadable file, an unknown or mistyped field.
  """
  if isinstance(spec, ExamTask):
    return spec
  spec = (spec or "").strip()
  if spec in ("", "cmexam"):
    return CMEXAM
  subject = None
  path = Path(spec)
  if not (spec.endswith(".json") or os.sep in spec):
    name, _, subject = spec.partition(":")
    path = asset_path(TASKS_DIR) / f"{name}.json"
    if not path.is_file():
      raise ConfigError(f"task {spec!r}: not a shipped task ({', '.join(shipped())}) or a "
                        ".json file")
  task = _read(path)
  if subject:
    task = dataclasses.replace(task, subject=subject)
  if "{subject}" in task.header and not task.subject:
    raise ConfigError(f"task {path}: the header names {{subject}}; give it as "
                      f"{task.name}:SUBJECT or set 'subject'")
  return task


def to_record(task: ExamTask) -> dict:
  """The task as plain data (for built datasets); `from_record` reads it back."""
  return dataclasses.asdict(task)


def from_record(r: dict | None) -> ExamTask:
  return ExamTask(**r) if r else CMEXAM
