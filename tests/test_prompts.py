"""Edit-token detection (LUSD supp. Sec. 6.1) on real prompt pairs and the real CLIP tokenizer.

Every expected position below was read off the bundled CLIP tokenizer's output by eye (BOS = 0),
and every expected edit word follows the rule from the target's POS tags. The whole module runs
with NLTK pointed at an empty data directory, so the tagger is the offline one.
"""

import json
import sys
import warnings

import nltk
import numpy as np
import pytest
from nltk.tag.perceptron import PerceptronTagger

from lusd_jax import prompts
from lusd_jax.tokenizer import BOS_ID, EOS_ID, tokenize

# No NLTK data anywhere (conftest): the tagger is the offline one from the textblob-aptagger wheel.
pytestmark = pytest.mark.usefixtures("no_nltk_data")


def _find(tok, source, target, **kw):
  """find_edit_tokens, failing on any warning (only uniform or truncated results may warn)."""
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    return prompts.find_edit_tokens(tok, source, target, **kw)


# (source, target, expected edit words, expected positions). Positions: BOS = 0.
CASES = [
  # The official LUSD samples (samples/index.csv).
  ("a cat", "a cat wearing a party hat", ("party", "hat"), (5, 6)),
  ("a cup of coffee", "a cup of matcha", ("matcha",), (4,)),
  ("", "thunder", ("thunder",), (1,)),
  ("a glass of lemon tea", "a glass of lemon tea with a straw", ("straw",), (8,)),
  ("a snowman", "a snowman with a scarf", ("scarf",), (5,)),
  ("pizza", "seafood pizza", ("seafood",), (1,)),
  ("a photo of sky", "a photo of sky with a flying airplane", ("airplane",), (8,)),
  ("a chinese lion statue", "a chinese lion wearing a sunglasses", ("sunglasses",), (6,)),
  ("a cat", "a cat wearing a long red necktie", ("necktie",), (7, 8)),  # neck|tie
  ("a walkway", "a walkway and a rabbit", ("rabbit",), (5,)),
  # "t-shirt" is 3 tokens (t, -, shirt): google at 11, logo at 12.
  (
    "a man wearing a red t-shirt",
    "a man wearing a red t-shirt with a google logo",
    ("google", "logo"),
    (11, 12),
  ),
  ("a notebook", "a masterpiece drawing of pikachu", ("drawing", "pikachu"), (3, 5)),
  ("food", "wagyu steak", ("wagyu", "steak"), (1, 2, 3)),  # wag|yu steak
  ("a drawing of a dog", "a drawing of a boss in dark soul", ("boss", "soul"), (5, 8)),
  (
    "a man surfing",
    "a man surfing with a hot air balloon at the background",
    ("air", "balloon", "background"),
    (7, 8, 11),
  ),
  (
    "two surfers carrying bright blue boards wade into the ocean",
    "two surfers carrying bright blue boards wade into the ocean and a kite in the sky",
    ("kite", "sky"),
    (13, 16),
  ),
  ("a siberian husky", "a siberian husky wearing stylish sunglasses", ("sunglasses",), (6,)),
  ("a chair", "a chair and a minion", ("minion",), (5,)),
  ("a hill", "a dragon on a hill", ("dragon",), (2,)),  # differing "dragon on a": ends in an article
  (
    "a painting of a dog",
    "a painting of a dog wearing a blindfold over its eyes",
    ("blindfold", "eyes"),
    (8, 9, 12),  # blind|fold ... eyes
  ),
  # Pure additions.
  ("a woman", "a woman holding an umbrella", ("umbrella",), (5,)),
  ("a man", "a man with a beard", ("beard",), (5,)),
  ("a living room", "a living room with a fireplace", ("fireplace",), (6,)),
  ("a street at night", "a street at night with neon signs", ("neon", "signs"), (6, 7)),
  ("a boy", "a boy eating an ice cream cone", ("ice", "cream", "cone"), (5, 6, 7)),
  ("a teddy bear", "a teddy bear on the moon", ("moon",), (6,)),
  ("a house", "a house in winter", ("winter",), (4,)),
  ("a cake", "a cake with 3 candles", ("candles",), (5,)),
  (
    "a landscape",
    "a landscape with a lighthouse and a sailboat",
    ("lighthouse", "sailboat"),
    (5, 8, 9),  # lighthouse, sail|boat
  ),
  ("a cat", "a cat and a dog", ("dog",), (5,)),
  ("a cat", "a cat and a cat", ("cat",), (5,)),  # the added cat, not the first one
  # Replacements.
  ("a black cat on a sofa", "a black dog on a sofa", ("dog",), (3,)),
  ("a bird on a branch", "a parrot on a branch", ("parrot",), (2,)),
  ("an apple", "an orange", ("orange",), (2,)),
  ("a bicycle", "a motorcycle", ("motorcycle",), (2,)),
  ("a vase of flowers", "a vase of sunflowers", ("sunflowers",), (4,)),
  ("a bowl of soup", "a bowl of ramen", ("ramen",), (4,)),
  ("a dog", "two dogs", ("dogs",), (2,)),
  # Differing substring not ending in a noun: extended until a noun is included.
  ("a dog", "a red dog", ("dog",), (3,)),
  ("a red car", "a blue car", ("car",), (3,)),
  ("a man riding a horse", "a man feeding a horse", ("horse",), (5,)),
  ("a cat sitting on a sofa", "a cat sleeping on a sofa", ("sofa",), (6,)),
  # Capitalized words (CLIP lower-cases; words are compared and tagged lower-cased).
  ("A cat", "A Cat Wearing A Party Hat", ("Party", "Hat"), (5, 6)),
  ("a photo of Paris", "a photo of London", ("London",), (4,)),
  ("a Photo of a Tree", "a photo of a tree with an Owl", ("Owl",), (8,)),
  # Punctuation, digits and unicode inside words: positions follow the real tokens.
  ("a man", "a man wearing a t-shirt", ("t", "shirt"), (5, 7)),  # t - shirt: the "-" is no word
  ("a cat, sitting", "a cat, sitting on a red-brick wall", ("brick", "wall"), (9, 10)),
  ("a red t-shirt", "a red t-shirt and a cap", ("cap",), (8,)),
  ("a dog's bowl", "a dog's bone", ("bone",), (4,)),  # a dog 's bone
  ("a robot", "a robot holding a ps5 controller", ("ps5", "controller"), (5, 6, 7)),  # ps|5
  ("a table", "a table in a café", ("café",), (5,)),
  ("a  cat", "a cat   wearing   a hat", ("hat",), (5,)),  # whitespace collapses
  # No edit words: uniform mask.
  ("a cat", "a cat", (), ()),
  ("a cat.", "a cat!", (), ()),
  ("a cat wearing a hat", "a cat", (), ()),  # pure removal
  ("a cat", "the cat", (), ()),  # only an article differs
  ("a cat on a mat", "a cat under a mat", (), ()),  # only a preposition differs
  ("a dog sitting", "a dog sitting quietly", (), ()),  # extension finds no noun
  ("a cat", "", (), ()),
  ("", "", (), ()),
]


@pytest.mark.parametrize("source,target,words,positions", CASES, ids=[f"{s!r}->{t!r}" for s, t, *_ in CASES])
def test_inferred_edit_tokens(tok, source, target, words, positions):
  if positions:
    out = _find(tok, source, target)
  else:
    with pytest.warns(UserWarning, match="no edit words found"):
      out = prompts.find_edit_tokens(tok, source, target)
  assert out.edit_words == words
  assert out.positions == positions
  assert out.source == "inferred"
  assert out.dropped_words == ()
  assert out.uniform == (not positions)
  assert "\n" not in out.explanation


def test_case_count():
  assert len(CASES) >= 40


def test_positions_index_the_real_tokens(tok):
  # Independent of the rule: the marked ids must be the edit words' BPE tokens.
  out = _find(tok, "a cat", "a cat wearing a long red necktie")
  ids = tokenize(tok, ["a cat wearing a long red necktie"])[0]
  assert tok.convert_ids_to_tokens([int(ids[p]) for p in out.positions]) == ["neck", "tie</w>"]
  out = _find(tok, "a man wearing a red t-shirt", "a man wearing a red t-shirt with a google logo")
  ids = tokenize(tok, ["a man wearing a red t-shirt with a google logo"])[0]
  assert tok.convert_ids_to_tokens([int(ids[p]) for p in out.positions]) == ["google</w>", "logo</w>"]


# ------------------------------------------------------------------ the record and its explanation


def test_differing_and_extended_words_and_explanation(tok):
  out = _find(tok, "a cat", "a cat wearing a party hat")
  assert out.differing_words == ("wearing", "a", "party", "hat")
  assert out.extended_words == ()
  assert (
    out.explanation == 'edit words: party, hat -> tokens [5, 6] (inferred: differing "wearing a party hat")'
  )

  out = _find(tok, "a dog", "a red dog")
  assert out.differing_words == ("red",)
  assert out.extended_words == ("dog",)
  assert out.explanation == 'edit words: dog -> tokens [3] (inferred: differing "red", extended to "red dog")'

  out = _find(tok, "a cat sitting on a sofa", "a cat sleeping on a sofa")
  assert out.extended_words == ("on", "a", "sofa")

  # The quote is the target's own text, punctuation included.
  out = _find(tok, "a man", "a man wearing a t-shirt")
  assert out.differing_words == ("wearing", "a", "t", "shirt")
  assert out.explanation == 'edit words: t, shirt -> tokens [5, 7] (inferred: differing "wearing a t-shirt")'


def test_uniform_explanations(tok):
  with pytest.warns(UserWarning, match="no edit words found"):
    out = prompts.find_edit_tokens(tok, "a cat", "a cat")
  assert out.explanation == (
    "no edit words found: uniform mask (no spatial regularization) (inferred: no differing words)"
  )
  assert out.differing_words == ()
  np.testing.assert_array_equal(out.token_mask(), np.zeros(77, np.float32))

  with pytest.warns(UserWarning, match="no edit words found"):
    out = prompts.find_edit_tokens(tok, "a cat on a mat", "a cat under a mat")
  assert out.explanation == (
    'no edit words found: uniform mask (no spatial regularization) (inferred: differing "under")'
  )
  assert out.differing_words == ("under",)


def test_token_mask():
  expected = np.zeros(77, np.float32)
  expected[5] = expected[6] = 1.0
  mask = prompts.token_mask((5, 6))
  assert mask.dtype == np.float32 and mask.shape == (77,)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(prompts.token_mask([2], length=4), np.array([0, 0, 1, 0], np.float32))
  with pytest.raises(ValueError, match="outside"):
    prompts.token_mask([77])


def test_record_token_mask(tok):
  out = _find(tok, "a cat", "a cat wearing a party hat")
  np.testing.assert_array_equal(np.flatnonzero(out.token_mask()), [5, 6])


def test_last_subtoken_preset(tok):
  # Official LUSD marks the last sub-token of each noun.
  cases = [
    ("a cat", "a cat wearing a long red necktie", (8,)),
    ("food", "wagyu steak", (2, 3)),
    ("a painting of a dog", "a painting of a dog wearing a blindfold over its eyes", (9, 12)),
    ("a landscape", "a landscape with a lighthouse and a sailboat", (5, 9)),
    ("a robot", "a robot holding a ps5 controller", (6, 7)),
    ("a cat", "a cat wearing a party hat", (5, 6)),
  ]
  for source, target, positions in cases:
    assert _find(tok, source, target, subtokens="last").positions == positions, target


def test_differing_span():
  assert prompts.differing_span(["a", "cat"], ["a", "cat", "and", "a", "cat"]) == (2, 5)
  assert prompts.differing_span(["a", "hill"], ["a", "dragon", "on", "a", "hill"]) == (1, 4)
  assert prompts.differing_span(["A", "Cat"], ["a", "cat"]) == (2, 2)
  assert prompts.differing_span([], ["thunder"]) == (0, 1)
  assert prompts.differing_span(["a", "cat", "wearing", "a", "hat"], ["a", "cat"]) == (2, 2)


# --------------------------------------------------------------------------- 77-token limit

_GARDEN = (
  "a highly detailed photograph of a quiet garden in the early {time}, with tall green hedges, a stone "
  "path, wooden benches, blooming roses, lavender bushes, a small fountain, hanging lanterns, soft "
  "golden light, morning dew on the grass, a red brick wall, ivy on the wall, butterflies over the "
  "flowers, a wooden birdhouse on a pole and a {end}"
)
# 76 content tokens: "... 71 and 72 a 73 cat 74 on 75 the 76 bench"; truncation keeps 1..75 + EOS.
_LONG = _GARDEN.format(time="morning", end="cat on the bench")

LONG_CASES = [
  # (target, edit words, positions, dropped words)
  (_GARDEN.format(time="morning", end="squirrel on the bench"), ("squirrel",), (73,), ()),
  (_GARDEN.format(time="evening", end="cat on the bench"), ("evening",), (12,), ()),
  (_LONG + " with a garden gnome", (), (), ("garden", "gnome")),  # tokens 79, 80
  (_GARDEN.format(time="morning", end="cat on the table"), (), (), ("table",)),  # token 76
  (_GARDEN.format(time="morning", end="dog and a puppy on the bench"), ("dog",), (73,), ("puppy",)),
  (_GARDEN.format(time="morning", end="cat near sailboats"), (), (), ("sailboats",)),  # sail 75|boats 76
]


@pytest.mark.parametrize(
  "target,words,positions,dropped",
  LONG_CASES,
  ids=["squirrel@73", "evening@12", "gnome@80", "table@76", "dog@73+puppy@76", "sailboats@75-76"],
)
def test_prompts_longer_than_77_tokens(tok, target, words, positions, dropped):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = prompts.find_edit_tokens(tok, _LONG, target)
  messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert out.edit_words == words
  assert out.positions == positions
  assert out.dropped_words == dropped
  if dropped:
    assert any("77-token limit" in m and dropped[-1] in m for m in messages)
    assert f"dropped past the 77-token limit: {', '.join(dropped)}" in out.explanation
  else:
    assert not messages
  if not positions:
    assert any("no edit words found" in m for m in messages)


def test_long_prompt_positions_survive_truncation(tok):
  target = _GARDEN.format(time="morning", end="squirrel on the bench")
  ids = tokenize(tok, [target])[0]
  assert ids[0] == BOS_ID and ids[76] == EOS_ID
  assert ids[73] == tok.convert_tokens_to_ids("squirrel</w>")


# --------------------------------------------------------------------------- overrides


def test_edit_words_override(tok):
  out = _find(tok, "a cat", "a cat wearing a party hat", edit_words="party hat")
  assert (out.edit_words, out.positions, out.source) == (("party", "hat"), (5, 6), "edit_words")
  assert out.explanation == "edit words: party, hat -> tokens [5, 6] (given by edit_words)"

  # A list, any case; the record holds the words as the target spells them.
  out = _find(tok, "A cat", "A Cat Wearing A Party Hat", edit_words=["HAT"])
  assert (out.edit_words, out.positions) == (("Hat",), (6,))

  # Overrides may name non-nouns: an adjective-only edit localized on the adjective itself.
  assert _find(tok, "a dog", "a red dog", edit_words="red").positions == (2,)
  # Multi-sub-token word, both presets.
  assert _find(tok, "a cat", "a cat wearing a long red necktie", edit_words="necktie").positions == (7, 8)
  out = _find(tok, "a cat", "a cat wearing a long red necktie", edit_words="necktie", subtokens="last")
  assert out.positions == (8,)
  # Identical prompts, user insists.
  assert _find(tok, "a cat", "a cat", edit_words="cat").positions == (2,)


def test_edit_words_repeated_in_target(tok):
  # Occurrences inside the differing substring win ...
  assert _find(tok, "a cat", "a cat and a cat", edit_words="cat").positions == (5,)
  assert _find(tok, "a dog", "a cat and a cat", edit_words="cat").positions == (2, 5)
  # ... and a word outside it marks every occurrence.
  assert _find(tok, "a red dog near a dog", "a blue dog near a dog", edit_words="dog").positions == (3, 6)


def test_edit_words_invalid(tok):
  with pytest.raises(ValueError, match="'crown' does not occur in the target prompt"):
    prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat", edit_words="crown")
  with pytest.raises(ValueError, match="'crown' does not occur"):
    prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat", edit_words="party crown")
  # Words are whole words: "hats" is not "hat".
  with pytest.raises(ValueError, match="'hats' does not occur"):
    prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat", edit_words=["hats"])
  with pytest.raises(ValueError, match="no words"):
    prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat", edit_words="")
  with pytest.raises(ValueError, match="no words"):
    prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat", edit_words=["--", "!"])


def test_edit_words_past_the_limit_are_dropped(tok):
  target = _LONG + " with a garden gnome"
  with pytest.warns(UserWarning, match="77-token limit"):
    out = prompts.find_edit_tokens(tok, _LONG, target, edit_words="gnome")
  assert out.positions == () and out.dropped_words == ("gnome",)


def test_token_positions_override(tok):
  out = _find(tok, "a cat", "a cat wearing a party hat", token_positions=[6, 5, 6])
  assert out.positions == (5, 6)
  assert out.source == "positions"
  assert out.explanation == "edit tokens [5, 6] (party hat) (given as token positions)"
  assert _find(tok, "a cat", "a cat wearing a party hat", token_positions=(np.int64(3),)).positions == (3,)
  # The last visible content token of a truncated prompt.
  assert _find(tok, _LONG, _LONG, token_positions=[75]).positions == (75,)


@pytest.mark.parametrize(
  "target,bad,error",
  [
    ("a cat wearing a party hat", [0], ValueError),  # BOS
    ("a cat wearing a party hat", [7], ValueError),  # EOS
    ("a cat wearing a party hat", [-1], ValueError),
    (_LONG, [76], ValueError),  # truncated away
    ("a cat wearing a party hat", [], ValueError),
    ("a cat wearing a party hat", [True], TypeError),
    ("a cat wearing a party hat", [2.0], TypeError),
  ],
)
def test_token_positions_invalid(tok, target, bad, error):
  with pytest.raises(error):
    prompts.find_edit_tokens(tok, "a cat", target, token_positions=bad)


def test_argument_errors(tok):
  with pytest.raises(ValueError, match="not both"):
    prompts.find_edit_tokens(tok, "a cat", "a cat in a hat", edit_words="hat", token_positions=[5])
  with pytest.raises(ValueError, match="subtokens"):
    prompts.find_edit_tokens(tok, "a cat", "a cat in a hat", subtokens="first")


def test_custom_tagger_is_used(tok):
  # A tagger calling everything a noun makes the adjective an edit word (and needs no extension).
  out = _find(tok, "a dog", "a red dog", tagger=lambda words: [(w, "NN") for w in words])
  assert (out.edit_words, out.positions, out.extended_words) == (("red",), (2,), ())


# --------------------------------------------------------------------------- words -> tokens


def test_word_token_positions_by_character_offsets(tok):
  text = "a man wearing a red T-shirt, dog's  3d café_x"
  # Tokens: 1 a, 2 man, 3 wearing, 4 a, 5 red, 6 t, 7 -, 8 shirt, 9 ",", 10 dog, 11 's, 12 3, 13 d,
  # 14 café, 15 _, 16 x. Words (\w+): a man wearing a red T shirt dog s 3d café_x.
  expected = [(1,), (2,), (3,), (4,), (5,), (6,), (8,), (10,), (11,), (12, 13), (14, 15, 16)]
  assert prompts.word_token_positions(tok, text, method="offsets") == expected
  assert prompts.word_token_positions(tok, text, method="regex") == expected


def test_regex_fallback_matches_offsets_on_all_cases(tok):
  targets = [t for _, t, *_ in CASES] + [t for t, *_ in LONG_CASES]
  for target in targets:
    assert prompts.word_token_positions(tok, target, method="regex") == prompts.word_token_positions(
      tok, target, method="offsets"
    ), target


# --------------------------------------------------------------------------- the offline tagger


def test_tagger_without_nltk_data():
  assert not nltk.data.path or all("empty_nltk_data" in p for p in nltk.data.path)
  with pytest.raises(LookupError):
    nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
  assert isinstance(prompts.load_tagger(), PerceptronTagger)
  assert prompts.pos_tag(["a", "cat", "wearing", "a", "party", "hat"]) == [
    ("a", "DT"),
    ("cat", "NN"),
    ("wearing", "VBG"),
    ("a", "DT"),
    ("party", "NN"),
    ("hat", "NN"),
  ]
  assert prompts.pos_tag(["two", "dogs", "under", "the", "red", "umbrella"]) == [
    ("two", "CD"),
    ("dogs", "NNS"),
    ("under", "IN"),
    ("the", "DT"),
    ("red", "JJ"),
    ("umbrella", "NN"),
  ]
  with pytest.raises(TypeError):
    prompts.pos_tag("a cat")


def test_installed_nltk_data_is_preferred(tmp_path, monkeypatch):
  # A made-up model in NLTK's own format: every word is XX except the dictionary word "cat".
  folder = tmp_path / "taggers" / "averaged_perceptron_tagger_eng"
  folder.mkdir(parents=True)
  params = {"weights": {"bias": {"XX": 1.0}}, "tagdict": {"cat": "YY"}, "classes": ["XX", "YY"]}
  for name, value in params.items():
    (folder / f"averaged_perceptron_tagger_eng.{name}.json").write_text(json.dumps(value))
  monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
  assert prompts.pos_tag(["cat", "dog"]) == [("cat", "YY"), ("dog", "XX")]


def test_no_tagger_anywhere(tok, monkeypatch):
  monkeypatch.setitem(sys.modules, "textblob_aptagger", None)  # find_spec -> None: not installed
  with pytest.raises(LookupError, match="textblob-aptagger") as err:
    prompts.load_tagger()
  assert "averaged_perceptron_tagger_eng" in str(err.value) and "edit_words" in str(err.value)
  with pytest.raises(LookupError):
    prompts.find_edit_tokens(tok, "a cat", "a cat wearing a party hat")
  # Overrides need no tagger.
  assert _find(tok, "a cat", "a cat wearing a party hat", edit_words="hat").positions == (6,)
  assert _find(tok, "a cat", "a cat wearing a party hat", token_positions=[6]).positions == (6,)
