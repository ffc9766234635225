"""Streaming: models larger than the device, processed one decoder block at a time (issue 18)."""
