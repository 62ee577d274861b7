"""seft_scale: repair pruned LLMs with SEFT (sparsity evolution fine-tuning) on one process or
sharded with DeepSpeed ZeRO-3 / PyTorch FSDP2; the layout is in README.md ('Architecture')."""
