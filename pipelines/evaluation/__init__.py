"""Evaluating checkpoints on the benchmarks, fanned out over Ray: what to evaluate (`config`), where the
benchmarks live (`benchmarks`), the shards and their workers (`fanout`), scores, tables and figures
(`report`), and the whole run with its MLflow logging (`run`). Answering questions on one device is
`dpn.inference`."""
