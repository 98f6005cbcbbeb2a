"""Edit-token detection: which CLIP tokens of the target prompt name what the edit introduces.

(Over 450 lines on purpose: the paper rule, the official rule and the word -> token mapping they
share are one job and read best side by side; most of the length is the rules' documentation.)

LUSD builds its spatial mask from the cross-attention of the nouns that the edit adds or changes
(LUSD supplementary Sec. 6.1). This module turns a (source, target) prompt pair into those token
positions, offline and deterministically, and says in one line what it did. Two rules infer them:
`rule="paper"` (the default, this project's reading of Sec. 6.1) and `rule="official"` (the official
code, reproduced bugs included). Both use the same words, tagger and noun tags.

The paper rule:

  1. Split both prompts into words (`\\w+`); drop the longest common prefix, then the longest common
     suffix of what remains (compared case-insensitively, because CLIP lower-cases its input). The
     target words left over are the *differing substring*.
  2. POS-tag the target's words (NLTK's averaged perceptron); nouns are NN or NNS.
  3. If the substring's last word is not a noun, an article (a, an, the) or a preposition (IN), extend
     it with the following target words until a noun is included ("a dog" -> "a red dog" gives "red",
     extended to "red dog").
  4. The edit words are the nouns of that (extended) substring; each maps to the positions of its
     sub-tokens in the CLIP tokenization of the actual target prompt (BOS at position 0), found by
     character offsets so punctuation ("t-shirt", "dog's") cannot shift the count. All sub-tokens by
     default; `subtokens="last"` keeps the last one, as the official LUSD code does.

The official rule (`sincostanx/LUSD`, `colocation/prompt_utils.py`: `find_prompt_difference` and
`compute_target_index`) is bug-compatible: it yields the positions that code yields, for comparing
results with the released implementation. Its quirks, each of which the paper rule avoids:
  - Suffix, then position by position: it removes the longest common suffix only, then marks every
    remaining target word that differs from the source word *at the same index* (or has none). Words
    equal at the same index are skipped even inside the change; an insertion displaces later words,
    which then differ.
  - Case-sensitive: words are compared as written ("A" != "a"), tagged as written (a capitalized noun
    is usually NNP, so not a noun), and only lower-case "a", "an", "the" count as articles.
  - The tokens before the first marked word are counted from the first `len(target) - suffix -
    len(differing)` target words, i.e. from the *number* of differing words, not from where they are:
    "a cup of coffee" -> "a bottle of wine" differs in "bottle" and "wine", counts "a bottle" first,
    and marks tokens 3 ("of") and 4 ("wine").
  - Token counts come from the space-joined words, so punctuation before the change is not counted
    ("a man in a t-shirt holding a cup" marks token 9, "a", not 10, "cup": "t-shirt" is 3 tokens).
  - One position per noun: its last sub-token in that count (`subtokens` does not apply).
  Positions outside 1..75 are dropped with a warning (the official code would index past the visible
  tokens); a count that overshoots the prompt's last token but stays within 75 marks EOS or padding,
  as the official code does. The explanation names the real tokens marked, so a shifted position
  shows.

Deliberate differences of the paper rule from the official code, which it otherwise follows: the
differing substring is the contiguous middle, positions come from character offsets, and words are
tagged lower-cased (CLIP sees "A Cat Wearing A Party Hat" exactly as "a cat wearing a party hat", but
the tagger calls every capitalized word a proper noun (NNP), which would silently yield no mask).

Which occurrence of a repeated word? Inferred edit words are taken by their index inside the
differing substring, so "a cat" -> "a cat and a cat" marks the second "cat" only. For `edit_words`
given by the user, occurrences inside the differing substring win; a word that does not occur there
marks all its occurrences in the target. `edit_words=` and `token_positions=` work the same under
both rules.

The tagger runs offline: NLTK's installed `averaged_perceptron_tagger_eng` data when present, else
the averaged-perceptron model shipped inside the `textblob-aptagger` wheel (MIT), loaded into NLTK's
`PerceptronTagger` (same features, same model format). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import re
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from lusd_jax.tokenizer import MAX_LENGTH, tokenize

NOUN_TAGS = ("NN", "NNS")
ARTICLES = ("a", "an", "the")
PREPOSITION_TAG = "IN"
RULES = ("paper", "official")
# Content tokens sit at 1..75: position 0 is BOS and position 76 is EOS once a prompt is truncated.
LAST_CONTENT_POSITION = MAX_LENGTH - 2
NO_EDIT_NOTICE = "no edit words found: uniform mask (no spatial regularization)"

_WORD_RE = re.compile(r"\w+")
_NLTK_TAGGER_RESOURCE = "taggers/averaged_perceptron_tagger_eng/"
_BUNDLED_PICKLE = "trontagger-0.1.0.pickle"
# OpenAI CLIP's pre-tokenization pattern (`SimpleTokenizer.pat`, also transformers' CLIPTokenizer).
_CLIP_PAT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


class EditTokens(NamedTuple):
  """Which target-prompt tokens localize the edit, and why.

  `positions` index the target's CLIP token ids `[77]` (BOS at 0), ready to select cross-attention
  columns. Empty `positions` means LUSD without spatial regularization: a uniform mask.
  """

  # Target words left after removing the common prefix/suffix; under rule="official", the target
  # words that differ position by position after removing the common suffix.
  differing_words: tuple[str, ...]
  extended_words: tuple[str, ...]  # words appended by the "extend until a noun" rule (often empty)
  edit_words: tuple[str, ...]  # the nouns (or the user's words) whose tokens are marked
  positions: tuple[int, ...]  # sorted, unique, each in [1, 75]
  dropped_words: tuple[str, ...]  # edit words whose tokens fall past the 77-token limit
  source: str  # "inferred" | "edit_words" | "positions"
  explanation: str  # one line for the CLI, e.g. 'edit words: hat -> tokens [4] (inferred: ...)'

  @property
  def uniform(self) -> bool:
    """True when no token is marked: the caller uses a uniform spatial mask."""
    return not self.positions

  def token_mask(self, length: int = MAX_LENGTH) -> np.ndarray:
    """`[length]` float32, 1 at `positions` (all zeros when `uniform`)."""
    return token_mask(self.positions, length)


def token_mask(positions: Sequence[int], length: int = MAX_LENGTH) -> np.ndarray:
  """Indicator over token positions, used to pick the edit tokens' cross-attention maps.

  Args:
    positions: token indices in `[0, length)`.
    length: number of text tokens (77 for Stable Diffusion).

  Returns:
    `[length]` float32 with 1 at `positions`, 0 elsewhere. All zeros for no positions: callers
    then fall back to a uniform spatial mask (LUSD without spatial regularization).
  """
  mask = np.zeros((length,), np.float32)
  for p in positions:
    if not 0 <= int(p) < length:
      raise ValueError(f"token position {p} is outside [0, {length})")
    mask[int(p)] = 1.0
  return mask


# ----------------------------------------------------------------------------------------- tagger


def _bundled_model_path() -> str | None:
  """The textblob-aptagger pickle, located without importing the package (its import is broken)."""
  try:
    spec = importlib.util.find_spec("textblob_aptagger")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, _BUNDLED_PICKLE)
    if os.path.isfile(path):
      return path
  return None


@functools.lru_cache(maxsize=4)
def _nltk_tagger(resource_path: str):
  from nltk.tag.perceptron import PerceptronTagger

  del resource_path  # the cache key: a different NLTK data dir loads afresh
  return PerceptronTagger()


@functools.lru_cache(maxsize=4)
def _bundled_tagger(pickle_path: str):
  from nltk.tag.perceptron import PerceptronTagger

  # A Python 2 pickle of plain dicts/sets: (feature -> {tag: weight}, word -> tag, tags). The file
  # comes from an installed wheel, never from user input or the network.
  with open(pickle_path, "rb") as f:
    weights, tagdict, classes = pickle.load(f, encoding="latin1")
  tagger = PerceptronTagger(load=False)
  tagger.model.weights = weights
  tagger.tagdict = tagdict
  tagger.classes = tagger.model.classes = set(classes)
  return tagger


def load_tagger():
  """NLTK's averaged-perceptron POS tagger, loaded offline.

  Uses NLTK's installed `averaged_perceptron_tagger_eng` data when `nltk.data` finds it, otherwise
  the model in the `textblob-aptagger` wheel. The lookup runs on every call (so a changed
  `nltk.data.path` is honoured); the loaded models are cached.

  Returns:
    An `nltk.tag.perceptron.PerceptronTagger`.

  Raises:
    LookupError: neither model is installed; the message says how to get one, or how to skip
      inference with `edit_words=` / `token_positions=`.
  """
  import nltk

  try:
    found = nltk.data.find(_NLTK_TAGGER_RESOURCE)
  except LookupError:
    found = None
  if found is not None:
    return _nltk_tagger(str(found))
  path = _bundled_model_path()
  if path is not None:
    return _bundled_tagger(path)
  raise LookupError(
    "No part-of-speech tagger for edit-word detection. Install one offline-usable model: "
    "`pip install textblob-aptagger` (ships the model in its wheel) or "
    "`python -m nltk.downloader averaged_perceptron_tagger_eng`; or skip detection by passing "
    "edit_words='...' (words of the target prompt) or token_positions=[...]."
  )


def pos_tag(words: Sequence[str]) -> list[tuple[str, str]]:
  """Penn Treebank tags for a list of words, as `nltk.pos_tag` gives them, without NLTK data.

  Args:
    words: tokens of one sentence, e.g. `["a", "cat", "wearing", "a", "hat"]`.

  Returns:
    `[(word, tag), ...]`, e.g. `[("a", "DT"), ("cat", "NN"), ("wearing", "VBG"), ...]`.
  """
  if isinstance(words, str):
    raise TypeError("pos_tag expects a list of words, not a string")
  return [(w, t) for w, t in load_tagger().tag(list(words))]


# ---------------------------------------------------------------------------- words -> token ids


def _offset_spans(tokenizer, text: str) -> list[tuple[int, int]]:
  """Character span of every content token, from a fast tokenizer's offset mapping."""
  enc = tokenizer(text, truncation=False, return_offsets_mapping=True, verbose=False)
  ids, offsets = enc["input_ids"], enc["offset_mapping"]
  if not ids or ids[0] != tokenizer.bos_token_id or ids[-1] != tokenizer.eos_token_id:
    raise ValueError("expected a CLIP tokenizer that adds <|startoftext|> and <|endoftext|>")
  return [tuple(o) for o in offsets[1:-1]]


def _regex_spans(tokenizer, text: str) -> list[tuple[int, int]]:
  """Token spans without offsets (slow tokenizers): CLIP's pre-tokenizer regex, BPE per piece.

  Each piece's sub-tokens share the piece's span. A letter piece lies inside one `\\w+` word; only a
  run of punctuation (which may hold "_") can touch two. Verified against the whole-text tokens.
  """
  import regex

  spans, pieces = [], []
  for m in regex.finditer(_CLIP_PAT, text, flags=regex.IGNORECASE):
    toks = tokenizer.tokenize(m.group())
    pieces += toks
    spans += [(m.start(), m.end())] * len(toks)
  if pieces != tokenizer.tokenize(text):
    raise ValueError(
      "could not align CLIP tokens with the prompt's characters (the tokenizer cleans the text in "
      "a way the CLIP pattern does not reproduce); pass token_positions=[...] instead"
    )
  return spans


def token_spans(tokenizer, text: str, method: str = "auto") -> list[tuple[int, int]]:
  """Character span in `text` of each content token of its CLIP tokenization (no BOS/EOS).

  Args:
    tokenizer: a CLIP tokenizer (transformers `CLIPTokenizer` / `CLIPTokenizerFast`).
    text: the prompt, untruncated.
    method: "offsets" (fast tokenizers' offset mapping), "regex" (reproduce CLIP's
      pre-tokenization; for slow tokenizers) or "auto" (offsets when available).

  Returns:
    `[(start, end), ...]`, one per token; token `k` of the list sits at position `k + 1`.
  """
  if method == "auto":
    method = "offsets" if getattr(tokenizer, "is_fast", False) else "regex"
  if method == "offsets":
    return _offset_spans(tokenizer, text)
  if method == "regex":
    return _regex_spans(tokenizer, text)
  raise ValueError(f"method must be 'auto', 'offsets' or 'regex', got {method!r}")


def word_token_positions(tokenizer, text: str, method: str = "auto") -> list[tuple[int, ...]]:
  """Token positions (BOS = 0) of every `\\w+` word of `text`, in word order, untruncated.

  A word owns every token whose characters overlap it: "t-shirt" is the words "t" and "shirt"
  (tokens "t", "-", "shirt"; the "-" belongs to neither), "dog's" is "dog" and "s" (tokens "dog",
  "'s"). Positions may exceed 76 for long prompts; callers drop those.

  Example: `word_token_positions(tok, "a cat's hat")` -> `[(1,), (2,), (3,), (4,)]`.
  """
  spans = token_spans(tokenizer, text, method)
  out = []
  for m in _WORD_RE.finditer(text):
    s, e = m.span()
    out.append(tuple(k + 1 for k, (ts, te) in enumerate(spans) if ts < e and te > s))
  return out


# ------------------------------------------------------------------------------- the LUSD rule


def _words(text: str) -> list[str]:
  return _WORD_RE.findall(text)


def differing_span(source_words: Sequence[str], target_words: Sequence[str]) -> tuple[int, int]:
  """`[start, end)` of the target words left after removing the common prefix and suffix.

  Prefix first, then the suffix of what remains, so the two never overlap: for "a cat" -> "a cat
  and a cat" the span is "and a cat" (the addition), not "a cat and". Case-insensitive.
  """
  s = [w.lower() for w in source_words]
  t = [w.lower() for w in target_words]
  n = min(len(s), len(t))
  p = 0
  while p < n and s[p] == t[p]:
    p += 1
  q = 0
  while q < n - p and s[len(s) - 1 - q] == t[len(t) - 1 - q]:
    q += 1
  return p, len(t) - q


class OfficialDifference(NamedTuple):
  """What the official LUSD code finds in a prompt pair (`find_prompt_difference`), quirks included."""

  prior_words: tuple[str, ...]  # target words whose tokens are counted before the first marked word
  differing_words: tuple[str, ...]  # target words differing at the same index, after the common suffix
  extended_words: tuple[str, ...]  # suffix words appended up to the first noun (often empty)
  is_noun: tuple[bool, ...]  # one per differing word, then per extended word


def official_difference(
  source_words: Sequence[str], target_words: Sequence[str], target_tags: Sequence[str]
) -> OfficialDifference:
  """The official code's differing words, reproduced bug for bug (see the module docstring).

  Args:
    source_words: `\\w+` words of the source prompt, as written.
    target_words: `\\w+` words of the target prompt, as written.
    target_tags: one POS tag per target word, tagged as written (case-sensitive).

  Returns:
    An `OfficialDifference`. Example: `["a", "cup", "of", "coffee"]` -> `["a", "bottle", "of",
    "wine"]` gives differing `("bottle", "wine")` but prior `("a", "bottle")`: the prior is the first
    `len(target) - suffix - len(differing)` words, wherever the differing words are.
  """
  s, t = list(source_words), list(target_words)
  if len(target_tags) != len(t):
    raise ValueError(f"expected {len(t)} tags, got {len(target_tags)}")
  suffix = 0
  while suffix < min(len(s), len(t)) and s[-1 - suffix] == t[-1 - suffix]:  # exact, case-sensitive
    suffix += 1
  head = len(t) - suffix
  diff = [i for i in range(head) if i >= len(s) or s[i] != t[i]]  # position by position
  is_noun = [target_tags[i] in NOUN_TAGS for i in diff]
  extended: list[str] = []
  if diff:
    last = diff[-1]
    if not is_noun[-1] and t[last] not in ARTICLES and target_tags[last] != PREPOSITION_TAG:
      for i in range(head, len(t)):  # into the common suffix, up to and including the first noun
        extended.append(t[i])
        is_noun.append(target_tags[i] in NOUN_TAGS)
        if is_noun[-1]:
          break
  return OfficialDifference(
    prior_words=tuple(t[: head - len(diff)]),
    differing_words=tuple(t[i] for i in diff),
    extended_words=tuple(extended),
    is_noun=tuple(is_noun),
  )


def _official_positions(tokenizer, diff: OfficialDifference) -> list[tuple[str, int]]:
  """(noun, position) pairs as `compute_target_index` counts them: BPE tokens of each word alone."""
  counter = len(tokenizer.tokenize(" ".join(diff.prior_words)))
  out = []
  for word, noun in zip(diff.differing_words + diff.extended_words, diff.is_noun, strict=True):
    counter += len(tokenizer.tokenize(word))
    if noun:
      out.append((word, counter))
  return out


def _positions_of(
  word_positions: list[tuple[int, ...]], indices: Sequence[int], words: Sequence[str], subtokens: str
) -> tuple[list[int], list[str], list[str]]:
  """Positions of the words at `indices`; words past the 77-token limit are dropped, not cut."""
  positions, kept, dropped = [], [], []
  for i in indices:
    pos = word_positions[i]
    if not pos:  # a word CLIP drops entirely (cannot happen for \w+ text, but never guess)
      dropped.append(words[i])
      continue
    if max(pos) > LAST_CONTENT_POSITION:
      dropped.append(words[i])
      continue
    positions += list(pos) if subtokens == "all" else [pos[-1]]
    kept.append(words[i])
  return positions, kept, dropped


def find_edit_tokens(
  tokenizer,
  source_prompt: str,
  target_prompt: str,
  edit_words: str | Sequence[str] | None = None,
  token_positions: Sequence[int] | None = None,
  subtokens: str = "all",
  *,
  tagger: Callable[[list[str]], list[tuple[str, str]]] | None = None,
  rule: str = "paper",
) -> EditTokens:
  """The CLIP token positions of the edited nouns of a prompt pair (LUSD supp. Sec. 6.1).

  Args:
    tokenizer: the CLIP tokenizer that encodes `target_prompt` for the U-Net.
    source_prompt: describes the input image ("" is allowed).
    target_prompt: describes the wanted image; positions index its tokenization.
    edit_words: skip inference and mark these words instead, e.g. "party hat" or
      ["party", "hat"]; each must occur in the target prompt (case-insensitive).
    token_positions: skip inference and mark these positions (BOS = 0; each must be a content
      token of the target within the 77-token limit).
    subtokens: "all" marks every sub-token of a word ("necktie" -> "neck", "tie"); "last" marks the
      last one only, as the official LUSD code does. Ignored by `rule="official"` inference.
    tagger: POS tagger `words -> [(word, tag)]`; default `pos_tag` (offline NLTK perceptron).
    rule: how inference picks the tokens: "paper" (the project's rule) or "official" (the official
      LUSD code's positions, bugs included; see the module docstring). Overrides ignore it.

  Returns:
    An `EditTokens`; `explanation` is one line meant to be printed before editing. When no edit
    word is found, `positions` is empty (uniform mask) and a `UserWarning` says so.

  Example:
    >>> find_edit_tokens(tok, "a cat", "a cat wearing a party hat").positions
    (5, 6)
    >>> find_edit_tokens(tok, "a cup of coffee", "a bottle of wine", rule="official").positions
    (3, 4)
  """
  if subtokens not in ("all", "last"):
    raise ValueError(f"subtokens must be 'all' or 'last', got {subtokens!r}")
  if rule not in RULES:
    raise ValueError(f"rule must be 'paper' or 'official', got {rule!r}")
  if edit_words is not None and token_positions is not None:
    raise ValueError("pass edit_words or token_positions, not both")
  source_prompt = source_prompt or ""
  target_prompt = target_prompt or ""
  src = _words(source_prompt)
  matches = list(_WORD_RE.finditer(target_prompt))
  tgt = [m.group() for m in matches]
  start, end = differing_span(src, tgt)
  differing = tuple(tgt[start:end])

  def quote(i: int, j: int) -> str:  # the target's own text for words i..j-1, punctuation included
    return '"' + target_prompt[matches[i].start() : matches[j - 1].end()] + '"'

  if token_positions is not None:
    return _given_positions(tokenizer, target_prompt, differing, token_positions)

  if edit_words is None and rule == "official":
    *found, why, shown = _infer_official(tokenizer, src, tgt, target_prompt, tagger or pos_tag)
    return _edit_tokens(*found, "inferred", why, shown)

  word_positions = word_token_positions(tokenizer, target_prompt)
  extended: list[str] = []
  if edit_words is not None:
    indices = _given_word_indices(edit_words, tgt, start, end, target_prompt)
    source, why = "edit_words", "given by edit_words"
  else:
    tags = [t for _, t in (tagger or pos_tag)([w.lower() for w in tgt])]
    span_end = end
    if start < end:
      last, last_tag = tgt[end - 1].lower(), tags[end - 1]
      if last_tag not in NOUN_TAGS and last not in ARTICLES and last_tag != PREPOSITION_TAG:
        # Supp. Sec. 6.1: an edit ending in e.g. an adjective ("a red dog") names a noun further on.
        while span_end < len(tgt):
          span_end += 1
          if tags[span_end - 1] in NOUN_TAGS:
            break
        extended = tgt[end:span_end]
    indices = [i for i in range(start, span_end) if tags[i] in NOUN_TAGS]
    source = "inferred"
    why = f"inferred: differing {quote(start, end)}" if differing else "inferred: no differing words"
    if extended:
      why += f", extended to {quote(start, span_end)}"

  positions, kept, dropped = _positions_of(word_positions, indices, tgt, subtokens)
  return _edit_tokens(differing, extended, positions, kept, dropped, source, why, "")


def _infer_official(tokenizer, src: list[str], tgt: list[str], target_prompt: str, tagger):
  """Inference by the official code's rule: (differing, extended, positions, kept, dropped, why, shown)."""
  tags = [t for _, t in tagger(list(tgt))]  # words as written, as the official code tags them
  diff = official_difference(src, tgt, tags)
  ids = [int(i) for i in tokenize(tokenizer, [target_prompt])[0]]  # [77], as the text encoder sees it
  positions, kept, dropped, wrong = [], [], [], []
  for word, p in _official_positions(tokenizer, diff):
    # Past 75 the official code indexes EOS or beyond the 77 tokens: dropped, as the paper rule does.
    # Short of it the count may still pass the prompt's last word (onto EOS/padding): kept, as there.
    if not 1 <= p <= LAST_CONTENT_POSITION:
      dropped.append(word)
      continue
    positions.append(p)
    kept.append(word)
    # The count can land off the noun (see the module docstring): say which token is marked instead.
    if tokenizer.convert_ids_to_tokens(ids[p]) not in tokenizer.tokenize(word)[-1:]:
      wrong.append(f'token {p} is "{_token_text(tokenizer, ids[p])}", not "{word}"')
  differing = diff.differing_words
  why = "official rule, bug-compatible: " + (
    f'differing "{" ".join(differing)}"' if differing else "no differing words"
  )
  if diff.extended_words:
    why += f', extended with "{" ".join(diff.extended_words)}"'
  if wrong:
    why += "; " + ", ".join(wrong)
  shown = " = " + ", ".join(_token_text(tokenizer, ids[p]) for p in sorted(set(positions)))
  return differing, diff.extended_words, positions, kept, dropped, why, shown


def _token_text(tokenizer, token_id: int) -> str:
  """One token as text, e.g. "tie" for "tie</w>" and "café" for its byte-level spelling."""
  return (
    tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])
    .replace("</w>", "")
    .strip()
  )


def _edit_tokens(differing, extended, positions, kept, dropped, source, why, shown) -> EditTokens:
  """The record, its one-line explanation and its warnings (caller of `find_edit_tokens` blamed)."""
  positions = sorted(set(positions))
  if dropped:
    warnings.warn(
      f"edit words past CLIP's {MAX_LENGTH}-token limit are ignored: {', '.join(dropped)}",
      UserWarning,
      stacklevel=3,
    )
  if positions:
    explanation = f"edit words: {', '.join(kept)} -> tokens {positions}{shown} ({why})"
  else:
    explanation = f"{NO_EDIT_NOTICE} ({why})"
  if dropped:
    explanation += f"; dropped past the {MAX_LENGTH}-token limit: {', '.join(dropped)}"
  if not positions:
    warnings.warn(explanation, UserWarning, stacklevel=3)
  return EditTokens(
    differing_words=tuple(differing),
    extended_words=tuple(extended),
    edit_words=tuple(kept),
    positions=tuple(positions),
    dropped_words=tuple(dropped),
    source=source,
    explanation=explanation,
  )


def _given_word_indices(
  edit_words: str | Sequence[str], tgt: list[str], start: int, end: int, target_prompt: str
) -> list[int]:
  """Target word indices for user-given edit words; differing-substring occurrences win."""
  if isinstance(edit_words, str):
    edit_words = [edit_words]
  wanted = [w for phrase in edit_words for w in _words(phrase)]
  if not wanted:
    raise ValueError(f"edit_words {edit_words!r} contains no words")
  lowered = [w.lower() for w in tgt]
  indices: list[int] = []
  for w in wanted:
    hits = [i for i, t in enumerate(lowered) if t == w.lower()]
    if not hits:
      raise ValueError(
        f"edit word {w!r} does not occur in the target prompt {target_prompt!r} "
        f"(its words: {', '.join(dict.fromkeys(t.lower() for t in tgt)) or 'none'})"
      )
    inside = [i for i in hits if start <= i < end]
    indices += inside or hits
  return sorted(set(indices))


def _given_positions(tokenizer, target_prompt: str, differing: tuple[str, ...], token_positions):
  n_content = min(len(token_spans(tokenizer, target_prompt)), LAST_CONTENT_POSITION)
  positions = []
  for p in token_positions:
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
      raise TypeError(f"token positions must be integers, got {p!r}")
    if not 1 <= p <= n_content:
      raise ValueError(
        f"token position {p} is not a content token of the target prompt: BOS is 0 and its "
        f"{n_content} visible tokens are at 1..{n_content}"
      )
    positions.append(int(p))
  if not positions:
    raise ValueError("token_positions is empty; pass None to infer edit tokens")
  positions = sorted(set(positions))
  ids = tokenizer(target_prompt, truncation=False, verbose=False)["input_ids"]
  names = " ".join(
    t.removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens([ids[p] for p in positions])
  )
  return EditTokens(
    differing_words=differing,
    extended_words=(),
    edit_words=(),
    positions=tuple(positions),
    dropped_words=(),
    source="positions",
    explanation=f"edit tokens {positions} ({names}) (given as token positions)",
  )
