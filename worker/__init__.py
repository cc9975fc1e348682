"""Workers: prefill and decode instances and their DP ranks. The folder says which process a file
runs in: `instance/` is the instance's own process (controller, dispatch, supervisor, CLI),
`rank/` is a DP rank's process (servicers, decode loop, its KV sender or receiver); what a rank
owns lives beside them: `engine/` (the model), `kv/` (the paged KV pool, pack/unpack kernels),
`transfer/` (the data plane). `config` is shared by both processes."""
