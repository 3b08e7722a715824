"""`bench data --corpus-tokens N`: the data path at corpus scale.

Writes a synthetic corpus of about N tokens (documents of random sentences of the shipped
medical sample, each with a unique case number, as .jsonl files), then, each in a child
process so its peak RSS is its own:

  build      `medjax data build medical_text --tokenizer`: tokens/s, peak RSS, bytes on disk;
  first      what `medjax train` does before its first step with `data.train=tfds:OUT`:
             open the build, make the iterator, fetch the first global batch; then resume
             at a far global batch and fetch again; then read batches for throughput
             (three cold starts, the median);
  text       (--compare-text) the same from the raw files, tokenized at start;
  overlap    `medjax data overlap --build` against the shipped CMExam sample: tokens/s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from medjax.bench.common import child_peak_rss

_FIRST_BATCH = r'''
import json, sys, time


def hwm():  # this process's peak resident bytes so far (VmHWM; see bench.common)
  with open("/proc/self/status") as f:
    return int(next(ln for ln in f if ln.startswith("VmHWM")).split()[1]) * 1024


t0 = time.perf_counter()
from medjax.data import from_config
from medjax.data.tokenizer import load_tokenizer
from medjax.training import config
imports = time.perf_counter() - t0
rss_imports = hwm()
train, tok_path, seq_len, batch, batches = sys.argv[1:6]
c = config.base_config()
c.data.train, c.data.seq_len, c.batch_size = train, int(seq_len), int(batch)
c.data.replay_weight, c.data.val_fraction, c.data.columns = 0.0, 0.0, ""
tok = load_tokenizer(tok_path)
t1 = time.perf_counter()
it, _ = from_config.make_data(c, tok, log=lambda m: None)
first = next(it)
t_first = time.perf_counter() - t1
t2 = time.perf_counter()
it.set_state({"global_sample": 10**6 * int(batch)})  # a resume far into the run
next(it)
t_resume = time.perf_counter() - t2
t3 = time.perf_counter()
for _ in range(int(batches)):
  b = next(it)
t_read = time.perf_counter() - t3
print(json.dumps({"imports_s": imports, "rss_imports": rss_imports, "first_s": t_first,
                  "resume_s": t_resume, "read_s": t_read, "batches": int(batches),
                  "shape": list(first["inputs"].shape)}))
'''


def _sentences() -> list[str]:
  from medjax.assets import asset_path
  from medjax.data import corpus
  text = "\n".join(corpus.read_texts(asset_path("medical_text_sample.csv")))
  return [s for s in re.split(r"(?<=[。！？\n])", text) if s.strip()]


def write_corpus(out_dir: Path, tokens: int, tokenizer, file_mb: int = 256,
                 seed: int = 0) -> dict:
  """About `tokens` tokens of synthetic medical text as .jsonl files under out_dir.

  Each document is 10-60 random sentences of the shipped sample after a unique case
  number, so documents differ (the hash split and the contamination check see distinct
  texts). The size is reached by characters, from the sample's tokens per character.
  """
  import numpy as np
  sents = _sentences()
  probe = "".join(sents[:2000])
  per_char = len(tokenizer.encode(probe, bos=False)) / len(probe)
  target = int(tokens / per_char)
  rng = np.random.default_rng(seed)
  out_dir.mkdir(parents=True, exist_ok=True)
  chars = docs = 0
  f, files, size = None, 0, 0
  while chars < target:
    if f is None or size >= file_mb << 20:
      if f:
        f.close()
      f = open(out_dir / f"part-{files:05d}.jsonl", "w", encoding="utf-8")
      files, size = files + 1, 0
    pick = rng.integers(0, len(sents), rng.integers(10, 61))
    text = f"病例{docs}：" + "".join(sents[i] for i in pick)
    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
    f.write(line)
    size += len(line.encode("utf-8"))
    chars += len(text)
    docs += 1
  f.close()
  disk = sum(p.stat().st_size for p in out_dir.glob("*.jsonl"))
  return {"documents": docs, "chars": chars, "files": files, "bytes": disk,
          "tokens_per_char": per_char}


def bench_scale(corpus_tokens: int, tokenizer_path: str, seq_len: int, batch_size: int,
                batches: int, workers: int | None, tmp: str | None, compare_text: bool,
                keep: bool = False) -> dict:
  """Runs the steps in the module docstring; returns their figures."""
  from medjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(tokenizer_path)
  root = Path(tempfile.mkdtemp(prefix="medjax-bench-data-", dir=tmp))
  py = ["-m", "medjax.cli"]
  try:
    t = time.perf_counter()
    gen = write_corpus(root / "corpus", corpus_tokens, tok)
    gen["write_s"] = time.perf_counter() - t
    cmd = py + ["data", "build", "medical_text", "--input", str(root / "corpus"), "--out",
                str(root / "built"), "--tokenizer", tokenizer_path, "--seq-len", str(seq_len)]
    if workers:
      cmd += ["--workers", str(workers)]
    wall, rss, _ = child_peak_rss(cmd)
    built = root / "built" / "medical_text" / "tokenized"
    m = json.loads((built / "manifest.json").read_text())
    build = {"wall_s": wall, "peak_rss": rss, "seconds": m["build_seconds"],
             "workers": m["workers"],
             "tokens": sum(s["tokens"] for s in m["splits"].values()),
             "bytes": sum(p.stat().st_size for p in built.glob("*.array_record"))}
    if not (keep or compare_text):
      shutil.rmtree(root / "corpus")  # disk: the build alone is read from here on
    # Three cold starts (the machine is shared): the median by time to the first batch.
    runs = sorted((_first_batch(f"tfds:{root / 'built'}", tokenizer_path, seq_len, batch_size,
                                batches) for _ in range(3)), key=lambda x: x["first_s"])
    first = dict(runs[1], first_range=(runs[0]["first_s"], runs[2]["first_s"]))
    text = None
    if compare_text:
      text = _first_batch(str(root / "corpus"), tokenizer_path, seq_len, batch_size, 0)
    from medjax.assets import asset_path
    wall, rss, out = child_peak_rss(py + ["data", "overlap", "--build", f"tfds:{root / 'built'}",
                                      "--eval", str(asset_path("cmexam_sample.csv"))])
    rate = re.search(r"([\d,]+) tokens, ([\d,]+) tokens/s", out)
    overlap = {"wall_s": wall, "peak_rss": rss, "tokens": int(rate[1].replace(",", "")),
               "tokens_per_s": int(rate[2].replace(",", "")),
               "summary": next(ln for ln in out.splitlines() if "eval questions" in ln)}
  finally:
    if not keep:
      shutil.rmtree(root, ignore_errors=True)
  return {"corpus": gen, "build": build, "first": first, "text": text, "overlap": overlap,
          "seq_len": seq_len, "batch_size": batch_size, "tokenizer": tokenizer_path,
          "vocab_size": tok.vocab_size, "kept": str(root) if keep else None}


def _first_batch(train: str, tok: str, seq_len: int, batch: int, batches: int) -> dict:
  # jax on CPU unless the caller chose: the pipeline is host work, and an accelerator
  # runtime's own memory (libtpu's is ~100 MiB where installed) would hide the pipeline's.
  wall, rss, out = child_peak_rss(["-c", _FIRST_BATCH, train, tok, str(seq_len), str(batch),
                                   str(batches)],
                                  env={"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
  r = json.loads(out.strip().splitlines()[-1])
  r["wall_s"], r["peak_rss"] = wall, rss  # the child's VmHWM at exit (`child_peak_rss`)
  return r


def scale_lines(r: dict) -> list[str]:
  def mib(b):
    return f"{b / (1 << 20):,.0f} MiB"

  g, b, f, o = r["corpus"], r["build"], r["first"], r["overlap"]
  tok = Path(r["tokenizer"])
  rows = f"{r['batch_size']} x {r['seq_len']}"
  workers = (f"{b['workers']} tokenizing processes" if b["workers"] > 1 else
             "tokenized in the main process, by the tokenizer's threads")
  lines = [
      f"synthetic corpus: {g['documents']:,} documents, {g['chars']:,} characters "
      f"({g['tokens_per_char']:.2f} tokens/char with {tok.parent.name}/{tok.name}, vocab "
      f"{r['vocab_size']}), {g['files']} .jsonl files, {mib(g['bytes'])}, written in "
      f"{g['write_s']:.1f} s",
      f"build: {b['tokens']:,} tokens in {b['seconds']:.1f} s = "
      f"{b['tokens'] / b['seconds'] / 1e6:.2f}M tokens/s ({workers}; "
      f"{b['wall_s']:.1f} s wall with start-up), peak RSS {mib(b['peak_rss'])} "
      f"(the main process: read, pack, write), {mib(b['bytes'])} on disk ({b['bytes'] / b['tokens']:.2f} "
      "bytes/token)",
      f"first batch ({rows}, tfds: build, one process, JAX_PLATFORMS="
      f"{os.environ.get('JAX_PLATFORMS', 'cpu')}): {f['first_s']:.2f} s after imports "
      f"(median of 3 starts, {f['first_range'][0]:.2f}-{f['first_range'][1]:.2f} s; imports "
      f"{f['imports_s']:.1f} s); resume at global batch 1,000,000: next batch in "
      f"{f['resume_s']:.2f} s; then {f['batches'] / f['read_s']:.1f} batches/s = "
      f"{f['batches'] * r['batch_size'] * r['seq_len'] / f['read_s'] / 1e6:.1f}M tokens/s; "
      f"peak RSS {mib(f['peak_rss'])} (after imports {mib(f['rss_imports'])})",
  ]
  if r["text"]:
    t = r["text"]
    lines.append(f"text path (the raw files, tokenized at start): first batch after "
                 f"{t['first_s']:.2f} s, peak RSS {mib(t['peak_rss'])}; tokenized build / "
                 f"text: {f['first_s'] / t['first_s']:.3f}x the time, "
                 f"{f['peak_rss'] / t['peak_rss']:.2f}x the RSS")
  lines.append(f"overlap --build (13-character n-grams of the shipped CMExam sample): "
               f"{o['tokens']:,} tokens at {o['tokens_per_s'] / 1e6:.2f}M tokens/s, "
               f"peak RSS {mib(o['peak_rss'])}; {o['summary']}")
  if r["kept"]:
    lines.append(f"kept: {r['kept']}")
  return lines
