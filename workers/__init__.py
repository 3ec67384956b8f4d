"""Everything that touches frames and the model: probing, sampling, decoding, the engine, the
visual-token cache and the job loop."""
