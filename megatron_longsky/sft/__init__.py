"""Supervised fine-tuning data: chat formats, chat templates with exact loss masks,
preprocessing into indexed datasets, and the packed training dataset."""
