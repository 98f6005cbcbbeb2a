"""`find_edit_tokens(rule="official")`: the official LUSD code's token positions, bugs included.

Every expected position was worked out by hand from the official rule (module docstring of
`lusd_jax.prompts`), written next to each case as: suffix length; the position-wise differing words;
the prior words (the first `len(target) - suffix - len(differing)` target words) and their token
count; then the running count per differing (and appended) word, `*` marking a noun. Token counts
are those of the bundled CLIP tokenizer: every word here is one token except "necktie" (neck|tie);
"t-shirt" in a prompt is 3 tokens (t, -, shirt) but its words "t shirt" are 2.
"""

import random
import warnings

import pytest

from lusd_jax import prompts
from lusd_jax.tokenizer import EOS_ID, tokenize

# No NLTK data anywhere (conftest): the tagger is the offline one from the textblob-aptagger wheel.
pytestmark = pytest.mark.usefixtures("no_nltk_data")


# Tags as written (case-sensitive), so that each case's working does not depend on the perceptron.
TAGS = {
  **dict.fromkeys(["a", "A", "an", "the", "The"], "DT"),
  **dict.fromkeys(["of", "on", "in", "with", "under", "over"], "IN"),
  **dict.fromkeys(["big", "green", "red", "long"], "JJ"),
  **dict.fromkeys(["wearing", "holding", "sitting", "sleeping"], "VBG"),
  **dict.fromkeys(["Hat", "Mat", "London", "Paris"], "NNP"),
  "two": "CD",
  "and": "CC",
  "quietly": "RB",
  "eyes": "NNS",
  "dogs": "NNS",
}
NOUNS = "cup coffee bottle wine dog grass cat mat rug hat man t shirt necktie blindfold sofa hill dragon"
TAGS.update(dict.fromkeys(NOUNS.split(), "NN"))


def stub_tagger(words):
  return [(w, TAGS[w]) for w in words]  # KeyError: a case uses a word the table lacks


def official(tok, source, target, tagger=stub_tagger, **kw):
  """The official rule, failing on any warning (only uniform or truncated results may warn)."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    return prompts.find_edit_tokens(tok, source, target, tagger=tagger, rule="official", **kw)


def real_tokens(tok, target, positions):
  """The tokens that the text encoder sees at `positions` of the target (BOS = 0)."""
  ids = tokenize(tok, [target])[0]
  return [tok.convert_ids_to_tokens(int(ids[p])).removesuffix("</w>") for p in positions]


# (source, target, differing words, extended words, edit words, positions, real tokens at them)
CASES = [
  # Suffix, then position by position: equal words at the same index are skipped.
  # suffix 0 (wine != coffee); differing bottle, wine (a = a, of = of); prior "a bottle" = 2;
  # bottle 3*, wine 4*. The first mark lands on "of".
  ("a cup of coffee", "a bottle of wine", ("bottle", "wine"), (), ("bottle", "wine"), (3, 4), ["of", "wine"]),
  # suffix 0; differing dog, rug (on, a equal in place); prior "a dog on" = 3; dog 4*, rug 5*.
  ("a cat on a mat", "a dog on a rug", ("dog", "rug"), (), ("dog", "rug"), (4, 5), ["a", "rug"]),
  # An insertion displaces every later word: suffix 1 (grass; green != the); differing big, dog, on,
  # the (all shifted by one) and green (past the source); prior "a" = 1; big 2, dog 3*, on 4, the 5,
  # green 6; "green" is JJ: appended grass 7*. The unchanged "dog" is marked.
  (
    "a dog on the grass",
    "a big dog on the green grass",
    ("big", "dog", "on", "the", "green"),
    ("grass",),
    ("dog", "grass"),
    (3, 7),
    ["dog", "grass"],
  ),
  # The same insertion absorbed by the suffix: suffix 4 (dog on the grass; big != a); differing big;
  # prior "a" = 1; big 2; JJ: appended dog 3*, stopping at the first noun.
  ("a dog on the grass", "a big dog on the grass", ("big",), ("dog",), ("dog",), (3,), ["dog"]),
  # Case-sensitive comparison: suffix 0 (hat != cat); "a" != "A", cat = cat, then wearing, a, hat
  # past the source; prior "a" = 1 (the first, differing, word); a 2, wearing 3, a 4, hat 5*.
  (
    "A cat",
    "a cat wearing a hat",
    ("a", "wearing", "a", "hat"),
    (),
    ("hat",),
    (5,),
    ["hat"],
  ),
  # suffix 0 (mat != Mat); differing dog, mat; prior "a dog on" = 3; dog 4*, mat 5*. Case-insensitive
  # (paper rule) the change is "dog" alone.
  ("a cat on a Mat", "a dog on a mat", ("dog", "mat"), (), ("dog", "mat"), (4, 5), ["a", "mat"]),
  # Case-sensitive article: suffix 1 (hill; The != a); differing dragon, on, The; prior "a" = 1;
  # dragon 2*, on 3, The 4; "The" (DT) is not one of a/an/the: appended hill 5*.
  (
    "a hill",
    "a dragon on The hill",
    ("dragon", "on", "The"),
    ("hill",),
    ("dragon", "hill"),
    (2, 5),
    ["dragon", "hill"],
  ),
  # Punctuation in the prefix: suffix 0 (cup != shirt); differing holding, a, cup; prior "a man in a
  # t shirt" = 6 ("-" not counted); holding 7, a 8, cup 9*. The real "cup" is token 10.
  (
    "a man in a t-shirt",
    "a man in a t-shirt holding a cup",
    ("holding", "a", "cup"),
    (),
    ("cup",),
    (9,),
    ["a"],
  ),
  # Multi-token noun: suffix 0; differing wearing, a, long, red, necktie; prior "a cat" = 2;
  # wearing 3, a 4, long 5, red 6, necktie 6 + 2 = 8*: its last sub-token only.
  (
    "a cat",
    "a cat wearing a long red necktie",
    ("wearing", "a", "long", "red", "necktie"),
    (),
    ("necktie",),
    (8,),
    ["tie"],
  ),
  # A multi-token word in the miscounted prior: suffix 0 (dog != cat); differing necktie, dog;
  # prior "a necktie on" = 1 + 2 + 1 = 4; necktie 6*, dog 7*. The target has 6 tokens: 7 is EOS.
  (
    "a blindfold on a cat",
    "a necktie on a dog",
    ("necktie", "dog"),
    (),
    ("necktie", "dog"),
    (6, 7),
    ["dog", "<|endoftext|>"],
  ),
  # Extension through the suffix: suffix 3 (on a sofa; sleeping != sitting); differing sleeping;
  # prior "a cat" = 2; sleeping 3; VBG: appended on 4, a 5, sofa 6*.
  (
    "a cat sitting on a sofa",
    "a cat sleeping on a sofa",
    ("sleeping",),
    ("on", "a", "sofa"),
    ("sofa",),
    (6,),
    ["sofa"],
  ),
  # The last differing word is IN: no extension. suffix 2 (a hill; min length 2); differing dragon,
  # on; prior "a" = 1; dragon 2*, on 3.
  ("a hill", "a dragon on a hill", ("dragon", "on"), (), ("dragon",), (2,), ["dragon"]),
  # A non-noun with nothing after it: suffix 0; differing quietly (RB); nothing to append: uniform.
  ("a dog sitting", "a dog sitting quietly", ("quietly",), (), (), (), []),
  # The last differing word is an article: no extension (else "mat" would be appended). suffix 1;
  # differing the: uniform.
  ("a cat on a mat", "a cat on the mat", ("the",), (), (), (), []),
  # Only a preposition differs: suffix 2 (a mat); differing under (IN): uniform.
  ("a cat on a mat", "a cat under a mat", ("under",), (), (), (), []),
  # A capitalized noun is NNP, not a noun: suffix 0; differing wearing, a, Hat; "Hat" is neither
  # noun, article nor IN, but nothing follows: uniform (the paper rule tags "hat": token 5).
  ("a cat", "a cat wearing a Hat", ("wearing", "a", "Hat"), (), (), (), []),
  # Empty source: every target word differs (index past the source); prior "" = 0; two 1, dogs 2*.
  ("", "two dogs", ("two", "dogs"), (), ("dogs",), (2,), ["dogs"]),
  ("a cat", "a cat", (), (), (), (), []),
]


@pytest.mark.parametrize(
  "source,target,differing,extended,words,positions,names", CASES, ids=[f"{s!r}->{t!r}" for s, t, *_ in CASES]
)
def test_official_rule(tok, source, target, differing, extended, words, positions, names):
  if positions:
    out = official(tok, source, target)
  else:
    with pytest.warns(UserWarning, match="no edit words found"):
      out = prompts.find_edit_tokens(tok, source, target, tagger=stub_tagger, rule="official")
  assert out.differing_words == differing
  assert out.extended_words == extended
  assert out.edit_words == words
  assert out.positions == positions
  assert out.source == "inferred" and out.dropped_words == ()
  assert real_tokens(tok, target, positions) == names
  assert "official rule" in out.explanation and "\n" not in out.explanation


# (source, target, paper-rule positions with subtokens="last"): the pairs of CASES where a quirk
# moves the official positions off the paper rule's (same stub tags; the paper rule lower-cases).
PAPER_DIFFERS = [
  ("a cup of coffee", "a bottle of wine", (2, 4)),  # position-wise + prior from the count
  ("a cat on a mat", "a dog on a rug", (2, 5)),
  ("a cat on a Mat", "a dog on a mat", (2,)),  # case: "Mat" vs "mat"
  ("a hill", "a dragon on The hill", (2,)),  # case: "The" is an article once lower-cased
  ("a man in a t-shirt", "a man in a t-shirt holding a cup", (10,)),  # "-" counted
  ("a blindfold on a cat", "a necktie on a dog", (3, 6)),  # neck|tie 2-3, dog 6
]


@pytest.mark.parametrize("source,target,paper", PAPER_DIFFERS)
def test_official_differs_from_paper_where_a_quirk_bites(tok, source, target, paper):
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    out = prompts.find_edit_tokens(tok, source, target, subtokens="last", tagger=stub_tagger)
  assert out.positions == paper
  expected = next(c[5] for c in CASES if c[:2] == (source, target))
  assert official(tok, source, target).positions == expected != paper


def test_real_tagger_cases(tok):
  # Tags the working relies on, from the real (offline) tagger.
  assert prompts.pos_tag(["a", "bottle", "of", "wine"]) == [
    ("a", "DT"),
    ("bottle", "NN"),
    ("of", "IN"),
    ("wine", "NN"),
  ]
  assert [t for _, t in prompts.pos_tag("a man in a t shirt holding a cup".split())][-3:] == [
    "VBG",
    "DT",
    "NN",
  ]
  assert prompts.pos_tag(["a", "photo", "of", "London"])[-1] == ("London", "NNP")

  out = official(tok, "a cup of coffee", "a bottle of wine", tagger=None)
  assert out.positions == (3, 4)  # as with the stub: bottle 3*, wine 4*
  out = official(tok, "a man in a t-shirt", "a man in a t-shirt holding a cup", tagger=None)
  assert out.positions == (9,)  # prior 6 tokens without "-"; holding 7, a 8, cup 9*
  # suffix 0; differing London (NNP, not a noun), nothing after it: uniform. Paper: "london" NN, 4.
  with pytest.warns(UserWarning, match="no edit words found"):
    out = prompts.find_edit_tokens(tok, "a photo of Paris", "a photo of London", rule="official")
  assert out.positions == () and out.differing_words == ("London",)
  assert prompts.find_edit_tokens(tok, "a photo of Paris", "a photo of London").positions == (4,)


def test_official_explanation(tok):
  out = official(tok, "a cup of coffee", "a bottle of wine")
  assert out.explanation == (
    'edit words: bottle, wine -> tokens [3, 4] = of, wine (official rule, bug-compatible: differing "bottle '
    'wine"; token 3 is "of", not "bottle")'
  )
  out = official(tok, "a cat sitting on a sofa", "a cat sleeping on a sofa")
  assert out.explanation == (
    'edit words: sofa -> tokens [6] = sofa (official rule, bug-compatible: differing "sleeping", extended '
    'with "on a sofa")'
  )
  # A multi-token noun's last sub-token is the noun's own token: no note.
  assert "not" not in official(tok, "a cat", "a cat wearing a long red necktie").explanation
  with pytest.warns(UserWarning, match="no edit words found"):
    out = prompts.find_edit_tokens(tok, "a cat", "a cat", rule="official")
  assert out.explanation == (
    "no edit words found: uniform mask (no spatial regularization) (official rule, bug-compatible: no "
    "differing words)"
  )


def test_official_difference_is_pure_and_case_sensitive():
  tags = lambda words: [TAGS[w] for w in words]
  t = ["a", "bottle", "of", "wine"]
  d = prompts.official_difference(["a", "cup", "of", "coffee"], t, tags(t))
  assert d == (("a", "bottle"), ("bottle", "wine"), (), (True, True))
  t = ["a", "big", "dog", "on", "the", "grass"]
  d = prompts.official_difference(["a", "dog", "on", "the", "grass"], t, tags(t))
  assert d == (("a",), ("big",), ("dog",), (False, True))
  t = ["a", "cat"]
  assert prompts.official_difference(["A", "cat"], t, tags(t)).differing_words == ("a",)
  with pytest.raises(ValueError, match="tags"):
    prompts.official_difference(["a"], ["a", "cat"], ["DT"])


# ---------------------------------------------------------------------------- the 77-token limit


def test_official_positions_at_and_past_the_limit(tok):
  # No punctuation, one token per word: the count is the real position.
  # 72 x "cat" equal, then with 73, a 74, hat 75*: the last visible content token.
  target = "cat " * 72 + "with a hat"
  out = official(tok, "cat " * 72, target)
  assert out.positions == (75,) and real_tokens(tok, target, [75]) == ["hat"]
  # 74 x "cat": with 75, a 76, hat 77*: past the limit, dropped with the warning.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = prompts.find_edit_tokens(
      tok, "cat " * 74, "cat " * 74 + "with a hat", tagger=stub_tagger, rule="official"
    )
  messages = [str(w.message) for w in caught]
  assert out.positions == () and out.dropped_words == ("hat",)
  assert any("77-token limit" in m and "hat" in m for m in messages)
  assert any("no edit words found" in m for m in messages)
  assert "dropped past the 77-token limit: hat" in out.explanation


def test_official_count_skips_commas_of_a_long_prompt(tok):
  # 76 content tokens, 13 of them commas ("birdhouse" is bird|house); the target appends "with a
  # garden gnome" (real tokens 77..80, past the limit: the paper rule drops both nouns).
  base = (
    "a highly detailed photograph of a quiet garden in the early morning, with tall green hedges, a stone "
    "path, wooden benches, blooming roses, lavender bushes, a small fountain, hanging lanterns, soft "
    "golden light, morning dew on the grass, a red brick wall, ivy on the wall, butterflies over the "
    "flowers, a wooden birdhouse on a pole and a cat on the bench"
  )
  assert base.count(",") == 13 and len(tok.tokenize(base)) == 76
  target = base + " with a garden gnome"
  # suffix 0; all base words equal, then with, a, garden, gnome; prior = the base words = 76 - 13
  # = 63; with 64, a 65, garden 66*, gnome 67*: inside the limit, on tokens of the base.
  tagger = lambda words: [(w, "NN" if w in ("garden", "gnome") else "DT") for w in words]
  out = official(tok, base, target, tagger=tagger)
  assert out.positions == (66, 67)
  # Real tokens: ... 62 flowers, 63 ",", 64 a, 65 wooden, 66 bird, 67 house, 68 on ...
  assert real_tokens(tok, target, [66, 67]) == ["bird", "house"]
  assert 'token 66 is "bird", not "garden", token 67 is "house", not "gnome"' in out.explanation


# ------------------------------------------------------------------------ overrides and arguments


def test_overrides_ignore_the_rule(tok):
  for kw in ({"edit_words": "hat"}, {"edit_words": ["party", "hat"]}, {"token_positions": [5, 6]}):
    paper = prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat", **kw)
    assert prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat", rule="official", **kw) == paper
  out = official(tok, "a cup of coffee", "a bottle of wine", edit_words="bottle")
  assert (out.positions, out.source) == ((2,), "edit_words")


def test_subtokens_does_not_change_official_inference(tok):
  pair = ("a cat", "a cat wearing a long red necktie")
  assert official(tok, *pair, subtokens="all") == official(tok, *pair, subtokens="last")


def test_bad_rule(tok):
  for rule in ("Official", "lusd", ""):
    with pytest.raises(ValueError, match="'paper' or 'official'"):
      prompts.find_edit_tokens(tok, "a cat", "a cat in a hat", rule=rule)


def test_default_rule_is_paper(tok):
  for source, target in [("a cup of coffee", "a bottle of wine"), ("a man", "a man wearing a t-shirt")]:
    assert prompts.find_edit_tokens(tok, source, target) == prompts.find_edit_tokens(
      tok, source, target, rule="paper"
    )


# ---------------------------------------------------------------------------- property: agreement

SINGLE_NOUNS = ["cat", "dog", "hat", "cup", "sofa", "tree", "car", "bird", "rug", "boat", "lamp", "chair"]
TEMPLATES = [
  ["a", 0, "on", "the", 1],
  ["two", 0, "and", "a", 1, "near", "the", 2],
  ["a", 0],
  [0, "with", "a", 1],
]


def _substitution_pairs(rng, count):
  """Same-length pairs of lower-case single-token words differing in one noun slot, no punctuation."""
  pairs = []
  for _ in range(count):
    template = rng.choice(TEMPLATES)
    slots = sorted({x for x in template if isinstance(x, int)})
    fill = rng.sample(SINGLE_NOUNS, len(slots) + 1)
    source = [fill[x] if isinstance(x, int) else x for x in template]
    k = rng.choice([i for i, x in enumerate(template) if isinstance(x, int)])
    target = source[:k] + [fill[-1]] + source[k + 1 :]
    pairs.append((" ".join(source), " ".join(target), k + 1))
  return pairs


@pytest.mark.parametrize("tagger", [None, lambda ws: [(w, "NN" if w in SINGLE_NOUNS else "DT") for w in ws]])
def test_official_equals_paper_last_on_single_noun_substitutions(tok, tagger):
  words = sorted({w for t in TEMPLATES for w in t if isinstance(w, str)} | set(SINGLE_NOUNS))
  assert all(len(tok.tokenize(w)) == 1 for w in words)  # the premise: one token per word
  pairs = _substitution_pairs(random.Random(0), 150)
  assert len({p[:2] for p in pairs}) > 100
  for source, target, changed in pairs:
    with warnings.catch_warnings(record=True):  # the real tagger may tag a noun otherwise: uniform
      warnings.simplefilter("always")
      paper = prompts.find_edit_tokens(tok, source, target, subtokens="last", tagger=tagger)
      out = prompts.find_edit_tokens(tok, source, target, tagger=tagger, rule="official")
    assert out[:-1] == paper[:-1], (source, target)  # everything but the explanation
    if tagger is not None:
      assert out.positions == (changed,)


def test_property_pairs_cover_every_slot():
  seen = {(len(s.split()), k) for s, _, k in _substitution_pairs(random.Random(0), 150)}
  expected = {(len(t), i + 1) for t in TEMPLATES for i, x in enumerate(t) if isinstance(x, int)}
  assert seen == expected


def test_eos_id_is_what_an_overshooting_count_marks(tok):
  # The overshoot case above marks the text encoder's EOS token, not padding of another id.
  ids = tokenize(tok, ["a necktie on a dog"])[0]
  assert int(ids[7]) == EOS_ID
  assert official(tok, "a blindfold on a cat", "a necktie on a dog").positions[-1] == 7
