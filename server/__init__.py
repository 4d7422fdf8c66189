"""netswap.server: the gRPC swap service.

Layers, outermost first: cli (flags -> Config) -> app (build_server) ->
interceptors (status table, metrics, auth) -> handlers (protobuf <-> Python) ->
areas (handles, ownership, quotas, validation) -> store (bytes on disk or in memory).
"""
