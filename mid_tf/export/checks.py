"""The request checks inside the served graph: each failure is an InvalidArgumentError, which TF Serving
returns as INVALID_ARGUMENT with the assertion's message, and the server goes on serving.

  checked_image(image, shape, limits)            float32 [batch, H, W, C] in [0, 1], batch <= max_batch
  decoded_images(image_bytes, shape, limits)     PNG/JPEG bytes [batch] -> float32 [batch, H, W, C]

Encoded images are checked from their headers *before* decoding (size in bytes, PNG/JPEG signature,
the height and width the header declares), so a small file that declares a huge image is refused
without the decoder allocating it. Images of another size are refused rather than resized: a resize
would change what the robustness numbers in the model card were measured on.
"""

from __future__ import annotations

import tensorflow as tf

from mid_tf.export.limits import ServingLimits

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def image_message(shape) -> str:
    h, w, c = shape
    return f"image must be float32 [batch, {h}, {w}, {c}] with values in [0, 1]"


def batch_message(limits: ServingLimits) -> str:
    return (f"a request holds at most {limits.max_batch} images (max_batch in export.json): send fewer per "
            "request (mid-client --batch_size); got")


def _after(checks, tensor):
    """`tensor`, computed only once every check in `checks` has passed."""
    with tf.control_dependencies(checks):
        return tf.identity(tensor)


def _check_batch(batch_size, limits: ServingLimits):
    return tf.debugging.Assert(batch_size <= limits.max_batch, [batch_message(limits), batch_size],
                               name="check_batch_size")


def checked_image(image, shape, limits: ServingLimits):
    """Asserts rank, H/W/C, batch size and the value range in-graph, then pins the static shape."""
    h, w, c = shape
    message = image_message(shape)
    dims = tf.shape(image)
    padded = tf.concat([dims, tf.zeros([4], tf.int32)], axis=0)[:4]  # no out-of-range slice for rank < 4
    # batch >= 1 too: an empty batch would otherwise fail obscurely inside the convolutions.
    shape_ok = tf.logical_and(tf.logical_and(tf.equal(tf.size(dims), 4), padded[0] > 0),
                              tf.reduce_all(tf.equal(padded[1:], tf.constant([h, w, c], tf.int32))))
    check_shape = tf.debugging.Assert(shape_ok, [message + "; got shape", dims], summarize=8,
                                      name="check_image_shape")
    check_batch = _check_batch(padded[0], limits)
    with tf.control_dependencies([check_shape, check_batch]):
        # `x >= 0 and x <= 1` is false for NaN, so NaN/inf are rejected as out of range too.
        in_range = tf.reduce_all(tf.logical_and(image >= 0.0, image <= 1.0))
        check_range = tf.debugging.Assert(
            in_range, [message + "; got min", tf.reduce_min(image), "max", tf.reduce_max(image)],
            name="check_image_range")
    return tf.ensure_shape(_after([check_range], image), [None, h, w, c])


def _big_endian(byte_columns):
    """uint8 [batch, k] -> int64 [batch]: the k bytes read as one big-endian unsigned integer."""
    k = byte_columns.shape[-1]
    weights = tf.constant([256 ** (k - 1 - i) for i in range(k)], tf.int64)
    return tf.reduce_sum(tf.cast(byte_columns, tf.int64) * weights, axis=-1)


def _declared_sizes(image_bytes, is_png):
    """(heights, widths) int64 [batch] as each file's header declares them, without decoding pixels.

    PNG: the IHDR chunk is first, its width and height at bytes 16..23. JPEG: the SOF marker, found by
    ExtractJpegShape (a header parse as well)."""
    padded = tf.strings.join([image_bytes, tf.constant(b"\0" * 24)])  # short entries must not fail substr
    ihdr = tf.io.decode_raw(tf.strings.substr(padded, 16, 8), tf.uint8, fixed_length=8)
    png_w, png_h = _big_endian(ihdr[:, :4]), _big_endian(ihdr[:, 4:])

    def jpeg_size(args):
        data, png = args
        return tf.cond(png, lambda: tf.zeros([2], tf.int64),
                       lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64))

    jpeg = tf.map_fn(jpeg_size, (image_bytes, is_png), fn_output_signature=tf.TensorSpec([2], tf.int64))
    return tf.where(is_png, png_h, jpeg[:, 0]), tf.where(is_png, png_w, jpeg[:, 1])


def decoded_images(image_bytes, shape, limits: ServingLimits):
    """PNG/JPEG bytes [batch] -> float32 [batch, H, W, C] in [0, 1], after the request checks."""
    h, w, c = shape
    lengths = tf.strings.length(image_bytes)
    batch = tf.size(image_bytes)
    check_batch = _check_batch(batch, limits)
    check_bytes = tf.debugging.Assert(
        tf.logical_and(batch > 0, tf.reduce_all((lengths > 0) & (lengths <= limits.max_image_bytes))),
        [f"image_bytes must hold 1 or more PNG or JPEG files of 1 to {limits.max_image_bytes} bytes each "
         "(max_image_bytes in export.json); got sizes", lengths], summarize=16, name="check_image_bytes")
    image_bytes = _after([check_batch, check_bytes], image_bytes)
    is_png = tf.equal(tf.strings.substr(image_bytes, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, len(JPEG_SIGNATURE)), JPEG_SIGNATURE)
    check_format = tf.debugging.Assert(
        tf.reduce_all(is_png | is_jpeg),
        ["image_bytes entries must be PNG or JPEG files (not another format, not raw pixels); "
         "PNG/JPEG signature found per entry:", is_png | is_jpeg], summarize=16, name="check_image_format")
    heights, widths = _declared_sizes(_after([check_format], image_bytes), is_png)
    check_size = tf.debugging.Assert(
        tf.reduce_all((heights == h) & (widths == w)),
        [f"image_bytes: each image must be {h}x{w} pixels (height x width, as the model takes them); resize them "
         "before sending. Got heights", heights, "widths", widths], summarize=16, name="check_image_size")

    def decode_one(data):
        img = tf.io.decode_image(data, channels=c, dtype=tf.float32, expand_animations=False)
        return tf.ensure_shape(img, [h, w, c])

    return tf.map_fn(decode_one, _after([check_size], image_bytes),
                     fn_output_signature=tf.TensorSpec([h, w, c], tf.float32))
