"""The engine: model loading, prompting, the V-Reason controller, the last layer in float32, and the decode loop. No Ray, no files."""
