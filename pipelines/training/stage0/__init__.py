"""Stage 0 of the embedded default: the tiny recipe has no pretrained weights offline, so its vision tower
(`vision`) and LLM (`llm`) are pre-trained on the synthetic corpus first, as one-CPU Ray tasks (`common`)."""
