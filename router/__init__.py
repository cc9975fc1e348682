"""The router: picks a prefill and a decode instance per request, assigns rooms, may pin DP ranks."""
