"""The engine: model loading, prompting, the V-Reason controller, the last layer in float32, and the decode loop. No Ray, no files.

The model: models.py (LoadedModel, what the loop sees), loading.py (builds it; the only module
naming transformers model classes), hf_standins.py (the KV-cache layer and last-layer stand-in).
Inputs: prompting.py, modes.py. The method: controller.py (pure tensor code), last_layer.py.
The decode loop, as gpt-fast's generate.py in pieces: api.py (what goes in and comes out),
state.py (per-row state), prefill.py, step.py (one token), driver.py (continuous batching).
"""
