"""Decoding, geometry and augmentation (graph functions used by the pipeline).

Image convention (the models' input contract): float32 ``pixel / 255 - mean`` with
``mean`` a per-pixel mean image in the same [0, 1] units, so values lie in [-1, 1];
always 3 channels.

Training augmentation:
- ``PAD_CROP`` (32x32 CIFAR-like and other small images): the mean is subtracted
  first, then the image is zero-padded by ``pad`` pixels on each side and a random
  ``H x W`` window is cut out (a shift of up to ``pad`` pixels), then flipped
  horizontally with probability 1/2 when ``flip``. Padding after centring makes the
  border equal to the mean image's value, so it carries no signal.
- ``RESIZE_CROP`` (ImageNet-like): the shorter side is resized to ``resize``
  (bilinear), a random ``H x W`` crop is cut out, the mean subtracted, and the result
  flipped with probability 1/2 (method.md section 4: "a random 224x224 crop of the
  image or its horizontal flip").

Evaluation: ``PAD_CROP`` uses the image as is; ``RESIZE_CROP`` resizes the shorter side
to ``resize`` and takes the centre ``H x W`` crop.
"""

from __future__ import annotations

import tensorflow as tf

from tfq.data.core import PAD_CROP, RESIZE_CROP

# Streams of independent stateless random numbers drawn from one seed.
_CROP_Y, _CROP_X, _FLIP, _ELEMENT_CROP = range(4)


def _seed(seed, stream):
    """A stateless seed for ``stream`` drawn from a shape-[2] int64 ``seed``."""
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), stream)


# Refuse to decode images whose header claims more pixels than this (a few bytes can
# declare a 60000 x 60000 image); the largest ImageNet image has about 20M.
MAX_PIXELS = 1 << 26


def _declared_pixels(payload):
    """Pixels a JPEG or PNG header declares (0 for other formats, checked by TF)."""
    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(payload), tf.int64)
        return shape[0] * shape[1]

    def png():
        ihdr = tf.io.decode_raw(tf.strings.substr(payload, 16, 8), tf.uint8)
        dims = tf.cast(tf.reshape(ihdr, [2, 4]), tf.int64)
        size = dims[:, 0] * 2**24 + dims[:, 1] * 2**16 + dims[:, 2] * 2**8 + dims[:, 3]
        return size[0] * size[1]

    magic = tf.strings.substr(payload, 0, 4)
    return tf.case([(tf.equal(tf.strings.substr(payload, 0, 2), b"\xff\xd8"), jpeg),
                    (tf.equal(magic, b"\x89PNG"), png)],
                   default=lambda: tf.constant(0, tf.int64))


def decode(payload):
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 RGB (grayscale repeated, CMYK converted).

    Raises (inside the graph) ``InvalidArgumentError`` for bytes that are not a
    decodable image or that declare more than ``MAX_PIXELS`` pixels; the pipeline turns
    that into a skip or an error naming the file.
    """
    pixels = _declared_pixels(payload)
    check = tf.debugging.Assert(pixels <= MAX_PIXELS, ["image declares", pixels, "pixels"])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(payload, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _to_uint8(image):
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_to(image, size):
    """Resizes uint8 [h, w, 3] to ``size`` (bilinear) unless it already has that size."""
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size[0]), tf.equal(shape[1], size[1]))
    image = tf.cond(
        same,
        lambda: image,
        lambda: _to_uint8(tf.image.resize(image, size, method="bilinear")),
    )
    return tf.ensure_shape(image, [size[0], size[1], 3])


def resize_shorter(image, shorter):
    """Resizes uint8 [h, w, 3] so that its shorter side is ``shorter`` (bilinear)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.cast(shorter, tf.float32) / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), shorter)
    return _to_uint8(tf.image.resize(image, new, method="bilinear"))


def element_geometry(image, geometry, training, seed=None):
    """Brings one decoded uint8 image to the geometry's size (per element, before batching).

    ``seed``: shape-[2] int64 stateless seed of this element (training only).

    PAD_CROP: resized to ``size`` if it differs (padding/cropping happen per batch).
    RESIZE_CROP: shorter side resized, then a random (training) or centre crop.
    """
    h, w = geometry.size
    if geometry.mode == PAD_CROP:
        return resize_to(image, geometry.size)
    image = resize_shorter(image, geometry.resize)
    if training:
        image = tf.image.stateless_random_crop(image, [h, w, 3], _seed(seed, _ELEMENT_CROP))
    else:
        shape = tf.shape(image)
        top, left = (shape[0] - h) // 2, (shape[1] - w) // 2
        image = image[top:top + h, left:left + w]
    return tf.ensure_shape(image, [h, w, 3])


def _random_shift(x, pad, seed):
    """Zero-pads a batch by ``pad`` and cuts one random window per image."""
    shape = tf.shape(x)
    b, h, w = shape[0], shape[1], shape[2]
    x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    dy = tf.random.stateless_uniform([b], _seed(seed, _CROP_Y), 0, 2 * pad + 1, tf.int32)
    dx = tf.random.stateless_uniform([b], _seed(seed, _CROP_X), 0, 2 * pad + 1, tf.int32)
    rows = dy[:, None] + tf.range(h)[None, :]
    cols = dx[:, None] + tf.range(w)[None, :]
    x = tf.gather(x, rows, axis=1, batch_dims=1)
    return tf.gather(x, cols, axis=2, batch_dims=1)


def _random_flip(x, seed):
    flip = tf.random.stateless_uniform([tf.shape(x)[0]], _seed(seed, _FLIP)) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)


def finish_batch(images, geometry, mean, training, seed=None):
    """uint8 [B, h, w, 1 or 3] -> float32 [B, H, W, 3] in the model's convention.

    Args:
      images: a batch of uint8 images (arrays may still have 1 channel or another size).
      geometry: the pipeline's ``Geometry``.
      mean: float32 [H, W, 3] tensor in [0, 1] units, or None.
      training: apply the random augmentation.
      seed: shape-[2] int64 stateless seed of this batch's augmentation (training only).
    """
    x = tf.cast(images, tf.float32)
    if images.shape[-1] == 1:
        x = tf.repeat(x, 3, axis=-1)
    if tuple(images.shape[1:3]) != tuple(geometry.size):
        x = tf.image.resize(x, geometry.size, method="bilinear")
    x = x / 255.0
    if mean is not None:
        x = x - mean
    if training and geometry.mode == PAD_CROP and geometry.pad > 0:
        x = _random_shift(x, geometry.pad, seed)
    if training and geometry.flip:
        x = _random_flip(x, seed)
    h, w = geometry.size
    return tf.ensure_shape(x, [None, h, w, 3])


__all__ = ["decode", "element_geometry", "finish_batch", "resize_to", "resize_shorter",
           "PAD_CROP", "RESIZE_CROP"]
