"""FFN nodes: stateless holders of expert shards and dense/shared MLP slices that return partial sums."""
