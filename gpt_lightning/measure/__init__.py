"""Measurement: timing.py (decode speed), limits.py (matmul peak, memory-read bandwidth, spec peaks), memory.py
(peak memory), references.py (the naive and Hugging Face contenders of the bench)."""
