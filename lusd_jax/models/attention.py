"""Multi-head attention shared by the U-Net, the VAE and the CLIP text encoder, and its registry.

Entry points with one meaning: `dot_product_attention` runs whichever implementation is asked for
(or "auto") for layers whose maps nobody reads; `attend` does the same for a layer that may want
the maps of some batch rows, and returns the head-mean map when the implementation computes it in
the same call; `attention_with_probs` computes the softmax probabilities explicitly and returns
them, and is the float32 ground truth of every implementation. All take and return `[B, T, N, H]`
tensors (batch, query tokens, heads, head dim).

Implementations register by name in `REGISTRY` (as maxdiffusion's attention dispatch chooses
kernels), each an `AttentionImpl` that declares what it supports: platforms (and where it runs
compiled), q / k / v dtypes, head-dim limits, gradients, and whether it returns head-mean maps:

  "xla"        `jax.nn.dot_product_attention`: XLA's softmax attention; materializes the
               [B, N, T, S] scores (1 GiB float32 for SD1.5's 64x64 layers at batch 2). Anything.
  "cudnn"      cuDNN flash attention through `jax.nn.dot_product_attention`: GPU only, fp16 /
               bf16, head dim a multiple of 8, at most 128 (256 from Hopper on).
  "chunked"    `chunked_attention`: blocks of queries of a group of heads in turn under
               `lax.map`, each streaming over key blocks with an online softmax in float32 (flash
               attention written in jnp); memory O(MAX_BLOCK_SCORES) instead of O(B x N x T x S).
               The fast path on CPU. Anything.
  "pallas"     `lusd_jax.kernels.attention_with_map`: Pallas flash attention that also returns the
               head-mean map of a batch slice, differentiable through both; compiled on GPU
               (Triton) and TPU (Mosaic), interpreted on CPU (correct, slow); fp32 / bf16 / fp16
               (no fp16 on TPU), head dim <= 256.
  "reference"  `attention_with_probs` without the probabilities (debugging). Anything.
  "auto"       `select`, per layer, from static shapes, dtype, platform and whether the layer wants
               maps: a layer that wants head-mean maps takes the registered map kernel compiled on
               its platform ("pallas" on GPU / TPU); every other layer (and every layer on CPU,
               where Pallas only interprets) takes cudnn on GPU where it applies, chunked on CPU
               and TPU for long sequences, xla otherwise.

A named implementation that cannot compute a layer (e.g. "cudnn" on CPU, "pallas" in float64)
raises a ValueError saying why; one that supports the layer but returns no maps (every one but
"pallas", and "pallas" for per-head maps) computes the output and the caller computes the maps
beside it (`attend` returns None for the map).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lusd_jax import kernels

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
# cuDNN flash attention's dtypes and head-dim limits (jax._src.cudnn.fused_attention_stablehlo).
_CUDNN_DTYPES = ("float16", "bfloat16")


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


# ---------------------------------------------------------------------------------------------------
# The registry.

PLATFORMS = ("cpu", "gpu", "tpu")
HEADS = ("mean", "all")


def platform(backend: str | None = None) -> str:
  """`backend` (default `jax.default_backend()`) as a registry platform: "cuda" / "rocm" are "gpu"."""
  backend = backend or jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm") else backend


@dataclasses.dataclass(frozen=True)
class AttentionLayer:
  """The static facts of one attention call that implementations are chosen by.

  Attributes:
    t, s: query and key lengths.
    head_dim: H.
    dtype, kv_dtype: dtype names of q and of k / v.
    platform: "cpu", "gpu" or "tpu" (`platform`).
    maps: the head-mean map of some batch rows is wanted ("mean"), the per-head maps ("all"), or
      none (None).
    grad: the call may be differentiated (the U-Net: UnifyEdit's map losses backpropagate through
      every layer below the captured ones).
  """

  t: int
  s: int
  head_dim: int
  dtype: str
  kv_dtype: str
  platform: str
  maps: str | None = None
  grad: bool = False

  def __post_init__(self):
    if self.maps is not None and self.maps not in HEADS:
      raise ValueError(f"AttentionLayer.maps={self.maps!r}; expected None or one of {HEADS}")

  @classmethod
  def of(cls, q_BTNH, k_BSNH, *, maps: str | None = None, grad: bool = False, backend: str | None = None):
    """The layer of these inputs (arrays or `jax.ShapeDtypeStruct`s; only shapes and dtypes are read).

    Example:
      >>> q = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.bfloat16)
      >>> AttentionLayer.of(q, q, maps="mean", backend="cuda").platform
      'gpu'
    """
    return cls(
      t=q_BTNH.shape[1],
      s=k_BSNH.shape[1],
      head_dim=q_BTNH.shape[-1],
      dtype=jnp.dtype(q_BTNH.dtype).name,
      kv_dtype=jnp.dtype(k_BSNH.dtype).name,
      platform=platform(backend),
      maps=maps,
      grad=grad,
    )


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  """One registered implementation and what it declares to support.

  Attributes:
    name: the name `impl=` / `attention_impl=` selects it by.
    fn: `fn(q_BTNH, k_BSNH, v_BSNH, *, causal) -> out_BTNH`.
    platforms: where it runs at all; None: on every backend.
    compiled: where it runs compiled; "auto" picks it only there (Pallas interprets on CPU: correct,
      but far slower than the other paths); None: wherever it runs.
    dtypes: q, k and v dtype names it takes; None: any floating dtype.
    platform_dtypes: narrower dtype lists on some platforms, as (platform, dtypes) pairs.
    with_map: `with_map(q, k, v, *, causal, map_rows) -> (out_BTNH, map_BTS)`: the output and the
      head-mean map of batch rows `map_rows` in one call; None when it returns no maps.
    differentiable: `jax.grad` works through it (and through its map).
    head_dim_multiple: H must be a multiple of this.
    max_head_dim: the largest H, or a function returning it (read per call: it may depend on the
      device); None for no limit.
  """

  name: str
  fn: Callable[..., jax.Array]
  platforms: tuple[str, ...] | None = None
  compiled: tuple[str, ...] | None = None
  dtypes: tuple[str, ...] | None = None
  platform_dtypes: tuple[tuple[str, tuple[str, ...]], ...] = ()
  with_map: Callable[..., tuple[jax.Array, jax.Array]] | None = None
  differentiable: bool = True
  head_dim_multiple: int = 1
  max_head_dim: int | Callable[[], int] | None = None

  @property
  def maps(self) -> bool:
    """Whether it returns head-mean maps (`with_map`)."""
    return self.with_map is not None

  def unsupported(self, layer: AttentionLayer) -> str | None:
    """Why this implementation cannot compute `layer`'s output, or None when it can.

    Maps are not a reason: an implementation without them computes the output, and the caller the
    maps beside it (`attend`).
    """
    if self.platforms is not None and layer.platform not in self.platforms:
      return f"it runs on {'/'.join(self.platforms)}, not {layer.platform}"
    dtypes = dict(self.platform_dtypes).get(layer.platform, self.dtypes)
    if dtypes is not None and not {layer.dtype, layer.kv_dtype} <= set(dtypes):
      return f"it takes {'/'.join(dtypes)} on {layer.platform}, not {layer.dtype}"
    if layer.head_dim % self.head_dim_multiple:
      return f"head dim {layer.head_dim} is not a multiple of {self.head_dim_multiple}"
    limit = self.max_head_dim() if callable(self.max_head_dim) else self.max_head_dim
    if limit is not None and layer.head_dim > limit:
      return f"head dim {layer.head_dim} is over its limit of {limit}"
    if layer.grad and not self.differentiable:
      return "it is not differentiable"
    return None

  def supports(self, layer: AttentionLayer) -> bool:
    """Whether it can compute `layer`'s output (`unsupported` gives the reason when not)."""
    return self.unsupported(layer) is None

  def serves_maps(self, layer: AttentionLayer) -> bool:
    """Whether it returns `layer`'s maps itself: it has `with_map` and the layer wants head means."""
    return self.maps and layer.maps == "mean"


REGISTRY: dict[str, AttentionImpl] = {}


def register(impl: AttentionImpl, *, replace: bool = False) -> AttentionImpl:
  """Adds `impl` to `REGISTRY` under its name ("auto" is reserved); returns it.

  "auto" considers a registered implementation only for map layers (the first one, in registration
  order, that has `with_map`, is compiled on the platform and supports the layer); for layers
  without maps it keeps its fixed order (`_auto_order`).
  """
  if impl.name == "auto":
    raise ValueError('"auto" is not an implementation: it chooses among them')
  if impl.name in REGISTRY and not replace:
    raise ValueError(f"attention implementation {impl.name!r} is already registered")
  REGISTRY[impl.name] = impl
  return impl


def _lookup(name: str) -> AttentionImpl:
  if name not in REGISTRY:
    raise ValueError(f"unknown attention implementation {name!r}; expected one of {(*REGISTRY, 'auto')}")
  return REGISTRY[name]


def _auto_order(layer: AttentionLayer) -> tuple[str, ...]:
  """ "auto"'s preference for the output of a layer without a map kernel (today's choices).

  GPU: cuDNN flash attention, else XLA. Elsewhere: "chunked" from `CHUNKED_MIN_SCORES` scores per
  (batch, head) on (below it XLA's attention is as fast), else XLA.
  """
  if layer.platform == "gpu":
    return ("cudnn", "xla", "reference")
  if layer.t * layer.s >= CHUNKED_MIN_SCORES:
    return ("chunked", "xla", "reference")
  return ("xla", "reference")


def select(layer: AttentionLayer, impl: str = "auto") -> AttentionImpl:
  """The implementation that computes `layer`, by name or "auto" (static: decided at trace time).

  "auto": for a layer that wants head-mean maps, the first registered implementation with a map
  kernel that is compiled on the layer's platform and supports it ("pallas" on GPU and TPU); else,
  and for every other layer, the first of `_auto_order` that is compiled there and supports it
  (cuDNN on GPU where it applies, "chunked" on CPU and TPU for long sequences, XLA otherwise).

  A name: that implementation, which must support the layer's platform, dtype, head dim and
  gradients; it need not return maps (the caller computes them beside its output, `attend`).

  Raises:
    ValueError: for an unknown name, or a named implementation that cannot compute the layer (one
      line with the reason: e.g. "cudnn" on CPU, "pallas" with float64).
  """
  if impl != "auto":
    chosen = _lookup(impl)
    reason = chosen.unsupported(layer)
    if reason is not None:
      raise ValueError(
        f"attention implementation {impl!r} cannot compute this layer (T={layer.t}, S={layer.s}, "
        f"H={layer.head_dim}, {layer.dtype}, {layer.platform}): {reason}; use 'auto' or another of "
        f"{tuple(REGISTRY)}"
      )
    return chosen
  usable = lambda c: (c.compiled is None or layer.platform in c.compiled) and c.supports(layer)
  if layer.maps == "mean":
    for candidate in REGISTRY.values():
      if candidate.maps and usable(candidate):
        return candidate
  for name in _auto_order(layer):
    if name in REGISTRY and usable(REGISTRY[name]):
      return REGISTRY[name]
  raise ValueError(f"no attention implementation supports {layer}")


def cudnn_supported(q_BTNH, k_BSNH) -> bool:
  """Whether cuDNN flash attention can take these inputs (dtype and head dim; GPU backend)."""
  return REGISTRY["cudnn"].supports(AttentionLayer.of(q_BTNH, k_BSNH))


def resolve_impl(q_BTNH, k_BSNH, impl: str = "auto", *, maps: str | None = None, grad: bool = False) -> str:
  """The name of the implementation `impl` stands for, for these inputs on the default backend.

  `select` on `AttentionLayer.of(q_BTNH, k_BSNH, maps=maps, grad=grad)`. Without maps, "auto" is:
  GPU: "cudnn" when `cudnn_supported`, else "xla"; CPU and TPU: "chunked" when T * S >=
  `CHUNKED_MIN_SCORES`, else "xla". Decided at trace time from static shapes and dtypes, so it never
  adds a branch to the compiled program.
  """
  return select(AttentionLayer.of(q_BTNH, k_BSNH, maps=maps, grad=grad), impl).name


def _run(chosen: AttentionImpl, auto: bool, q_BTNH, k_BSNH, v_BSNH, causal: bool):
  if chosen.name == "cudnn" and auto:
    try:
      return chosen.fn(q_BTNH, k_BSNH, v_BSNH, causal=causal)
    except (NotImplementedError, RuntimeError):  # cuDNN missing or too old for these shapes
      chosen = REGISTRY["xla"]
  return chosen.fn(q_BTNH, k_BSNH, v_BSNH, causal=causal)


def dot_product_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = False, impl: str = "auto"):
  """Attention without returning probabilities, through the implementation named `impl`.

  Args:
    q_BTNH: [B, T, N, H] queries.
    k_BSNH, v_BSNH: [B, S, N, H] keys and values.
    causal: query i sees keys j <= i.
    impl: a `REGISTRY` name: "xla" (XLA's fused softmax attention), "cudnn" (flash attention on
      NVIDIA GPUs; needs fp16/bf16 and a supported head dim), "chunked" (`chunked_attention`,
      memory-lean, fastest on CPU for long sequences), "pallas" (the Pallas flash attention of
      `lusd_jax.kernels`; interpreted on CPU), "reference" (explicit softmax, for debugging), or
      "auto" (`select`: cudnn / chunked / xla by backend, dtype and shape).

  Returns:
    out_BTNH: [B, T, N, H].

  Raises:
    ValueError: for an unknown `impl`, or one that cannot run these inputs here (`select`).
  """
  chosen = select(AttentionLayer.of(q_BTNH, k_BSNH), impl)
  return _run(chosen, impl == "auto", q_BTNH, k_BSNH, v_BSNH, causal)


def attend(
  q_BTNH,
  k_BSNH,
  v_BSNH,
  *,
  map_rows: tuple[int, int] | None = None,
  heads: str = "mean",
  causal: bool = False,
  impl: str = "auto",
  grad: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Attention of a layer that may want maps: the output, and the head-mean map when the chosen
  implementation computes it in the same call.

  The layer wants the maps of batch rows `map_rows` (None: no maps), averaged over heads
  (`heads="mean"`) or per head ("all"). `select` picks the implementation; when it `serves_maps`
  (a map kernel, and head means wanted) the map comes back with the output, float32 [B', T, S].
  Otherwise the map is None and the caller computes it beside the output from q and k (per-head
  maps always take that path: no kernel returns them).

  Args:
    q_BTNH: [B, T, N, H] queries.
    k_BSNH, v_BSNH: [B, S, N, H] keys and values.
    map_rows: (start, stop) batch rows whose maps are wanted, or None.
    heads: "mean" or "all".
    causal: query i sees keys j <= i.
    impl: a `REGISTRY` name or "auto".
    grad: the call may be differentiated (an implementation must then be `differentiable`).

  Returns:
    (out_BTNH, map_BTS or None).

  Example:
    >>> q = k = v = jnp.ones((2, 16, 2, 8))
    >>> out, m = attend(q, k, v, map_rows=(1, 2), impl="pallas")
    >>> m.shape
    (1, 16, 16)
  """
  maps = None if map_rows is None else heads
  layer = AttentionLayer.of(q_BTNH, k_BSNH, maps=maps, grad=grad)
  chosen = select(layer, impl)
  if chosen.serves_maps(layer):
    return chosen.with_map(q_BTNH, k_BSNH, v_BSNH, causal=causal, map_rows=map_rows)
  return _run(chosen, impl == "auto", q_BTNH, k_BSNH, v_BSNH, causal), None


# Pallas tiles when the kernel is interpreted (CPU): each grid step and key block is a step of an XLA
# loop there, so large tiles compile and run faster (memory is no concern); 512 x 512 halves the
# compile time of a 1024-token layer against the kernel's 128 x 128 default. Compiled kernels (GPU,
# TPU) keep `kernels.block_sizes`.
PALLAS_INTERPRET_BLOCK = 512


def _pallas_blocks() -> dict:
  if platform() in ("gpu", "tpu"):
    return {}
  return {"block_q": PALLAS_INTERPRET_BLOCK, "block_k": PALLAS_INTERPRET_BLOCK}


def _pallas(q_BTNH, k_BSNH, v_BSNH, *, causal: bool):
  return kernels.attention_with_map(q_BTNH, k_BSNH, v_BSNH, causal=causal, **_pallas_blocks())[0]


def _pallas_with_map(q_BTNH, k_BSNH, v_BSNH, *, causal: bool, map_rows: tuple[int, int]):
  return kernels.attention_with_map(
    q_BTNH, k_BSNH, v_BSNH, map_rows=map_rows, causal=causal, **_pallas_blocks()
  )


def _xla(q_BTNH, k_BSNH, v_BSNH, *, causal: bool):
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=causal, implementation="xla")


def _cudnn(q_BTNH, k_BSNH, v_BSNH, *, causal: bool):
  return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=causal, implementation="cudnn")


def _reference(q_BTNH, k_BSNH, v_BSNH, *, causal: bool):
  return attention_with_probs(q_BTNH, k_BSNH, v_BSNH, causal=causal)[0]


register(AttentionImpl("xla", _xla))
register(
  AttentionImpl(
    "cudnn",
    _cudnn,
    platforms=("gpu",),
    compiled=("gpu",),
    dtypes=_CUDNN_DTYPES,
    head_dim_multiple=8,
    max_head_dim=lambda: _cudnn_max_head_dim(),  # looked up per call (tests replace it)
  )
)
register(AttentionImpl("chunked", chunked_attention))
register(
  AttentionImpl(
    "pallas",
    _pallas,
    platforms=PLATFORMS,
    compiled=("gpu", "tpu"),
    dtypes=("float32", "bfloat16", "float16"),
    platform_dtypes=(("tpu", ("float32", "bfloat16")),),  # Mosaic TPU has no float16 matmuls
    with_map=_pallas_with_map,
    # Triton pads H to a power of two, Mosaic to a multiple of 128: 256 covers SD's 40 / 80 / 160
    # (SD2's 64) with tiles that fit one SM / one TPU core's VMEM.
    max_head_dim=256,
  )
)
register(AttentionImpl("reference", _reference))

# The built-in names, "auto" last (what a CLI flag may offer).
IMPLEMENTATIONS = (*REGISTRY, "auto")
