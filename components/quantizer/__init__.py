"""The Quantizer TFX component (a custom Beam component) and its Trainer contract."""
