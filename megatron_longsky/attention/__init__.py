"""Long-context attention: context parallelism and packed documents without Transformer Engine."""
