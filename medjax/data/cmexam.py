"""Multiple-choice exam CSVs (CMExam by default): the reader and the prompt shared by SFT and eval.

Which columns hold what, and how the prompt is written, comes from an exam task definition
(`medjax.data.tasks`; `tasks.CMEXAM` unless another is given). A CMExam CSV has the columns
`Question, Options, Answer, Explanation`. `Options` is one string with one option per line,
"A 原发病"; lines are separated by real newlines or by the two characters backslash and `n`
(both occur in copies of the dataset). A task may instead name one column per option
("option_a,...,option_e"). `Answer` is the correct letters run together ("C", "ABD"). Any
other column (e.g. the annotated test file's `Disease Group, Area of Competency, Clinical
Department, Medical Discipline, Difficulty level`) is carried through in `Question.extra`.

Rows that cannot be parsed are never dropped silently: `read_cmexam` returns them as
`Problem`s with file, line and reason, and the CLIs print them.

Each `Question` carries its task, so `format_prompt` (used verbatim by SFT in `medjax.data`
and by evaluation) writes the prompt the model is trained and scored on. CMExam's:

    以下是中国医师资格考试的选择题，请选出正确答案。
    {question}
    A. {option A}
    ...
    答案：

The response is the answer letters ("C" or "ABD"), optionally followed by "\n解析：" and the
explanation.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from pathlib import Path

from medjax.data import tasks
from medjax.data.tasks import ExamTask
from medjax.errors import DataError

# CMExam's prompt pieces (the default task's), for callers that show or check them.
PROMPT_HEADER = tasks.CMEXAM.header.rstrip("\n")
ANSWER_CUE = tasks.CMEXAM.answer_cue
EXPLANATION_CUE = tasks.CMEXAM.explanation_cue

# "A 原发病", "A. 原发病", "A、原发病", "(A) ..." -> ("A", "原发病").
_OPTION_RE = re.compile(r"^\s*[（(]?([A-Z])[)）]?\s*[.．、:：]?\s*(.*?)\s*$")
_OPTION_SPLIT_RE = re.compile(r"\r?\n|\\n")
# Empty cells written by pandas' to_csv come out as "nan" (754 explanations in the val split).
_MISSING = ("", "nan", "none", "null")


@dataclasses.dataclass(frozen=True)
class Question:
  """One exam question (CMExam's, or another task's).

  Attributes:
    question: the stem.
    options: letter -> option text, letters in order "A", "B", ...
    answer: the correct letters, sorted and run together ("C", "ABD").
    explanation: the official explanation ("" when absent).
    extra: other CSV columns (annotations such as "Difficulty level"), by column name.
    source: "file:line" of the row's first line in its CSV.
    task: the exam task it was read with (its prompt convention).
  """

  question: str
  options: dict[str, str]
  answer: str
  explanation: str = ""
  extra: dict[str, str] = dataclasses.field(default_factory=dict)
  source: str = ""
  task: ExamTask = tasks.CMEXAM

  @property
  def is_multi(self) -> bool:
    """True for a multiple-answer question (more than one correct letter)."""
    return len(self.answer) > 1

  @property
  def letters(self) -> str:
    return "".join(self.options)


@dataclasses.dataclass(frozen=True)
class Problem:
  """A row that could not be parsed."""

  file: str
  line: int
  reason: str

  def __str__(self) -> str:
    return f"{self.file}:{self.line}: {self.reason}"


def parse_options(text: str) -> dict[str, str]:
  """Parses an `Options` cell into letter -> text.

  Args:
    text: options separated by real newlines or literal backslash-n.

  Returns:
    Ordered dict of options.

  Raises:
    ValueError: a line without a leading letter, or letters not A, B, C, ... in order.
  """
  lines = [ln for ln in _OPTION_SPLIT_RE.split(text) if ln.strip()]
  options: dict[str, str] = {}
  for ln in lines:
    m = _OPTION_RE.match(ln)
    if not m:
      raise ValueError(f"option line {ln.strip()[:30]!r} does not start with a letter")
    letter, body = m.groups()
    want = chr(ord("A") + len(options))
    if letter != want:
      raise ValueError(f"option letters out of order: got {letter!r}, expected {want!r}")
    options[letter] = body
  if len(options) < 2:
    raise ValueError(f"need at least 2 options, found {len(options)}")
  return options


def parse_answer(text: str, options: dict[str, str]) -> str:
  """Normalises an `Answer` cell ("DBA", "A,B") to sorted letters ("ABD")."""
  if text.strip().lower() in _MISSING:
    raise ValueError(f"no answer ({text.strip()!r})")
  letters = re.sub(r"[\s,，、;；]", "", text).upper()
  bad = [c for c in letters if c not in options]
  if bad:
    raise ValueError(f"answer {text!r} names letters not among options {''.join(options)}")
  return "".join(sorted(set(letters)))


def read_cmexam(path: str | os.PathLike, task: ExamTask | str | None = None
                ) -> tuple[list[Question], list[Problem]]:
  """Reads an exam CSV with the columns its task names.

  Args:
    path: a UTF-8 CSV (CMExam's: Question, Options, Answer, Explanation).
    task: an ExamTask or a name/path for `tasks.load_task` (default CMExam).

  Returns:
    (questions, problems): the parsed questions in file order, and one `Problem` per row
    that could not be parsed (file, line, reason).

  Raises:
    DataError: missing file, a column the task names that the CSV lacks, a file that is
      not UTF-8, or no data rows.
  """
  task = tasks.load_task(task)
  path = Path(path)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  try:
    text = raw.decode("utf-8-sig")  # -sig: CSVs saved by Excel start with a BOM
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}: not UTF-8 (byte {e.start}); re-encode the file "
                    "as UTF-8") from None
  reader = csv.reader(io.StringIO(text, newline=""))
  header = next(reader, None)
  if not header:
    raise DataError(f"{path}: empty file (no header row)")
  header = [h.strip() for h in header]
  used = task.columns()
  for field, col in used.items():
    if col not in header:
      raise DataError(f"{path}:1: missing column {col!r} (task {task.name!r}, field "
                      f"{field.split('[')[0]!r}; header: {', '.join(header)})")
  idx = {h: i for i, h in enumerate(header)}
  extra_cols = [h for h in header if h not in used.values() and h]

  questions: list[Question] = []
  problems: list[Problem] = []
  start = reader.line_num + 1  # csv rows may span lines; report the row's first line
  rows = 0
  for row in reader:
    line, start = start, reader.line_num + 1
    if not any(c.strip() for c in row):
      continue
    rows += 1
    if len(row) < len(header):
      problems.append(Problem(str(path), line, f"{len(row)} fields, header has {len(header)}"))
      continue
    get = lambda col: row[idx[col]].strip()  # noqa: E731
    try:
      if not get(task.question):
        raise ValueError(f"empty {task.question}")
      if task.option_columns:
        options = _column_options([get(c) for c in task.option_columns])
      else:
        options = parse_options(get(task.options))
      answer = parse_answer(get(task.answer), options)
      if task.single_answer and len(answer) > 1:
        raise ValueError(f"answer {answer!r} has several letters; task {task.name!r} is "
                         "single-answer")
    except ValueError as e:
      problems.append(Problem(str(path), line, str(e)))
      continue
    questions.append(Question(
        question=get(task.question), options=options, answer=answer,
        explanation=_clean(get(task.explanation)) if task.explanation else "",
        extra={c: _clean(get(c)) for c in extra_cols}, source=f"{path}:{line}", task=task))
  if rows == 0:
    raise DataError(f"{path}: no data rows")
  if not questions:  # every row is bad: most likely the wrong file or format
    raise DataError(f"{problems[0]} (no row of the {rows} could be parsed)")
  return questions, problems


def _column_options(cells: list[str]) -> dict[str, str]:
  """Options from one column per letter; trailing empty cells mean fewer options."""
  while cells and _clean(cells[-1]) == "":
    cells = cells[:-1]
  if any(_clean(c) == "" for c in cells):
    raise ValueError("an empty option before the last one")
  if len(cells) < 2:
    raise ValueError(f"need at least 2 options, found {len(cells)}")
  return {chr(ord("A") + i): c for i, c in enumerate(cells)}


def _clean(cell: str) -> str:
  return "" if cell.lower() in _MISSING else cell


def format_options(q: Question) -> str:
  """The options as the prompt writes them, one per line."""
  return q.task.format_options(q.options)


def format_prompt(q: Question) -> str:
  """The model input for a question, in its task's convention, ending with the answer cue.

  Args:
    q: the question.

  Returns:
    The prompt text (no trailing space, so the answer is the next token).
  """
  return q.task.prompt(q.question, q.options)


def format_response(q: Question, with_explanation: bool = False) -> str:
  """The training target after the prompt: the answer letters, optionally the explanation.

  Args:
    q: the question.
    with_explanation: append the task's explanation cue ("\\n解析：") and the explanation
      (when the question has one).

  Returns:
    E.g. "C" or "ABD\\n解析：...".
  """
  target = q.task.target_delimiter + q.answer
  if with_explanation and q.explanation:
    return target + q.task.explanation_cue + q.explanation
  return target


def chance_accuracy(q: Question) -> float:
  """Exact-match accuracy of uniform random guessing.

  A single-answer question: 1 / number of options. A multiple-answer question: the guesser
  knows it is multiple-answer and picks uniformly among letter sets of size >= 2, i.e.
  1 / (2**n - 1 - n) for n options (5 options: 1/26).
  """
  n = len(q.options)
  return 1.0 / n if not q.is_multi else 1.0 / (2**n - 1 - n)


def question_to_record(q: Question) -> dict:
  """A JSON-friendly dict (for array_record / tfds files); inverse of `question_from_record`."""
  return {"question": q.question, "options": list(q.options.items()), "answer": q.answer,
          "explanation": q.explanation, "extra": dict(q.extra), "source": q.source,
          # Another task's definition travels with each record; CMExam's is the default.
          **({} if q.task == tasks.CMEXAM else {"task": tasks.to_record(q.task)})}


def question_from_record(r: dict) -> Question:
  return Question(question=r["question"], options=dict(r["options"]), answer=r["answer"],
                  explanation=r.get("explanation", ""), extra=dict(r.get("extra", {})),
                  source=r.get("source", ""), task=tasks.from_record(r.get("task")))
