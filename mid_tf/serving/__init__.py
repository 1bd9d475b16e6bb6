"""Client side of serving: talks to TF Serving (gRPC 8500 / REST 8501). Imports nothing else from mid_tf.

Use `python -m mid_tf.serving.client --help` (or `python -m mid_tf.serving`); the library API lives in
`mid_tf.serving.client` (GrpcClient, RestClient, ServingError, load_inputs). Kept import-free so the
CLI module runs without a runpy double-import warning.
"""
