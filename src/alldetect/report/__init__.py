"""The evaluation report of an ensemble folder: tables, figures, subject-level results."""
