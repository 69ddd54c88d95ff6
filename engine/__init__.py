"""Everything that touches MLX: the worker process and the front-process client that drives it."""
