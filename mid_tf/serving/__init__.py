"""Client side of serving: talks to TF Serving (gRPC 8500 / REST 8501). Imports nothing else from mid_tf.

Use `python -m mid_tf.serving.client --help` (or `python -m mid_tf.serving`, or `mid-client`); the
library API lives in `mid_tf.serving.client` (GrpcClient, RestClient, ServingError, load_inputs,
model_card_text). Kept import-free so the CLI module runs without a runpy double-import warning.
"""
