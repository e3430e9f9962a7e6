"""Data in and out: storage (local / S3), manifests, video decoding, the output schema and layout.

storage.py is the one face for files and objects (localfs.py and s3.py do the work, failures.py
holds the error types and the retry policy); manifest.py reads a job's input (manifest_formats.py
parses the files, manifest_rows.py turns a row into a Sample); video.py decodes clips (the readers in video_decord.py, video_pyav.py, video_image.py; the
choice in video_probe.py; clip.py holds what they return); schema.py
and outputs.py name what is written.
"""
