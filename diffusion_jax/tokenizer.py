"""CLIP's byte-level BPE tokenizer in pure Python.

It reads the `vocab.json` / `merges.txt` pair of OpenAI's CLIP (and of every Stable Diffusion
`tokenizer/` folder) and gives the same ids as transformers' `CLIPTokenizer`:

1. special tokens (bos, eos, unk, pad) written in the text are cut out first and keep their ids;
2. each remaining segment is normalised: NFC, every whitespace run to one space, lowercase;
3. it is split into words by CLIP's pattern (letter runs, single digits, punctuation runs,
   English contractions), written with the `regex` module's `\\p{L}` / `\\p{N}` classes,
   emulated here with `re` and `unicodedata`;
4. every word's UTF-8 bytes are mapped to printable characters and merged by BPE, the last
   symbol of a word carrying the end-of-word mark `</w>`.

`CLIPTokenizer.from_words` builds a small vocabulary for models trained from scratch.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77

# What the `\s` of CLIP's patterns matches (Oniguruma, Unicode): the C0 spaces, NEL and the
# space, line and paragraph separators. Python's `str.isspace` differs (it accepts U+001C-U+001F).
_WHITESPACE = "\t\n\x0b\x0c\r\x85 \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RUN = re.compile(f"[{_WHITESPACE}]+")
_CAPITAL_SIGMA = "\u03a3"

# The pattern's literal special tokens: they are split again into "<|", name, "|>" by the
# byte-level step that follows (GPT-2's pattern), exactly as transformers does.
_PATTERN_SPECIALS = (BOS_TOKEN, EOS_TOKEN)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP map from the 256 byte values to printable characters (no whitespace/control)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  printable += range(ord("®"), ord("ÿ") + 1)
  chars = printable[:]
  shifted = 0
  for byte in range(256):
    if byte not in printable:
      printable.append(byte)
      chars.append(256 + shifted)
      shifted += 1
  return {byte: chr(char) for byte, char in zip(printable, chars)}


@functools.cache
def _byte_decoder() -> dict[str, int]:
  return {char: byte for byte, char in bytes_to_unicode().items()}


def _code_point_class(first_letter: str) -> str:
  """A `re` character-class body holding every code point whose general category starts so."""
  points = [cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp))[0] == first_letter]
  ranges, start, prev = [], points[0], points[0]
  for cp in points[1:] + [-1]:
    if cp != prev + 1:
      ranges.append(f"\\U{start:08x}-\\U{prev:08x}" if start != prev else f"\\U{start:08x}")
      start = cp
    prev = cp
  return "".join(ranges)


@functools.cache
def _word_pattern() -> re.Pattern:
  """CLIP's split pattern, with the `regex` classes `\\p{L}` and `\\p{N}` spelled out.

  `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
  """
  letters, numbers = _code_point_class("L"), _code_point_class("N")
  specials = "|".join(re.escape(token) for token in _PATTERN_SPECIALS)
  return re.compile(
      f"{specials}|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^{_WHITESPACE}{letters}{numbers}]+")


def normalize(text: str) -> str:
  """CLIP's text cleanup: NFC, whitespace runs to one space, lowercase character by character."""
  text = unicodedata.normalize("NFC", text)
  text = _WHITESPACE_RUN.sub(" ", text)
  # `str.lower` turns a word-final sigma into "ς"; CLIP lowercases character by character.
  if _CAPITAL_SIGMA in text:
    return "".join(char.lower() for char in text)
  return text.lower()


def pre_tokenize(normalized_text: str) -> list[str]:
  """Splits normalised text into the words that BPE merges, dropping the whitespace."""
  words = []
  for word in _word_pattern().findall(normalized_text):
    if word in _PATTERN_SPECIALS:
      words.extend(("<|", word[2:-2], "|>"))
    else:
      words.append(word)
  return words


def to_byte_level(word: str) -> str:
  """The word's UTF-8 bytes, each written as its printable stand-in character."""
  # Latin-1 turns byte b into chr(b), which the table maps to b's stand-in.
  return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(bytes_to_unicode())


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
  """Merges the characters of a byte-level word; the last one carries `</w>`.

  At each step the pair with the lowest rank is merged everywhere in the word, left to right.
  """
  symbols = [*word[:-1], word[-1] + END_OF_WORD]
  while len(symbols) > 1:
    pairs = set(zip(symbols, symbols[1:]))
    best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(symbols):
      if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


def _split_on(text: str, pattern: re.Pattern | None) -> list[tuple[str, bool]]:
  """[(piece, is_special)], the special tokens matched leftmost-longest."""
  if pattern is None:
    return [(text, False)] if text else []
  pieces, start = [], 0
  for match in pattern.finditer(text):
    if match.start() > start:
      pieces.append((text[start : match.start()], False))
    pieces.append((match.group(), True))
    start = match.end()
  if start < len(text):
    pieces.append((text[start:], False))
  return pieces


def _alternation(tokens: Iterable[str]) -> re.Pattern | None:
  tokens = sorted(set(tokens), key=len, reverse=True)  # the longest first: leftmost-longest
  return re.compile("|".join(map(re.escape, tokens))) if tokens else None


class CLIPTokenizer:
  """CLIP's byte-level BPE tokenizer.

  Args:
    vocab: token -> id.
    merges: BPE merges, highest priority first.
    bos_token, eos_token, unk_token, pad_token: special tokens. Stable Diffusion 1.x pads with
      the end token, 2.x with "!" (id 0). All four are matched in the text as whole tokens.
    max_length: the length of the id rows `__call__` returns.
    normalized_special_tokens: special tokens matched after normalisation (so also in upper case)
      instead of in the raw text, as transformers does for tokens saved with `normalized: true`.
  """

  def __init__(
      self,
      vocab: dict[str, int],
      merges: Sequence[tuple[str, str]],
      *,
      bos_token: str = BOS_TOKEN,
      eos_token: str = EOS_TOKEN,
      unk_token: str = EOS_TOKEN,
      pad_token: str = EOS_TOKEN,
      max_length: int = DEFAULT_MAX_LENGTH,
      normalized_special_tokens: Iterable[str] = (),
  ):
    self.encoder = dict(vocab)
    self.merges = [tuple(merge) for merge in merges]
    self.bos_token, self.eos_token = bos_token, eos_token
    self.unk_token, self.pad_token = unk_token, pad_token
    self.max_length = int(max_length)
    self.special_tokens = tuple(dict.fromkeys((bos_token, eos_token, unk_token, pad_token)))
    for token in self.special_tokens:  # a special token missing from the vocabulary gets the next id
      self.encoder.setdefault(token, max(self.encoder.values(), default=-1) + 1)
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.bpe_ranks = {merge: rank for rank, merge in enumerate(self.merges)}
    self.normalized_special_tokens = frozenset(normalized_special_tokens) & set(self.special_tokens)
    raw = [token for token in self.special_tokens if token not in self.normalized_special_tokens]
    self._raw_specials = _alternation(raw)
    self._normalized_specials = _alternation(self.normalized_special_tokens)
    self._cache: dict[str, list[str]] = {}

  # ------------------------------------------------------------------ properties
  @property
  def vocab_size(self) -> int:
    """Number of rows an embedding table needs: the largest id plus one."""
    return max(self.decoder) + 1

  def __len__(self) -> int:
    return self.vocab_size

  @property
  def bos_token_id(self) -> int:
    return self.encoder[self.bos_token]

  @property
  def eos_token_id(self) -> int:
    return self.encoder[self.eos_token]

  @property
  def pad_token_id(self) -> int:
    return self.encoder[self.pad_token]

  @property
  def unk_token_id(self) -> int:
    return self.encoder[self.unk_token]

  # ------------------------------------------------------------------ encoding
  def _bpe(self, word: str) -> list[str]:
    if word not in self._cache:
      if len(self._cache) > 100_000:
        self._cache.clear()
      self._cache[word] = bpe(word, self.bpe_ranks)
    return self._cache[word]

  def tokenize(self, text: str) -> list[str]:
    """Token strings of `text`, without bos/eos."""
    tokens = []
    for raw_piece, raw_special in _split_on(text, self._raw_specials):
      if raw_special:
        tokens.append(raw_piece)
        continue
      for piece, special in _split_on(normalize(raw_piece), self._normalized_specials):
        if special:
          tokens.append(piece)
          continue
        for word in pre_tokenize(piece):
          tokens.extend(self._bpe(to_byte_level(word)))
    return tokens

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos and without padding or truncation."""
    unk = self.unk_token_id
    return [self.encoder.get(token, unk) for token in self.tokenize(text)]

  def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Ids the text encoder expects: bos + tokens + eos, padded with the pad id.

    Text longer than `max_length - 2` tokens is cut, keeping the end token; one warning says
    how many tokens were dropped. Returns int32 [N, max_length] (N = 1 for a single string).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    length = self.max_length if max_length is None else int(max_length)
    ids = np.full((len(texts), length), self.pad_token_id, np.int32)  # [N, L]
    dropped = {}
    for row, text in enumerate(texts):
      tokens = self.encode(text)
      if len(tokens) > length - 2:
        dropped[row] = tokens[length - 2 :]
        tokens = tokens[: length - 2]
      tokens = [self.bos_token_id, *tokens, self.eos_token_id]
      ids[row, : len(tokens)] = tokens
    if dropped:
      warnings.warn(self._truncation_message(dropped, length), stacklevel=2)
    return ids

  def _truncation_message(self, dropped: dict[int, list[int]], length: int) -> str:
    parts = [f"text {row}: {len(ids)} tokens dropped ({self.decode(ids, skip_special_tokens=False)!r})"
             for row, ids in dropped.items()]
    total = sum(len(ids) for ids in dropped.values())
    return (f"Truncated {len(dropped)} text(s) to {length} tokens, {total} token(s) dropped in all; "
            + "; ".join(parts))

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of a sequence of ids; words are separated by single spaces."""
    tokens = [self.decoder[int(i)] for i in np.asarray(ids).reshape(-1)]
    if skip_special_tokens:
      tokens = [token for token in tokens if token not in self.special_tokens]
    byte_decoder = _byte_decoder()
    data = bytearray()
    for char in "".join(tokens):
      if char in byte_decoder:
        data.append(byte_decoder[char])
      else:
        data.extend(char.encode("utf-8"))
    return data.decode("utf-8", "replace").replace(END_OF_WORD, " ").strip()

  # ------------------------------------------------------------------ files
  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike, max_length: int | None = None) -> CLIPTokenizer:
    """Loads a tokenizer folder (vocab.json + merges.txt, or tokenizer.json) or a pipeline's `tokenizer/`.

    The special tokens and `model_max_length` come from tokenizer_config.json and
    special_tokens_map.json when present (pad "!" for Stable Diffusion 2.x).
    """
    directory = _tokenizer_directory(os.fspath(directory))
    config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
    tokenizer_json = _read_json(os.path.join(directory, "tokenizer.json"))
    if os.path.exists(os.path.join(directory, "vocab.json")):
      vocab = _read_json(os.path.join(directory, "vocab.json"))
      merges = _read_merges(os.path.join(directory, "merges.txt"))
    else:
      model = tokenizer_json["model"]
      vocab = model["vocab"]
      merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokens, normalized = _special_tokens(config, special_map, tokenizer_json)
    if max_length is None:
      max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
      if not isinstance(max_length, int) or max_length >= 1 << 20:  # transformers' "no limit"
        max_length = DEFAULT_MAX_LENGTH
    return cls(vocab, merges, **tokens, max_length=max_length, normalized_special_tokens=normalized)

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    vocab = dict(sorted(self.encoder.items(), key=lambda item: item[1]))
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
    names = dict(bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
                 pad_token=self.pad_token)
    # Each special token's id and matching flags, which transformers reads before anything else.
    added = {
        str(self.encoder[token]): {
            "content": token, "lstrip": False, "normalized": token in self.normalized_special_tokens,
            "rstrip": False, "single_word": False, "special": True,
        }
        for token in sorted(self.special_tokens, key=self.encoder.get)
    }
    config = {
        "tokenizer_class": "CLIPTokenizer", **names, "model_max_length": self.max_length, "do_lower_case": True,
        "add_prefix_space": False, "errors": "replace", "added_tokens_decoder": added,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)
    special_map = {key: {k: v for k, v in added[str(self.encoder[token])].items() if k != "special"}
                   for key, token in names.items()}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
      json.dump(special_map, f, indent=2, ensure_ascii=False)

  # ------------------------------------------------------------------ small vocabularies
  @classmethod
  def from_words(cls, words: Iterable[str], max_length: int = DEFAULT_MAX_LENGTH,
                 pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A small vocabulary in which each listed word is one token (for models trained from scratch).

    The vocabulary holds the 256 byte characters with and without `</w>` (so any text still
    tokenizes, falling apart into bytes), the merges that build each word (lowercased; a
    string the CLIP pattern splits, like "don't", gives one token per piece), and the special
    tokens, in CLIP's order.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [char + END_OF_WORD for char in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for text in words:
      for word in pre_tokenize(normalize(text)):
        word = to_byte_level(word)
        # New merges rank after all others, so words already whole stay whole.
        while len(symbols := bpe(word, ranks)) > 1:
          merge = (symbols[0], symbols[1])
          ranks[merge] = len(merges)
          merges.append(merge)
          tokens.append("".join(merge))
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for token in tokens:
      vocab.setdefault(token, len(vocab))
    return cls(vocab, merges, pad_token=pad_token, max_length=max_length)


# ---------------------------------------------------------------------- file helpers
def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_merges(path: str) -> list[tuple[str, str]]:
  """merges.txt: one "left right" pair a line; "#version" header lines are skipped."""
  merges = []
  with open(path, encoding="utf-8") as f:
    for line in f.read().split("\n"):
      line = line.rstrip("\r")
      if not line or line.startswith("#version"):
        continue
      parts = line.split(" ")
      if len(parts) != 2:
        raise ValueError(f"{path}: a merge needs exactly two symbols, got {line!r}")
      merges.append((parts[0], parts[1]))
  return merges


def _tokenizer_directory(directory: str) -> str:
  for candidate in (directory, os.path.join(directory, "tokenizer")):
    if any(os.path.exists(os.path.join(candidate, f)) for f in ("vocab.json", "tokenizer.json")):
      return candidate
  raise FileNotFoundError(f"No vocab.json or tokenizer.json in {directory} or {directory}/tokenizer")


def _content(value: Any) -> str:
  return value["content"] if isinstance(value, dict) else str(value)


def _special_tokens(config: dict, special_map: dict,
                    tokenizer_json: dict | None) -> tuple[dict[str, str], set[str]]:
  """Special tokens and which of them are matched after normalisation, resolved as transformers does.

  Flags come from `added_tokens_decoder` when the config has one, otherwise from
  special_tokens_map.json (which overrides the config) and tokenizer.json's added tokens; a
  token given as a plain string is matched in the raw text. Later names win for shared content.
  """
  defaults = dict(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
  named = {key: config.get(key) or default for key, default in defaults.items()}
  flags: dict[str, bool] = {}
  if "added_tokens_decoder" in config:
    for entry in config["added_tokens_decoder"].values():
      flags[entry["content"]] = entry.get("normalized", not entry.get("special", False))
  else:
    named.update({key: value for key, value in special_map.items() if key in defaults and value})
    for entry in (tokenizer_json or {}).get("added_tokens", []):
      flags[entry["content"]] = entry.get("normalized", not entry.get("special", False))
  normalized = {}
  for value in named.values():
    content = _content(value)
    if content in flags:
      normalized[content] = flags[content]
    else:
      normalized[content] = bool(value.get("normalized", False)) if isinstance(value, dict) else False
  tokens = {key: _content(value) for key, value in named.items()}
  return tokens, {content for content, flag in normalized.items() if flag}
