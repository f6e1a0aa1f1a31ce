"""The data side of the pipeline, in the order data flows: where it comes from (`sources`; the synthetic
corpus in `synth/`), reading LLaVA annotation files (`annotations`), record validation and tokenization
(`records`), the Ray Data step that writes validated Parquet shards (`preprocess`), and the training-side
shard loader (`loader`)."""
