"""Run-time patches of third-party packages, one module per package, each patch naming the upstream
issue it works around (tests/test_compat.py fails once upstream no longer shows the bug).

  cleverhans.py        CleverHans 4.0.0 on Keras 3 / NumPy 2 (`apply()`), seedable PGD random start
  keras_distribute.py  Keras' `fit` under MultiWorkerMirroredStrategy (`apply()`)
  batchnorm.py         BatchNormalization with exact second derivatives (`exact_batch_normalization`)
"""
