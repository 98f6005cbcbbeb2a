"""`configs.config_kwargs`: the one rule every `from_dict` applies to a `config.json` dict."""

import dataclasses

import pytest

from lusd_jax import schedule as schedule_lib
from lusd_jax.configs import config_kwargs, tuplify
from lusd_jax.models import clip, clip_text, unet, vae


@dataclasses.dataclass(frozen=True)
class Toy:
  blocks: tuple = (1, 2)
  act: str = "silu"
  token_id: int = 0


def test_known_ignored_metadata_and_unknown_keys():
  d = {"_class_name": "Toy", "blocks": [[1, 2], [3]], "dropout": 0.1, "act": "gelu"}
  assert config_kwargs(Toy, d, name="toy config", ignore=("dropout",)) == {
    "blocks": ((1, 2), (3,)),
    "act": "gelu",
  }
  with pytest.raises(ValueError, match=r"^toy config: unknown key 'dropout' \(value 0.1\)\.$"):
    config_kwargs(Toy, d, name="toy config")
  assert config_kwargs(Toy, d, name="toy config", strict=False) == {"blocks": ((1, 2), (3,)), "act": "gelu"}


def test_default_only_keys_and_convert():
  rule = {"upcast": False}
  assert config_kwargs(Toy, {"upcast": False}, name="toy config", default_only=rule) == {}
  with pytest.raises(
    ValueError, match=r"toy config: upcast=True is not supported \(only the default False\)"
  ):
    config_kwargs(Toy, {"upcast": True}, name="toy config", default_only=rule)
  first = lambda key, v: v[0] if key == "token_id" else v
  assert config_kwargs(Toy, {"token_id": [7, 8]}, name="toy config", convert=first) == {"token_id": 7}
  assert tuplify([1, [2, [3]]]) == (1, (2, (3,))) and tuplify("ab") == "ab"


def test_every_config_uses_the_rule():
  # Architecture configs reject unknown keys by name; the scheduler and CLIP towers drop them.
  for cls, name in [
    (unet.UNetConfig, "UNet config"),
    (vae.VAEConfig, "VAE config"),
    (clip_text.CLIPTextConfig, "text encoder config"),
  ]:
    with pytest.raises(ValueError, match=rf"^{name}: unknown key 'no_such_key'"):
      cls.from_dict({"_diffusers_version": "0.30", "no_such_key": 1})
  assert schedule_lib.Schedule.from_dict({"no_such_key": 1, "steps_offset": 1}) == schedule_lib.Schedule()
  assert clip.CLIPVisionConfig.from_dict({"no_such_key": 1, "patch_size": 16}).patch_size == 16
  cfg = clip.CLIPConfig.from_dict({"text_config": {"eos_token_id": [49407, 2], "no_such_key": 1}})
  assert cfg.text_config.eos_token_id == 49407
  with pytest.raises(ValueError, match="only the default"):
    unet.UNetConfig.from_dict({"class_embed_type": "timestep"})
