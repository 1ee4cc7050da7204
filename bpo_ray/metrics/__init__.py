"""Benchmark scorers (CHAIR, POPE, ...), pure Python, shared by the bias world and COCO benchmarks."""
