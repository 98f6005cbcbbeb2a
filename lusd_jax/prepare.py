"""An edit's inputs, checked and encoded: everything between the user's arguments and the engine's batch.

`check_edit` runs every check that needs no weights (the command line calls it before a model
loads); `prepare_edit` then preprocesses the photo and encodes it and the prompts; `stack_elements`
lays edits out as the engine's flat batch (each element its own inputs, key and numeric config).
The jitted encoders are module-level pure functions keyed on static configs, so a second edit with
the same model and image size reuses every compiled program.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lusd_jax import io, prompts
from lusd_jax import tokenizer as tokenizer_lib
from lusd_jax.compiler import jit
from lusd_jax.loading import SDModel
from lusd_jax.lusd import core
from lusd_jax.models import clip_text, vae


@functools.partial(jit, static_argnames=("config",))
def _encode_text(params, ids_BL, *, config):
  return clip_text.encode_text(params, config, ids_BL)


@functools.partial(jit, static_argnames=("config",))
def _encode_image(params, x_BHWC01, *, config):
  """Image in [0, 1] -> scaled latent (posterior mean times scaling_factor, LUSD Alg. 1 line 1)."""
  mean = vae.encode_mean(params, config, x_BHWC01 * 2.0 - 1.0)
  return mean * config.scaling_factor


@functools.partial(jit, static_argnames=("config",))
def _decode(params, z_BHWC, *, config):
  x = vae.decode(params, config, z_BHWC / config.scaling_factor)
  return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def encode_prompts(model: SDModel, prompt_list: list[str]):
  """CLIP text embeddings `[B, 77, D]` of prompts (padded/truncated to 77 tokens)."""
  ids = tokenizer_lib.tokenize(model.tokenizer, prompt_list)
  return _encode_text(model.params.text_encoder, jnp.asarray(ids), config=model.configs.text_encoder)


def encode_image(model: SDModel, image_HWC01):
  x = jnp.asarray(image_HWC01, model.compute_dtype)[None]
  return _encode_image(model.params.vae, x, config=model.configs.vae)[0].astype(jnp.float32)


def decode_latents(model: SDModel, z_SHWC):
  out = [
    _decode(model.params.vae, z[None].astype(model.compute_dtype), config=model.configs.vae)[0]
    for z in z_SHWC
  ]
  return np.stack([np.asarray(x, np.float32) for x in out])


def preprocess_image(image, size: int) -> np.ndarray:
  """A path, PIL image or array as the [size, size, 3] float32 input of an edit (crop, resize)."""
  io.validate_size(size)
  if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
    return io.load_image(image, size)
  return io.image_from_array(image, size)


# Longest explanation line printed before an edit (a 77-token prompt can make it very long).
MAX_NOTE_CHARS = 240


def _short(text: str, limit: int = MAX_NOTE_CHARS) -> str:
  return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def check_edit(
  tokenizer,
  schedule,
  source_prompt: str,
  target_prompt: str,
  seeds,
  config,
  edit_words=None,
  *,
  token_positions=None,
  size: int = 512,
  names: Callable[[str], str] | None = None,
  announce=None,
) -> tuple[tuple[int, ...], prompts.EditTokens]:
  """Every check of an edit's inputs that needs no weights; run before a model loads.

  Args:
    tokenizer: the model's CLIP tokenizer (`SDModel.tokenizer` or `loading.load_model_head`).
    schedule: the model's `Schedule` (its `num_train_timesteps` bounds the t range).
    source_prompt, target_prompt, seeds, config, edit_words, token_positions, size: as `edit`.
    names: how messages name an argument or `LUSDConfig` field (the CLI passes its flags,
      "t_max" -> "--t-max"); default: the Python names.
    announce: where the one-line notes go (long prompts, the edit tokens); None: `warnings`.

  Returns:
    (seeds as ints, `prompts.EditTokens`).

  Raises:
    io.InputError: naming the argument: bad seeds or size, an empty target, prompts that tokenize
      identically (nothing to edit), a t range beyond the model's schedule, edit words that are
      not in the target prompt, bad token positions.
  """
  from lusd_jax.lusd.config import ConfigError

  name = names or (lambda arg: arg)
  seeds = io.check_seeds(seeds, name("seeds"))
  io.validate_size(size)
  for arg, p in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
    if not isinstance(p, str):
      raise io.InputError(f"{name(arg)}: expected a string, got {type(p).__name__}")
  if not target_prompt.strip():
    raise io.InputError(f"{name('target_prompt')}: the target prompt is empty")
  ids = tokenizer_lib.tokenize(tokenizer, [source_prompt, target_prompt])
  if np.array_equal(ids[0], ids[1]):
    raise io.InputError(
      f"{name('source_prompt')} {source_prompt!r} and {name('target_prompt')} {target_prompt!r} are the "
      "same prompt to CLIP (it lower-cases and ignores spacing and the words after 77 tokens): "
      "there is nothing to edit"
    )
  try:
    config.check_timesteps(schedule.num_train_timesteps)
  except ConfigError as e:
    raise io.InputError(f"{name(e.field)} {e.problem}") from None
  notes = []
  for what, p in (("source", source_prompt), ("target", target_prompt)):
    n = len(tokenizer(p, truncation=False, verbose=False)["input_ids"])
    if n > tokenizer_lib.MAX_LENGTH:
      notes.append(
        f"warning: the {what} prompt has {n} tokens; CLIP reads the first {tokenizer_lib.MAX_LENGTH}, "
        "the rest is cut"
      )
  with warnings.catch_warnings(record=True):  # the explanation below carries the same notice
    warnings.simplefilter("always")
    try:
      edit_tokens = prompts.find_edit_tokens(
        tokenizer,
        source_prompt,
        target_prompt,
        edit_words=edit_words,
        token_positions=token_positions,
        subtokens="last" if config.edit_token_last_subtoken else "all",
        rule=config.edit_token_rule,
      )
    except (ValueError, TypeError) as e:
      arg = "token_positions" if token_positions is not None else "edit_words"
      raise io.InputError(f"{name(arg)}: {e}") from None
  notes.append(_short(edit_tokens.explanation))
  for note in notes:
    if announce is not None:
      announce(note)
    elif note.startswith("warning:") or edit_tokens.uniform or edit_tokens.dropped_words:
      warnings.warn(note.removeprefix("warning: "), UserWarning, stacklevel=3)
  return seeds, edit_tokens


class PreparedEdit(NamedTuple):
  """An edit's checked, preprocessed and encoded inputs (shared by `edit` and `sweep`)."""

  seeds: tuple[int, ...]
  image: np.ndarray  # [H, W, 3] float32 in [0, 1], preprocessed
  edit_tokens: Any  # prompts.EditTokens
  inputs: Any  # core.EditInputs
  keys: jax.Array  # [S] PRNG keys, jax.random.key(seed)


def prepare_edit(
  model: SDModel,
  image,
  source_prompt: str,
  target_prompt: str,
  seeds,
  config,
  edit_words: str | None = None,
  *,
  token_positions=None,
  size: int = 512,
  announce=None,
) -> PreparedEdit:
  """Checks the inputs, preprocesses the image, finds the edit tokens and encodes image and prompts.

  Raises:
    io.InputError: see `check_edit`; a bad image.
  """
  seeds, edit_tokens = check_edit(
    model.tokenizer, model.configs.schedule, source_prompt, target_prompt, seeds, config, edit_words,
    token_positions=token_positions, size=size, announce=announce,
  )  # fmt: skip
  x = preprocess_image(image, size)
  ctx = encode_prompts(model, [source_prompt, target_prompt])
  z_src = encode_image(model, x)
  inputs = core.EditInputs(z_src, ctx[0], ctx[1], jnp.asarray(edit_tokens.token_mask()))
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  return PreparedEdit(seeds, x, edit_tokens, inputs, keys)


def stack_elements(elements: Sequence[tuple[Any, jax.Array, Any]]) -> tuple[Any, jax.Array, Any]:
  """The engine's flat batch: each element's (inputs, key, numeric config), stacked on a [B] axis.

  Seeds of one edit, cells of a sweep and images of a batch are all elements; their inputs may be
  shared (the same `EditInputs` object) or differ.

  Args:
    elements: [(core.EditInputs, PRNG key, LUSDNumeric), ...].

  Returns:
    (inputs_B, keys_B, numeric_B), every leaf with a leading [B] axis.
  """
  inputs, keys, numerics = zip(*elements, strict=True)
  stack = lambda *xs: jnp.stack(xs)
  return jax.tree.map(stack, *inputs), jnp.stack(keys), jax.tree.map(stack, *numerics)
