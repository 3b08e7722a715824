"""`medjax demo`: the paper's pipeline in miniature on the shipped samples."""
