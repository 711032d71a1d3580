"""Image encoders, caption encoders and the fused multi-label tagger."""

