"""Multi-head attention shared by the U-Net, the VAE and the CLIP text encoder.

Two entry points with one meaning: `dot_product_attention` runs whichever implementation is asked
for (or the fastest one for the backend, "auto") for layers whose maps nobody reads;
`attention_with_probs` computes the softmax probabilities explicitly and returns them, for the
layers whose maps are captured, and is the float32 ground truth of every implementation. All take
and return `[B, T, N, H]` tensors (batch, query tokens, heads, head dim).

Implementations of `dot_product_attention` (a registry by name, as maxdiffusion chooses kernels):

  "xla"        `jax.nn.dot_product_attention`: XLA's softmax attention; materializes the
               [B, N, T, S] scores (1 GiB float32 for SD1.5's 64x64 layers at batch 2).
  "cudnn"      cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs, fp16 /
               bf16, head dim a multiple of 8, at most 128, or 256 from Hopper on).
  "chunked"    `chunked_attention`: blocks of queries of a group of heads in turn under
               `lax.map`, each streaming over key blocks with an online softmax in float32 (flash
               attention written in jnp); memory O(MAX_BLOCK_SCORES) instead of O(B x N x T x S).
               The fast path on CPU.
  "reference"  `attention_with_probs` without the probabilities (debugging).
  "auto"       `resolve_impl`: cudnn on GPU where it applies, chunked on CPU for long sequences,
               xla otherwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "reference", "chunked", "auto")

# Blocks of `chunked_attention`: up to 4096 query rows x 512 key columns of one head, and as many
# heads per block as fit in 4096 x 512 scores (8 MiB float32). Measured on a 2-core AMD EPYC
# (benchmarks/RESULTS.md), SD1.5 shapes at batch 2:
# - 64x64 self-attention (T = S = 4096, 16 heads): one head per block, the 4096 queries against
#   keys in 8 blocks of 512 runs in 1.03-1.1 s, against 1.2-1.4 s for the earlier blocks of 256 x 512
#   spanning all 16 heads (batched small matmuls run slower than one [4096, 40] x [40, 512]) and
#   0.92 s for PyTorch's CPU flash attention; blocks of 512 x 512, 1024 x 1024 or 4096 x 1024 were
#   no faster.
# - cross-attention (S = 77): every key fits one block, so heads are grouped (4 at 64x64, all 16 at
#   32x32) and the loop is short or gone: 1.2-1.5x faster than XLA's attention.
DEFAULT_Q_CHUNK = 4096
DEFAULT_KV_CHUNK = 512
MAX_BLOCK_SCORES = 4096 * 512
# "auto" on CPU switches to "chunked" from this many scores per (batch, head): T * S >= 256 * 256
# (SD1.5's self-attention from 16x16 latents and cross-attention from 32x32). Below it XLA's
# attention is as fast.
CHUNKED_MIN_SCORES = 256 * 256
# cuDNN flash attention's head-dim limits (jax._src.cudnn.fused_attention_stablehlo).
_CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)


def attention_with_probs(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = False, upcast: bool = True):
  """Explicit softmax attention; returns (out_BTNH, probs_BNTS).

  `upcast` computes scores and softmax in float32 whatever the input dtype (diffusers'
  `upcast_attention` / `upcast_softmax`); float64 inputs stay float64 (gradient checks).
  """
  scale = q_BTNH.shape[-1] ** -0.5
  dtype = jnp.promote_types(q_BTNH.dtype, jnp.float32) if upcast else q_BTNH.dtype
  scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH.astype(dtype), k_BSNH.astype(dtype)) * scale
  if causal:
    t, s = scores_BNTS.shape[-2:]
    mask_TS = jnp.tril(jnp.ones((t, s), dtype=bool))
    scores_BNTS = jnp.where(mask_TS, scores_BNTS, jnp.finfo(dtype).min)
  probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
  out_BTNH = jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)
  return out_BTNH, probs_BNTS


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _attend_block(q_GQH, q0, k_DGKH, v_DGKH, *, s: int, causal: bool, scale: float):
  """Attention of one query block [q0, q0 + Q) of G heads over their keys, key block by key block.

  Online softmax (flash attention): a running row max m, row sum l and unnormalized output o, all
  float32; each key block rescales them by exp(m_old - m_new). Keys at positions >= s are padding
  and get no weight. With `causal`, key j is visible to query i when j <= i, so key 0 is visible to
  every row and m is finite after the first block.

  Args:
    q_GQH: [G, Q, H] queries.
    q0: int32 scalar, position of the block's first query.
    k_DGKH, v_DGKH: [D, G, K, H] keys and values in D blocks of K (padded to D * K >= s).
    s: the number of real keys.
    causal: mask keys after the query.
    scale: factor on the float32 scores (1.0 when q is already scaled).

  Returns:
    [G, Q, H] float32.
  """
  g, q, h = q_GQH.shape
  d, _, kb, _ = k_DGKH.shape
  neg = jnp.finfo(jnp.float32).min
  pad = d * kb > s
  rows_Q = q0 + jnp.arange(q, dtype=jnp.int32)

  def body(carry, xs):
    m_GQ1, l_GQ1, o_GQH = carry
    k_GKH, v_GKH, k0 = xs
    scores_GQK = jnp.einsum("GQH,GKH->GQK", q_GQH, k_GKH, preferred_element_type=jnp.float32)
    if scale != 1.0:
      scores_GQK = scores_GQK * scale
    if pad or causal:
      cols_K = k0 + jnp.arange(kb, dtype=jnp.int32)
      visible_QK = jnp.broadcast_to(cols_K[None, :] < s, (q, kb))
      if causal:
        visible_QK = visible_QK & (cols_K[None, :] <= rows_Q[:, None])
      scores_GQK = jnp.where(visible_QK, scores_GQK, neg)
    m_new_GQ1 = jnp.maximum(m_GQ1, jnp.max(scores_GQK, axis=-1, keepdims=True))
    p_GQK = jnp.exp(scores_GQK - m_new_GQ1)
    if pad or causal:
      # exp(neg - m) is 0 unless the whole row was masked so far; make masked keys exactly 0.
      p_GQK = jnp.where(visible_QK, p_GQK, 0.0)
    rescale_GQ1 = jnp.exp(m_GQ1 - m_new_GQ1)
    l_GQ1 = l_GQ1 * rescale_GQ1 + jnp.sum(p_GQK, axis=-1, keepdims=True)
    pv_GQH = jnp.einsum("GQK,GKH->GQH", p_GQK.astype(v_GKH.dtype), v_GKH, preferred_element_type=jnp.float32)
    return (m_new_GQ1, l_GQ1, o_GQH * rescale_GQ1 + pv_GQH), None

  init = (
    jnp.full((g, q, 1), neg, jnp.float32),
    jnp.zeros((g, q, 1), jnp.float32),
    jnp.zeros((g, q, h), jnp.float32),
  )
  starts_D = jnp.arange(d, dtype=jnp.int32) * kb
  if d == 1:  # one key block: no loop
    (_, l_GQ1, o_GQH), _ = body(init, (k_DGKH[0], v_DGKH[0], starts_D[0]))
  else:
    (_, l_GQ1, o_GQH), _ = jax.lax.scan(body, init, (k_DGKH, v_DGKH, starts_D))
  return o_GQH / l_GQ1


def chunked_attention(
  q_BTNH,
  k_BSNH,
  v_BSNH,
  *,
  causal: bool = False,
  q_chunk: int = DEFAULT_Q_CHUNK,
  kv_chunk: int = DEFAULT_KV_CHUNK,
  max_block_scores: int = MAX_BLOCK_SCORES,
):
  """Memory-lean attention: blocks of (heads, queries) in turn, online softmax over key blocks.

  Equal to `attention_with_probs(...)[0]` up to float32 rounding (scores, softmax and the value
  accumulation are float32 whatever the input dtype; probabilities are cast to v's dtype before the
  value product, as `attention_with_probs` does). The B * N heads are grouped `heads_per_block`
  at a time; the blocks (query block x head group) run in turn under `lax.map`, each over its heads'
  keys in blocks of `kv_chunk`, so the live scores are one [g, q_chunk, kv_chunk] tile of at most
  `max_block_scores` (or one head's tile, if that is larger). Lengths need not divide the block
  sizes: queries are padded and sliced off, padded keys get no weight. Each block is rematerialized
  (`jax.checkpoint`) so gradients stay lean too.

  Args:
    q_BTNH: [B, T, N, H] queries.
    k_BSNH, v_BSNH: [B, S, N, H] keys and values.
    causal: query i sees keys j <= i (the top-left aligned `jnp.tril` mask).
    q_chunk: query rows per block (capped at T).
    kv_chunk: key columns per block (capped at S).
    max_block_scores: the most scores one block holds; a block takes `heads_per_block` heads.

  Returns:
    out_BTNH: [B, T, N, H] in q's dtype.

  Example:
    >>> q = k = v = jnp.ones((2, 1000, 8, 40))
    >>> chunked_attention(q, k, v).shape
    (2, 1000, 8, 40)
  """
  b, t, n, h = q_BTNH.shape
  s = k_BSNH.shape[1]
  q_chunk, kv_chunk = max(1, min(q_chunk, t)), max(1, min(kv_chunk, s))
  c, d = _cdiv(t, q_chunk), _cdiv(s, kv_chunk)
  heads = b * n
  g = heads_per_block(heads, q_chunk * kv_chunk, max_block_scores)
  groups = heads // g

  # Float32 queries take the 1 / sqrt(H) scale for free; lower precisions scale the float32 scores
  # (as `attention_with_probs` and `jax.nn.dot_product_attention` do) to avoid a rounding.
  prescale = q_BTNH.dtype == jnp.float32
  scale = h**-0.5
  qp_BTNH = jnp.pad(q_BTNH * scale if prescale else q_BTNH, ((0, 0), (0, c * q_chunk - t), (0, 0), (0, 0)))
  # Blocks in the order (query block, head group): X = C * groups blocks of g heads.
  q_XGQH = qp_BTNH.reshape(b, c, q_chunk, n, h).transpose(1, 0, 3, 2, 4).reshape(c * groups, g, q_chunk, h)
  groups_X = jnp.tile(jnp.arange(groups, dtype=jnp.int32), c)
  starts_X = jnp.repeat(jnp.arange(c, dtype=jnp.int32) * q_chunk, groups)

  def blocks(x_BSNH):
    x_BSNH = jnp.pad(x_BSNH, ((0, 0), (0, d * kv_chunk - s), (0, 0), (0, 0)))
    x_BDKNH = x_BSNH.reshape(b, d, kv_chunk, n, h)
    return x_BDKNH.transpose(0, 3, 1, 2, 4).reshape(groups, g, d, kv_chunk, h).transpose(0, 2, 1, 3, 4)

  k_PDGKH, v_PDGKH = blocks(k_BSNH), blocks(v_BSNH)  # P = groups
  attend = functools.partial(_attend_block, s=s, causal=causal, scale=1.0 if prescale else scale)
  attend = jax.checkpoint(attend)

  def one_block(xs):
    q_GQH, group, q0 = xs
    return attend(q_GQH, q0, k_PDGKH[group], v_PDGKH[group])

  if c * groups == 1:  # a single block: no loop
    out_XGQH = one_block((q_XGQH[0], groups_X[0], starts_X[0]))[None]
  else:
    out_XGQH = jax.lax.map(one_block, (q_XGQH, groups_X, starts_X))
  out_BTNH = out_XGQH.reshape(c, b, n, q_chunk, h).transpose(1, 0, 3, 2, 4).reshape(b, c * q_chunk, n, h)
  return out_BTNH[:, :t].astype(q_BTNH.dtype)


def heads_per_block(heads: int, tile_scores: int, max_block_scores: int = MAX_BLOCK_SCORES) -> int:
  """How many of `heads` (batch x heads) `chunked_attention` takes per block: the largest divisor g
  of `heads` with g * `tile_scores` <= `max_block_scores`, at least 1.

  >>> heads_per_block(16, 4096 * 512), heads_per_block(16, 4096 * 77), heads_per_block(16, 1024 * 77)
  (1, 4, 16)
  """
  fits = [g for g in range(1, heads + 1) if heads % g == 0 and g * tile_scores <= max_block_scores]
  return max(fits, default=1)


def _cudnn_max_head_dim() -> int:
  """cuDNN flash attention's largest head dim on the default GPU: 256 from Hopper (sm90) on, else 128."""
  try:
    major = int(str(jax.devices()[0].compute_capability).split(".")[0])
  except (AttributeError, ValueError, IndexError):
    return 128
  return 256 if major >= 9 else 128


def cudnn_supported(q_BTNH, k_BSNH) -> bool:
  """Whether cuDNN flash attention can take these inputs (dtype and head dim; GPU backend)."""
  h = q_BTNH.shape[-1]
  return (
    jax.default_backend() == "gpu"
    and q_BTNH.dtype in _CUDNN_DTYPES
    and k_BSNH.dtype == q_BTNH.dtype
    and h % 8 == 0
    and h <= _cudnn_max_head_dim()
  )


def resolve_impl(q_BTNH, k_BSNH, impl: str = "auto") -> str:
  """The concrete implementation "auto" stands for, for these shapes on the default backend.

  GPU: "cudnn" when `cudnn_supported`, else "xla". CPU (and others): "chunked" when T * S >=
  `CHUNKED_MIN_SCORES`, else "xla". Any other `impl` is returned unchanged. Decided at trace time
  from static shapes and dtypes, so it never adds a branch to the compiled program.
  """
  if impl != "auto":
    return impl
  if jax.default_backend() == "gpu":
    return "cudnn" if cudnn_supported(q_BTNH, k_BSNH) else "xla"
  if q_BTNH.shape[1] * k_BSNH.shape[1] >= CHUNKED_MIN_SCORES:
    return "chunked"
  return "xla"


def dot_product_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = False, impl: str = "auto"):
  """Attention without returning probabilities, through the implementation named `impl`.

  Args:
    q_BTNH: [B, T, N, H] queries.
    k_BSNH, v_BSNH: [B, S, N, H] keys and values.
    causal: query i sees keys j <= i.
    impl: "xla" (XLA's fused softmax attention), "cudnn" (flash attention on NVIDIA GPUs; needs
      fp16/bf16 and a supported head dim), "chunked" (`chunked_attention`, memory-lean, fastest on
      CPU for long sequences), "reference" (explicit softmax, for debugging) or "auto"
      (`resolve_impl`: cudnn / chunked / xla by backend, dtype and shape).

  Returns:
    out_BTNH: [B, T, N, H].
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
  auto = impl == "auto"
  impl = resolve_impl(q_BTNH, k_BSNH, impl)
  if impl == "reference":
    return attention_with_probs(q_BTNH, k_BSNH, v_BSNH, causal=causal)[0]
  if impl == "chunked":
    return chunked_attention(q_BTNH, k_BSNH, v_BSNH, causal=causal)
  if impl == "cudnn" and auto:
    try:
      return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=causal, implementation="cudnn")
    except (NotImplementedError, RuntimeError):  # cuDNN missing or too old for these shapes
      impl = "xla"
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=causal, implementation=impl)
