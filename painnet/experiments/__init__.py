"""Experiment runners: single runs, leave-one-session-out, cross-subject, data size, fine-tuning."""
