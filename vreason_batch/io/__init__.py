"""Data in and out: storage (local / S3), manifests, video decoding, the output schema and layout."""
