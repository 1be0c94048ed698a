"""Attribution: per-datanet-version infini-gram indexes and the per-token attribution built on them."""
