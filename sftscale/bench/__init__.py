"""`sftscale bench`: training throughput and memory over a grid, against the Hugging Face
Trainer on the same model, data and DeepSpeed template (suite), its baseline process
(hf_baseline), the synthetic corpus and tokenizer the benchmarks share (corpus), and the
report (report). Part of the library so that `sftscale bench` works from any install; the
repository's benchmarks/ folder holds the stand-alone benchmark scripts and recorded results.
"""
