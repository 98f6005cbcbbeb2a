"""A tiny random-weight Stable Diffusion, built in memory: the whole pipeline in seconds, no download.

Its pixels are meaningless (the weights are random); it exists so that a newcomer can see the tool
run end to end, and so that tests exercise every code path on real-shaped checkpoints. The configs
use diffusers' / transformers' `config.json` keys; the tests build PyTorch twins from the same dicts.
"""

# SD1.x shape: 4 blocks like SD1.5 (attention at 1, 1/2, 1/4 of the latent; plain last block),
# `attention_head_dim` as a single int meaning the number of heads (diffusers' legacy naming).
TINY_SD1_UNET = dict(
  sample_size=16,
  in_channels=4,
  out_channels=4,
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  block_out_channels=(32, 32, 64, 64),
  layers_per_block=1,
  norm_num_groups=8,
  cross_attention_dim=32,
  attention_head_dim=4,
)

# Four blocks: the latent is 1/8 of the image, as in every SD VAE.
TINY_VAE = dict(
  in_channels=3,
  out_channels=3,
  down_block_types=("DownEncoderBlock2D",) * 4,
  up_block_types=("UpDecoderBlock2D",) * 4,
  block_out_channels=(16, 32, 32, 32),
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  sample_size=64,
)

TINY_SD1_TEXT = dict(
  vocab_size=49408,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  bos_token_id=49406,
  eos_token_id=49407,
  pad_token_id=1,
)
SD1_SCHEDULER = dict(
  num_train_timesteps=1000,
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule="scaled_linear",
  steps_offset=1,
  skip_prk_steps=True,
  set_alpha_to_one=False,
)

# A small random CLIP for trying the evaluator without a download (meaningless scores); its text
# tower is the tiny SD text encoder's.
TINY_CLIP = dict(
  projection_dim=32,
  text_config=TINY_SD1_TEXT,
  vision_config=dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=32,
  ),
)
