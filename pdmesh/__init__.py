"""pdmesh: a prefill/decode disaggregation mesh for LLM serving.

This core package holds what every service shares: the error tree (`errors`), gRPC helpers
(`grpcutil`), the DP-rank rules (`rules`), the command line (`cli`) and the generated contracts
(`pdmesh.<area>.v1`, made by `protogen`). The services live in the design card's folders, mapped
into this namespace: `pdmesh.server` (server/), `pdmesh.router` (router/), `pdmesh.worker` (worker/).
"""

__version__ = "0.1.0"
