"""The bootstrap service: a registry of prefill instances and of room -> prefill DP rank records."""
