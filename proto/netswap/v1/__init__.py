"""Generated code for the netswap.v1 API. Do not edit: see scripts/genproto.sh."""
