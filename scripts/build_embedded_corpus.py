"""Rebuilds the embedded corpus and its SentencePiece vocabulary.

Source: the reStructuredText sources of the Python 3.11 documentation as
Debian ships them (package ``python3.11-doc``, directory
``/usr/share/doc/python3.11/html/_sources``). The documentation is
distributed under the PSF License Version 2 (see ``tasks/embedded/LICENSE``),
a permissive licence that allows redistribution with the notice kept.

What the script does:
1. Strips reST markup: directives, code/literal blocks, tables, section
   underlines and roles (``:func:`len``` -> ``len``), keeping prose
   paragraphs of mostly alphabetic English text, one paragraph per line.
2. Groups the paragraphs of each source file into documents of at most 16
   paragraphs; documents are assigned to ``validation`` by a stable hash of their id (about 3%),
   the rest to ``train``; writes ``tasks/embedded/{train,validation}.jsonl.gz``
   (one ``{"id": ..., "text": ...}`` object per line, paragraphs joined by
   newlines).
3. Trains a SentencePiece unigram model on the train split with T5's
   conventions (pad=0, eos=1, unk=2, no BOS), 8,000 pieces; seqio adds 100
   extra ids (sentinels) on top, and the models pad 8,100 to 8,192.

Usage (on Debian/Ubuntu):
    apt-get install python3.11-doc
    python scripts/build_embedded_corpus.py [--sources DIR] [--out tasks/embedded]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import pathlib
import re

_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_ROLE_TARGET = re.compile(r"^(?:~|!)?(.*?)(?:\s*<[^>]*>)?$")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`_{1,2}")
_INTERPRETED = re.compile(r"`([^`]*)`")
_EMPH = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_FOOTNOTE = re.compile(r"\[#?\w*\]_")
_PARAGRAPHS_PER_DOCUMENT = 16


def _role_text(match: re.Match) -> str:
  inner = _ROLE_TARGET.match(match.group(1).strip()).group(1)
  return inner.split(".")[-1] if match.group(0).startswith(":") and inner.startswith("~") else inner


def clean_inline(text: str) -> str:
  text = _ROLE.sub(_role_text, text)
  text = _LITERAL.sub(r"\1", text)
  text = _LINK.sub(r"\1", text)
  text = _INTERPRETED.sub(r"\1", text)
  text = _EMPH.sub(r"\1", text)
  text = _FOOTNOTE.sub("", text)
  text = text.replace("\\", "")
  return re.sub(r"\s+", " ", text).strip()


def is_prose(paragraph: str) -> bool:
  """True for a paragraph that reads as English prose rather than code."""
  words = paragraph.split()
  if len(words) < 8:
    return False
  letters = sum(c.isalpha() or c.isspace() for c in paragraph)
  if letters / len(paragraph) < 0.85:
    return False
  return paragraph[0].isupper() and paragraph.rstrip()[-1] in ".:!?)"


def rst_to_paragraphs(source: str) -> list[str]:
  """Returns the prose paragraphs of one reST document, markup stripped."""
  paragraphs, current = [], []
  skip_indent = None  # indentation level of a block being skipped

  def flush():
    if current:
      text = clean_inline(" ".join(current))
      if is_prose(text):
        paragraphs.append(text)
      current.clear()

  for line in source.splitlines():
    stripped = line.strip()
    indent = len(line) - len(line.lstrip())
    if skip_indent is not None:
      if not stripped or indent > skip_indent:
        continue
      skip_indent = None
    if not stripped:
      flush()
      continue
    if stripped.startswith(".."):
      flush()
      skip_indent = indent
      continue
    if _UNDERLINE.match(stripped) or stripped.startswith(("+", "|", ">>>", "...")):
      flush()
      current.clear()
      continue
    if stripped.startswith(("* ", "- ", "#. ")):
      flush()
      stripped = stripped.split(" ", 1)[1]
    current.append(stripped)
    if stripped.endswith("::"):
      current[-1] = stripped[:-1] if not stripped.endswith(" ::") else stripped[:-3]
      flush()
      skip_indent = indent
  flush()
  return paragraphs


def build(sources: pathlib.Path, out: pathlib.Path, vocab_size: int) -> None:
  splits = {"train": [], "validation": []}
  seen = set()
  for path in sorted(sources.rglob("*.rst.txt")):
    rel = str(path.relative_to(sources))
    if "changelog" in rel:
      continue
    paragraphs = []
    for paragraph in rst_to_paragraphs(path.read_text(encoding="utf-8")):
      if paragraph not in seen:
        seen.add(paragraph)
        paragraphs.append(paragraph)
    for start in range(0, len(paragraphs), _PARAGRAPHS_PER_DOCUMENT):
      doc_id = f"{rel}#{start // _PARAGRAPHS_PER_DOCUMENT}"
      bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 100
      split = "validation" if bucket < 3 else "train"
      text = "\n".join(paragraphs[start:start + _PARAGRAPHS_PER_DOCUMENT])
      splits[split].append({"id": doc_id, "text": text})
  out.mkdir(parents=True, exist_ok=True)
  for split, docs in splits.items():
    with gzip.GzipFile(out / f"{split}.jsonl.gz", "wb", mtime=0) as f:
      for doc in docs:
        f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
    size = sum(len(d["text"].encode()) for d in docs)
    print(f"{split}: {len(docs)} documents, {size / 1e6:.2f} MB of text")

  import sentencepiece as spm
  sentences = [p for doc in splits["train"] for p in doc["text"].split("\n")]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model,
      vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=2,
      max_sentence_length=20000, minloglevel=2)
  (out / "spm.model").write_bytes(model.getvalue())
  print(f"spm.model: {vocab_size} pieces")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sources", type=pathlib.Path,
                      default=pathlib.Path("/usr/share/doc/python3.11/html/_sources"))
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).resolve().parents[1] / "tasks" / "embedded")
  parser.add_argument("--vocab_size", type=int, default=8000)
  args = parser.parse_args()
  build(args.sources, args.out, args.vocab_size)


if __name__ == "__main__":
  main()
