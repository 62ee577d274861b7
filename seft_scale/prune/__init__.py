"""One-shot pruners. Each scores the weights of a target matrix; `masks.keep_mask` turns scores
into an exact sparsity pattern (per row, per matrix, or N:M)."""
