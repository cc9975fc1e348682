"""The rank process: one per DP rank, started by its instance as `python -m pdmesh.worker.rank
'<RankConfig JSON>'` (`__main__`). It owns the model, the paged KV pool and its end of the data
plane: the rank's state (`rank_state`, `pages`), the prefill and decode servicers
(`prefill_rank`, `decode_rank`, `decode_loop`, `layer_stream`), its KV sender or receiver
(`kv_link`), request checks (`requests`), keeping its rooms registered (`room_keeper`), warm-up
before it reports ready (`warmup`) and the fault hooks tests use (`debug_faults`)."""
