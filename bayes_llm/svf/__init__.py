"""Singular-value fine-tuning (Transformer²): targets, decomposition, z scaling, expert files, blending."""
