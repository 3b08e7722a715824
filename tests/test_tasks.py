"""Exam task definitions: shipped tasks, per-option columns, the lm-evaluation-harness
convention (single answer, target " A"), answer extraction with a task's cue, and bad
input (columns the CSV lacks, unknown fields, a missing subject). Training and evaluating
the second task end to end is in test_report.py."""

import json

import pytest

from medjax.assets import asset_path
from medjax.data import cmexam, tasks
from medjax.data.tokenizer import Tokenizer
from medjax.errors import ConfigError, DataError
from medjax.evaluation import exam
from medjax.training import config as runconfig

CMMLU_CSV = ("Question,A,B,C,D,Answer\n"
             "甲状腺功能亢进症最常见的病因是,Graves病,甲状腺腺瘤,亚急性甲状腺炎,碘缺乏,A\n"
             "多选题示例,甲,乙,丙,丁,AB\n")


def test_shipped_tasks_load_and_cmexam_is_the_default():
  assert tasks.shipped() == ["ceval", "cmexam", "cmmlu", "medqa_usmle"]
  assert tasks.load_task("") is tasks.CMEXAM and tasks.load_task("cmexam") is tasks.CMEXAM
  for name in ("medqa_usmle", "cmmlu:临床知识", "ceval:临床医学"):
    t = tasks.load_task(name)
    assert t.name == name.split(":")[0] and t.license
  assert "临床知识" in tasks.load_task("cmmlu:临床知识").prompt("问", {"A": "x", "B": "y"})


def test_medqa_sample_reads_with_its_own_columns():
  qs, problems = cmexam.read_cmexam(asset_path("medqa_usmle_sample.csv"), "medqa_usmle")
  assert len(qs) == 40 and problems == []
  four = [q for q in qs if len(q.options) == 4]  # empty option_e cells: four options
  assert len(four) == 3 and all(q.letters == "ABCD" for q in four)
  q = qs[0]
  assert q.extra == {"topic": "endocrinology"} and q.explanation.startswith("Graves")
  prompt = cmexam.format_prompt(q)
  assert prompt.startswith("The following is a multiple-choice question")
  assert "\n(A) " in prompt and prompt.endswith("\nAnswer:")
  assert cmexam.format_response(q, True) == q.answer + "\nExplanation: " + q.explanation
  # The record a built dataset stores keeps the task, so its prompts stay the same.
  assert cmexam.question_from_record(json.loads(json.dumps(
      cmexam.question_to_record(q)))) == q


def test_harness_convention_prompt_and_pair_encoding(tmp_path):
  tiny_tok = Tokenizer(asset_path("tinystories-260k/tokenizer.model"))
  p = tmp_path / "cmmlu.csv"
  p.write_text(CMMLU_CSV, encoding="utf-8")
  task = tasks.load_task("cmmlu:临床知识")
  qs, problems = cmexam.read_cmexam(p, task)
  # Single answer only: the harness's CMMLU/C-Eval have one letter per question.
  assert len(qs) == 1 and "single-answer" in problems[0].reason
  prompt = cmexam.format_prompt(qs[0])
  assert prompt == ("以下是关于临床知识的单项选择题，请直接给出正确答案的选项。\n\n"
                    "甲状腺功能亢进症最常见的病因是\nA. Graves病\nB. 甲状腺腺瘤\nC. 亚急性甲状腺炎\n"
                    "D. 碘缺乏\n答案：")
  ctx = tiny_tok.encode(prompt, bos=True)
  # Target " A" as the harness encodes it: the tail of encode(prompt + " A").
  cont = exam._continuation(tiny_tok, prompt, ctx, task.target_delimiter, "A")
  assert cont == tiny_tok.encode(prompt + " A", bos=True)[len(ctx):]
  assert tiny_tok.decode(ctx + cont).endswith("答案： A")
  # medjax's convention (no delimiter) scores the letter tokenised on its own.
  assert exam._continuation(tiny_tok, prompt, ctx, "", "A") == tiny_tok.encode("A", bos=False)


def test_extract_answer_uses_the_task_cue():
  t = tasks.load_task("medqa_usmle")
  assert exam.extract_answer(" C\nExplanation: not A or B", "ABCDE", t) == "C"
  assert exam.extract_answer("The patient... Answer: (D)", "ABCDE", t) == "D"
  assert exam.extract_answer("答案：B\n解析：A错", "ABCDE") == "B"  # CMExam unchanged


def test_task_naming_columns_the_csv_lacks(tmp_path):
  p = tmp_path / "exam.csv"
  p.write_text(CMMLU_CSV, encoding="utf-8")
  with pytest.raises(DataError, match=rf"{p}:1: missing column 'Options' \(task 'cmexam', "
                     r"field 'options'"):
    cmexam.read_cmexam(p)
  custom = tmp_path / "law.json"
  custom.write_text(json.dumps({"name": "law", "header": "", "question": "Question",
                                "options": "A,B,C,D,E", "answer": "Answer"}))
  with pytest.raises(DataError, match=r"missing column 'E' \(task 'law', field 'options'"):
    cmexam.read_cmexam(p, str(custom))


@pytest.mark.parametrize("raw,needle", [
    ({"name": "x", "header": "", "colour": "red"}, "unknown field 'colour'"),
    ({"name": "x", "header": "", "single_answer": "yes"}, "field 'single_answer' must be a bool"),
    ({"header": ""}, "missing field 'name'"),
    ({"name": "x", "header": "", "answer": " "}, "field 'answer' must not be empty"),
])
def test_bad_task_files(tmp_path, raw, needle):
  p = tmp_path / "t.json"
  p.write_text(json.dumps(raw))
  with pytest.raises(ConfigError, match=needle):
    tasks.load_task(str(p))


def test_unknown_task_and_missing_subject_name_the_config_field():
  c = runconfig.base_config()
  c.exam = "law_exam"
  with pytest.raises(ConfigError, match=r"config.exam='law_exam'.*not a shipped task"):
    runconfig.validate(c)
  with pytest.raises(ConfigError, match=r"give it as cmmlu:SUBJECT"):
    tasks.load_task("cmmlu")
