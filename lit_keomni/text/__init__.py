"""Text side of the models: the bilingual tokenizer and its speech-token extension."""
