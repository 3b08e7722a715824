"""`medjax generate` and `medjax eval`: load a checkpoint and its tokenizer, then run."""

from __future__ import annotations

import argparse
import json
import os

from medjax.cli import multiprocess
from medjax.cli.args import path
from medjax.errors import MedjaxError
from medjax.inputs import DIR, FILE, FILE_OR_DIR, NEW_FILE, Float, Int, Ints, Text
from medjax.model.config import DTYPES


def _rules(text: str) -> None:
  from medjax.parallel import sharding
  sharding.parse_rules(text)


def _task(text: str) -> None:
  from medjax.data import tasks
  tasks.load_task(text)


def _add_model_args(p: argparse.ArgumentParser) -> None:
  path(p, "--checkpoint", kind=DIR, required=True,
       help="an HF Llama/Qwen2 dir, a medjax checkpoint, or a training workdir (newest)")
  path(p, "--tokenizer", kind=FILE, help="tokenizer.model or tokenizer.json to use instead of "
       "the checkpoint's")
  p.add_argument("--dtype", default=None, choices=DTYPES, help="compute dtype override")
  p.add_argument("--mesh", default="1,-1,1", metavar="DATA,FSDP,TENSOR",
                 type=Ints(count=3, ge=1, also=(-1,)),
                 help="device mesh the params are sharded over, with training's logical "
                      "rules; one size may be -1 (default 1,-1,1: every device on fsdp)")
  p.add_argument("--rules", default=None,
                 type=Text(check=_rules, what='sharding rules "logical=axis+axis;..."'),
                 help="sharding rule overrides as in a run config, e.g. 'mlp=tensor'")
  multiprocess.add_args(p)


def _start(args):
  """Joins a multi-process job, checks every process got the same arguments, and returns
  the mesh placement and a print that only process 0 uses (None: supervising instead)."""
  import jax
  from medjax.parallel import agreement, placement
  multiprocess.join(args)
  same = {k: v for k, v in vars(args).items()
          if k not in ("process_id", "rest") and isinstance(v, (str, int, float, list, type(None)))}
  agreement.check_same(same, "arguments")
  pl = placement.make(",".join(map(str, args.mesh)), args.rules)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  return pl, say


def _load(args, pl=None):
  """(loaded model, tokenizer); a MedjaxError names the checkpoint when it has no tokenizer."""
  import medjax
  from medjax.data.tokenizer import load_tokenizer
  overrides = {"dtype": args.dtype} if args.dtype else {}
  mesh = {} if pl is None else {"mesh": pl.mesh, "rules": pl.rules}
  loaded = medjax.load(args.checkpoint, **mesh, **overrides)
  path = args.tokenizer or loaded.tokenizer_path
  if not path:
    raise MedjaxError(f"{args.checkpoint}: checkpoint has no tokenizer.model or tokenizer.json; "
                      "pass --tokenizer PATH")
  tok = load_tokenizer(path)
  if tok.vocab_size > loaded.cfg.vocab_size:
    raise MedjaxError(f"{path}: tokenizer has {tok.vocab_size} pieces but the model "
                      f"{args.checkpoint} has vocab_size={loaded.cfg.vocab_size}")
  return loaded, tok


# ----------------------------------------------------------------------------- generate


def generate_add_args(p: argparse.ArgumentParser) -> None:
  _add_model_args(p)
  p.add_argument("--prompt", action="append", required=True, type=Text(),
                 help="prompt text (repeat for a batch)")
  p.add_argument("--max-new-tokens", type=Int(ge=1), default=64)
  p.add_argument("--temperature", type=Float(ge=0), default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=Float(gt=0, le=1), default=1.0)
  p.add_argument("--seed", type=Int(ge=0, lt=2**31), default=0)


def generate_run(args) -> int:
  rc = multiprocess.supervise(args, "generate")
  if rc is not None:
    return rc
  from medjax.evaluation.generate import generate_text
  pl, say = _start(args)
  with multiprocess.peers_lost("generate"):
    loaded, tok = _load(args, pl)
    outs = generate_text(loaded, tok, args.prompt, args.max_new_tokens, args.temperature,
                         args.top_p, args.seed)
  for prompt, out in zip(args.prompt, outs):
    say(prompt + out)
    if len(args.prompt) > 1:
      say("-" * 40)
  return 0


# ----------------------------------------------------------------------------- eval


def add_args(p: argparse.ArgumentParser) -> None:
  _add_model_args(p)
  src = p.add_mutually_exclusive_group(required=True)
  path(src, "--cmexam", "--exam", dest="cmexam", kind=FILE, metavar="FILE.csv",
       help="exam CSV to score, in --task's schema (CMExam's by default); asset:NAME for a "
       "shipped sample")
  path(src, "--text", kind=FILE_OR_DIR, metavar="FILE", help="text file/folder for perplexity "
       "(documents as in medjax.data.corpus: blank lines or <|endoftext|> lines)")
  p.add_argument("--task", default="cmexam", type=Text(nonempty=True, check=_task,
                 what="a task name or a task .json file"), help="exam task definition: a shipped name (cmexam, "
                 "medqa_usmle, cmmlu:SUBJECT, ceval:SUBJECT; the last two are "
                 "lm-evaluation-harness's prompt, target ' A') or a task .json file")
  p.add_argument("--method", choices=("loglik", "generate"), default="loglik")
  p.add_argument("--batch-size", type=Int(ge=1), default=16)
  p.add_argument("--limit", type=Int(ge=1), help="evaluate only the first N questions/documents")
  p.add_argument("--max-len", type=Int(ge=2), help="longest sequence (default: the model's)")
  p.add_argument("--max-new-tokens", type=Int(ge=1), default=16, help="for --method generate")
  path(p, "--out", kind=NEW_FILE, help="write the results JSON here")


def run(args) -> int:
  rc = multiprocess.supervise(args, "eval")
  if rc is not None:
    return rc
  from medjax.evaluation import exam, scoring
  from medjax.assets import resolve
  pl, say = _start(args)
  primary = say is print
  if args.cmexam:
    from medjax.data.cmexam import read_cmexam
    args.cmexam = resolve(args.cmexam)  # asset:NAME, a shipped sample
    # Read first: fail fast on a bad task or file.
    questions, problems = read_cmexam(args.cmexam, args.task)
    with multiprocess.peers_lost("eval"):
      loaded, tok = _load(args, pl)
      questions = questions[: args.limit] if args.limit else questions
      for pr in problems:
        say(f"skipped row: {pr}")
      res = exam.evaluate_cmexam(
          loaded.cfg, loaded.params, tok, questions, args.batch_size, args.method, problems,
          args.max_new_tokens, args.max_len, progress=primary,
          return_predictions=bool(args.out), placement=pl)
    res.update(checkpoint=args.checkpoint, data=args.cmexam, task=questions[0].task.name)
    say(exam.markdown_table(res))
  else:
    from medjax.data.corpus import read_texts
    args.text = resolve(args.text)
    texts = read_texts(args.text)
    with multiprocess.peers_lost("eval"):
      loaded, tok = _load(args, pl)
      texts = texts[: args.limit] if args.limit else texts
      res = scoring.perplexity(loaded.cfg, loaded.params, tok, texts, args.batch_size,
                               args.max_len, progress=primary, placement=pl)
    res.update(checkpoint=args.checkpoint, data=args.text)
    say("| documents | tokens | mean NLL | perplexity |\n|---:|---:|---:|---:|\n"
        f"| {res['documents']} | {res['tokens']} | {res['nll']:.4f} | "
        f"{res['perplexity']:.3f} |")
  if args.out and primary:  # every process has the same results; one writes them
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(res, f, ensure_ascii=False, indent=1)
    say(f"wrote {args.out}")
  return 0
