"""A report as a list of blocks, written as Markdown (PNG figures beside it) and as one
self-contained HTML file (figures embedded as base64, styles inline), from the same blocks.

`medjax report` and the demo's report build a `Doc`; nothing here knows about training.
"""

from __future__ import annotations

import base64
import html
import os


class Doc:
  """Headings, paragraphs, tables, figures and code blocks, in order."""

  def __init__(self, title: str):
    self.title = title
    self.blocks: list[tuple] = []

  def heading(self, text: str, level: int = 2) -> None:
    self.blocks.append(("h", level, text))

  def para(self, text: str) -> None:
    """A paragraph; `code` spans and **bold** are kept in Markdown and rendered in HTML."""
    self.blocks.append(("p", text))

  def bullets(self, items: list[str]) -> None:
    self.blocks.append(("ul", list(items)))

  def table(self, header: list[str], rows: list[list], align: str = "") -> None:
    """A table; `align` has one 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    self.blocks.append(("table", list(header), [[_cell(x) for x in r] for r in rows], align))

  def image(self, path: str, alt: str) -> None:
    self.blocks.append(("img", path, alt))

  def code(self, text: str, lang: str = "", summary: str = "") -> None:
    """A code block; with `summary` it is folded (HTML <details>)."""
    self.blocks.append(("code", text, lang, summary))

  def extend(self, other: Doc) -> None:
    self.blocks.extend(other.blocks)

  # ---------------------------------------------------------------------------- writers

  def markdown(self, base_dir: str) -> str:
    """The report in Markdown; figure links relative to `base_dir` (where it is written)."""
    out = [f"# {self.title}", ""]
    for b in self.blocks:
      kind = b[0]
      if kind == "h":
        out += ["#" * b[1] + " " + b[2], ""]
      elif kind == "p":
        out += [b[1], ""]
      elif kind == "ul":
        out += [f"- {x}" for x in b[1]] + [""]
      elif kind == "table":
        out += [markdown_table(*b[1:]), ""]
      elif kind == "img":
        out += [f"![{b[2]}]({os.path.relpath(b[1], base_dir)})", ""]
      elif kind == "code":
        _, text, lang, summary = b
        if summary:
          out.append(f"{summary}:")
          out.append("")
        out += [f"```{lang}", text.rstrip(), "```", ""]
    return "\n".join(out)

  def html(self) -> str:
    """The report as one HTML page with every figure embedded."""
    body = [f"<h1>{_inline(self.title)}</h1>"]
    for b in self.blocks:
      kind = b[0]
      if kind == "h":
        body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
      elif kind == "p":
        body.append(f"<p>{_inline(b[1])}</p>")
      elif kind == "ul":
        body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
      elif kind == "table":
        _, header, rows, align = b
        th = "".join(f"<th>{_inline(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(
            f'<td class="{"r" if a == "r" else "l"}">{_inline(c)}</td>'
            for c, a in zip(r, align)) + "</tr>" for r in rows)
        body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
      elif kind == "img":
        with open(b[1], "rb") as f:
          data = base64.b64encode(f.read()).decode("ascii")
        body.append(f'<img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">')
      elif kind == "code":
        _, text, _, summary = b
        pre = f"<pre>{html.escape(text.rstrip())}</pre>"
        body.append(f"<details><summary>{_inline(summary)}</summary>{pre}</details>"
                    if summary else pre)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(self.title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.25em .6em}th{background:#f3f3f3}td.r{text-align:right}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:85%}code{background:#f3f3f3;"
        "padding:0 .2em}")


def markdown_table(header: list[str], rows: list[list], align: str = "") -> str:
  """A Markdown table (align: one 'l' or 'r' per column; default first left, rest right)."""
  align = align or "l" + "r" * (len(header) - 1)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
  return "\n".join(lines + ["| " + " | ".join(_cell(x) for x in r) + " |" for r in rows])


def _cell(x) -> str:
  return "–" if x is None else str(x).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
  """Markdown's `code` and **bold** spans as HTML; everything else escaped."""
  parts = str(text).replace("\\|", "|").split("`")
  out = []
  for i, part in enumerate(parts):
    esc = html.escape(part)
    if i % 2:
      out.append(f"<code>{esc}</code>")
    else:
      bold = esc.split("**")
      out.append("".join(f"<b>{s}</b>" if j % 2 else s for j, s in enumerate(bold)))
  return "".join(out)
