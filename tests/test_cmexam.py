"""CMExam reader: option formats, multi answers, annotations, problem rows, errors, prompts."""

import pytest

from conftest_data import CMEXAM_CSV, need
from medjax.data import cmexam
from medjax.errors import DataError

HEADER = "Question,Options,Answer,Explanation\n"


def _write(tmp_path, text, name="q.csv", encoding="utf-8"):
  p = tmp_path / name
  p.write_bytes(text.encode(encoding))
  return p


def test_literal_backslash_n_options(tmp_path):
  options = "A 原发病\\nB 出血部位\\nC 出血量\\nD 停留时间\\nE 以上均非"  # literal backslash-n
  p = _write(tmp_path, HEADER + f"出血取决于,{options},C,因为C\n")
  qs, problems = cmexam.read_cmexam(p)
  assert problems == []
  (q,) = qs
  assert q.options == {"A": "原发病", "B": "出血部位", "C": "出血量", "D": "停留时间",
                       "E": "以上均非"}
  assert list(q.options) == list("ABCDE")
  assert (q.question, q.answer, q.explanation) == ("出血取决于", "C", "因为C")
  assert q.source == f"{p}:2" and not q.is_multi
  assert cmexam.chance_accuracy(q) == pytest.approx(0.2)


def test_real_newline_options_four_options_multi_answer(tmp_path):
  text = (HEADER + '问题一,"A 甲\nB 乙\nC 丙\nD 丁",DBA,解析\n'
          + '问题二,"A. 一\r\nB、二\r\nC：三\r\nD 四",b,\n')
  qs, problems = cmexam.read_cmexam(_write(tmp_path, text))
  assert problems == []
  assert [q.options for q in qs] == [{"A": "甲", "B": "乙", "C": "丙", "D": "丁"},
                                     {"A": "一", "B": "二", "C": "三", "D": "四"}]
  assert qs[0].answer == "ABD" and qs[0].is_multi  # sorted letters
  assert qs[1].answer == "B" and qs[1].explanation == ""
  # Rows spanning several physical lines: the source is the row's first line.
  assert [q.source.rsplit(":", 1)[1] for q in qs] == ["2", "6"]
  assert cmexam.chance_accuracy(qs[0]) == pytest.approx(1 / 11)  # 2**4 - 1 - 4


def test_annotation_columns_carried_in_extra(tmp_path):
  text = ("Question,Options,Answer,Explanation,Disease Group,Difficulty level\n"
          "问,A 甲\\nB 乙\\nC 丙\\nD 丁\\nE 戊,E,解,循环系统疾病,3\n")
  (q,), _ = cmexam.read_cmexam(_write(tmp_path, text))
  assert q.extra == {"Disease Group": "循环系统疾病", "Difficulty level": "3"}
  assert cmexam.question_from_record(cmexam.question_to_record(q)) == q


def test_unparseable_rows_are_reported_with_line(tmp_path):
  text = HEADER + ("好,A 甲\\nB 乙\\nC 丙\\nD 丁,A,\n"
                   "缺A,B 乙\\nC 丙\\nD 丁\\nE 戊,C,\n"      # line 3: options start at B
                   "坏答案,A 甲\\nB 乙\\nC 丙\\nD 丁,F,\n"   # line 4: F is not an option
                   "无答案,A 甲\\nB 乙\\nC 丙\\nD 丁,nan,\n"  # line 5: pandas-written empty
                   "乱,甲乙丙丁,A,\n"                       # line 6: no letters
                   "短行,A 甲\n")                          # line 7: too few fields
  qs, problems = cmexam.read_cmexam(_write(tmp_path, text))
  assert len(qs) == 1
  assert [p.line for p in problems] == [3, 4, 5, 6, 7]
  assert all(p.file.endswith("q.csv") for p in problems)
  assert "expected 'A'" in problems[0].reason and "'F'" in problems[1].reason
  assert str(problems[0]).endswith("q.csv:3: " + problems[0].reason)


def test_errors_name_file_and_column(tmp_path):
  with pytest.raises(DataError, match=r"q\.csv:1: missing column 'Answer'"):
    cmexam.read_cmexam(_write(tmp_path, "Question,Options,Explanation\n问,A 甲,解\n"))
  with pytest.raises(DataError, match=r"gbk\.csv:2: not UTF-8"):
    cmexam.read_cmexam(_write(tmp_path, HEADER + "问题,A 甲\\nB 乙,A,\n", "gbk.csv", "gbk"))
  with pytest.raises(DataError, match=r"empty\.csv: empty file"):
    cmexam.read_cmexam(_write(tmp_path, "", "empty.csv"))
  with pytest.raises(DataError, match=r"hdr\.csv: no data rows"):
    cmexam.read_cmexam(_write(tmp_path, HEADER, "hdr.csv"))
  with pytest.raises(DataError, match="missing.csv"):
    cmexam.read_cmexam(tmp_path / "missing.csv")


def test_prompt_and_response():
  q = cmexam.Question("哪项正确", {"A": "甲", "B": "乙"}, "B", "乙是对的")
  prompt = cmexam.format_prompt(q)
  assert prompt == cmexam.PROMPT_HEADER + "\n哪项正确\nA. 甲\nB. 乙\n答案："
  assert prompt.endswith(cmexam.ANSWER_CUE)
  assert cmexam.format_response(q) == "B"
  assert cmexam.format_response(q, with_explanation=True) == "B\n解析：乙是对的"
  no_expl = cmexam.Question("问", {"A": "甲", "B": "乙"}, "A")
  assert cmexam.format_response(no_expl, with_explanation=True) == "A"


def test_real_val_file():
  qs, problems = cmexam.read_cmexam(need(CMEXAM_CSV))
  assert len(qs) + len(problems) == 5000
  assert len(problems) < 10  # a handful of source rows lack option A or the answer
  assert sum(q.is_multi for q in qs) > 100
  assert {len(q.options) for q in qs} == {4, 5}
