"""Workers: prefill and decode instances, their DP ranks, the engine, the paged KV pool and the UCX data plane."""
