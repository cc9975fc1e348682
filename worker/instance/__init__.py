"""The instance process: one gRPC endpoint per prefill or decode instance (`pdmesh prefill`,
`pdmesh decode`). It starts and supervises one rank process per DP rank (`supervisor`), picks a
rank for each request (`dispatch`), forwards the call (`controller`, `controller_service`),
publishes the instance at its bootstrap service and can embed one (`instance`), and owns the
command line (`instance_cli`, `prefill_cli`, `decode_cli`). Nothing here touches KV memory."""
