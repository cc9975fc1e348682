"""The paged KV cache of one DP rank: layout, page pool and allocator, pack/unpack."""
