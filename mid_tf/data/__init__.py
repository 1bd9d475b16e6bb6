"""Data: IDX reader, image folders, datasets by name, tf.data pipelines.

`datasets`, `folders` and `idx` need only NumPy (and Pillow, imported when images are decoded), so
`train.py` can check for the data before TensorFlow is imported; the tf.data pipelines are imported on
first use.
"""

from mid_tf.data.datasets import (DATA_DIR_ENV, DATASET_SHAPES, FOLDER_DATASETS, KNOWN_DATASETS, DataError, Split,
                                   class_names_for, load_split, preflight)

_PIPELINE = ("eval_dataset", "steps_per_epoch", "train_stream")


def __getattr__(name):
    if name in _PIPELINE:
        from mid_tf.data import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)


__all__ = ["DATA_DIR_ENV", "DATASET_SHAPES", "FOLDER_DATASETS", "KNOWN_DATASETS", "DataError", "Split",
           "class_names_for", "load_split", "preflight", *_PIPELINE]
