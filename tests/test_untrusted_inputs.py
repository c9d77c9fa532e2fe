"""Property tests: any bytes as an image file, any text as a prompt, are handled or refused cleanly."""
import io
import json
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from diffusion_jax.data.image_folder import ImageFolderSource
from diffusion_jax.tokenizer import CLIPTokenizer


def _valid_image_bytes(fmt: str, mode: str) -> bytes:
  buf = io.BytesIO()
  image = Image.fromarray((np.arange(12 * 10 * 3) % 251).astype(np.uint8).reshape(12, 10, 3)).convert(mode)
  image.save(buf, format=fmt)
  return buf.getvalue()


SEEDS = [_valid_image_bytes(f, m) for f, m in [("PNG", "RGB"), ("PNG", "P"), ("PNG", "I;16"), ("JPEG", "L"),
                                                ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGBA")]]


@st.composite
def image_file_bytes(draw):
  """Arbitrary bytes, or a valid image with bytes flipped, cut or appended."""
  if draw(st.booleans()):
    return draw(st.binary(max_size=512))
  data = bytearray(draw(st.sampled_from(SEEDS)))
  for _ in range(draw(st.integers(0, 4))):
    pos = draw(st.integers(0, len(data) - 1))
    data[pos] = draw(st.integers(0, 255))
  if draw(st.booleans()):
    data = data[:draw(st.integers(0, len(data)))]
  return bytes(data) + draw(st.binary(max_size=16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=image_file_bytes())
def test_any_bytes_as_an_image_file_are_loaded_or_skipped(tmp_path_factory, blob):
  root = tmp_path_factory.mktemp("folder")
  (root / "x.png").write_bytes(blob)
  (root / "ok.png").write_bytes(SEEDS[0])
  with open(root / "metadata.jsonl", "w") as f:
    f.write(json.dumps({"file_name": "x.png", "text": "a thing"}) + "\n")
    f.write(json.dumps({"file_name": "ok.png", "text": "a good thing"}) + "\n")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    source = ImageFolderSource(root, image_size=8)
  assert len(source) + len(source.skipped) == 2
  assert "a good thing" in [source[i]["caption"] for i in range(len(source))]
  for i in range(len(source)):
    record = source[i]
    assert record["image"].shape == (8, 8, 3) and record["image"].dtype == np.uint8


TOKENIZER = CLIPTokenizer.from_words("a large red circle on the left of blue square".split())


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_unicode_prompt_gives_77_valid_ids(text):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # over-long prompts warn; that is tested elsewhere
    ids = TOKENIZER([text])
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  assert ids[0, 0] == TOKENIZER.bos_token_id and TOKENIZER.eos_token_id in ids[0]
  assert ids.min() >= 0 and ids.max() < TOKENIZER.vocab_size
