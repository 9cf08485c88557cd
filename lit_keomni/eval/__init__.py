"""Evaluation shared by every stage: ASR error rates (CER for Mandarin, WER for English)."""
