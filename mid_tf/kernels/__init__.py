"""CPU performance kernels: same maths as TF's stock ops, faster on the CPUs they were written for.

  xla.py        small XLA-compiled kernels (2x2 max pooling with its argmax, max-unpooling, the
                1-channel convolution) and the switch that picks them (`configure(auto|on|off)`)
  fast_conv.py  drop-in Keras Conv2D / Conv2DTranspose with a matmul-based 1-channel gradient
The networks (models/) use them; nothing here knows the method. Measurements: docs/performance.md.
"""
