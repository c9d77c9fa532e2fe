"""The grain pipeline: seeded shuffling, sharding, checkpointing, sources by name; pixel conversions."""

import io
import json

import grain
import grain.python
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from diffusion_jax.data import pipeline, shapes, transforms

N = 50


def _source(n=N):
  # The image encodes the index, so batches can be traced back to records.
  return [{"image": np.stack([np.full((4, 6), i % 256, np.uint8), np.full((4, 6), i // 256, np.uint8),
                              np.tile(np.arange(6, dtype=np.uint8), (4, 1))], -1),
           "caption": f"c{i}"} for i in range(n)]


def _ids(batch):
  return [int(c[1:]) for c in batch["caption"]]


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _dataset(**kwargs):
  kwargs = {"batch_size": 5, "seed": 0, "process_index": 0, "process_count": 1, **kwargs}
  return pipeline.make_dataset(_source(), **kwargs)


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
  epochs = lambda it: [sum((_ids(b) for b in _take(it, N // 5)), []) for _ in range(3)]  # noqa: E731
  first, again, other = epochs(_dataset(seed=1)), epochs(_dataset(seed=1)), epochs(_dataset(seed=2))
  assert first == again and first != other
  for epoch in first + other:
    assert sorted(epoch) == list(range(N))  # every record once per epoch
  assert first[0] != first[1] != first[2]
  assert epochs(_dataset(shuffle=False))[0] == list(range(N))


def test_finite_epochs_and_remainder():
  assert len(list(_dataset(num_epochs=2, batch_size=8))) == (2 * N) // 8
  batches = list(_dataset(num_epochs=1, batch_size=8, drop_remainder=False))
  assert [len(b["caption"]) for b in batches] == [8] * 6 + [2]


def test_process_shards_are_disjoint_and_equal():
  shards = []
  for index in range(3):
    it = _dataset(process_index=index, process_count=3, num_epochs=1, batch_size=4)
    shards.append(sum((_ids(b) for b in it), []))
  assert [len(s) for s in shards] == [16, 16, 16]  # 50 -> 48 usable records
  seen = [set(s) for s in shards]
  assert all(len(s) == 16 for s in seen)
  assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
  assert len(seen[0] | seen[1] | seen[2]) == 48


class _RandomCaption(grain.transforms.RandomMap):
  """A seeded random step, so iterator states must carry its randomness."""

  def random_map(self, record, rng):
    return {**record, "caption": record["caption"] + str(rng.integers(10))}


TRANSFORMED = dict(transforms=[_RandomCaption()], normalize=True,
                   tokenizer=lambda captions: [[len(c), 7] for c in captions])


def test_state_restore_mid_epoch_gives_the_same_batches():
  it = _dataset(**TRANSFORMED)
  _take(it, 13)  # into the third epoch (10 batches per epoch)
  state = it.get_state()
  expected = _take(it, 12)
  fresh = _dataset(**TRANSFORMED)
  _take(fresh, 2)  # a used iterator is put back too
  fresh.set_state(state)
  _assert_same(_take(fresh, 12), expected)
  assert json.loads(json.dumps(state)) == state  # the state is plain JSON


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  assert grain.python.PyGrainCheckpointSave is grain.checkpoint.CheckpointSave
  it = _dataset(**TRANSFORMED)
  _take(it, 7)
  with ocp.CheckpointManager(epath.Path(tmp_path)) as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _take(it, 6)
  fresh = _dataset(**TRANSFORMED)
  with ocp.CheckpointManager(epath.Path(tmp_path)) as manager:
    restored = manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same(_take(restored["data"], 6), expected)


def test_worker_process_gives_the_same_batches_and_restores():
  expected = _take(_dataset(), 8)
  it = _dataset(worker_count=1)
  _assert_same(_take(it, 4), expected[:4])
  state = it.get_state()
  fresh = _dataset(worker_count=1)
  fresh.set_state(state)
  _assert_same(_take(fresh, 4), expected[4:])


def test_records_pass_unchanged_by_default():
  source = _source()
  for batch in _take(_dataset(shuffle=False), 10):
    for i, image in zip(_ids(batch), batch["image"]):
      np.testing.assert_array_equal(image, source[i]["image"])


def test_normalized_images_and_tokens():
  raw = next(_dataset(shuffle=False))
  batch = next(_dataset(shuffle=False, normalize=True, tokenizer=TRANSFORMED["tokenizer"]))
  assert batch["image"].dtype == np.float32
  np.testing.assert_allclose(batch["image"], raw["image"] / 127.5 - 1, rtol=1e-6)
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert batch["tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["tokens"], [[len(c), 7] for c in raw["caption"]])
  assert batch["caption"].dtype.kind == "U"


class _Upper(grain.transforms.Map):

  def map(self, record):
    return {**record, "caption": record["caption"].upper()}


def test_user_transforms():
  add_x = lambda r: {**r, "caption": r["caption"] + "x"}  # noqa: E731
  batch = next(_dataset(shuffle=False, transforms=[_Upper(), add_x]))
  assert list(batch["caption"]) == ["C0x", "C1x", "C2x", "C3x", "C4x"]


# ----------------------------------------------------------------------------
# Sources by name.


def test_get_source_shapes_is_built_once(tmp_path):
  config = {"name": "shapes", "data_dir": str(tmp_path), "train_size": 16, "test_size": 4}
  source = pipeline.get_source(config)
  files = sorted(tmp_path.rglob("*.array_record*"))
  stamps = [f.stat().st_mtime_ns for f in files]
  assert len(source) == 16
  record = source[3]
  assert record.keys() == {"image", "caption"} and isinstance(record["caption"], str)
  np.testing.assert_array_equal(record["image"], shapes.generate_example("train", 3)["image"])
  test = pipeline.get_source({**config, "split": "test", "labels": True, "image_size": 32})
  assert [f.stat().st_mtime_ns for f in files] == stamps  # reused, not rebuilt
  record = test[1]
  assert len(test) == 4 and record["image"].shape == (32, 32, 3)
  assert record["num_objects"] == 2 and record["caption"] == shapes.generate_example("test", 1)["caption"]
  batch = next(pipeline.make_dataset(test, batch_size=4, shuffle=False, process_index=0, process_count=1))
  assert batch["boxes"].shape == (4, 2, 4)


def test_get_source_image_folder(tmp_path):
  Image.new("RGB", (10, 8), (1, 2, 3)).save(tmp_path / "a.png")
  (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "hello"}\n')
  source = pipeline.get_source({"name": "image_folder", "path": str(tmp_path), "image_size": 8,
                                "caption_key": "caption"})
  assert len(source) == 1 and source[0]["caption"] == "hello"
  assert (source[0]["image"] == (1, 2, 3)).all() and source[0]["image"].shape == (8, 8, 3)


def test_get_source_rejects_unknown_names():
  with pytest.raises(ValueError, match="Unknown data source"):
    pipeline.get_source({"name": "imagenet"})


def test_tfds_catalog_with_mock_data():
  # tf_flowers builds its features without TensorFlow, so TFDS's mock works here.
  names = tfds.builder("tf_flowers").info.features["label"].names
  with tfds.testing.mock_data(num_examples=6):
    source = pipeline.get_source({"name": "tfds:tf_flowers", "image_size": 12})
    assert len(source) == 6
    for i in range(6):
      record = source[i]
      assert record["image"].shape == (12, 12, 3) and record["image"].dtype == np.uint8
      assert record["caption"] in {f"a photo of {n}" for n in names}


class ToyCaptions(tfds.core.GeneratorBasedBuilder):
  """coco_captions' layout (an image, several captions), which TFDS's mock cannot build without TensorFlow."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(3):
      png = io.BytesIO()
      Image.fromarray(toy_image(i)).save(png, format="PNG")  # TFDS encodes arrays with TensorFlow
      yield i, {"image": png.getvalue(),
                "captions": [{"id": 10 * i + k, "text": f"caption {k} of {i}"} for k in range(2)]}


def toy_image(i):
  return np.random.default_rng(i).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_tfds_catalog_mapping_with_an_array_record_builder(tmp_path):
  ToyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = pipeline.get_source({"name": "tfds:toy_captions", "data_dir": str(tmp_path),
                                "image_size": 16, "caption_key": "captions/text",
                                "caption_index": 1})
  assert len(source) == 3
  captions = sorted(source[i]["caption"] for i in range(3))
  assert captions == [f"caption 1 of {i}" for i in range(3)]
  for i in range(3):
    record = source[i]
    index = int(record["caption"].rsplit(" ", 1)[1])
    np.testing.assert_array_equal(record["image"],
                                  transforms.resize_center_crop(toy_image(index), 16))
  # The known mapping of coco_captions is this one.
  from diffusion_jax.data import tfds_catalog  # pylint: disable=g-import-not-at-top
  coco = tfds_catalog.KNOWN_MAPPINGS["coco_captions"]
  assert (coco.image_key, coco.caption_key) == ("image", "captions/text")


# ----------------------------------------------------------------------------
# Pixel conversions.


def test_model_pixels_round_trip():
  values = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  pixels = transforms.to_model_pixels(values)
  assert pixels.dtype == np.float32 and pixels.min() == -1 and pixels.max() == 1
  np.testing.assert_array_equal(transforms.to_uint8(pixels), values)
  np.testing.assert_array_equal(transforms.to_uint8(np.array([-3.0, 0.0, 2.0])), [0, 128, 255])
  np.testing.assert_array_equal(transforms.to_uint8(np.array([0.0, 0.5, 1.0]), (0.0, 1.0)), [0, 128, 255])
  assert transforms.to_uint8(values) is values


def test_as_rgb_uint8(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a.png")
  rgba = Image.fromarray(np.dstack([rgb, np.zeros((5, 7), np.uint8)]), "RGBA")  # transparent
  cases = {
      "array": (rgb, rgb[None]),
      "batch": (np.stack([rgb, rgb]), np.stack([rgb, rgb])),
      "float": (rgb / 255.0, rgb[None]),
      "path": (str(tmp_path / "a.png"), rgb[None]),
      "pil": (Image.fromarray(rgb), rgb[None]),
      "list": ([Image.fromarray(rgb), rgb], np.stack([rgb, rgb])),
      "gray": (rgb[..., 0], np.repeat(rgb[None, ..., :1], 3, -1)),
      "alpha": (rgba, np.full((1, 5, 7, 3), 255, np.uint8)),  # over white
  }
  for name, (image, expected) in cases.items():
    out = transforms.as_rgb_uint8(image, name)
    assert out.dtype == np.uint8, name
    np.testing.assert_array_equal(out, expected, err_msg=name)
  for bad in (np.zeros((1, 5, 7, 4), np.uint8), np.zeros((5,), np.uint8), str(tmp_path / "none.png"),
              [rgb, rgb[:4]]):
    with pytest.raises(ValueError, match="init_image"):
      transforms.as_rgb_uint8(bad, "init_image")
