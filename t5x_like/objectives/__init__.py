"""Training objectives: language-model cross-entropy (lm) and contrastive losses."""
