"""Flash attention that also returns the head-mean attention map of a batch slice (Pallas).

Both methods read head-averaged softmax maps from some layers (LUSD: self-attention at latent/2 and
cross-attention at latent/4; UnifyEdit: self-attention of every layer, with gradients through the
maps). Without a kernel, `lusd_jax.models.unet` materializes each head's [B', T, S] probabilities to
average them; the kernels here never hold more than one [block_q, block_k] tile of scores. The
attention registry (`lusd_jax.models.attention`, "pallas") runs them for the U-Net's captured
layers, output and map in one call (forced, or "auto" on GPU / TPU):

  pass 1  `_forward_kernel`: flash attention per (batch, head, query block), an online softmax over
          key blocks; writes the output and each row's log-sum-exp (lse).
  pass 2  `_map_kernel`: per (map row, query block, key block) tile, the normalized probabilities
          exp(q k^T / sqrt(H) - lse) summed over the heads, divided by N: the head-mean map.

The backward (`jax.custom_vjp`) is Pallas too, FlashAttention-2 style, with the map's cotangent dM
folded in. With P_n = softmax(S_n), S_n = q_n k_n^T / sqrt(H), out_n = P_n v_n, map = mean_n P_n:

  dP_n   = dO_n v_n^T + dM / N                       (dM only on the map's batch rows)
  dS_n   = P_n * (dP_n - delta_n),  delta_n = rowsum(dO_n * out_n) + rowsum(P_n * dM) / N
  dq_n   = dS_n k_n / sqrt(H),  dk_n = dS_n^T q_n / sqrt(H),  dv_n = P_n^T dO_n

  `_delta_map_kernel` computes rowsum(P_n * dM) / N (map rows only; one extra pass over the keys),
  `_dq_kernel` loops over key blocks per query block, `_dkv_kernel` over query blocks per key block.

Layout: the wrappers transpose to [B, N, T, H] and zero-pad T, S and H to the block sizes (one XLA
copy each; zero head-dim columns change no score and give zero output columns), so every block's last
two dims are (rows, head dim) as Mosaic TPU wants them. Padded keys are masked out of every softmax,
padded query rows are sliced off (their cotangents are zero). `reference_attention_with_map` is the
plain-jnp ground truth (it materializes the [B, N, T, S] probabilities).

Backends: `block_sizes` picks tiles per platform (Triton on GPU: power-of-two blocks >= 16, head dim
padded to a power of two; Mosaic on TPU: blocks multiple of 8 rows, 128-lane map tiles, head dim
padded to 128). On CPU, Pallas only interprets: `interpret=None` turns it on there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Masked scores: finite (m - NEG stays finite, exp(NEG - m) is exactly 0), as jax's Pallas kernels do.
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and the constraints of one backend.

  Attributes:
    block_q: query rows per tile (capped to the padded query length).
    block_k: key columns per tile (capped to the padded key length).
    min_block: the smallest block (Triton's `tl.dot` needs 16; TPU sublanes 8).
    power_of_two: blocks must be powers of two (Triton tensors).
    head_multiple: the head dim is zero-padded to a multiple of this (TPU: 128 lanes).
    head_power_of_two: the head dim is zero-padded to a power of two >= `min_block` (Triton).
    num_warps: Triton warps per program (None elsewhere).
  """

  block_q: int
  block_k: int
  min_block: int = 8
  power_of_two: bool = False
  head_multiple: int = 1
  head_power_of_two: bool = False
  num_warps: int | None = None

  def fit(self, length: int, block: int) -> tuple[int, int]:
    """(block, padded length) for a sequence of `length` and a requested `block`."""
    if self.power_of_two:
      b = min(block, max(self.min_block, pl.next_power_of_2(length)))
    else:
      b = min(block, _round_up(length, self.min_block))
    return b, _round_up(length, b)

  def head_dim(self, h: int) -> int:
    """The padded head dim."""
    if self.head_power_of_two:
      h = max(self.min_block, pl.next_power_of_2(h))
    return _round_up(h, self.head_multiple)


def block_sizes(backend: str | None = None) -> BlockSizes:
  """Tile sizes for `backend` ("gpu", "tpu", "cpu"; default: `jax.default_backend()`).

  GPU (Pallas Triton): 64 x 64 tiles, 4 warps: the [64, 64] float32 scores, the running output and
  one K and V tile fit the registers / shared memory of one SM at head dims up to 128 (jax's own
  Triton flash attention uses 128 x 128 forward, 32 x 32 backward blocks). TPU (Mosaic): 128 x 128
  tiles, the MXU's size, lane-aligned map tiles. CPU (interpret mode, tests): 128 x 128, so that few
  grid steps run (each one is a step of an interpreted loop).

  Example:
    >>> block_sizes("tpu").fit(77, 128)
    (80, 80)
  """
  backend = backend or jax.default_backend()
  if backend in ("gpu", "cuda", "rocm"):
    return BlockSizes(64, 64, min_block=16, power_of_two=True, head_power_of_two=True, num_warps=4)
  if backend == "tpu":
    return BlockSizes(128, 128, min_block=8, head_multiple=128)
  return BlockSizes(128, 128, min_block=8)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: the custom_vjp's non-differentiable argument)."""

  t: int  # real query length
  s: int  # real key length
  heads: int
  scale: float  # 1 / sqrt(real head dim)
  causal: bool
  rows: tuple[int, int] | None  # map batch rows [start, stop)
  bq: int
  bk: int
  backend: str  # "gpu", "tpu" or "cpu"
  interpret: bool
  num_warps: int | None

  def compiler_params(self, grid_dims: int):
    if self.interpret:
      return None
    if self.backend == "tpu":
      from jax.experimental.pallas import tpu as pltpu

      return pltpu.CompilerParams(dimension_semantics=("parallel",) * grid_dims)
    if self.backend == "gpu":
      from jax.experimental.pallas import triton as pltriton

      return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=2)
    return None

  def call(self, kernel, *, grid, in_specs, out_specs, out_shape, name):
    return pl.pallas_call(
      functools.partial(kernel, cfg=self),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=self.interpret,
      compiler_params=self.compiler_params(len(grid)),
      name=name,
    )


# ---------------------------------------------------------------------------------------------------
# Tile helpers (run inside kernels).


def _dot_nt(a, b):
  """a @ b.T in float32."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  """a @ b in float32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _probs_tile(q, k, lse, q0, k0, cfg: _Config):
  """Normalized probabilities exp(q k^T * scale - lse) of one [bq, bk] tile, 0 on masked keys."""
  s = _dot_nt(q, k) * cfg.scale
  p = jnp.exp(s - lse)
  visible = _visible(q0, k0, s.shape, cfg)
  return p if visible is None else jnp.where(visible, p, 0.0)


def _visible(q0, k0, shape, cfg: _Config):
  """Which keys of a tile each query sees: real keys (< s), and keys <= the query when causal."""
  padded = cfg.s % cfg.bk != 0
  if not (padded or cfg.causal):
    return None
  cols = k0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  visible = cols < cfg.s
  if cfg.causal:
    visible = visible & (cols <= q0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0))
  return visible


def _key_blocks_upto(i, cfg: _Config, nk: int):
  """How many key blocks query block i needs: all of them, or up to its last row when causal."""
  if not cfg.causal:
    return nk
  return jnp.minimum(nk, jax.lax.div((i + 1) * cfg.bq + cfg.bk - 1, cfg.bk))


def _loop(lo, hi, body, carry, static_hi: int):
  """`lax.fori_loop`, or a direct call for one block (no loop; static, aligned slice offsets)."""
  if static_hi == 1 and isinstance(lo, int) and lo == 0:
    return body(0, carry)
  return jax.lax.fori_loop(lo, hi, body, carry)


def _at(j, block: int):
  """Offset of block j, with an alignment hint for Mosaic."""
  return j * block if isinstance(j, int) else pl.multiple_of(j * block, block)


# ---------------------------------------------------------------------------------------------------
# Forward kernels.


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
  """Pass 1, one (batch, head, query block): online softmax over the key blocks (FlashAttention-2).

  Refs: q [bq, Hp], k and v [Sp, Hp] (the head's keys), o [bq, Hp], lse [bq, 1] float32.
  """
  i = pl.program_id(2)
  q0 = i * cfg.bq
  q = q_ref[...]
  nk = k_ref.shape[0] // cfg.bk

  def body(j, carry):
    m, row_sum, acc = carry
    k0 = _at(j, cfg.bk)
    k, v = k_ref[pl.ds(k0, cfg.bk), :], v_ref[pl.ds(k0, cfg.bk), :]
    s = _dot_nt(q, k) * cfg.scale
    visible = _visible(q0, k0, s.shape, cfg)
    if visible is not None:
      s = jnp.where(visible, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)  # masked keys: exp(NEG - m) == 0 (key 0 is always visible)
    rescale = jnp.exp(m - m_new)
    row_sum = row_sum * rescale + jnp.sum(p, axis=1, keepdims=True)
    acc = acc * rescale + _dot(p.astype(v.dtype), v)
    return m_new, row_sum, acc

  bq, hp = q.shape
  init = (
    jnp.full((bq, 1), _NEG, jnp.float32),
    jnp.zeros((bq, 1), jnp.float32),
    jnp.zeros((bq, hp), jnp.float32),
  )
  m, row_sum, acc = _loop(0, _key_blocks_upto(i, cfg, nk), body, init, nk)
  o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(row_sum)


def _map_kernel(q_ref, k_ref, lse_ref, map_ref, *, cfg: _Config):
  """Pass 2, one (map row, query block, key block) tile: normalized probabilities summed over heads.

  Refs: q [N, bq, Hp], k [N, bk, Hp], lse [N, bq, 1], map [bq, bk] float32.
  """
  q0, k0 = pl.program_id(1) * cfg.bq, pl.program_id(2) * cfg.bk

  def add_head(n, acc):
    return acc + _probs_tile(q_ref[n], k_ref[n], lse_ref[n], q0, k0, cfg)

  acc = jax.lax.fori_loop(0, cfg.heads, add_head, jnp.zeros(map_ref.shape, jnp.float32))
  map_ref[...] = acc * (1.0 / cfg.heads)


def _forward(cfg: _Config, q_BNTH, k_BNSH, v_BNSH):
  """Both passes on padded [B, N, T, H] inputs: (out_BNTH, lse_BNT1, map_BTS or None)."""
  b, n, tp, hp = q_BNTH.shape
  sp = k_BNSH.shape[2]
  q_spec = pl.BlockSpec((None, None, cfg.bq, hp), lambda b, n, i: (b, n, i, 0))
  kv_spec = pl.BlockSpec((None, None, sp, hp), lambda b, n, i: (b, n, 0, 0))
  lse_spec = pl.BlockSpec((None, None, cfg.bq, 1), lambda b, n, i: (b, n, i, 0))
  out_BNTH, lse_BNT1 = cfg.call(
    _forward_kernel,
    grid=(b, n, tp // cfg.bq),
    in_specs=[q_spec, kv_spec, kv_spec],
    out_specs=[q_spec, lse_spec],
    out_shape=[
      jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype),
      jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32),
    ],
    name="attention_with_map_fwd",
  )(q_BNTH, k_BNSH, v_BNSH)
  if cfg.rows is None:
    return out_BNTH, lse_BNT1, None
  start, stop = cfg.rows
  map_BTS = cfg.call(
    _map_kernel,
    grid=(stop - start, tp // cfg.bq, sp // cfg.bk),
    in_specs=[
      pl.BlockSpec((None, n, cfg.bq, hp), lambda b, i, j: (b + start, 0, i, 0)),
      pl.BlockSpec((None, n, cfg.bk, hp), lambda b, i, j: (b + start, 0, j, 0)),
      pl.BlockSpec((None, n, cfg.bq, 1), lambda b, i, j: (b + start, 0, i, 0)),
    ],
    out_specs=pl.BlockSpec((None, cfg.bq, cfg.bk), lambda b, i, j: (b, i, j)),
    out_shape=jax.ShapeDtypeStruct((stop - start, tp, sp), jnp.float32),
    name="attention_map_fwd",
  )(q_BNTH, k_BNSH, lse_BNT1)
  return out_BNTH, lse_BNT1, map_BTS


# ---------------------------------------------------------------------------------------------------
# Backward kernels.


def _delta_map_kernel(q_ref, k_ref, lse_ref, dm_ref, out_ref, *, cfg: _Config):
  """rowsum(P_n * dM) / N for one (map row, head, query block).

  Refs: q [bq, Hp], k [Sp, Hp], lse [bq, 1], dm [nk, bq, bk] float32, out [bq, 1] float32.
  """
  i = pl.program_id(2)
  q0 = i * cfg.bq
  q, lse = q_ref[...], lse_ref[...]
  nk = k_ref.shape[0] // cfg.bk

  def body(j, acc):
    k0 = _at(j, cfg.bk)
    p = _probs_tile(q, k_ref[pl.ds(k0, cfg.bk), :], lse, q0, k0, cfg)
    return acc + jnp.sum(p * dm_ref[j], axis=1, keepdims=True)

  acc = _loop(0, _key_blocks_upto(i, cfg, nk), body, jnp.zeros(out_ref.shape, jnp.float32), nk)
  out_ref[...] = acc * (1.0 / cfg.heads)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: _Config):
  """dq for one (batch, head, query block), looping over key blocks.

  Refs: q, do [bq, Hp]; k, v [Sp, Hp]; lse, delta [bq, 1]; optional dm [nk, bq, bk] (map rows);
  dq [bq, Hp].
  """
  dm_ref, dq_ref = rest if len(rest) == 2 else (None, rest[0])
  i = pl.program_id(2)
  q0 = i * cfg.bq
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  nk = k_ref.shape[0] // cfg.bk

  def body(j, dq):
    k0 = _at(j, cfg.bk)
    k, v = k_ref[pl.ds(k0, cfg.bk), :], v_ref[pl.ds(k0, cfg.bk), :]
    p = _probs_tile(q, k, lse, q0, k0, cfg)
    dp = _dot_nt(do, v)
    if dm_ref is not None:
      dp = dp + dm_ref[j] * (1.0 / cfg.heads)
    ds = p * (dp - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = _loop(0, _key_blocks_upto(i, cfg, nk), body, jnp.zeros(q.shape, jnp.float32), nk)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, cfg: _Config):
  """dk and dv for one (batch, head, key block), looping over query blocks.

  Refs: q, do [Tp, Hp]; k, v [bk, Hp]; lse, delta [Tp, 1]; optional dm [Tp, bk] (map rows);
  dk, dv [bk, Hp].
  """
  dm_ref, dk_ref, dv_ref = rest if len(rest) == 3 else (None, *rest)
  j = pl.program_id(2)
  k0 = j * cfg.bk
  k, v = k_ref[...], v_ref[...]
  nq = q_ref.shape[0] // cfg.bq

  def body(i, carry):
    dk, dv = carry
    q0 = _at(i, cfg.bq)
    rows = pl.ds(q0, cfg.bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    p = _probs_tile(q, k, lse_ref[rows, :], q0, k0, cfg)
    dv = dv + _dot(p.T.astype(do.dtype), do)
    dp = _dot_nt(do, v)
    if dm_ref is not None:
      dp = dp + dm_ref[rows, :] * (1.0 / cfg.heads)
    ds = p * (dp - delta_ref[rows, :])
    return dk + _dot(ds.T.astype(q.dtype), q), dv

  # Causal: query blocks that end before this key block's first key see none of it.
  lo = jax.lax.div(k0, cfg.bq) if cfg.causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = _loop(lo, nq, body, (zeros, zeros), nq)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_rows(cfg: _Config, q, k, v, do, lse, delta, dm, offset: int, rows: int):
  """(dq, dk, dv) of batch rows [offset, offset + rows); `dm` [rows, nk, Tp, bk] or None."""
  _, n, tp, hp = q.shape
  sp = k.shape[2]
  full_q = pl.BlockSpec((None, None, tp, hp), lambda b, n, x: (b + offset, n, 0, 0))
  full_k = pl.BlockSpec((None, None, sp, hp), lambda b, n, x: (b + offset, n, 0, 0))
  full_r = pl.BlockSpec((None, None, tp, 1), lambda b, n, x: (b + offset, n, 0, 0))
  block_q = pl.BlockSpec((None, None, cfg.bq, hp), lambda b, n, i: (b + offset, n, i, 0))
  block_k = pl.BlockSpec((None, None, cfg.bk, hp), lambda b, n, j: (b + offset, n, j, 0))
  block_r = pl.BlockSpec((None, None, cfg.bq, 1), lambda b, n, i: (b + offset, n, i, 0))
  out_q = pl.BlockSpec((None, None, cfg.bq, hp), lambda b, n, i: (b, n, i, 0))
  out_k = pl.BlockSpec((None, None, cfg.bk, hp), lambda b, n, j: (b, n, j, 0))
  extra_q, extra_k, args = [], [], []
  if dm is not None:
    extra_q = [pl.BlockSpec((None, sp // cfg.bk, cfg.bq, cfg.bk), lambda b, n, i: (b, 0, i, 0))]
    extra_k = [pl.BlockSpec((None, None, tp, cfg.bk), lambda b, n, j: (b, j, 0, 0))]
    args = [dm]
  dq = cfg.call(
    _dq_kernel,
    grid=(rows, n, tp // cfg.bq),
    in_specs=[block_q, full_k, full_k, block_q, block_r, block_r, *extra_q],
    out_specs=out_q,
    out_shape=jax.ShapeDtypeStruct((rows, n, tp, hp), q.dtype),
    name="attention_with_map_dq",
  )(q, k, v, do, lse, delta, *args)
  dk, dv = cfg.call(
    _dkv_kernel,
    grid=(rows, n, sp // cfg.bk),
    in_specs=[full_q, block_k, block_k, full_q, full_r, full_r, *extra_k],
    out_specs=[out_k, out_k],
    out_shape=[
      jax.ShapeDtypeStruct((rows, n, sp, hp), k.dtype),
      jax.ShapeDtypeStruct((rows, n, sp, hp), v.dtype),
    ],
    name="attention_with_map_dkv",
  )(q, k, v, do, lse, delta, *args)
  return dq, dk, dv


def _backward(cfg: _Config, res, cts):
  q, k, v, out, lse = res
  do, dm = cts
  b, n, tp, _ = q.shape
  sp = k.shape[2]
  # delta = rowsum(dO * out): the output's share of rowsum(P * dP) (FlashAttention-2's D).
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  segments = [(0, b, None)]
  if cfg.rows is not None:
    start, stop = cfg.rows
    # dM as [B', nk, Tp, bk]: a kernel picks key block j by a leading index, never by a dynamic
    # offset along the lanes (which Mosaic cannot load).
    dm = dm.reshape(stop - start, tp, sp // cfg.bk, cfg.bk).transpose(0, 2, 1, 3)
    # The map's rows add rowsum(P_n * dM) / N to their delta.
    delta_m = cfg.call(
      _delta_map_kernel,
      grid=(stop - start, n, tp // cfg.bq),
      in_specs=[
        pl.BlockSpec((None, None, cfg.bq, q.shape[-1]), lambda b, n, i: (b + start, n, i, 0)),
        pl.BlockSpec((None, None, sp, k.shape[-1]), lambda b, n, i: (b + start, n, 0, 0)),
        pl.BlockSpec((None, None, cfg.bq, 1), lambda b, n, i: (b + start, n, i, 0)),
        pl.BlockSpec((None, sp // cfg.bk, cfg.bq, cfg.bk), lambda b, n, i: (b, 0, i, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, cfg.bq, 1), lambda b, n, i: (b, n, i, 0)),
      out_shape=jax.ShapeDtypeStruct((stop - start, n, tp, 1), jnp.float32),
      name="attention_map_delta",
    )(q, k, lse, dm)
    delta = delta.at[start:stop].add(delta_m)
    # Batch rows are independent: rows outside the map take the kernels without dM.
    segments = [(0, start, None), (start, stop, dm), (stop, b, None)]
  grads = [
    _backward_rows(cfg, q, k, v, do, lse, delta, dm_rows, lo, hi - lo)
    for lo, hi, dm_rows in segments
    if hi > lo
  ]
  return tuple(jnp.concatenate(g, axis=0) if len(g) > 1 else g[0] for g in zip(*grads, strict=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_with_map_padded(cfg: _Config, q_BNTH, k_BNSH, v_BNSH):
  out_BNTH, _, map_BTS = _forward(cfg, q_BNTH, k_BNSH, v_BNSH)
  return out_BNTH, map_BTS


def _fwd(cfg, q_BNTH, k_BNSH, v_BNSH):
  out_BNTH, lse_BNT1, map_BTS = _forward(cfg, q_BNTH, k_BNSH, v_BNSH)
  return (out_BNTH, map_BTS), (q_BNTH, k_BNSH, v_BNSH, out_BNTH, lse_BNT1)


_attention_with_map_padded.defvjp(_fwd, _backward)


# ---------------------------------------------------------------------------------------------------
# Public API.


def attention_with_map(
  q_BTNH: jax.Array,
  k_BSNH: jax.Array,
  v_BSNH: jax.Array,
  *,
  map_rows: tuple[int, int] | None = None,
  causal: bool = False,
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: bool | None = None,
  backend: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """Softmax attention and the head-mean probability map of batch rows [start, stop) (Pallas).

  Equal to `reference_attention_with_map` up to float32 rounding: scores, softmax and the
  accumulations are float32 whatever the input dtype; probabilities are cast to v's dtype before the
  value product. Lengths need not divide the block sizes (padding + masking). Differentiable in q,
  k and v (`jax.custom_vjp`, Pallas backward) through both the output and the map.

  Args:
    q_BTNH: [B, T, N, H] queries.
    k_BSNH, v_BSNH: [B, S, N, H] keys and values.
    map_rows: (start, stop), 0 <= start < stop <= B: the batch rows whose head-mean map is
      returned; None returns no map (plain flash attention).
    causal: query i sees keys j <= i (top-left aligned, as `jnp.tril`).
    block_q, block_k: tile sizes (default: `block_sizes(backend)`); capped to the padded lengths.
      On TPU `block_k` should be a multiple of 128 (the map tiles' lane dim).
    interpret: run the kernels in Pallas' interpreter; None: only on CPU, where Pallas cannot compile.
    backend: "gpu", "tpu" or "cpu" for the block sizes and compiler parameters (default:
      `jax.default_backend()`).

  Returns:
    out_BTNH: [B, T, N, H] in q's dtype.
    map_BTS: [stop - start, T, S] float32, mean over the N heads of softmax(q k^T / sqrt(H)); None
      when `map_rows` is None.

  Example:
    >>> q = k = v = jnp.ones((2, 40, 4, 8))
    >>> out, m = attention_with_map(q, k, v, map_rows=(1, 2), block_q=16, block_k=16)
    >>> out.shape, m.shape
    ((2, 40, 4, 8), (1, 40, 40))
  """
  b, t, n, h = q_BTNH.shape
  s = k_BSNH.shape[1]
  if k_BSNH.shape != (b, s, n, h) or v_BSNH.shape != k_BSNH.shape:
    raise ValueError(f"attention_with_map: q {q_BTNH.shape}, k {k_BSNH.shape}, v {v_BSNH.shape} do not match")
  if map_rows is not None:
    map_rows = (int(map_rows[0]), int(map_rows[1]))
    if not 0 <= map_rows[0] < map_rows[1] <= b:
      raise ValueError(f"attention_with_map: map_rows {map_rows} is not a non-empty range within [0, {b}]")
  backend = backend or jax.default_backend()
  backend = "gpu" if backend in ("cuda", "rocm") else backend
  if interpret is None:
    interpret = backend not in ("gpu", "tpu")
  if not interpret and backend not in ("gpu", "tpu"):
    raise ValueError(
      f"attention_with_map: Pallas compiles for GPU and TPU only; use interpret=True on {backend}"
    )
  tiles = block_sizes(backend)
  bq, tp = tiles.fit(t, block_q or tiles.block_q)
  bk, sp = tiles.fit(s, block_k or tiles.block_k)
  hp = tiles.head_dim(h)
  cfg = _Config(
    t, s, n, 1.0 / math.sqrt(h), bool(causal), map_rows, bq, bk, backend, bool(interpret), tiles.num_warps
  )

  def to_blocks(x_BLNH, length):
    x_BNLH = x_BLNH.transpose(0, 2, 1, 3)
    return jnp.pad(x_BNLH, ((0, 0), (0, 0), (0, length - x_BNLH.shape[2]), (0, hp - h)))

  out_BNTH, map_BTS = _attention_with_map_padded(
    cfg, to_blocks(q_BTNH, tp), to_blocks(k_BSNH, sp), to_blocks(v_BSNH, sp)
  )
  out_BTNH = out_BNTH[:, :, :t, :h].transpose(0, 2, 1, 3)
  return out_BTNH, None if map_BTS is None else map_BTS[:, :t, :s]


def reference_attention_with_map(
  q_BTNH: jax.Array,
  k_BSNH: jax.Array,
  v_BSNH: jax.Array,
  *,
  map_rows: tuple[int, int] | None = None,
  causal: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Plain-jnp `attention_with_map`: materializes the [B, N, T, S] probabilities (the test oracle).

  Scores and softmax in float32 (or float64 for float64 inputs), as
  `lusd_jax.models.attention.attention_with_probs` computes them.

  Args:
    q_BTNH: [B, T, N, H] queries.
    k_BSNH, v_BSNH: [B, S, N, H] keys and values.
    map_rows: (start, stop) batch rows of the returned head-mean map, or None.
    causal: query i sees keys j <= i.

  Returns:
    (out_BTNH in v's dtype, map_BTS [stop - start, T, S] or None).
  """
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  scale = q_BTNH.shape[-1] ** -0.5
  scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH.astype(dtype), k_BSNH.astype(dtype)) * scale
  if causal:
    t, s = scores_BNTS.shape[-2:]
    scores_BNTS = jnp.where(jnp.tril(jnp.ones((t, s), dtype=bool)), scores_BNTS, jnp.finfo(dtype).min)
  probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
  out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)
  if map_rows is None:
    return out_BTNH, None
  start, stop = map_rows
  return out_BTNH, jnp.mean(probs_BNTS[start:stop], axis=1)
