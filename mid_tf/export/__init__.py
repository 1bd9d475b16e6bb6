"""Export of the deployed MID model for TF Serving (SavedModel + warmup + models.config)."""

from mid_tf.export.savedmodel import (SIGNATURES, ExportError, build_serving_module, existing_versions,
                                      export_model, next_version, read_export_json, signature_summary,
                                      verify_export)

__all__ = ["SIGNATURES", "ExportError", "build_serving_module", "existing_versions", "export_model",
           "next_version", "read_export_json", "signature_summary", "verify_export"]
