"""Shared helpers of the int4-lora-bench pipeline: result IO, statistics, models, engines."""
