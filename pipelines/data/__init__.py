"""Data layer of the Ray pipeline: record validation (`records`) and the training-side shard loader
(`loader`). `pipelines.preprocess` is the Ray Data step that writes the shards."""
