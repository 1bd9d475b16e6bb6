"""The export's one error type, in a module of its own so that the TensorFlow-free parts of the export
(the model card, the publishing rules) can raise it without loading TensorFlow."""


class ExportError(RuntimeError):
    """An export that cannot proceed; the message names the fix."""
